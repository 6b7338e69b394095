//! Advantages for RL from rewards: GRPO's group-normalised rewards, PPO's generalised
//! advantage estimation (GAE), whitening, and the KL controllers of PPO's reward penalty.

/// GRPO (Shao et al., 2024): each completion's advantage is its reward minus the mean reward
/// of its group (the completions of the same prompt), divided by the group's standard
/// deviation plus 1e-4 when `scale` (TRL's default; the deviation is the unbiased one, as
/// `torch.std`). `rewards` holds consecutive groups of `group` completions.
pub fn group_advantages(rewards: &[f64], group: usize, scale: bool) -> Vec<f64> {
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group.max(1)) {
        let n = g.len() as f64;
        let mean = g.iter().sum::<f64>() / n;
        let var = if g.len() > 1 { g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        let denom = if scale { var.sqrt() + 1e-4 } else { 1.0 };
        out.extend(g.iter().map(|r| (r - mean) / denom));
    }
    out
}

/// GAE (Schulman et al., 2016) over one sequence of per-token `rewards` and `values`:
/// `δ_t = r_t + γ·V_{t+1} − V_t` (with `V_T = 0` after the last token),
/// `A_t = δ_t + γλ·A_{t+1}`; returns `(advantages, returns = A + V)`.
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_adv = 0.0;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        next_adv = delta + gamma * lam * next_adv;
        adv[t] = next_adv;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// PPO's per-token rewards of one completion (as TRL's PPOTrainer): `−kl_coef · (log π − log
/// π_ref)` at every token, plus the sequence's score at the last token.
pub fn token_rewards(logps: &[f64], ref_logps: &[f64], score: f64, kl_coef: f64) -> Vec<f64> {
    let mut r: Vec<f64> = logps.iter().zip(ref_logps).map(|(p, q)| -kl_coef * (p - q)).collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Shifts and scales `xs` to mean 0 and variance 1 (the biased variance, plus 1e-8).
pub fn whiten(xs: &mut [f64]) {
    if xs.is_empty() {
        return;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let s = (var + 1e-8).sqrt();
    xs.iter_mut().for_each(|x| *x = (*x - mean) / s);
}

/// The weight of PPO's KL penalty: fixed, or adapted towards a target KL (Ziegler et al.,
/// 2019, as TRL's `AdaptiveKLController`).
#[derive(Debug, Clone, PartialEq)]
pub struct KlController {
    /// The current coefficient.
    pub value: f64,
    /// Target KL per sequence; `None` keeps `value` fixed.
    pub target: Option<f64>,
    /// Steps over which a full correction is made.
    pub horizon: f64,
}

impl KlController {
    /// After a rollout of `n_steps` samples whose mean sequence KL was `kl`:
    /// `e = clip(kl / target − 1, −0.2, 0.2)`, `value *= 1 + e · n_steps / horizon`.
    pub fn update(&mut self, kl: f64, n_steps: usize) {
        if let Some(target) = self.target {
            let e = (kl / target - 1.0).clamp(-0.2, 0.2);
            self.value *= 1.0 + e * n_steps as f64 / self.horizon;
        }
    }
}
