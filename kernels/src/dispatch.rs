//! The `extern "C"` face of the kernels: one function per kernel taking a [`Launch`] and the
//! kernel's argument block, running the CUDA version on a device (`launch.device ≥ 0`) and the
//! CPU reference on host memory (`−1`). The host hands [`TABLE`] to its C++ autograd nodes.
//!
//! Each returns 0 on success, else −1 with a message written (NUL-terminated, truncated) to
//! `err`. They never unwind into C++.

use crate::reference::{self, Elem, RopeShape};
use crate::{cuda, CrossEntropyArgs, Dtype, Fp8QuantizeRows, KernelError, Launch, RmsNormBackward, RmsNormForward, RopeArgs, SwigluArgs};
use half::bf16;
use std::ffi::c_char;

/// A kernel's C entry point.
pub type KernelFn<A> = unsafe extern "C" fn(launch: *const Launch, args: *const A, err: *mut c_char, err_len: i32) -> i32;

/// Every kernel, as the C++ side (host/src/gpu/kernels.cpp, `FtxKernelTable`) declares them,
/// in this order.
#[repr(C)]
pub struct KernelTable {
    pub rms_norm_forward: KernelFn<RmsNormForward>,
    pub rms_norm_backward: KernelFn<RmsNormBackward>,
    pub rope: KernelFn<RopeArgs>,
    pub swiglu: KernelFn<SwigluArgs>,
    pub cross_entropy: KernelFn<CrossEntropyArgs>,
    pub fp8_quantize_rows: KernelFn<Fp8QuantizeRows>,
    /// 0 when `fp8_quantize_rows` would run this call (its outputs may be null), else −1 and why
    /// not: the C++ side runs libtorch's composition then.
    pub fp8_quantize_rows_fits: KernelFn<Fp8QuantizeRows>,
}

/// The table of this crate's kernels.
pub static TABLE: KernelTable = KernelTable {
    rms_norm_forward: c_rms_norm_forward,
    rms_norm_backward: c_rms_norm_backward,
    rope: c_rope,
    swiglu: c_swiglu,
    cross_entropy: c_cross_entropy,
    fp8_quantize_rows: c_fp8_quantize_rows,
    fp8_quantize_rows_fits: c_fp8_quantize_rows_fits,
};

fn finish(r: Result<(), KernelError>, err: *mut c_char, err_len: i32) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            if !err.is_null() && err_len > 0 {
                let msg = e.to_string();
                let n = msg.len().min(err_len as usize - 1);
                // SAFETY: the caller's buffer holds err_len bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(msg.as_ptr() as *const c_char, err, n);
                    *err.add(n) = 0;
                }
            }
            -1
        }
    }
}

/// Runs `f`, turning a panic into an error (nothing may unwind into C++).
fn guarded(f: impl FnOnce() -> Result<(), KernelError>) -> Result<(), KernelError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(KernelError::Unsupported { kernel: "kernel", why: "panicked (see the log above)".into() }))
}

fn dtype(l: &Launch, kernel: &'static str) -> Result<Dtype, KernelError> {
    Dtype::from_code(l.dtype).ok_or(KernelError::Unsupported { kernel, why: format!("element type code {}", l.dtype) })
}

/// `len` elements at `p` (an empty slice for a null pointer or no elements).
///
/// # Safety
/// `p` must point at `len` initialised elements that outlive the slice.
unsafe fn slice<'a, T>(p: *const std::ffi::c_void, len: usize) -> &'a [T] {
    if p.is_null() || len == 0 {
        return &[];
    }
    std::slice::from_raw_parts(p as *const T, len)
}

/// # Safety
/// As [`slice`], with no other reference to the memory while the slice lives.
unsafe fn slice_mut<'a, T>(p: *mut std::ffi::c_void, len: usize) -> &'a mut [T] {
    if p.is_null() || len == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(p as *mut T, len)
}

unsafe extern "C" fn c_rms_norm_forward(l: *const Launch, a: *const RmsNormForward, err: *mut c_char, err_len: i32) -> i32 {
    let (l, a) = (&*l, &*a);
    finish(guarded(|| rms_norm_forward(l, a)), err, err_len)
}

/// RMSNorm forward on the launch's device (see [`RmsNormForward`]).
///
/// # Safety
/// The pointers must be valid for the shapes the block names, on the launch's device.
pub unsafe fn rms_norm_forward(l: &Launch, a: &RmsNormForward) -> Result<(), KernelError> {
    if l.device >= 0 {
        return cuda::rms_norm_forward(l, a);
    }
    fn run<T: Elem>(a: &RmsNormForward) {
        let (rows, n) = (a.rows as usize, a.n as usize);
        unsafe {
            let sum = (!a.residual.is_null()).then(|| slice_mut::<T>(a.sum, rows * n));
            let residual = (!a.residual.is_null()).then(|| slice::<T>(a.residual, rows * n));
            reference::rms_norm_forward(
                slice::<T>(a.x, rows * n),
                residual,
                slice::<T>(a.weight, n),
                sum,
                slice_mut::<T>(a.y, rows * n),
                slice_mut::<f32>(a.rstd as *mut _, rows),
                n,
                a.eps,
                a.offset,
            );
        }
    }
    match dtype(l, "rms_norm_forward")? {
        Dtype::F32 => run::<f32>(a),
        Dtype::Bf16 => run::<bf16>(a),
    }
    Ok(())
}

unsafe extern "C" fn c_rms_norm_backward(l: *const Launch, a: *const RmsNormBackward, err: *mut c_char, err_len: i32) -> i32 {
    let (l, a) = (&*l, &*a);
    finish(guarded(|| rms_norm_backward(l, a)), err, err_len)
}

/// RMSNorm backward on the launch's device (see [`RmsNormBackward`]).
///
/// # Safety
/// As [`rms_norm_forward`].
pub unsafe fn rms_norm_backward(l: &Launch, a: &RmsNormBackward) -> Result<(), KernelError> {
    if l.device >= 0 {
        return cuda::rms_norm_backward(l, a);
    }
    fn run<T: Elem>(a: &RmsNormBackward) {
        let (rows, n) = (a.rows as usize, a.n as usize);
        unsafe {
            let dsum = (!a.dsum.is_null()).then(|| slice::<T>(a.dsum, rows * n));
            let dw = (!a.dw.is_null()).then(|| slice_mut::<T>(a.dw, n));
            reference::rms_norm_backward(
                slice::<T>(a.sum, rows * n),
                slice::<T>(a.weight, n),
                slice::<f32>(a.rstd as *const _, rows),
                slice::<T>(a.dy, rows * n),
                dsum,
                slice_mut::<T>(a.dx, rows * n),
                dw,
                n,
                a.offset,
            );
        }
    }
    match dtype(l, "rms_norm_backward")? {
        Dtype::F32 => run::<f32>(a),
        Dtype::Bf16 => run::<bf16>(a),
    }
    Ok(())
}

unsafe extern "C" fn c_rope(l: *const Launch, a: *const RopeArgs, err: *mut c_char, err_len: i32) -> i32 {
    let (l, a) = (&*l, &*a);
    finish(guarded(|| rope(l, a)), err, err_len)
}

/// Rotary embedding on the launch's device (see [`RopeArgs`]).
///
/// # Safety
/// As [`rms_norm_forward`].
pub unsafe fn rope(l: &Launch, a: &RopeArgs) -> Result<(), KernelError> {
    if l.device >= 0 {
        return cuda::rope(l, a);
    }
    let nonneg = |v: i64| usize::try_from(v).map_err(|_| KernelError::Unsupported { kernel: "rope", why: format!("negative size or stride {v}") });
    let s3 = |s: [i64; 3]| -> Result<[usize; 3], KernelError> { Ok([nonneg(s[0])?, nonneg(s[1])?, nonneg(s[2])?]) };
    let shape = RopeShape {
        batch: nonneg(a.batch)?,
        tokens: nonneg(a.tokens)?,
        q_heads: nonneg(a.q_heads as i64)?,
        k_heads: if a.k.is_null() { 0 } else { nonneg(a.k_heads as i64)? },
        head_dim: nonneg(a.head_dim as i64)?,
        rot: nonneg(a.rot as i64)?,
        q_strides: s3(a.q_strides)?,
        k_strides: s3(a.k_strides)?,
        cos_strides: [nonneg(a.cos_strides[0])?, nonneg(a.cos_strides[1])?],
    };
    if shape.rot % 2 != 0 || shape.rot > shape.head_dim {
        return Err(KernelError::Unsupported { kernel: "rope", why: format!("{} rotary dimensions of {}", shape.rot, shape.head_dim) });
    }
    fn run<T: Elem>(a: &RopeArgs, sh: &RopeShape) {
        let out_len = |heads: usize| sh.batch * sh.tokens * heads * sh.head_dim;
        unsafe {
            let k = (!a.k.is_null()).then(|| slice::<T>(a.k, sh.span(sh.k_strides, sh.k_heads)));
            let k_out = (!a.k.is_null()).then(|| slice_mut::<T>(a.k_out, out_len(sh.k_heads)));
            reference::rope(
                sh,
                slice::<T>(a.q, sh.span(sh.q_strides, sh.q_heads)),
                k,
                slice_mut::<T>(a.q_out, out_len(sh.q_heads)),
                k_out,
                slice::<T>(a.cos, sh.table_span()),
                slice::<T>(a.sin, sh.table_span()),
                a.inverse != 0,
            );
        }
    }
    match dtype(l, "rope")? {
        Dtype::F32 => run::<f32>(a, &shape),
        Dtype::Bf16 => run::<bf16>(a, &shape),
    }
    Ok(())
}

unsafe extern "C" fn c_swiglu(l: *const Launch, a: *const SwigluArgs, err: *mut c_char, err_len: i32) -> i32 {
    let (l, a) = (&*l, &*a);
    finish(guarded(|| swiglu(l, a)), err, err_len)
}

/// SwiGLU forward or backward on the launch's device (see [`SwigluArgs`]).
///
/// # Safety
/// As [`rms_norm_forward`].
pub unsafe fn swiglu(l: &Launch, a: &SwigluArgs) -> Result<(), KernelError> {
    if l.device >= 0 {
        return cuda::swiglu(l, a);
    }
    fn run<T: Elem>(a: &SwigluArgs) {
        let (rows, inner) = (a.rows as usize, a.inner as usize);
        let span = |stride: i64, width: usize| if rows == 0 { 0 } else { (rows - 1) * stride as usize + width };
        unsafe {
            let gu = slice::<T>(a.gu, span(a.gu_stride, 2 * inner));
            if a.dh.is_null() {
                reference::swiglu_forward(gu, a.gu_stride as usize, slice_mut::<T>(a.out, rows * inner), rows, inner);
            } else {
                let dh = slice::<T>(a.dh, span(a.dh_stride, inner));
                reference::swiglu_backward(gu, a.gu_stride as usize, dh, a.dh_stride as usize, slice_mut::<T>(a.out, rows * 2 * inner), rows, inner);
            }
        }
    }
    if a.gu_stride < 2 * a.inner || (!a.dh.is_null() && a.dh_stride < a.inner) || a.rows < 0 || a.inner < 0 {
        return Err(KernelError::Unsupported { kernel: "swiglu", why: "row strides narrower than the rows".into() });
    }
    match dtype(l, "swiglu")? {
        Dtype::F32 => run::<f32>(a),
        Dtype::Bf16 => run::<bf16>(a),
    }
    Ok(())
}

unsafe extern "C" fn c_cross_entropy(l: *const Launch, a: *const CrossEntropyArgs, err: *mut c_char, err_len: i32) -> i32 {
    let (l, a) = (&*l, &*a);
    finish(guarded(|| cross_entropy(l, a)), err, err_len)
}

/// Cross-entropy (loss per row, and the gradient when asked) on the launch's device (see
/// [`CrossEntropyArgs`]). On the CPU the gradient may be the logits too (in place): each row is
/// read whole before its gradient is written.
///
/// # Safety
/// As [`rms_norm_forward`].
pub unsafe fn cross_entropy(l: &Launch, a: &CrossEntropyArgs) -> Result<(), KernelError> {
    if l.device >= 0 {
        return cuda::cross_entropy::cross_entropy(l, a);
    }
    const K: &str = "cross_entropy";
    let d = dtype(l, K)?;
    cuda::cross_entropy::cross_entropy_supported(d, a).map_err(|why| KernelError::Unsupported { kernel: K, why })?;
    fn run<T: Elem>(a: &CrossEntropyArgs) {
        let (rows, v) = (a.rows as usize, a.vocab as usize);
        let (z_stride, g_stride) = (a.logits_stride as usize, a.grad_stride as usize);
        let mut z = vec![0f32; v];
        let mut g = vec![0f32; if a.grad.is_null() { 0 } else { v }];
        unsafe {
            let targets = slice::<i64>(a.targets as *const _, rows);
            let loss = slice_mut::<f32>(a.loss as *mut _, rows);
            for r in 0..rows {
                // The row's logits are copied out before its gradient (perhaps the same memory)
                // is written.
                for (o, x) in z.iter_mut().zip(slice::<T>((a.logits as *const T).add(r * z_stride) as *const _, v)) {
                    *o = x.to_f32();
                }
                let grad = (!a.grad.is_null()).then_some(&mut g[..]);
                loss[r] = reference::cross_entropy_row(&z, targets[r], a.ignore_index, a.softcap, a.scale, grad);
                if !a.grad.is_null() {
                    for (o, x) in slice_mut::<T>((a.grad as *mut T).add(r * g_stride) as *mut _, v).iter_mut().zip(&g) {
                        *o = T::from_f32(*x);
                    }
                }
            }
        }
    }
    match d {
        Dtype::F32 => run::<f32>(a),
        Dtype::Bf16 => run::<bf16>(a),
    }
    Ok(())
}

unsafe extern "C" fn c_fp8_quantize_rows(l: *const Launch, a: *const Fp8QuantizeRows, err: *mut c_char, err_len: i32) -> i32 {
    let (l, a) = (&*l, &*a);
    finish(guarded(|| fp8_quantize_rows(l, a)), err, err_len)
}

unsafe extern "C" fn c_fp8_quantize_rows_fits(l: *const Launch, a: *const Fp8QuantizeRows, err: *mut c_char, err_len: i32) -> i32 {
    let (l, a) = (&*l, &*a);
    finish(guarded(|| fp8_quantize_rows_fits(l, a)), err, err_len)
}

/// Checks the shape of a rowwise quantisation: sizes and a row stride that make sense, and
/// `x` given (the outputs too unless `outputs_optional`).
fn fp8_shape_ok(a: &Fp8QuantizeRows, outputs_optional: bool) -> Result<(), KernelError> {
    let bad = |why: String| Err(KernelError::Unsupported { kernel: "fp8_quantize_rows", why });
    if a.rows < 0 || a.n < 1 || a.x_stride < a.n {
        return bad(format!("{} rows of width {} at row stride {}", a.rows, a.n, a.x_stride));
    }
    if a.x.is_null() || (!outputs_optional && (a.q.is_null() || a.scale.is_null())) {
        return bad("the input or an output is missing".into());
    }
    Ok(())
}

/// Whether [`fp8_quantize_rows`] runs this call on the launch's device: on a GPU, what the
/// CUDA kernel takes ([`cuda::fp8::fp8_quantize_fits`]: sm_89 or newer, whole aligned packs);
/// on the CPU, any shape the reference takes.
///
/// # Safety
/// Reads only the block's fields.
pub unsafe fn fp8_quantize_rows_fits(l: &Launch, a: &Fp8QuantizeRows) -> Result<(), KernelError> {
    if l.device >= 0 {
        return cuda::fp8::fp8_quantize_fits(l, a);
    }
    dtype(l, "fp8_quantize_rows")?;
    fp8_shape_ok(a, true)
}

/// Rowwise e4m3 quantisation on the launch's device (see [`Fp8QuantizeRows`]).
///
/// # Safety
/// As [`rms_norm_forward`].
pub unsafe fn fp8_quantize_rows(l: &Launch, a: &Fp8QuantizeRows) -> Result<(), KernelError> {
    if l.device >= 0 {
        return cuda::fp8::fp8_quantize_rows(l, a);
    }
    fp8_shape_ok(a, false)?;
    fn run<T: Elem>(a: &Fp8QuantizeRows) {
        let (rows, n, stride) = (a.rows as usize, a.n as usize, a.x_stride as usize);
        let span = if rows == 0 { 0 } else { (rows - 1) * stride + n };
        unsafe {
            let col_scale = (!a.col_scale.is_null()).then(|| slice::<f32>(a.col_scale as *const _, n));
            reference::fp8_quantize_rows(
                slice::<T>(a.x, span),
                stride,
                col_scale,
                slice_mut::<u8>(a.q as *mut _, rows * n),
                slice_mut::<f32>(a.scale as *mut _, rows),
                n,
            );
        }
    }
    match dtype(l, "fp8_quantize_rows")? {
        Dtype::F32 => run::<f32>(a),
        Dtype::Bf16 => run::<bf16>(a),
    }
    Ok(())
}
