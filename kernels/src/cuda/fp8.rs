//! The CUDA launcher of the rowwise e4m3 quantisation kernel (source `fp8.cu`, compiled in the
//! same NVRTC module as `fused.cu`). Its conversion is the hardware's (`cvt…e4m3x2`, sm_89 and
//! newer): on an older GPU every launch is refused as not fitting, and the host runs libtorch's
//! composition instead.

use super::{aligned, arg, dtype_of, launch, module, suffix, unsupported};
use crate::{Dtype, Fp8QuantizeRows, KernelError, Launch};
use std::ffi::c_void;

/// The kernel entry points of `fp8.cu` (each exists for `_f32` and `_bf16`).
pub const KERNELS: [&str; 1] = ["fp8_quantize_rows"];

/// The oldest compute capability with the e4m3 conversion instruction (8.9, Ada; Hopper is 9.0).
pub const MIN_CAPABILITY: (i32, i32) = (8, 9);

/// Packs a thread keeps in registers between the two passes (`FP8_CACHED` in fp8.cu).
const CACHED_PACKS: usize = 4;

/// Threads per row block for a row of `packs` 16-byte packs: enough for each to hold at most
/// [`CACHED_PACKS`] (the row then read from memory once), a whole number of warps, within
/// `cap` (the kernel's most threads per block on the device; wider rows loop).
pub fn threads(packs: usize, cap: usize) -> u32 {
    let cap = (cap.min(1024) / 32 * 32).max(32);
    (packs.div_ceil(CACHED_PACKS).div_ceil(32) * 32).clamp(32, cap) as u32
}

/// Checks that a quantisation fits the kernel apart from the device: a row width and stride in
/// whole 16-byte packs, and every given pointer 16-byte aligned (the codes' rows are `n` bytes
/// long, written 4 or 8 at a time).
pub fn fp8_quantize_supported(dtype: Dtype, a: &Fp8QuantizeRows) -> Result<(), String> {
    let v = dtype.vector() as i64;
    if a.rows < 0 || a.n < 1 || a.x_stride < a.n {
        return Err(format!("{} rows of width {} at row stride {}", a.rows, a.n, a.x_stride));
    }
    if a.n % v != 0 || a.x_stride % v != 0 {
        return Err(format!("the width {} or the row stride {} is not a multiple of {v} elements", a.n, a.x_stride));
    }
    if a.rows > i32::MAX as i64 {
        return Err(format!("{} rows in one call (at most {})", a.rows, i32::MAX));
    }
    let ptrs = [a.x, a.col_scale as *const c_void, a.q as *const c_void, a.scale as *const c_void];
    if a.x.is_null() || !ptrs.iter().all(|&p| aligned(p)) {
        return Err("a pointer is not 16-byte aligned".into());
    }
    Ok(())
}

/// Whether the kernel runs on `device` for this call: [`fp8_quantize_supported`], a GPU of
/// compute capability [`MIN_CAPABILITY`] or newer, and the kernels loaded there (compiled on
/// first use).
pub fn fp8_quantize_fits(l: &Launch, a: &Fp8QuantizeRows) -> Result<(), KernelError> {
    const K: &str = "fp8_quantize_rows";
    let d = dtype_of(l, K)?;
    fp8_quantize_supported(d, a).map_err(|e| unsupported(K, e))?;
    let m = module(l.device)?;
    if m.capability < MIN_CAPABILITY {
        let (major, minor) = m.capability;
        return Err(unsupported(K, format!("cuda:{} is sm_{major}{minor}; the e4m3 conversion needs sm_89 or newer", l.device)));
    }
    Ok(())
}

/// Rowwise e4m3 quantisation on the GPU (see [`Fp8QuantizeRows`]).
pub fn fp8_quantize_rows(l: &Launch, a: &Fp8QuantizeRows) -> Result<(), KernelError> {
    const K: &str = "fp8_quantize_rows";
    fp8_quantize_fits(l, a)?;
    if a.q.is_null() || a.scale.is_null() {
        return Err(unsupported(K, "no output for the codes or the scales"));
    }
    if a.rows == 0 {
        return Ok(());
    }
    let d = dtype_of(l, K)?;
    let m = module(l.device)?;
    let name = format!("{K}_{}", suffix(d));
    let block = threads(a.n as usize / d.vector(), m.kernel(&name)?.max_threads);
    launch(m, l, &name, a.rows as u32, block, &mut [arg(&a.x), arg(&a.x_stride), arg(&a.col_scale), arg(&a.q), arg(&a.scale), arg(&a.n)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_hold_at_most_the_cached_packs_in_whole_warps() {
        // bf16 rows of 2048, 8192, 16384: 256, 1024, 2048 packs.
        assert_eq!(threads(256, 1024), 64);
        assert_eq!(threads(1024, 1024), 256);
        assert_eq!(threads(2048, 1024), 512);
        assert_eq!(threads(1, 1024), 32);
        // Past 1024 · 4 packs (or the device's cap) the threads loop over the rest.
        assert_eq!(threads(8192, 1024), 1024);
        assert_eq!(threads(2048, 384), 384);
    }

    #[test]
    fn only_whole_aligned_packs_fit() {
        #[repr(align(16))]
        struct Aligned([u8; 512]);
        let buf = Aligned([0; 512]);
        let base = buf.0.as_ptr() as *const c_void;
        let mut a = Fp8QuantizeRows { x: base, x_stride: 24, col_scale: std::ptr::null(), q: std::ptr::null_mut(), scale: std::ptr::null_mut(), rows: 2, n: 16 };
        assert!(fp8_quantize_supported(Dtype::Bf16, &a).is_ok());
        a.x_stride = 20;
        assert!(fp8_quantize_supported(Dtype::Bf16, &a).is_err(), "a row stride of 2.5 packs");
        assert!(fp8_quantize_supported(Dtype::F32, &a).is_ok());
        a.n = 24;
        assert!(fp8_quantize_supported(Dtype::F32, &a).is_err(), "rows overlapping");
        a.n = 12;
        a.x = unsafe { (base as *const u8).add(8) } as *const c_void;
        assert!(fp8_quantize_supported(Dtype::F32, &a).is_err(), "x not 16-byte aligned");
        a.x = base;
        a.col_scale = unsafe { (base as *const u8).add(4) } as *const f32;
        assert!(fp8_quantize_supported(Dtype::F32, &a).is_err(), "the column factor not 16-byte aligned");
    }
}
