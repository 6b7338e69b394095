//! The fused cross-entropy kernel in `ftx bench kernels`: one chunk of LM-head logits as the
//! chunked head loss makes it (`CHUNK_ELEMS / V` rows: 523 × 128256 for the Llama 3 vocabulary),
//! checked and timed like the other kernels.
//!
//! - Checked, loss per row and gradient, against libtorch's autograd of `cross_entropy` on the
//!   float32-upcast logits (rows with target −100 included), and on a CUDA device against the
//!   kernel's CPU reference, plain and soft-capped (`c = 30`, Gemma 2's final cap) — the
//!   gradient written in place over the logits, as the head loss runs it.
//! - Timed against the libtorch composite the head loss runs without the kernel
//!   ([`composite_chunk`]): "fwd" the loss alone, "fwd_bwd" the loss and the gradient.

use super::bench_kernels::{median_ms, normalised_error, KernelBenchResult, KernelBenchSettings, KernelTimes};
use crate::gpu::cross_entropy::{cross_entropy, CeGradient, IGNORE_INDEX};
use crate::train::head_loss::{composite_chunk, CHUNK_ELEMS};
use anyhow::Result;
use tch::{Device, Kind, Reduction, Tensor};

/// Gemma 2's final logit soft-cap, the one family that caps.
const SOFTCAP: f64 = 30.0;

/// Loss per row and gradient through the kernel, the gradient over a copy of `z` (in place).
fn fused(z: &Tensor, targets: &Tensor, cap: Option<f64>) -> Result<(Tensor, Tensor)> {
    let g = z.copy();
    let loss = cross_entropy(&g, targets, cap, 1.0, CeGradient::InPlace)?;
    Ok((loss, g))
}

/// Loss per row and gradient by libtorch's autograd of `cross_entropy` (float32 logits; rows
/// with the ignore index give zero), the gradient rounded once to `z`'s type.
pub fn autograd_reference(z: &Tensor, targets: &Tensor, cap: Option<f64>) -> (Tensor, Tensor) {
    tch::with_grad(|| {
        let zf = z.to_kind(Kind::Float).detach().set_requires_grad(true);
        let x = match cap {
            Some(c) => (&zf / c).tanh() * c,
            None => zf.shallow_clone(),
        };
        let loss = x.cross_entropy_loss::<Tensor>(targets, None, Reduction::None, IGNORE_INDEX, 0.0);
        loss.sum(Kind::Float).backward();
        (loss.detach(), zf.grad().to_kind(z.kind()))
    })
}

/// The kernel at `s`'s shape in `kind`: one JSON line of `ftx bench kernels`.
pub fn bench_cross_entropy(s: &KernelBenchSettings, kind: Kind) -> Result<KernelBenchResult> {
    let vocab = s.shape.vocab as i64;
    let rows = (CHUNK_ELEMS / vocab).clamp(1, (s.batch * s.seq).max(1));
    tch::manual_seed(8);
    // Logits of a trained head's spread; every fifth row without a target.
    let z_cpu = (Tensor::randn([rows, vocab], (Kind::Float, Device::Cpu)) * 3.0).to_kind(kind);
    let targets_cpu = Tensor::randint(vocab, [rows], (Kind::Int64, Device::Cpu));
    let _ = targets_cpu.slice(0, 0, rows, 5).fill_(IGNORE_INDEX);
    let (z, targets) = (z_cpu.to_device(s.device), targets_cpu.to_device(s.device));

    let (loss, grad) = fused(&z, &targets, None)?;
    let (lib_loss, lib_grad) = autograd_reference(&z, &targets, None);
    let err_lib = vec![("loss".to_string(), normalised_error(&loss, &lib_loss)), ("grad".to_string(), normalised_error(&grad, &lib_grad))];
    let err_ref = if s.device.is_cuda() {
        let mut errs = Vec::new();
        for (label, cap) in [("", None), ("_softcap", Some(SOFTCAP))] {
            let (l, g) = if cap.is_none() { (loss.shallow_clone(), grad.shallow_clone()) } else { fused(&z, &targets, cap)? };
            let (rl, rg) = fused(&z_cpu, &targets_cpu, cap)?;
            errs.push((format!("loss{label}"), normalised_error(&l, &rl)));
            errs.push((format!("grad{label}"), normalised_error(&g, &rg)));
        }
        Some(errs)
    } else {
        None
    };
    let finite = [&loss, &grad].iter().all(|t| t.isfinite().all().int64_value(&[]) == 1);

    // Timed as the head loss runs each chunk; targets all valid there.
    let valid = targets.clamp_min(0);
    let valid_col = valid.unsqueeze(1);
    let out = z.empty_like();
    let mut failed = None;
    let mut run_fused = |with_grad: bool| {
        let gradient = if with_grad { CeGradient::Into(&out) } else { CeGradient::None };
        if let Err(e) = cross_entropy(&z, &valid, None, 1.0, gradient) {
            failed = Some(e);
        }
    };
    let ff = median_ms(s.device, s.iters, &mut || run_fused(false))?;
    let fb = median_ms(s.device, s.iters, &mut || run_fused(true))?;
    if let Some(e) = failed {
        anyhow::bail!("timing the fused cross-entropy: {e}");
    }
    let run_composite = |with_grad: bool| {
        let mut total = Tensor::zeros([], (Kind::Float, s.device));
        let _ = composite_chunk(z.shallow_clone(), &valid_col, None, with_grad, &mut total);
    };
    let lf = median_ms(s.device, s.iters, &mut || run_composite(false))?;
    let lb = median_ms(s.device, s.iters, &mut || run_composite(true))?;
    let t = KernelTimes { fused_fwd: ff, libtorch_fwd: lf, fused_fwd_bwd: fb, libtorch_fwd_bwd: lb };
    Ok(KernelBenchResult::new("cross_entropy", kind, vec![rows, vocab], err_ref, err_lib, finite, t))
}
