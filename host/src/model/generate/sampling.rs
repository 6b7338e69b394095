//! Batched sampling on the device: from logits `[B, vocab]` and each row's settings, the next
//! token ids `[B]` — and, where asked, the chosen token's log-probability and the most likely
//! alternatives — with only those few numbers copied to the host.
//!
//! Every caller samples here: `ftx generate`, `ftx serve`'s scheduler and RL rollouts.
//!
//! Per row, in order: penalties are subtracted from the logits, tokens a constraint forbids
//! are set to −∞, then greedy rows take the argmax; sampled rows divide by the temperature,
//! keep the `top_k` most likely tokens, then the smallest prefix whose probability (over what
//! top-k kept) reaches `top_p`, and draw from what is left with the Gumbel-max trick:
//! `argmax(logit/T + g)` with `g = −ln(−ln u)` is a draw from `softmax(logit/T)` (renormalised
//! over the kept tokens).
//!
//! The noise `u` of token `i` is a counter-based hash (splitmix64) of the row's seed, the
//! step (which new token of the row this is) and `i`, computed with int64 tensor ops, so it is
//! bit-identical on the CPU and CUDA and a row's draw depends only on (seed, step, its logits):
//! not on the other rows of the batch, their order, or what was drawn before.

use tch::{Device, Kind, TchError, Tensor};

/// splitmix64's increment (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const MIX1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX2: u64 = 0x94D0_49BB_1331_11EB;
/// Separates the seeds' stream from the steps' (any odd constant).
const SEED_SALT: u64 = 0x5851_F42D_4C95_7F2D;

/// How one row picks its next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// 0 (or less) is greedy: the argmax.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0 = off).
    pub top_p: f64,
    /// The row's seed.
    pub seed: u64,
    /// Which new token of the row this draw is (0 for the first): with the seed, all the
    /// randomness of the draw.
    pub step: u64,
}

impl Default for RowSampling {
    fn default() -> Self {
        RowSampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 }
    }
}

impl RowSampling {
    /// `opts`' settings for the row's `step`-th new token.
    pub fn new(opts: &super::GenerateOptions, step: usize) -> RowSampling {
        RowSampling { temperature: opts.temperature, top_k: opts.top_k, top_p: opts.top_p, seed: opts.seed, step: step as u64 }
    }

    /// True when the row takes the argmax.
    pub fn greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// True when top-k or top-p cut the distribution.
    fn truncates(&self) -> bool {
        self.top_k > 0 || self.top_p < 1.0
    }
}

/// One row of a batched draw.
#[derive(Debug, Clone, Default)]
pub struct RowRequest {
    pub sampling: RowSampling,
    /// `(token, amount)`: subtracted from that token's logit before anything else (serve's
    /// presence and frequency penalties); tokens past the vocabulary are ignored.
    pub penalties: Vec<(u32, f32)>,
    /// The tokens a constraint allows, as a bitset (token `i` is bit `i % 32` of word `i / 32`,
    /// llguidance's layout); tokens past its end are forbidden. `None`: every token.
    pub allowed: Option<Vec<u32>>,
    /// `Some(n)`: report the chosen token's log-probability and the `n` most likely tokens',
    /// under the raw logits (before penalties, temperature or the constraint).
    pub logprobs: Option<usize>,
}

/// A row's next token.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    pub id: u32,
    /// When asked for: the log-probabilities of the raw logits.
    pub logprobs: Option<Logprobs>,
}

/// The chosen token's log-probability and the most likely tokens with theirs, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// splitmix64's output function.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(MIX1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX2);
    z ^ (z >> 31)
}

/// The hash state of a row's draw at `step`.
fn row_key(seed: u64, step: u64) -> u64 {
    mix64(mix64(seed ^ SEED_SALT).wrapping_add(step.wrapping_mul(GAMMA)))
}

/// The definition of the noise: token `token`'s uniform in (0, 1) for the draw of `seed` at
/// `step` — splitmix64's `token + 1`-th output from the row's key, its top 53 bits centred in
/// their interval. [`uniforms`] computes the same numbers on a device.
pub fn uniform(seed: u64, step: u64, token: u32) -> f64 {
    let z = mix64(row_key(seed, step).wrapping_add((token as u64 + 1).wrapping_mul(GAMMA)));
    ((z >> 11) as f64 + 0.5) * (-53f64).exp2()
}

/// `[rows, vocab]` fp64 uniforms on `device`, row `r` being `(seed, step)`'s noise for every
/// token: bit for bit [`uniform`], computed with int64 tensor ops (which wrap on overflow, as
/// u64 arithmetic does, on the CPU and CUDA alike).
pub fn uniforms(rows: &[(u64, u64)], vocab: i64, device: Device) -> Result<Tensor, TchError> {
    let keys: Vec<i64> = rows.iter().map(|&(seed, step)| row_key(seed, step) as i64).collect();
    let keys = Tensor::f_from_slice(&keys)?.f_to_device(device)?.f_view([-1, 1])?;
    let counters = Tensor::f_arange_start(1, vocab + 1, (Kind::Int64, device))?.f_mul_scalar(GAMMA as i64)?.f_view([1, -1])?;
    let z = mix64_tensor(&keys.f_add(&counters)?)?;
    shift_right(&z, 11)?.f_to_kind(Kind::Double)?.f_add_scalar(0.5)?.f_mul_scalar((-53f64).exp2())
}

/// Logical right shift of int64 values (torch's `>>` is arithmetic: it copies the sign bit).
fn shift_right(z: &Tensor, bits: u32) -> Result<Tensor, TchError> {
    z.f_bitwise_right_shift_tensor_scalar(bits as i64)?.f_bitwise_and((u64::MAX >> bits) as i64)
}

/// [`mix64`] on an int64 tensor.
fn mix64_tensor(z: &Tensor) -> Result<Tensor, TchError> {
    let z = z.f_bitwise_xor_tensor(&shift_right(z, 30)?)?.f_mul_scalar(MIX1 as i64)?;
    let z = z.f_bitwise_xor_tensor(&shift_right(&z, 27)?)?.f_mul_scalar(MIX2 as i64)?;
    z.f_bitwise_xor_tensor(&shift_right(&z, 31)?)
}

/// An index tensor on `device`.
fn index(rows: &[usize], device: Device) -> Result<Tensor, TchError> {
    let v: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::f_from_slice(&v)?.f_to_device(device)
}

/// The next token of every row of `logits` (`[B, vocab]`, any float kind, any device) under
/// `rows[b]`'s settings. Copies to the host only the ids and the log-probabilities asked for,
/// in one transfer.
pub fn sample(logits: &Tensor, rows: &[RowRequest]) -> Result<Vec<Draw>, TchError> {
    let _g = tch::no_grad_guard();
    let size = logits.size();
    if size.len() != 2 || size[0] as usize != rows.len() {
        return Err(TchError::Shape(format!("sampling: logits of shape {size:?} for {} rows", rows.len())));
    }
    let (batch, vocab) = (size[0], size[1]);
    if batch == 0 {
        return Ok(Vec::new());
    }
    let device = logits.device();
    let raw = logits.f_to_kind(Kind::Float)?;
    let x = constrain(&penalise(&raw, rows)?, rows)?;
    let mut ids = x.f_argmax(-1, false)?;
    let sampled: Vec<usize> = (0..rows.len()).filter(|&r| !rows[r].sampling.greedy()).collect();
    if !sampled.is_empty() {
        let at = index(&sampled, device)?;
        let drawn = draw(&x.f_index_select(0, &at)?, &sampled.iter().map(|&r| rows[r].sampling).collect::<Vec<_>>())?;
        ids = ids.f_index_copy(0, &at, &drawn)?;
    }
    // The log-probabilities asked for, of the raw logits.
    let asked: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].logprobs.is_some()).collect();
    let n_top = asked.iter().filter_map(|&r| rows[r].logprobs).max().unwrap_or(0).min(vocab as usize) as i64;
    let mut parts = vec![ids.f_to_kind(Kind::Double)?];
    if !asked.is_empty() {
        let at = index(&asked, device)?;
        let lp = raw.f_index_select(0, &at)?.f_log_softmax(-1, Kind::Float)?;
        let chosen = lp.f_gather(1, &ids.f_index_select(0, &at)?.f_unsqueeze(1)?, false)?;
        parts.push(chosen.f_flatten(0, -1)?.f_to_kind(Kind::Double)?);
        if n_top > 0 {
            let (values, tokens) = lp.f_topk(n_top, -1, true, true)?;
            parts.push(values.f_flatten(0, -1)?.f_to_kind(Kind::Double)?);
            parts.push(tokens.f_flatten(0, -1)?.f_to_kind(Kind::Double)?);
        }
    }
    let host: Vec<f64> = Vec::<f64>::try_from(&Tensor::f_cat(&parts, 0)?.f_to_device(Device::Cpu)?)?;
    let b = batch as usize;
    let (chosen, rest) = host[b..].split_at(asked.len());
    let (top_values, top_tokens) = rest.split_at(rest.len() / 2);
    let mut draws: Vec<Draw> = host[..b].iter().map(|&id| Draw { id: id as u32, logprobs: None }).collect();
    for (k, &r) in asked.iter().enumerate() {
        let n = rows[r].logprobs.unwrap_or(0).min(n_top as usize);
        let at = k * n_top as usize;
        let top = (at..at + n).map(|i| (top_tokens[i] as u32, top_values[i] as f32)).collect();
        draws[r].logprobs = Some(Logprobs { logprob: chosen[k] as f32, top });
    }
    Ok(draws)
}

/// `x` with every row's penalties subtracted (a new tensor: `x` may be the caller's logits).
fn penalise(x: &Tensor, rows: &[RowRequest]) -> Result<Tensor, TchError> {
    let vocab = x.size()[1];
    let (mut at_row, mut at_token, mut amount) = (Vec::new(), Vec::new(), Vec::new());
    for (r, row) in rows.iter().enumerate() {
        for &(t, v) in row.penalties.iter().filter(|(t, _)| i64::from(*t) < vocab) {
            at_row.push(r as i64);
            at_token.push(i64::from(t));
            amount.push(-v);
        }
    }
    if amount.is_empty() {
        return Ok(x.shallow_clone());
    }
    let d = x.device();
    let (r, t) = (Tensor::f_from_slice(&at_row)?.f_to_device(d)?, Tensor::f_from_slice(&at_token)?.f_to_device(d)?);
    x.f_index_put(&[Some(r), Some(t)], &Tensor::f_from_slice(&amount)?.f_to_device(d)?, true)
}

/// `x` with the tokens each row's constraint forbids at −∞; the bitsets travel packed (one bit
/// a token) and are unpacked on the device.
fn constrain(x: &Tensor, rows: &[RowRequest]) -> Result<Tensor, TchError> {
    let masked: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].allowed.is_some()).collect();
    if masked.is_empty() {
        return Ok(x.shallow_clone());
    }
    let (vocab, d) = (x.size()[1], x.device());
    let words = (vocab as usize).div_ceil(32);
    let mut packed = vec![0i32; masked.len() * words];
    for (k, &r) in masked.iter().enumerate() {
        let allowed = rows[r].allowed.as_deref().unwrap_or_default();
        for (dst, &w) in packed[k * words..(k + 1) * words].iter_mut().zip(allowed) {
            *dst = w as i32; // the same 32 bits
        }
    }
    let packed = Tensor::f_from_slice(&packed)?.f_to_device(d)?.f_view([masked.len() as i64, words as i64, 1])?;
    let shifts = Tensor::f_arange(32, (Kind::Int, d))?;
    let allowed = packed.f_bitwise_right_shift(&shifts)?.f_bitwise_and(1)?.f_view([masked.len() as i64, -1])?.f_narrow(1, 0, vocab)?.f_ne(0)?;
    let at = index(&masked, d)?;
    let rows_masked = x.f_index_select(0, &at)?.f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?;
    x.f_index_copy(0, &at, &rows_masked)
}

/// Draws one token per row of `x` (`[S, vocab]` fp32, penalised and constrained) under
/// `settings` (all sampled rows): temperature, top-k, top-p, then the Gumbel-max race.
fn draw(x: &Tensor, settings: &[RowSampling]) -> Result<Tensor, TchError> {
    let (d, vocab) = (x.device(), x.size()[1]);
    let temps: Vec<f32> = settings.iter().map(|s| s.temperature as f32).collect();
    let mut y = x.f_div(&Tensor::f_from_slice(&temps)?.f_to_device(d)?.f_view([-1, 1])?)?;
    if settings.iter().any(RowSampling::truncates) {
        y = truncate(&y, settings)?;
    }
    let keys: Vec<(u64, u64)> = settings.iter().map(|s| (s.seed, s.step)).collect();
    let gumbel = uniforms(&keys, vocab, d)?.f_log()?.f_neg()?.f_log()?.f_neg()?;
    y.f_to_kind(Kind::Double)?.f_add(&gumbel)?.f_argmax(-1, false)
}

/// `y` (`[S, vocab]`, logits over temperature) with what top-k and top-p drop at −∞. As the
/// tokens sorted by descending logit (ties: lower id first): the first `top_k`, then of
/// those (renormalised) the prefix up to and including the token where the cumulative
/// probability reaches `top_p`.
fn truncate(y: &Tensor, settings: &[RowSampling]) -> Result<Tensor, TchError> {
    let (d, vocab) = (y.device(), y.size()[1]);
    let (sorted, order) = y.f_sort_stable(true, -1, true)?;
    let position = Tensor::f_arange(vocab, (Kind::Int64, d))?.f_view([1, -1])?;
    let k: Vec<i64> = settings.iter().map(|s| if s.top_k == 0 { vocab } else { (s.top_k as i64).min(vocab) }).collect();
    let in_top_k = position.f_lt_tensor(&Tensor::f_from_slice(&k)?.f_to_device(d)?.f_view([-1, 1])?)?;
    let probs = sorted.f_masked_fill(&in_top_k.f_logical_not()?, f64::NEG_INFINITY)?.f_softmax(-1, Kind::Double)?;
    let before = probs.f_cumsum(-1, Kind::Double)?.f_sub(&probs)?;
    let p: Vec<f64> = settings.iter().map(|s| if s.top_p < 1.0 { s.top_p } else { f64::INFINITY }).collect();
    let in_top_p = before.f_lt_tensor(&Tensor::f_from_slice(&p)?.f_to_device(d)?.f_view([-1, 1])?)?.f_logical_or(&position.f_eq(0)?)?;
    let keep_sorted = in_top_k.f_logical_and(&in_top_p)?;
    let keep = keep_sorted.f_zeros_like()?.f_scatter(-1, &order, &keep_sorted)?;
    y.f_masked_fill(&keep.f_logical_not()?, f64::NEG_INFINITY)
}
