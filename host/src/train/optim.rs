//! AdamW with fp32 master copies of trainable weights, global-norm gradient clipping and
//! learning-rate schedules, matching `torch.optim.AdamW` and transformers' schedulers.

use super::adamw8bit::{Moments8bit, MIN_8BIT_SIZE};
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
    /// The moments in 8 bits instead (`train.optimizer = "adamw-8bit"`); `exp_avg` and
    /// `exp_avg_sq` are then empty.
    moments_8bit: Option<Box<Moments8bit>>,
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
///
/// When every trainable tensor shares one dtype and device, their values, fp32 masters,
/// moments and (from the first step on) gradients are views into a few flat buffers, so a
/// step is a handful of kernels in total instead of a dozen per tensor — hundreds of LoRA
/// tensors otherwise leave the GPU idle while their tiny kernels are launched.
pub struct AdamW {
    pub params: Vec<Param>,
    pub cfg: AdamWConfig,
    /// Optimizer steps taken.
    pub step: i64,
    flat: Option<Flat>,
}

/// The flat buffers every parameter's tensors are views into.
struct Flat {
    /// The model's values, in the compute dtype.
    values: Tensor,
    /// fp32 masters when the compute dtype is not fp32.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Gradients, in the compute dtype; installed at the first step where every tensor has one.
    grads: Option<Tensor>,
}

/// Elements per pass of the flat update (keeps its fp32 temporaries to a few hundred MiB).
const FLAT_CHUNK: i64 = 1 << 26;

impl AdamW {
    /// Takes the model's trainable tensors (they must require grad).
    pub fn new(named: Vec<(String, Tensor)>, cfg: AdamWConfig) -> AdamW {
        let _g = tch::no_grad_guard();
        let same = named.windows(2).all(|w| w[0].1.kind() == w[1].1.kind() && w[0].1.device() == w[1].1.device());
        if same && !named.is_empty() {
            return Self::new_flat(named, cfg);
        }
        let params = named
            .into_iter()
            .map(|(name, tensor)| {
                let master = (tensor.kind() != Kind::Float).then(|| tensor.detach().to_kind(Kind::Float));
                let zeros = tensor.detach().to_kind(Kind::Float).zeros_like();
                Param { name, master, exp_avg: zeros.copy(), exp_avg_sq: zeros, moments_8bit: None, active: true, tensor }
            })
            .collect();
        AdamW { params, cfg, step: 0, flat: None }
    }

    /// AdamW whose moments are stored in 8 bits, as bitsandbytes' `AdamW8bit` (see
    /// [`super::adamw8bit`]): tensors of at least 4096 values keep one byte per moment value
    /// and an fp32 scale per 256; smaller ones keep fp32 moments.
    pub fn new_8bit(named: Vec<(String, Tensor)>, cfg: AdamWConfig) -> AdamW {
        let _g = tch::no_grad_guard();
        let params = named
            .into_iter()
            .map(|(name, tensor)| {
                let master = (tensor.kind() != Kind::Float).then(|| tensor.detach().to_kind(Kind::Float));
                let n = tensor.numel() as i64;
                let (exp_avg, exp_avg_sq, moments_8bit) = if n >= MIN_8BIT_SIZE {
                    let empty = Tensor::zeros([0], (Kind::Float, tensor.device()));
                    (empty.copy(), empty, Some(Box::new(Moments8bit::new(&tensor.size(), tensor.device()))))
                } else {
                    let zeros = tensor.detach().to_kind(Kind::Float).zeros_like();
                    (zeros.copy(), zeros, None)
                };
                Param { name, master, exp_avg, exp_avg_sq, moments_8bit, active: true, tensor }
            })
            .collect();
        AdamW { params, cfg, step: 0, flat: None }
    }

    /// The optimizer `train.optimizer` names (`adamw` or `adamw-8bit`), with `[train]`'s
    /// betas, eps and weight decay.
    pub fn for_train(named: Vec<(String, Tensor)>, t: &super::config::TrainSection) -> AdamW {
        let cfg = AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay };
        match t.optimizer.as_str() {
            "adamw-8bit" => Self::new_8bit(named, cfg),
            _ => Self::new(named, cfg),
        }
    }

    fn new_flat(named: Vec<(String, Tensor)>, cfg: AdamWConfig) -> AdamW {
        let (kind, device) = (named[0].1.kind(), named[0].1.device());
        let total: i64 = named.iter().map(|(_, t)| t.numel() as i64).sum();
        let values = Tensor::empty([total], (kind, device));
        let master = (kind != Kind::Float).then(|| Tensor::empty([total], (Kind::Float, device)));
        let exp_avg = Tensor::zeros([total], (Kind::Float, device));
        let exp_avg_sq = Tensor::zeros([total], (Kind::Float, device));
        let mut offset = 0;
        let params = named
            .into_iter()
            .map(|(name, mut tensor)| {
                let (n, shape) = (tensor.numel() as i64, tensor.size());
                let view = |flat: &Tensor| flat.narrow(0, offset, n).view(shape.as_slice());
                let value = view(&values);
                let _ = value.shallow_clone().copy_(&tensor);
                // The model keeps its handle; its data now lives in the flat buffer.
                tensor.set_data(&value);
                let param_master = master.as_ref().map(|m| {
                    let mut v = view(m);
                    let _ = v.copy_(&tensor);
                    v
                });
                let p = Param { name, master: param_master, exp_avg: view(&exp_avg), exp_avg_sq: view(&exp_avg_sq), moments_8bit: None, active: true, tensor };
                offset += n;
                p
            })
            .collect();
        AdamW { params, cfg, step: 0, flat: Some(Flat { values, master, exp_avg, exp_avg_sq, grads: None }) }
    }

    /// The flat buffers when this step can use them: every parameter active and with a
    /// gradient. The first time, the gradients move into one flat buffer (autograd then
    /// accumulates into those views in place).
    fn flat_ready(&mut self) -> Option<&Flat> {
        let flat = self.flat.as_mut()?;
        if flat.grads.is_none() {
            if !self.params.iter().all(|p| p.active && p.tensor.grad().defined()) {
                return None;
            }
            let grads = flat.values.zeros_like();
            let mut offset = 0;
            for p in &self.params {
                let mut g = p.tensor.grad();
                let n = g.numel() as i64;
                let view = grads.narrow(0, offset, n).view(g.size().as_slice());
                let _ = view.shallow_clone().copy_(&g);
                g.set_data(&view);
                offset += n;
            }
            flat.grads = Some(grads);
        }
        if !self.params.iter().all(|p| p.active) {
            return None;
        }
        self.flat.as_ref()
    }

    /// Global L2 norm of the active parameters' gradients (fp32).
    pub fn grad_norm(&mut self) -> f64 {
        let _g = tch::no_grad_guard();
        let sq = |g: &Tensor| g.to_kind(Kind::Float).square().sum(Kind::Float);
        let total = match self.flat_ready() {
            Some(flat) => chunks(flat.values.numel() as i64).map(|(o, n)| sq(&flat.grads.as_ref().expect("ready").narrow(0, o, n))).reduce(|a, b| a + b),
            None => self.params.iter().filter(|p| p.active).map(|p| p.tensor.grad()).filter(|g| g.defined()).map(|g| sq(&g)).reduce(|a, b| a + b),
        };
        // One device sync for the whole norm.
        total.map_or(0.0, |t| t.double_value(&[]).sqrt())
    }

    /// One update with learning rate `lr`, gradients first multiplied by `grad_scale`
    /// (the clipping coefficient). Parameters without gradient are left alone.
    pub fn step(&mut self, lr: f64, grad_scale: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let bias1 = 1.0 - self.cfg.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - self.cfg.beta2.powi(self.step as i32)).sqrt();
        let (cfg, step) = (self.cfg, self.step);
        if let Some(flat) = self.flat_ready() {
            let grads = flat.grads.as_ref().expect("ready");
            for (o, n) in chunks(flat.values.numel() as i64) {
                let part = |t: &Tensor| t.narrow(0, o, n);
                let mut values = part(&flat.values);
                let mut value = flat.master.as_ref().map_or_else(|| values.shallow_clone(), part);
                flat_update(&mut value, &mut part(&flat.exp_avg), &mut part(&flat.exp_avg_sq), &part(grads), grad_scale, lr, step, &cfg);
                if flat.master.is_some() {
                    let _ = values.copy_(&value);
                }
            }
            return;
        }
        for p in self.params.iter_mut().filter(|p| p.active) {
            let grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            let mut value = p.master.as_ref().unwrap_or(&p.tensor).shallow_clone();
            match &mut p.moments_8bit {
                Some(m) => {
                    let g = if grad_scale != 1.0 { &grad * grad_scale } else { grad.shallow_clone() };
                    m.step(&mut value, &g, lr, step, (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay))
                }
                None => adamw_update(&mut value, &mut p.exp_avg, &mut p.exp_avg_sq, &grad, grad_scale, lr, bias1, bias2_sqrt, &cfg),
            }
            if let Some(m) = &p.master {
                let _ = p.tensor.copy_(m);
            }
        }
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        if let Some(mut g) = self.flat.as_ref().and_then(|f| f.grads.as_ref()).map(Tensor::shallow_clone) {
            let _ = g.zero_();
            return;
        }
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
            match &p.moments_8bit {
                Some(m) => out.extend(m.state().into_iter().map(|(k, t)| (format!("{}.{k}", p.name), t))),
                None => {
                    out.push((format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone()));
                    out.push((format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.shallow_clone()));
                }
            }
            out.push((format!("{}.master", p.name), p.value().shallow_clone()));
        }
        out
    }

    /// Restores what [`AdamW::state`] saved (also the weights, from the fp32 masters).
    pub fn load_state(&mut self, saved: &[(String, Tensor)], step: i64) -> Result<(), String> {
        let _g = tch::no_grad_guard();
        let find = |n: String| {
            saved.iter().find(|(k, _)| *k == n).map(|(_, t)| t).ok_or_else(|| {
                let stacked = n.contains(&format!(".experts.{}.", crate::peft::stacked::ALL_EXPERTS));
                let hint = if stacked {
                    " (MoE expert adapters are trained stacked; a checkpoint of per-expert ones converts only when each expert's 8-bit state is whole blocks: \
                     continue from its adapter folder with model.adapter instead)"
                } else {
                    ""
                };
                format!("checkpoint lacks {n}{hint}")
            })
        };
        for p in &mut self.params {
            match &p.moments_8bit {
                Some(m) => {
                    for (k, mut t) in m.state() {
                        let _ = t.copy_(find(format!("{}.{k}", p.name))?);
                    }
                }
                None => {
                    let _ = p.exp_avg.copy_(find(format!("{}.exp_avg", p.name))?);
                    let _ = p.exp_avg_sq.copy_(find(format!("{}.exp_avg_sq", p.name))?);
                }
            }
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

/// One AdamW update of `value` (fp32) from `grad`: the same operations, in the same order,
/// as torch's single-tensor AdamW.
#[allow(clippy::too_many_arguments)]
fn adamw_update(value: &mut Tensor, exp_avg: &mut Tensor, exp_avg_sq: &mut Tensor, grad: &Tensor, grad_scale: f64, lr: f64, bias1: f64, bias2_sqrt: f64, cfg: &AdamWConfig) {
    let mut g = grad.to_kind(Kind::Float);
    if grad_scale != 1.0 {
        g = g * grad_scale;
    }
    let step_size = lr / bias1;
    let _ = value.g_mul_scalar_(1.0 - lr * cfg.weight_decay);
    let _ = exp_avg.lerp_(&g, 1.0 - cfg.beta1);
    let _ = exp_avg_sq.g_mul_scalar_(cfg.beta2);
    let _ = exp_avg_sq.g_add_(&((&g * (1.0 - cfg.beta2)) * &g));
    let denom = exp_avg_sq.sqrt() / bias2_sqrt + cfg.eps;
    let _ = value.g_add_(&((&*exp_avg * -step_size) / denom));
}

/// One AdamW update of a slice of the flat buffers: libtorch's fused kernel through the C++
/// shim (fused_adamw.cpp) where it is built, else [`adamw_update`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn flat_update(value: &mut Tensor, exp_avg: &mut Tensor, exp_avg_sq: &mut Tensor, grad: &Tensor, grad_scale: f64, lr: f64, step: i64, cfg: &AdamWConfig) {
    #[cfg(ftx_torch_shim)]
    {
        fused::adamw(value, exp_avg, exp_avg_sq, grad, grad_scale, lr, step, cfg);
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let bias1 = 1.0 - cfg.beta1.powi(step as i32);
        let bias2_sqrt = (1.0 - cfg.beta2.powi(step as i32)).sqrt();
        adamw_update(value, exp_avg, exp_avg_sq, grad, grad_scale, lr, bias1, bias2_sqrt, cfg);
    }
}

#[cfg(ftx_torch_shim)]
mod fused {
    use super::AdamWConfig;
    use std::ffi::{c_char, c_void, CStr};
    use tch::Tensor;

    extern "C" {
        fn ftx_fused_adamw(
            value: *mut c_void,
            grad: *const c_void,
            exp_avg: *mut c_void,
            exp_avg_sq: *mut c_void,
            grad_scale: f64,
            lr: f64,
            beta1: f64,
            beta2: f64,
            eps: f64,
            weight_decay: f64,
            step: i64,
            err: *mut c_char,
            err_len: i32,
        ) -> i32;
    }

    /// `value` (fp32) updated in place at 1-based optimizer step `step`.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(value: &mut Tensor, exp_avg: &mut Tensor, exp_avg_sq: &mut Tensor, grad: &Tensor, grad_scale: f64, lr: f64, step: i64, cfg: &AdamWConfig) {
        let mut err = [0 as c_char; 512];
        // SAFETY: live tch tensors (at::Tensor*), updated in place; nothing is handed back.
        let rc = unsafe {
            ftx_fused_adamw(
                value.as_mut_ptr() as *mut c_void,
                grad.as_ptr() as *const c_void,
                exp_avg.as_mut_ptr() as *mut c_void,
                exp_avg_sq.as_mut_ptr() as *mut c_void,
                grad_scale,
                lr,
                cfg.beta1,
                cfg.beta2,
                cfg.eps,
                cfg.weight_decay,
                step,
                err.as_mut_ptr(),
                err.len() as i32,
            )
        };
        if rc != 0 {
            // Only a dtype or device mismatch among the flat buffers gets here: a bug, as a
            // failing tensor op panics in tch.
            panic!("fused AdamW: {}", unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy());
        }
    }
}

/// `(offset, len)` pieces of a flat buffer of `total` elements.
fn chunks(total: i64) -> impl Iterator<Item = (i64, i64)> {
    (0..total).step_by(FLAT_CHUNK as usize).map(move |o| (o, FLAT_CHUNK.min(total - o)))
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
