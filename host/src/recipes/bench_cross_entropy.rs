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

use super::bench_kernels::{median_ms, normalised_error, tolerances, KernelBenchResult, KernelBenchSettings};
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
    let (tol_ref, tol_lib) = tolerances(kind);
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
    let max = |v: &[(String, f64)]| v.iter().map(|(_, e)| *e).fold(0.0, f64::max);
    let max_lib = max(&err_lib);
    let max_ref = err_ref.as_deref().map(max);
    let finite = |t: &Tensor| t.isfinite().all().int64_value(&[]) == 1;
    let pass = max_lib <= tol_lib && max_ref.is_none_or(|e| e <= tol_ref) && finite(&loss) && finite(&grad);

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
    let round = |v: f64| (v * 1e4).round() / 1e4;
    Ok(KernelBenchResult {
        kernel: "cross_entropy",
        dtype: if kind == Kind::BFloat16 { "bf16" } else { "fp32" },
        shape: vec![rows, vocab],
        err_vs_reference: err_ref,
        max_err_vs_reference: max_ref,
        tolerance_vs_reference: tol_ref,
        err_vs_libtorch: err_lib,
        max_err_vs_libtorch: max_lib,
        tolerance_vs_libtorch: tol_lib,
        fused_fwd_ms: round(ff),
        libtorch_fwd_ms: round(lf),
        fused_fwd_bwd_ms: round(fb),
        libtorch_fwd_bwd_ms: round(lb),
        speedup_fwd: round(lf / ff.max(1e-9)),
        speedup_fwd_bwd: round(lb / fb.max(1e-9)),
        pass,
    })
}
