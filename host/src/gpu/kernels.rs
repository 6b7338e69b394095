//! The fused kernels of `ftx-kernels` (RMSNorm with the residual add, rotary embedding,
//! SwiGLU; CUDA C compiled at run time by NVRTC) inside the model's autograd graph.
//!
//! The C++ shim (src/gpu/kernels.cpp) wraps each in a libtorch autograd node that calls the
//! kernel table this module registers ([`ftx_kernels::dispatch::TABLE`]) on libtorch's current
//! CUDA stream; the SwiGLU node (src/model/swiglu.cpp) calls it too. The model takes these
//! paths on CUDA tensors (float32 or bf16) while [`enabled`] (the default; `--no-fused-kernels`
//! or `train.fused_kernels = false` turn it off) and the kernels load; everywhere else it runs
//! libtorch's composite ops as before. A device where NVRTC cannot be found or the kernels do
//! not compile is reported once and runs the composite ops.
//!
//! The rowwise e4m3 quantisation before each FP8 GEMM (src/model/fp8.h) calls the table from
//! C++ as well, once it is registered; [`fp8_quantize_rows`] reaches it, and libtorch's
//! composition it replaces, from Rust (the bench and the tests).

use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the fused kernels on or off for the rest of the process (on by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the model may use the fused kernels (see [`set_enabled`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// True when this build has the C++ nodes (a libtorch with headers).
pub fn built() -> bool {
    cfg!(ftx_torch_shim)
}

/// Whether the model's tensor `t` takes the fused kernels: enabled, built, a CUDA tensor in
/// float32 or bf16, and the kernels compiled and loaded on its device (the first call compiles
/// them; a failure is logged once and leaves the composite path).
pub fn active_for(t: &Tensor) -> bool {
    if t.device() == Device::Cpu && CPU_REFERENCE.with(|c| c.get()) && enabled() && built() && matches!(t.kind(), Kind::BFloat16 | Kind::Float) {
        register();
        return true;
    }
    let Device::Cuda(i) = t.device() else { return false };
    if !enabled() || !built() || !matches!(t.kind(), Kind::BFloat16 | Kind::Float) {
        return false;
    }
    match ftx_kernels::cuda::prepare(i as i32) {
        Ok(()) => {
            register();
            true
        }
        Err(e) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!("fused kernels unavailable on cuda:{i}, using libtorch's ops instead: {e}");
            }
            false
        }
    }
}

thread_local! {
    static CPU_REFERENCE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the model taking the fused-kernel paths on CPU tensors too, through the
/// kernels' CPU reference versions — on this thread only (CPU autograd runs backward on the
/// calling thread, and each node keeps the path its forward took). What the tests hold the
/// model's wiring of the kernels to, without a GPU.
pub fn with_cpu_reference<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            CPU_REFERENCE.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(CPU_REFERENCE.with(|c| c.replace(true)));
    f()
}

/// Hands the kernel table to the C++ nodes (once).
pub fn register() {
    #[cfg(ftx_torch_shim)]
    {
        static DONE: std::sync::Once = std::sync::Once::new();
        // SAFETY: the table is a static with the C layout kernels.h declares.
        DONE.call_once(|| unsafe { shim::ftx_kernels_register(&ftx_kernels::dispatch::TABLE as *const _ as *const std::ffi::c_void) });
    }
}

fn dtype(kind: Kind) -> Option<ftx_kernels::Dtype> {
    match kind {
        Kind::Float => Some(ftx_kernels::Dtype::F32),
        Kind::BFloat16 => Some(ftx_kernels::Dtype::Bf16),
        _ => None,
    }
}

/// Whether an RMSNorm of `x` with `weight` fits the kernels (width in whole 16-byte vectors,
/// at most the widest row the kernels may launch with on `x`'s GPU, weight of `x`'s type).
pub fn rms_norm_fits(x: &Tensor, weight: &Tensor) -> bool {
    let Some(d) = dtype(x.kind()) else { return false };
    let n = x.size().last().copied().unwrap_or(0);
    let width_fits = match x.device() {
        tch::Device::Cuda(i) => ftx_kernels::cuda::rms_norm_launchable(i as i32, d, n as usize),
        _ => ftx_kernels::cuda::rms_norm_supported(d, n as usize).is_ok(),
    };
    weight.kind() == x.kind() && weight.size() == [n] && width_fits && aligned_rows(x) && aligned_rows(weight)
}

/// Whether the kernels can read `t`'s rows at 16-byte alignment: a contiguous tensor whose data
/// starts aligned (any other is copied into a fresh, aligned, contiguous one by the node).
pub fn aligned_rows(t: &Tensor) -> bool {
    !t.is_contiguous() || (t.data_ptr() as usize) % 16 == 0
}

/// Whether rotary embedding of q, k (`[B, T, heads, head_dim]`) with tables `[B, T, rot]` fits
/// the kernel: same types, whole vectors, 16-byte-aligned rows.
pub fn rope_fits(q: &Tensor, k: &Tensor, cos: &Tensor) -> bool {
    let Some(d) = dtype(q.kind()) else { return false };
    let v = d.vector() as i64;
    let (qs, ks, cs) = (q.size(), k.size(), cos.size());
    if qs.len() != 4 || ks.len() != 4 || cs.len() != 3 || k.kind() != q.kind() || cos.kind() != q.kind() {
        return false;
    }
    let (hd, rot) = (qs[3], cs[2]);
    let aligned = |t: &Tensor| (t.data_ptr() as usize) % 16 == 0 && t.stride().iter().rev().skip(1).all(|s| s % v == 0) && t.stride()[t.dim() - 1] == 1;
    ks[3] == hd && rot <= hd && rot % (2 * v) == 0 && (hd - rot) % v == 0 && aligned(q) && aligned(k) && aligned(cos)
}

/// RMSNorm through the fused kernel, as one autograd node: with `residual`, `(Some(x + r),
/// norm(x + r))`, else `(None, norm(x))`; `y = s · rstd · (weight + offset)`. The caller checks
/// [`rms_norm_fits`]; on the CPU this runs the reference versions (what the tests use).
pub fn rms_norm(x: &Tensor, residual: Option<&Tensor>, weight: &Tensor, eps: f64, offset: f64) -> (Option<Tensor>, Tensor) {
    #[cfg(ftx_torch_shim)]
    {
        register();
        shim::rms_norm(x, residual, weight, eps, offset)
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let _ = (x, residual, weight, eps, offset);
        unreachable!("the fused kernels need the C++ shim (kernels::built())")
    }
}

/// RMSNorm of `x` through the fused kernel as one autograd node that also passes `x` on:
/// `(x', norm(x))` with `x'` a view of `x` for the residual stream, whose gradient then comes
/// back to the node and is added into the input gradient by the backward kernel (no separate
/// add). The caller checks [`rms_norm_fits`].
pub fn rms_norm_passing(x: &Tensor, weight: &Tensor, eps: f64, offset: f64) -> (Tensor, Tensor) {
    #[cfg(ftx_torch_shim)]
    {
        register();
        shim::rms_norm_passing(x, weight, eps, offset)
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let _ = (x, weight, eps, offset);
        unreachable!("the fused kernels need the C++ shim (kernels::built())")
    }
}

/// Rotary embedding of `q` and `k` (`[B, T, heads, head_dim]`, the last dimension contiguous)
/// with `cos`, `sin` (`[B, T, rot]`) through the fused kernel, as one autograd node; outputs
/// contiguous `[B, T, heads, head_dim]`. The caller checks [`rope_fits`].
pub fn rope(q: &Tensor, k: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor) {
    #[cfg(ftx_torch_shim)]
    {
        register();
        shim::rope(q, k, cos, sin)
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let _ = (q, k, cos, sin);
        unreachable!("the fused kernels need the C++ shim (kernels::built())")
    }
}

/// Which way [`fp8_quantize_rows`] quantises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8QuantizePath {
    /// `ftx::fp8::quantize_rows`, what the FP8 GEMMs run: the kernel on a GPU where it fits,
    /// else libtorch's composition.
    Auto = 0,
    /// libtorch's composition (`quantize_rows_reference`), the reference of the other two.
    Composition = 1,
    /// The kernel table: the CUDA kernel on a GPU (an error where it does not fit), the CPU
    /// reference version on host tensors.
    KernelTable = 2,
}

/// Rowwise e4m3 quantisation of the 2-D `x` (float32 or bf16, rows contiguous) with an optional
/// per-column factor `[n]` (host/src/model/fp8.h): `(q [rows, n] Float8e4m3fn, scale [rows, 1]
/// float32)` with `x · col_scale ≈ q · scale`. Registers the kernel table first. An error says
/// why the asked-for path could not run.
pub fn fp8_quantize_rows(x: &Tensor, col_scale: Option<&Tensor>, path: Fp8QuantizePath) -> Result<(Tensor, Tensor), String> {
    #[cfg(ftx_torch_shim)]
    {
        register();
        shim::fp8_quantize_rows(x, col_scale, path as i32)
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let _ = (x, col_scale, path);
        Err("this ftx was built without the C++ shim (a libtorch without headers)".into())
    }
}

/// Whether the quantisation kernel takes `x` (on a GPU: sm_89 or newer, rows in whole 16-byte
/// vectors, 16-byte aligned), else why not. Registers the kernel table first.
pub fn fp8_quantize_kernel_fits(x: &Tensor) -> Result<(), String> {
    #[cfg(ftx_torch_shim)]
    {
        register();
        shim::fp8_quantize_kernel_fits(x)
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let _ = x;
        Err("this ftx was built without the C++ shim (a libtorch without headers)".into())
    }
}

/// libtorch's current CUDA stream on `device` (a `cudaStream_t`), for timing kernels on it.
pub fn current_stream(device: usize) -> *mut std::ffi::c_void {
    #[cfg(ftx_torch_shim)]
    // SAFETY: a plain query of the shim; null on error.
    unsafe {
        shim::ftx_cuda_current_stream(device as i32)
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let _ = device;
        std::ptr::null_mut()
    }
}

#[cfg(ftx_torch_shim)]
mod shim {
    use std::ffi::{c_char, c_void, CStr};
    use tch::Tensor;

    extern "C" {
        pub fn ftx_kernels_register(table: *const c_void);
        pub fn ftx_cuda_current_stream(device: i32) -> *mut c_void;
        fn ftx_rms_norm(x: *const c_void, r: *const c_void, w: *const c_void, eps: f64, offset: f64, sum: *mut *mut c_void, y: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
        fn ftx_rms_norm_pass(x: *const c_void, w: *const c_void, eps: f64, offset: f64, pass: *mut *mut c_void, y: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
        fn ftx_rope(q: *const c_void, k: *const c_void, cos: *const c_void, sin: *const c_void, q_out: *mut *mut c_void, k_out: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
        fn ftx_fp8_quantize_rows(x: *const c_void, col_scale: *const c_void, path: i32, q: *mut *mut c_void, scale: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
        fn ftx_fp8_quantize_kernel_fits(x: *const c_void, err: *mut c_char, err_len: i32) -> i32;
    }

    fn message(err: &[c_char]) -> String {
        // SAFETY: the shim writes a NUL-terminated message into the zeroed buffer.
        unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned()
    }

    pub fn fp8_quantize_rows(x: &Tensor, col_scale: Option<&Tensor>, path: i32) -> Result<(Tensor, Tensor), String> {
        let (mut q, mut scale): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
        let mut err = [0 as c_char; 512];
        let c = col_scale.map_or(std::ptr::null(), ptr);
        // SAFETY: as in `rms_norm`.
        let rc = unsafe { ftx_fp8_quantize_rows(ptr(x), c, path, &mut q, &mut scale, err.as_mut_ptr(), err.len() as i32) };
        if rc != 0 {
            return Err(message(&err));
        }
        Ok(unsafe { (Tensor::from_ptr(q as *mut _), Tensor::from_ptr(scale as *mut _)) })
    }

    pub fn fp8_quantize_kernel_fits(x: &Tensor) -> Result<(), String> {
        let mut err = [0 as c_char; 512];
        // SAFETY: a live tensor; the message goes into `err`.
        match unsafe { ftx_fp8_quantize_kernel_fits(ptr(x), err.as_mut_ptr(), err.len() as i32) } {
            1 => Ok(()),
            _ => Err(message(&err)),
        }
    }

    fn ptr(t: &Tensor) -> *const c_void {
        t.as_ptr() as *const c_void
    }

    // A failing kernel here is a shape or device bug (the callers check what fits), reported as
    // a failing tensor op is in tch: a panic with libtorch's or the kernel's message.
    fn check(rc: i32, what: &str, err: &[c_char]) {
        if rc != 0 {
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            panic!("{what}: {msg}");
        }
    }

    pub fn rms_norm(x: &Tensor, residual: Option<&Tensor>, w: &Tensor, eps: f64, offset: f64) -> (Option<Tensor>, Tensor) {
        let (mut sum, mut y): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
        let mut err = [0 as c_char; 512];
        let r = residual.map_or(std::ptr::null(), ptr);
        // SAFETY: live tch tensors in; new heap tensors out, which tch then owns.
        let rc = unsafe { ftx_rms_norm(ptr(x), r, ptr(w), eps, offset, &mut sum, &mut y, err.as_mut_ptr(), err.len() as i32) };
        check(rc, "fused rms_norm", &err);
        let sum = (!sum.is_null()).then(|| unsafe { Tensor::from_ptr(sum as *mut _) });
        (sum, unsafe { Tensor::from_ptr(y as *mut _) })
    }

    pub fn rms_norm_passing(x: &Tensor, w: &Tensor, eps: f64, offset: f64) -> (Tensor, Tensor) {
        let (mut pass, mut y): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
        let mut err = [0 as c_char; 512];
        // SAFETY: as in `rms_norm`.
        let rc = unsafe { ftx_rms_norm_pass(ptr(x), ptr(w), eps, offset, &mut pass, &mut y, err.as_mut_ptr(), err.len() as i32) };
        check(rc, "fused rms_norm", &err);
        unsafe { (Tensor::from_ptr(pass as *mut _), Tensor::from_ptr(y as *mut _)) }
    }

    pub fn rope(q: &Tensor, k: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor) {
        let (mut qo, mut ko): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
        let mut err = [0 as c_char; 512];
        // SAFETY: as in `rms_norm`.
        let rc = unsafe { ftx_rope(ptr(q), ptr(k), ptr(cos), ptr(sin), &mut qo, &mut ko, err.as_mut_ptr(), err.len() as i32) };
        check(rc, "fused rope", &err);
        unsafe { (Tensor::from_ptr(qo as *mut _), Tensor::from_ptr(ko as *mut _)) }
    }
}
