//! ftx compute kernels.
//!
//! - [`nf4`]: the quantisation code books shared by every NF4 path (QLoRA storage, export),
//!   written to match bitsandbytes value for value.
//! - Fused elementwise kernels of the decoder layer — RMSNorm with the residual add, rotary
//!   embedding of q and k, SwiGLU — each way (forward and backward), as CUDA C compiled at run
//!   time by NVRTC ([`cuda`], source `src/cuda/fused.cu`) and as CPU reference versions
//!   ([`reference`]) that do the same arithmetic (float32 accumulation, one rounding per stored
//!   element).
//! - A fused cross-entropy of the LM head's logits ([`CrossEntropyArgs`]): the loss per row and
//!   its gradient, in place over the logits, in one kernel (`src/cuda/cross_entropy.cu`).
//! - The rowwise e4m3 quantisation of the frozen base's FP8 GEMMs ([`Fp8QuantizeRows`]): one
//!   read of the operand, one byte written per element (`src/cuda/fp8.cu`, sm_89 and newer).
//!
//! Both take the same `#[repr(C)]` argument blocks ([`RmsNormForward`], …) of raw pointers, so
//! that the C++ autograd nodes of the host (host/src/gpu/kernels.cpp) can call them through a
//! table of `extern "C"` functions ([`dispatch`]): device pointers and a CUDA stream go to the
//! CUDA kernels, host pointers to the references. This crate knows nothing of libtorch.

pub mod cuda;
pub mod dispatch;
pub mod nf4;
pub mod reference;

use std::ffi::c_void;

/// Element type of a kernel's tensors (float32 accumulation inside, either way).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32 = 0,
    Bf16 = 1,
}

impl Dtype {
    /// From the C side's code (0 float32, 1 bfloat16).
    pub fn from_code(code: i32) -> Option<Dtype> {
        match code {
            0 => Some(Dtype::F32),
            1 => Some(Dtype::Bf16),
            _ => None,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
    /// Elements per 16-byte vector load, the unit every CUDA kernel here reads in.
    pub fn vector(self) -> usize {
        16 / self.size()
    }
}

/// Where a kernel runs: `device` −1 is the CPU (the reference versions), N ≥ 0 CUDA device N
/// on `stream` (a `cudaStream_t`; null is the legacy default stream).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Launch {
    pub device: i32,
    /// A [`Dtype`] code.
    pub dtype: i32,
    pub stream: *mut c_void,
}

/// RMSNorm with the residual add, forward, over `rows` rows of width `n` (all contiguous):
/// `sum = x + residual` (when `residual` is not null), `rstd = 1/√(mean(sum²) + eps)`,
/// `y = sum · rstd · (weight + offset)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RmsNormForward {
    pub x: *const c_void,
    /// Null: no residual add (`sum` is `x`, and `sum` is not written).
    pub residual: *const c_void,
    pub weight: *const c_void,
    /// `[rows, n]`, written when `residual` is given.
    pub sum: *mut c_void,
    pub y: *mut c_void,
    /// `[rows]` float32, kept for backward.
    pub rstd: *mut f32,
    pub rows: i64,
    pub n: i64,
    pub eps: f32,
    /// Added to the weight (1 for Gemma's `1 + w` norms, else 0).
    pub offset: f32,
}

/// RMSNorm (with the residual add) backward: `dx = rstd · (g − n̂ · mean(g · n̂)) + dsum` with
/// `n̂ = sum · rstd`, `g = dy · (weight + offset)`; the gradient of `x` and of the residual
/// alike. With `dw`, also `dw = Σ_rows dy · n̂`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RmsNormBackward {
    /// The forward's `sum` (or its `x` when there was no residual).
    pub sum: *const c_void,
    pub weight: *const c_void,
    pub rstd: *const f32,
    pub dy: *const c_void,
    /// The gradient reaching `sum` directly (the residual stream), or null.
    pub dsum: *const c_void,
    pub dx: *mut c_void,
    /// `[n]`, or null when the weight needs no gradient.
    pub dw: *mut c_void,
    /// `[blocks, n]` float32 scratch for the per-block sums of `dw` (CUDA; null without `dw`).
    pub workspace: *mut f32,
    /// Row blocks of the CUDA kernel (the workspace's rows).
    pub blocks: i64,
    pub rows: i64,
    pub n: i64,
    pub offset: f32,
}

/// Rotary embedding of q (and k) for `batch × tokens` positions: inputs `[B, T, heads,
/// head_dim]` with element strides for B, T and heads (the last dimension contiguous),
/// outputs contiguous in that shape; `cos`/`sin` `[B, T, rot]` with strides `(b, t)`. The first
/// `rot` dimensions of each head rotate as `x·cos + rotate_half(x)·sin`, the rest are copied.
/// `inverse`: the transposed rotation (the backward, applied to the output's gradient).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RopeArgs {
    pub q: *const c_void,
    pub q_strides: [i64; 3],
    /// Null: q alone.
    pub k: *const c_void,
    pub k_strides: [i64; 3],
    pub q_out: *mut c_void,
    pub k_out: *mut c_void,
    pub cos: *const c_void,
    pub sin: *const c_void,
    pub cos_strides: [i64; 2],
    pub batch: i64,
    pub tokens: i64,
    pub q_heads: i32,
    pub k_heads: i32,
    pub head_dim: i32,
    pub rot: i32,
    pub inverse: i32,
}

/// SwiGLU on the fused gate/up output `gu = [g | u]` (`[rows, 2·inner]`, row stride
/// `gu_stride` elements). Forward (`dh` null): `out = silu(g) · u`, `[rows, inner]`. Backward:
/// `out = [dh · u · silu'(g) | dh · silu(g)]`, `[rows, 2·inner]`, from `dh` (`[rows, inner]`,
/// row stride `dh_stride`). Outputs contiguous.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SwigluArgs {
    pub gu: *const c_void,
    pub gu_stride: i64,
    pub dh: *const c_void,
    pub dh_stride: i64,
    pub out: *mut c_void,
    pub rows: i64,
    pub inner: i64,
}

/// Cross-entropy of `rows` rows of logits `[rows, vocab]` (row stride `logits_stride` elements)
/// against int64 `targets` `[rows]`, as transformers computes it (the logits upcast to float32
/// before the softmax): `x = logits`, or `c·tanh(logits/c)` with soft-capping (`softcap` c > 0,
/// Gemma 2), `loss[r] = logsumexp(x) − x[t]` (float32); with `grad`, also
/// `grad = (softmax(x) − onehot(t)) · scale · (1 − tanh²(logits/c) when capped)` in the
/// logits' type — over the logits themselves when `grad == logits` (same stride). A row whose
/// target is `ignore_index` gets loss 0 and a zero gradient; a target outside `[0, vocab)` a
/// NaN loss.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropyArgs {
    pub logits: *const c_void,
    pub logits_stride: i64,
    pub targets: *const i64,
    /// `[rows]` float32.
    pub loss: *mut f32,
    /// Null: the loss alone.
    pub grad: *mut c_void,
    pub grad_stride: i64,
    pub rows: i64,
    pub vocab: i64,
    pub ignore_index: i64,
    pub scale: f32,
    /// 0: no soft-capping.
    pub softcap: f32,
}

/// Rowwise e4m3 (float8_e4m3fn) quantisation for the frozen base's FP8 GEMMs
/// (host/src/model/fp8.h), over `rows` rows of width `n` of `x` (row stride `x_stride`
/// elements, the last dimension contiguous): `v = x · col_scale` in float32 (no factor:
/// `v = x`), `amax = max |v|` over the row; when `amax > 0`, `q = e4m3(clamp(v · (448 / amax),
/// ±448))` rounded to nearest even and `scale = amax / 448` (float32 divisions), else (a row of
/// zeros, or one holding a NaN) `q = e4m3(clamp(v, ±448))` and `scale = 1`. Bit for bit
/// libtorch's composition of the same ops (`quantize_rows_reference`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Fp8QuantizeRows {
    pub x: *const c_void,
    pub x_stride: i64,
    /// `[n]` float32, or null: no column factor.
    pub col_scale: *const f32,
    /// `[rows, n]` e4m3 codes, contiguous (null when only asking whether a launch fits).
    pub q: *mut u8,
    /// `[rows]` float32 (null when only asking whether a launch fits).
    pub scale: *mut f32,
    pub rows: i64,
    pub n: i64,
}

/// Why a kernel did not run.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The arguments are outside what the kernel handles (the caller should have checked).
    #[error("{kernel}: {why}")]
    Unsupported { kernel: &'static str, why: String },
    /// NVRTC could not be loaded.
    #[error("NVRTC (libnvrtc) could not be loaded: {0}")]
    NvrtcMissing(String),
    /// NVRTC rejected the source.
    #[error("NVRTC could not compile the fused kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    /// A CUDA driver call failed.
    #[error("CUDA driver: {what}: {err}")]
    Driver { what: &'static str, err: String },
}
