//! The CUDA launcher of the fused cross-entropy kernel (source `cross_entropy.cu`, compiled in
//! the same NVRTC module as `fused.cu`).

use super::{arg, dtype_of, launch, module, suffix, unsupported};
use crate::{CrossEntropyArgs, Dtype, KernelError};
use std::ffi::c_void;

/// The kernel entry points of `cross_entropy.cu` (each exists for `_f32` and `_bf16`).
pub const KERNELS: [&str; 1] = ["cross_entropy"];

/// Most threads per row block: 512 leaves four blocks per multiprocessor, so a 523-row chunk
/// runs in about one wave on an H100.
const MAX_THREADS: i64 = 512;

/// Threads per row block for a row of `vocab` elements: one 16-byte pack each per step, a
/// whole number of warps, at most [`MAX_THREADS`].
pub fn threads(dtype: Dtype, vocab: i64) -> u32 {
    let packs = (vocab / dtype.vector() as i64).max(1);
    ((packs + 31) / 32 * 32).min(MAX_THREADS) as u32
}

/// Checks that a cross-entropy call fits the kernel: sizes and strides that make sense,
/// element-aligned pointers, and a gradient either over the logits (same stride) or in rows
/// with the logits' 16-byte alignment.
pub fn cross_entropy_supported(dtype: Dtype, a: &CrossEntropyArgs) -> Result<(), String> {
    if a.rows < 0 || a.vocab < 1 || a.logits_stride < a.vocab {
        return Err(format!("{} rows of {} logits at row stride {}", a.rows, a.vocab, a.logits_stride));
    }
    if a.logits.is_null() || a.targets.is_null() || a.loss.is_null() {
        return Err("the logits, targets and loss must be given".into());
    }
    let size = dtype.size();
    if (a.logits as usize) % size != 0 || (a.targets as usize) % 8 != 0 || (a.loss as usize) % 4 != 0 {
        return Err("a pointer is not aligned to its element type".into());
    }
    if !a.grad.is_null() {
        if a.grad as *const c_void == a.logits {
            if a.grad_stride != a.logits_stride {
                return Err("an in-place gradient must have the logits' row stride".into());
            }
        } else {
            let row_bytes = |stride: i64| (stride as usize * size) % 16;
            if a.grad_stride < a.vocab || (a.grad as usize) % 16 != (a.logits as usize) % 16 || row_bytes(a.grad_stride) != row_bytes(a.logits_stride) {
                return Err("the gradient's rows do not share the logits' 16-byte alignment".into());
            }
        }
    }
    Ok(())
}

/// Cross-entropy of `rows` rows of logits on the GPU, loss per row and (with `grad`) its gradient.
pub fn cross_entropy(l: &crate::Launch, a: &CrossEntropyArgs) -> Result<(), KernelError> {
    const K: &str = "cross_entropy";
    let d = dtype_of(l, K)?;
    cross_entropy_supported(d, a).map_err(|e| unsupported(K, e))?;
    if a.rows == 0 {
        return Ok(());
    }
    if a.rows > i32::MAX as i64 {
        return Err(unsupported(K, format!("{} rows in one call (at most {})", a.rows, i32::MAX)));
    }
    let m = module(l.device)?;
    launch(
        m,
        l,
        &format!("{K}_{}", suffix(d)),
        a.rows as u32,
        threads(d, a.vocab),
        &mut [
            arg(&a.logits),
            arg(&a.logits_stride),
            arg(&a.targets),
            arg(&a.loss),
            arg(&a.grad),
            arg(&a.grad_stride),
            arg(&a.vocab),
            arg(&a.scale),
            arg(&a.softcap),
            arg(&a.ignore_index),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_whole_warps_up_to_the_cap() {
        assert_eq!(threads(Dtype::Bf16, 128_256), 512);
        assert_eq!(threads(Dtype::Bf16, 8), 32);
        assert_eq!(threads(Dtype::F32, 4 * 33), 64);
        assert_eq!(threads(Dtype::F32, 3), 32);
    }

    #[test]
    fn the_gradient_must_share_the_logits_alignment() {
        let buf = vec![0u64; 64];
        let base = buf.as_ptr() as *mut c_void;
        let targets = [0i64; 2];
        let mut loss = [0f32; 2];
        let mut a = CrossEntropyArgs {
            logits: base,
            logits_stride: 12,
            targets: targets.as_ptr(),
            loss: loss.as_mut_ptr(),
            grad: base,
            grad_stride: 12,
            rows: 2,
            vocab: 10,
            ignore_index: -100,
            scale: 1.0,
            softcap: 0.0,
        };
        assert!(cross_entropy_supported(Dtype::Bf16, &a).is_ok());
        a.grad_stride = 16;
        assert!(cross_entropy_supported(Dtype::Bf16, &a).is_err(), "in place at another stride");
        a.grad = unsafe { (base as *mut u8).add(128) } as *mut c_void;
        a.grad_stride = 16; // 32 bytes a row against the logits' 24: the rows' alignments drift apart
        assert!(cross_entropy_supported(Dtype::Bf16, &a).is_err());
        a.grad_stride = 12;
        assert!(cross_entropy_supported(Dtype::Bf16, &a).is_ok());
        a.grad = unsafe { (base as *mut u8).add(130) } as *mut c_void;
        assert!(cross_entropy_supported(Dtype::Bf16, &a).is_err());
        a.logits_stride = 8;
        a.grad = std::ptr::null_mut();
        assert!(cross_entropy_supported(Dtype::Bf16, &a).is_err(), "stride narrower than the row");
    }
}
