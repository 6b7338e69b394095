//! AdamW with fp32 master copies of trainable weights, global-norm gradient clipping and
//! learning-rate schedules, matching `torch.optim.AdamW` and transformers' schedulers.

use tch::{Kind, Tensor};

/// One trainable tensor and its optimizer state.
pub struct Param {
    pub name: String,
    /// The tensor the model computes with (may be bf16).
    pub tensor: Tensor,
    /// fp32 master copy when `tensor` is not fp32.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// False while HFT freezes it.
    pub active: bool,
}

impl Param {
    /// The fp32 value the optimizer updates.
    pub fn value(&self) -> &Tensor {
        self.master.as_ref().unwrap_or(&self.tensor)
    }
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Decoupled-weight-decay Adam (Loshchilov & Hutter), as `torch.optim.AdamW`.
pub struct AdamW {
    pub params: Vec<Param>,
    pub cfg: AdamWConfig,
    /// Optimizer steps taken.
    pub step: i64,
}

impl AdamW {
    /// Takes the model's trainable tensors (they must require grad).
    pub fn new(named: Vec<(String, Tensor)>, cfg: AdamWConfig) -> AdamW {
        let _g = tch::no_grad_guard();
        let params = named
            .into_iter()
            .map(|(name, tensor)| {
                let master = (tensor.kind() != Kind::Float).then(|| tensor.detach().to_kind(Kind::Float));
                let zeros = tensor.detach().to_kind(Kind::Float).zeros_like();
                Param { name, master, exp_avg: zeros.copy(), exp_avg_sq: zeros, active: true, tensor }
            })
            .collect();
        AdamW { params, cfg, step: 0 }
    }

    /// Global L2 norm of the active parameters' gradients (fp32).
    pub fn grad_norm(&self) -> f64 {
        let _g = tch::no_grad_guard();
        let sq: f64 = self
            .params
            .iter()
            .filter(|p| p.active)
            .filter_map(|p| {
                let g = p.tensor.grad();
                g.defined().then(|| g.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float).double_value(&[]))
            })
            .sum();
        sq.sqrt()
    }

    /// One update with learning rate `lr`, gradients first multiplied by `grad_scale`
    /// (the clipping coefficient). Parameters without gradient are left alone.
    pub fn step(&mut self, lr: f64, grad_scale: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bias1 = 1.0 - beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        for p in self.params.iter_mut().filter(|p| p.active) {
            let grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            let mut g = grad.to_kind(Kind::Float);
            if grad_scale != 1.0 {
                g = g * grad_scale;
            }
            let mut value = p.master.as_ref().unwrap_or(&p.tensor).shallow_clone();
            let step_size = lr / bias1;
            // The same operations, in the same order, as torch's single-tensor AdamW.
            let _ = value.g_mul_scalar_(1.0 - lr * weight_decay);
            let _ = p.exp_avg.lerp_(&g, 1.0 - beta1);
            let _ = p.exp_avg_sq.g_mul_scalar_(beta2);
            let _ = p.exp_avg_sq.g_add_(&((&g * (1.0 - beta2)) * &g));
            let denom = p.exp_avg_sq.sqrt() / bias2_sqrt + eps;
            let _ = value.g_add_(&((&p.exp_avg * -step_size) / denom));
            if let Some(m) = &p.master {
                let _ = p.tensor.copy_(&m.to_kind(p.tensor.kind()));
            }
        }
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Optimizer state to checkpoint: moments and master weights, by parameter name.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            out.push((format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone()));
            out.push((format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.shallow_clone()));
            out.push((format!("{}.master", p.name), p.value().shallow_clone()));
        }
        out
    }

    /// Restores what [`AdamW::state`] saved (also the weights, from the fp32 masters).
    pub fn load_state(&mut self, saved: &[(String, Tensor)], step: i64) -> Result<(), String> {
        let _g = tch::no_grad_guard();
        let find = |n: String| {
            saved.iter().find(|(k, _)| *k == n).map(|(_, t)| t).ok_or_else(|| format!("checkpoint lacks {n}"))
        };
        for p in &mut self.params {
            let _ = p.exp_avg.copy_(find(format!("{}.exp_avg", p.name))?);
            let _ = p.exp_avg_sq.copy_(find(format!("{}.exp_avg_sq", p.name))?);
            let master = find(format!("{}.master", p.name))?;
            match &mut p.master {
                Some(m) => {
                    let _ = m.copy_(master);
                }
                None => {}
            }
            let _ = p.tensor.copy_(&master.to_kind(p.tensor.kind()));
        }
        self.step = step;
        Ok(())
    }
}

/// Learning-rate multiplier at 0-based optimizer step `step` of `total`, as transformers'
/// `get_{constant,linear,cosine}_schedule_with_warmup`.
pub fn lr_factor(schedule: &str, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    match schedule {
        "linear" => (1.0 - progress).max(0.0),
        "cosine" => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        _ => 1.0,
    }
}

/// The clipping coefficient `torch.nn.utils.clip_grad_norm_` applies.
pub fn clip_coef(total_norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (total_norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers_by_hand() {
        // warmup 2 of 10: 0, 0.5, then decay over 8 steps.
        assert_eq!(lr_factor("linear", 0, 2, 10), 0.0);
        assert_eq!(lr_factor("linear", 1, 2, 10), 0.5);
        assert_eq!(lr_factor("linear", 2, 2, 10), 1.0);
        assert_eq!(lr_factor("linear", 6, 2, 10), 0.5);
        assert!((lr_factor("cosine", 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((lr_factor("cosine", 4, 2, 10) - (0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()))).abs() < 1e-12);
        assert_eq!(lr_factor("constant", 9, 2, 10), 1.0);
    }

    #[test]
    fn adamw_first_steps_match_the_closed_form() {
        // One scalar parameter, constant gradient g: after step 1 the update is lr * g/|g|
        // (m̂ = g, v̂ = g²), after decay p ← p(1 − lr·wd).
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 0.0, weight_decay: 0.1 });
        (&p * 3.0).sum(Kind::Float).backward();
        opt.step(0.01, 1.0);
        let v = p.double_value(&[0]);
        assert!((v - (1.0 * (1.0 - 0.01 * 0.1) - 0.01)).abs() < 1e-7, "{v}");
    }

    #[test]
    fn clip_coefficient_like_torch() {
        assert_eq!(clip_coef(0.5, 1.0), 1.0);
        assert!((clip_coef(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_coef(100.0, 0.0), 1.0);
    }
}
