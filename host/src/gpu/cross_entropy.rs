//! The fused cross-entropy kernel of `ftx-kernels` on tch tensors: the loss of each row of a
//! chunk of LM-head logits and, in the same kernel, its gradient (over the logits, in place, or
//! into another tensor). The chunked head loss (train/head_loss.rs) runs it on each chunk under
//! `no_grad` and pushes the gradient through the head's GEMMs itself, so it needs no autograd
//! node and goes through the kernel table from Rust directly, on libtorch's current stream.

use super::kernels;
use ftx_kernels::{CrossEntropyArgs, Dtype, KernelError, Launch};
use tch::{Device, Kind, Tensor};

/// Where the kernel writes the gradient `(softmax − onehot) · scale`.
pub enum CeGradient<'a> {
    /// The loss alone.
    None,
    /// Over the logits themselves (no second `[rows, V]` buffer).
    InPlace,
    /// Into this tensor, of the logits' shape and type, its last dimension contiguous.
    Into(&'a Tensor),
}

/// The target that marks a row without one (its loss and gradient are zero).
pub const IGNORE_INDEX: i64 = -100;

/// Whether the chunk `logits` (`[rows, V]`, float32 or bf16, its last dimension contiguous)
/// takes the fused kernel: the fused kernels are on and loaded for its device (see
/// [`kernels::active_for`]: CUDA, or the CPU reference versions inside
/// [`kernels::with_cpu_reference`]).
pub fn fits(logits: &Tensor) -> bool {
    logits.dim() == 2 && logits.stride()[1] == 1 && kernels::active_for(logits)
}

fn unsupported(why: impl Into<String>) -> KernelError {
    KernelError::Unsupported { kernel: "cross_entropy", why: why.into() }
}

/// Cross-entropy of each row of `logits` (`[rows, V]`) against `targets` (`[rows]`, integers,
/// [`IGNORE_INDEX`] for none) as transformers computes it (float32 softmax of the upcast
/// logits; with `softcap` c, of `c·tanh(logits/c)`): returns the float32 loss per row
/// (`logsumexp − logit of the target`), and writes the gradient of `scale · Σ loss` where
/// `gradient` says. Runs on the logits' device (CUDA, or the CPU reference versions).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, softcap: Option<f64>, scale: f64, gradient: CeGradient) -> Result<Tensor, KernelError> {
    let dtype = match logits.kind() {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::Bf16,
        k => return Err(unsupported(format!("logits of type {k:?} (float32 or bf16 only)"))),
    };
    let &[rows, vocab] = logits.size().as_slice() else {
        return Err(unsupported(format!("logits of shape {:?}, not [rows, vocab]", logits.size())));
    };
    if logits.stride()[1] != 1 {
        return Err(unsupported("the logits' last dimension is not contiguous"));
    }
    if targets.size() != [rows] || targets.device() != logits.device() {
        return Err(unsupported(format!("targets of shape {:?} on {:?} for {rows} rows on {:?}", targets.size(), targets.device(), logits.device())));
    }
    // A single row's stride is arbitrary in libtorch; the kernel reads row 0 only.
    let row_stride = |t: &Tensor| if rows <= 1 { vocab } else { t.stride()[0] };
    let targets = targets.to_kind(Kind::Int64).contiguous();
    let loss = Tensor::empty([rows], (Kind::Float, logits.device()));
    let (grad, grad_stride) = match gradient {
        CeGradient::None => (std::ptr::null_mut(), 0),
        CeGradient::InPlace => (logits.data_ptr(), row_stride(logits)),
        CeGradient::Into(g) => {
            if g.size() != logits.size() || g.kind() != logits.kind() || g.device() != logits.device() || g.stride()[1] != 1 {
                return Err(unsupported("the gradient tensor does not match the logits' shape, type and device"));
            }
            (g.data_ptr(), row_stride(g))
        }
    };
    let (device, stream) = match logits.device() {
        Device::Cuda(i) => (i as i32, kernels::current_stream(i)),
        _ => (-1, std::ptr::null_mut()),
    };
    let launch = Launch { device, dtype: dtype as i32, stream };
    let args = CrossEntropyArgs {
        logits: logits.data_ptr(),
        logits_stride: row_stride(logits),
        targets: targets.data_ptr() as *const i64,
        loss: loss.data_ptr() as *mut f32,
        grad,
        grad_stride,
        rows,
        vocab,
        ignore_index: IGNORE_INDEX,
        scale: scale as f32,
        softcap: softcap.unwrap_or(0.0) as f32,
    };
    // SAFETY: every pointer is a live tensor of the shape the block names, on the launch's
    // device; the CUDA kernel runs on libtorch's current stream, where later uses of these
    // tensors are ordered after it.
    // The step ledger counts the launch as one kernel of these reads and writes.
    let written = match &gradient {
        CeGradient::None => None,
        CeGradient::InPlace => Some(logits),
        CeGradient::Into(g) => Some(*g),
    };
    let _ledger = super::ledger::kernel("ftx::kernel::cross_entropy", &[logits, &targets], &[&loss].into_iter().chain(written).collect::<Vec<_>>());
    unsafe { ftx_kernels::dispatch::cross_entropy(&launch, &args) }?;
    Ok(loss)
}
