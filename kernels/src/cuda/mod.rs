//! The CUDA versions: `fused.cu` (and the kernels in their own files) compiled by NVRTC once per process and architecture, loaded
//! once per device into its primary context (the one libtorch's runtime uses), and launched on
//! the caller's stream (libtorch's current stream) on the caller's device pointers.
//!
//! NVRTC and the driver are loaded at run time (cudarc's dynamic loading). libnvrtc is not
//! where the dynamic loader looks by default on a machine whose CUDA comes from PyTorch's wheels
//! (site-packages/nvidia/cu13/lib), so [`load_nvrtc`] looks beside the libtorch this process
//! loaded before cudarc asks for it by name.

use crate::{Dtype, KernelError, Launch, RmsNormBackward, RmsNormForward, RopeArgs, SwigluArgs};
use cudarc::driver::{result as drv, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

pub mod cross_entropy;
pub mod fp8;

/// The kernels' CUDA C source: `fused.cu`, then the kernels in their own files that use its
/// helpers (one NVRTC module).
pub const SOURCE: &str = concat!(include_str!("fused.cu"), include_str!("cross_entropy.cu"), include_str!("fp8.cu"));

/// Every kernel entry point in [`SOURCE`] (each exists for `_f32` and `_bf16`).
pub const KERNELS: [&str; 6] = ["rms_norm_fwd", "rms_norm_bwd", "rms_norm_dw", "rope", "swiglu_fwd", "swiglu_bwd"];

/// Most threads per block, and packs per thread, of the RMSNorm kernels (`MAX_PACKS` in fused.cu):
/// a row is at most `1024 · 4` 16-byte vectors wide.
const MAX_THREADS: usize = 1024;
const MAX_PACKS: usize = 4;

/// Widest row the RMSNorm kernels take, in elements of `dtype`.
pub fn rms_norm_max_width(dtype: Dtype) -> usize {
    MAX_THREADS * MAX_PACKS * dtype.vector()
}

/// Loads libnvrtc (once) and returns the path it came from. Looks, in order, at `$FTX_NVRTC`
/// (a file), the dynamic loader's own search (`LD_LIBRARY_PATH`, the run path), then beside
/// the libtorch in this process (torch/lib, site-packages/nvidia/cu13/lib,
/// site-packages/nvidia/cuda_nvrtc/lib), `$LIBTORCH/lib`, and /usr/local/cuda/lib64.
pub fn load_nvrtc() -> Result<String, KernelError> {
    static FOUND: OnceLock<Result<String, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let found = find_and_load_nvrtc()?;
            load_builtins();
            Ok(found)
        })
        .clone()
        .map_err(KernelError::NvrtcMissing)
}

/// NVRTC opens `libnvrtc-builtins.so.N.M` by name when it compiles, which the loader finds only
/// through `LD_LIBRARY_PATH`: loaded here from libnvrtc's own folder, it is found by its name.
fn load_builtins() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return };
    let Some(dir) = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libnvrtc.so"))
        .and_then(|p| std::path::Path::new(p).parent().map(|d| d.to_path_buf()))
    else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("libnvrtc-builtins.so") && !name.contains(".alt.") {
            // SAFETY: as for libnvrtc; a failure leaves NVRTC's own search.
            if let Ok(lib) = unsafe { libloading::Library::new(e.path()) } {
                std::mem::forget(lib);
            }
        }
    }
}

const NVRTC_NAMES: [&str; 3] = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

fn find_and_load_nvrtc() -> Result<String, String> {
    let mut tried = Vec::new();
    let open = |path: &str| -> Result<(), String> {
        // SAFETY: loading NVRTC runs no initialiser with preconditions; kept for the process's life.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
        std::mem::forget(lib);
        Ok(())
    };
    if let Ok(path) = std::env::var("FTX_NVRTC") {
        return open(&path).map(|_| path.clone()).map_err(|e| format!("FTX_NVRTC={path}: {e}"));
    }
    for name in NVRTC_NAMES {
        if open(name).is_ok() {
            return Ok(name.to_owned());
        }
        tried.push(name.to_owned());
    }
    for dir in candidate_dirs() {
        for name in NVRTC_NAMES {
            let path = dir.join(name);
            if path.exists() {
                let p = path.display().to_string();
                match open(&p) {
                    Ok(()) => return Ok(p),
                    Err(e) => tried.push(format!("{p} ({e})")),
                }
            } else {
                tried.push(path.display().to_string());
            }
        }
    }
    Err(format!(
        "looked for {} in the loader's path and in: {}. Install the NVRTC of the CUDA your PyTorch uses \
         (pip install nvidia-cuda-nvrtc==13.0.*, beside torch), or set FTX_NVRTC to the libnvrtc.so file, \
         or run with --no-fused-kernels",
        NVRTC_NAMES.join(", "),
        tried.join(", ")
    ))
}

/// Folders where PyTorch's wheels put libnvrtc, found from the libtorch this process loaded.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut torch_libs: Vec<PathBuf> = Vec::new();
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        for line in maps.lines() {
            if let Some(path) = line.split_whitespace().nth(5).filter(|p| p.ends_with("/libtorch_cpu.so") || p.ends_with("/libc10.so")) {
                if let Some(dir) = std::path::Path::new(path).parent() {
                    if !torch_libs.iter().any(|d| d == dir) {
                        torch_libs.push(dir.to_path_buf());
                    }
                }
            }
        }
    }
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        torch_libs.push(PathBuf::from(libtorch).join("lib"));
    }
    let mut dirs = Vec::new();
    for lib in torch_libs {
        dirs.push(lib.clone());
        // torch/lib → site-packages
        if let Some(site) = lib.parent().and_then(|torch| torch.parent()) {
            dirs.push(site.join("nvidia/cu13/lib"));
            dirs.push(site.join("nvidia/cuda_nvrtc/lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs
}

/// The NVRTC version (major, minor), loading it first.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    load_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::NvrtcMissing(format!("nvrtcVersion failed: {rc:?}")));
    }
    Ok((major, minor))
}

/// Compiles [`SOURCE`] to PTX for a virtual architecture (`compute_90`), as every launch
/// does once per process; no GPU is needed. Errors carry NVRTC's log.
pub fn compile_ptx(arch: &str) -> Result<String, KernelError> {
    load_nvrtc()?;
    // cudarc wants a 'static architecture name; there are few, and each compiles once.
    let arch_static: &'static str = Box::leak(arch.to_owned().into_boxed_str());
    let opts = cudarc::nvrtc::CompileOptions { arch: Some(arch_static), name: Some("ftx_fused.cu".into()), ..Default::default() };
    match cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(KernelError::Compile { arch: arch.into(), log: log.to_string_lossy().into_owned() }),
        Err(e) => Err(KernelError::Compile { arch: arch.into(), log: e.to_string() }),
    }
}

/// One loaded kernel entry point.
#[derive(Clone, Copy)]
struct Kernel {
    f: sys::CUfunction,
    /// Most threads per block this kernel launches with on its device: below 1024 when its
    /// registers per thread leave the multiprocessor too few for a full block (the RMSNorm
    /// backward keeps a row's packs in registers).
    max_threads: usize,
}

/// The kernels loaded on one device.
struct Module {
    ctx: sys::CUcontext,
    functions: HashMap<String, Kernel>,
    /// Multiprocessors of the device (grid sizes of the grid-stride kernels).
    sms: i64,
    /// Compute capability (major, minor): which kernels may launch (fp8's needs 8.9).
    capability: (i32, i32),
}

// SAFETY: CUDA contexts and functions are process-wide handles, usable from any thread once
// the context is made current there (which every launch does).
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

fn driver_err(what: &'static str) -> impl Fn(drv::DriverError) -> KernelError {
    move |e| KernelError::Driver { what, err: format!("{e:?}") }
}

/// The module of `device`, compiled and loaded on first use (an error is remembered, so a
/// missing NVRTC is reported once and costs nothing after).
fn module(device: i32) -> Result<&'static Module, KernelError> {
    static MODULES: OnceLock<Mutex<HashMap<i32, Result<&'static Module, String>>>> = OnceLock::new();
    let mut map = MODULES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    let entry = map.entry(device).or_insert_with(|| load_module(device).map(|m| &*Box::leak(Box::new(m))).map_err(|e| e.to_string()));
    entry.clone().map_err(|e| KernelError::Driver { what: "loading the fused kernels", err: e })
}

fn load_module(device: i32) -> Result<Module, KernelError> {
    // SAFETY: checks only that libcuda can be opened (libtorch_cuda has loaded it already).
    if !unsafe { sys::is_culib_present() } {
        return Err(KernelError::Driver { what: "loading libcuda", err: "the CUDA driver library was not found".into() });
    }
    drv::init().map_err(driver_err("cuInit"))?;
    let dev = drv::device::get(device).map_err(driver_err("cuDeviceGet"))?;
    // SAFETY: `dev` comes from cuDeviceGet; the primary context is libtorch's own.
    let ctx = unsafe { drv::primary_ctx::retain(dev) }.map_err(driver_err("cuDevicePrimaryCtxRetain"))?;
    unsafe { drv::ctx::set_current(ctx) }.map_err(driver_err("cuCtxSetCurrent"))?;
    let attr = |a| unsafe { drv::device::get_attribute(dev, a) }.map_err(driver_err("cuDeviceGetAttribute"));
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as i64;
    let ptx = ptx_for(&format!("compute_{major}{minor}"))?;
    let image = CString::new(ptx).map_err(|_| KernelError::Compile { arch: format!("compute_{major}{minor}"), log: "PTX with a NUL byte".into() })?;
    // SAFETY: a NUL-terminated PTX image; the context is current.
    let module = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }.map_err(driver_err("cuModuleLoadData"))?;
    let mut functions = HashMap::new();
    for kernel in all_kernels() {
        for suffix in ["f32", "bf16"] {
            let name = format!("{kernel}_{suffix}");
            let c = CString::new(name.clone()).expect("no NUL in kernel names");
            // SAFETY: `module` was just loaded.
            let f = unsafe { drv::module::get_function(module, c) }.map_err(driver_err("cuModuleGetFunction"))?;
            // SAFETY: `f` was just looked up in the loaded module.
            let max_threads = unsafe { drv::function::get_function_attribute(f, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK) }
                .map_err(driver_err("cuFuncGetAttribute"))?;
            functions.insert(name, Kernel { f, max_threads: max_threads.max(0) as usize });
        }
    }
    Ok(Module { ctx, functions, sms, capability: (major, minor) })
}

/// Every kernel entry point of [`SOURCE`], each file's (without the type suffix).
fn all_kernels() -> impl Iterator<Item = &'static &'static str> {
    KERNELS.iter().chain(&cross_entropy::KERNELS).chain(&fp8::KERNELS)
}

/// PTX of [`SOURCE`] for `arch`, compiled once per process.
fn ptx_for(arch: &str) -> Result<String, KernelError> {
    static PTX: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let mut map = PTX.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(arch) {
        return Ok(p.clone());
    }
    let ptx = compile_ptx(arch)?;
    map.insert(arch.to_owned(), ptx.clone());
    Ok(ptx)
}

/// Compiles and loads the kernels on `device` now (else the first launch does).
pub fn prepare(device: i32) -> Result<(), KernelError> {
    module(device).map(|_| ())
}

fn dtype_of(launch: &Launch, kernel: &'static str) -> Result<Dtype, KernelError> {
    Dtype::from_code(launch.dtype).ok_or(KernelError::Unsupported { kernel, why: format!("element type code {}", launch.dtype) })
}

fn unsupported(kernel: &'static str, why: impl Into<String>) -> KernelError {
    KernelError::Unsupported { kernel, why: why.into() }
}

fn aligned(p: *const c_void) -> bool {
    (p as usize) % 16 == 0
}

/// One kernel argument: a pointer to its value, as cuLaunchKernel takes them.
fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

fn launch(m: &Module, launch: &Launch, name: &str, grid: u32, block: u32, args: &mut [*mut c_void]) -> Result<(), KernelError> {
    let k = m.kernel(name)?;
    if block as usize > k.max_threads {
        return Err(KernelError::Driver { what: "cuLaunchKernel", err: format!("{name} needs {block} threads per block; the device allows {} for it", k.max_threads) });
    }
    let f = k.f;
    // SAFETY: the primary context outlives the process's use of it; the arguments match the
    // kernel's parameters (checked by the callers), and the pointers are the caller's live
    // tensors on `launch.stream`.
    unsafe {
        drv::ctx::set_current(m.ctx).map_err(driver_err("cuCtxSetCurrent"))?;
        drv::launch_kernel(f, (grid, 1, 1), (block, 1, 1), 0, launch.stream as sys::CUstream, args).map_err(driver_err("cuLaunchKernel"))
    }
}

impl Module {
    fn kernel(&self, name: &str) -> Result<Kernel, KernelError> {
        self.functions.get(name).copied().ok_or(KernelError::Driver { what: "kernel lookup", err: name.to_owned() })
    }

    /// Threads per block of RMSNorm kernel `name` for a row of `packs` 16-byte vectors, within
    /// what that kernel allows on this device; `None` when even `MAX_PACKS` per thread won't do.
    fn rms_threads(&self, name: &str, packs: usize) -> Result<Option<u32>, KernelError> {
        Ok(rms_threads(packs, self.kernel(name)?.max_threads))
    }
}

fn suffix(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        Dtype::Bf16 => "bf16",
    }
}

/// Threads per row block of the RMSNorm kernels: one 16-byte pack each where `cap` (the
/// kernel's most threads per block, at most 1024) allows, else up to `MAX_PACKS` each; a whole
/// number of warps. `None` when the row needs more than `cap · MAX_PACKS` packs.
fn rms_threads(packs: usize, cap: usize) -> Option<u32> {
    let cap = cap.min(MAX_THREADS) / 32 * 32;
    let least = packs.div_ceil(MAX_PACKS).div_ceil(32) * 32;
    (least <= cap && cap > 0).then(|| (least.max(packs.min(cap).div_ceil(32) * 32).min(cap)) as u32)
}

/// Whether the RMSNorm kernels (forward and backward) can take rows of `n` elements of `dtype`
/// on `device`: [`rms_norm_supported`], and the row fits the threads each kernel may launch
/// with there (loads the kernels on first use; false when they can't be loaded).
pub fn rms_norm_launchable(device: i32, dtype: Dtype, n: usize) -> bool {
    if rms_norm_supported(dtype, n).is_err() {
        return false;
    }
    let Ok(m) = module(device) else { return false };
    let packs = n / dtype.vector();
    ["rms_norm_fwd", "rms_norm_bwd"].iter().all(|k| matches!(m.rms_threads(&format!("{k}_{}", suffix(dtype)), packs), Ok(Some(_))))
}

/// Threads for RMSNorm kernel `k` of `dtype` on rows of `n`, or an `Unsupported` error.
fn rms_launch_threads(m: &Module, k: &'static str, dtype: Dtype, n: usize) -> Result<u32, KernelError> {
    let name = format!("{k}_{}", suffix(dtype));
    m.rms_threads(&name, n / dtype.vector())?
        .ok_or_else(|| unsupported(k, format!("width {n} needs more threads per block than {name} may use on this device")))
}

/// Checks that an RMSNorm of width `n` fits the kernels (16-byte vectors, widest row).
pub fn rms_norm_supported(dtype: Dtype, n: usize) -> Result<(), String> {
    if n == 0 || n % dtype.vector() != 0 {
        return Err(format!("width {n} is not a multiple of {} elements", dtype.vector()));
    }
    if n > rms_norm_max_width(dtype) {
        return Err(format!("width {n} exceeds {}", rms_norm_max_width(dtype)));
    }
    Ok(())
}

/// RMSNorm with the residual add, forward, on the GPU.
pub fn rms_norm_forward(l: &Launch, a: &RmsNormForward) -> Result<(), KernelError> {
    const K: &str = "rms_norm_fwd";
    let d = dtype_of(l, K)?;
    rms_norm_supported(d, a.n as usize).map_err(|e| unsupported(K, e))?;
    let ptrs = [a.x, a.residual, a.weight, a.sum as *const c_void, a.y as *const c_void];
    if !ptrs.iter().all(|&p| aligned(p)) || (!a.residual.is_null() && a.sum.is_null()) {
        return Err(unsupported(K, "a pointer is not 16-byte aligned, or the residual add has no output"));
    }
    if a.rows == 0 {
        return Ok(());
    }
    let m = module(l.device)?;
    let threads = rms_launch_threads(m, K, d, a.n as usize)?;
    launch(m, l, &format!("{K}_{}", suffix(d)), a.rows as u32, threads, &mut [arg(&a.x), arg(&a.residual), arg(&a.weight), arg(&a.sum), arg(&a.y), arg(&a.rstd), arg(&a.n), arg(&a.eps), arg(&a.offset)])
}

/// Row blocks the RMSNorm backward uses on `device` for `rows` rows (the workspace's rows).
pub fn rms_norm_backward_blocks(device: i32, rows: i64) -> Result<i64, KernelError> {
    let m = module(device)?;
    Ok(rows.clamp(1, 2 * m.sms))
}

/// RMSNorm (with the residual add) backward on the GPU; with `dw`, the second pass reduces the
/// per-block sums in a fixed order.
pub fn rms_norm_backward(l: &Launch, a: &RmsNormBackward) -> Result<(), KernelError> {
    const K: &str = "rms_norm_bwd";
    let d = dtype_of(l, K)?;
    rms_norm_supported(d, a.n as usize).map_err(|e| unsupported(K, e))?;
    let ptrs = [a.sum, a.weight, a.dy, a.dsum, a.dx as *const c_void, a.dw as *const c_void];
    if !ptrs.iter().all(|&p| aligned(p)) || (!a.dw.is_null() && (a.workspace.is_null() || a.blocks < 1)) {
        return Err(unsupported(K, "a pointer is not 16-byte aligned, or dw has no workspace"));
    }
    if a.rows == 0 {
        return Ok(());
    }
    let m = module(l.device)?;
    let threads = rms_launch_threads(m, K, d, a.n as usize)?;
    let blocks = if a.dw.is_null() { a.rows.clamp(1, 2 * m.sms) } else { a.blocks };
    let partial: *mut f32 = if a.dw.is_null() { std::ptr::null_mut() } else { a.workspace };
    launch(
        m,
        l,
        &format!("{K}_{}", suffix(d)),
        blocks as u32,
        threads,
        &mut [arg(&a.sum), arg(&a.weight), arg(&a.rstd), arg(&a.dy), arg(&a.dsum), arg(&a.dx), arg(&partial), arg(&a.rows), arg(&a.n), arg(&a.offset)],
    )?;
    if a.dw.is_null() {
        return Ok(());
    }
    let grid = (a.n as u32).div_ceil(256);
    launch(m, l, &format!("rms_norm_dw_{}", suffix(d)), grid, 256, &mut [arg(&partial), arg(&a.dw), arg(&blocks), arg(&a.n)])
}

/// Checks that a rotary call fits the kernel: head and rotary widths in whole vectors, strides
/// and pointers aligned.
pub fn rope_supported(dtype: Dtype, a: &RopeArgs) -> Result<(), String> {
    let v = dtype.vector() as i64;
    let (hd, rot) = (a.head_dim as i64, a.rot as i64);
    if hd <= 0 || rot <= 0 || rot > hd || rot % (2 * v) != 0 || (hd - rot) % v != 0 {
        return Err(format!("head_dim {hd} with {rot} rotary dimensions is not in whole {v}-element vectors"));
    }
    let mut strides = a.q_strides.to_vec();
    if !a.k.is_null() {
        strides.extend(a.k_strides);
    }
    strides.extend(a.cos_strides);
    if strides.iter().any(|s| s % v != 0) {
        return Err(format!("a stride is not a multiple of {v} elements"));
    }
    let ptrs = [a.q, a.k, a.q_out as *const c_void, a.k_out as *const c_void, a.cos, a.sin];
    if !ptrs.iter().all(|&p| aligned(p)) {
        return Err("a pointer is not 16-byte aligned".into());
    }
    Ok(())
}

/// Rotary embedding of q and k (or its inverse) on the GPU.
pub fn rope(l: &Launch, a: &RopeArgs) -> Result<(), KernelError> {
    const K: &str = "rope";
    let d = dtype_of(l, K)?;
    rope_supported(d, a).map_err(|e| unsupported(K, e))?;
    let tokens = a.batch * a.tokens;
    if tokens == 0 {
        return Ok(());
    }
    let m = module(l.device)?;
    let [qb, qt, qh] = a.q_strides;
    let [kb, kt, kh] = a.k_strides;
    let [cb, ct] = a.cos_strides;
    launch(
        m,
        l,
        &format!("{K}_{}", suffix(d)),
        tokens as u32,
        128,
        &mut [
            arg(&a.q),
            arg(&qb),
            arg(&qt),
            arg(&qh),
            arg(&a.k),
            arg(&kb),
            arg(&kt),
            arg(&kh),
            arg(&a.q_out),
            arg(&a.k_out),
            arg(&a.cos),
            arg(&a.sin),
            arg(&cb),
            arg(&ct),
            arg(&a.tokens),
            arg(&a.q_heads),
            arg(&a.k_heads),
            arg(&a.head_dim),
            arg(&a.rot),
            arg(&a.inverse),
        ],
    )
}

/// Checks that a SwiGLU call fits the kernels.
pub fn swiglu_supported(dtype: Dtype, a: &SwigluArgs) -> Result<(), String> {
    let v = dtype.vector() as i64;
    if a.inner % v != 0 || a.gu_stride % v != 0 || (!a.dh.is_null() && a.dh_stride % v != 0) {
        return Err(format!("the width or a row stride is not a multiple of {v} elements"));
    }
    if ![a.gu, a.dh, a.out as *const c_void].iter().all(|&p| aligned(p)) {
        return Err("a pointer is not 16-byte aligned".into());
    }
    Ok(())
}

/// SwiGLU forward (`dh` null) or backward on the GPU.
pub fn swiglu(l: &Launch, a: &SwigluArgs) -> Result<(), KernelError> {
    const K: &str = "swiglu";
    let d = dtype_of(l, K)?;
    swiglu_supported(d, a).map_err(|e| unsupported(K, e))?;
    let packs = a.rows * a.inner / d.vector() as i64;
    if packs == 0 {
        return Ok(());
    }
    let m = module(l.device)?;
    let grid = ((packs + 255) / 256).min(m.sms * 16) as u32;
    if a.dh.is_null() {
        launch(m, l, &format!("swiglu_fwd_{}", suffix(d)), grid, 256, &mut [arg(&a.gu), arg(&a.gu_stride), arg(&a.out), arg(&a.rows), arg(&a.inner)])
    } else {
        launch(m, l, &format!("swiglu_bwd_{}", suffix(d)), grid, 256, &mut [arg(&a.gu), arg(&a.gu_stride), arg(&a.dh), arg(&a.dh_stride), arg(&a.out), arg(&a.rows), arg(&a.inner)])
    }
}

/// Milliseconds `work` takes on `stream` of `device`, timed by CUDA events recorded around it
/// (waits for the stream).
pub fn time_ms(device: i32, stream: *mut c_void, work: &mut dyn FnMut()) -> Result<f32, KernelError> {
    let m = module(device)?;
    let s = stream as sys::CUstream;
    // SAFETY: events are created in the device's primary context and destroyed here.
    unsafe {
        drv::ctx::set_current(m.ctx).map_err(driver_err("cuCtxSetCurrent"))?;
        let start = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(driver_err("cuEventCreate"))?;
        let end = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(driver_err("cuEventCreate"))?;
        drv::event::record(start, s).map_err(driver_err("cuEventRecord"))?;
        work();
        drv::event::record(end, s).map_err(driver_err("cuEventRecord"))?;
        drv::event::synchronize(end).map_err(driver_err("cuEventSynchronize"))?;
        let ms = drv::event::elapsed(start, end).map_err(driver_err("cuEventElapsedTime"))?;
        let _ = drv::event::destroy(start);
        let _ = drv::event::destroy(end);
        Ok(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    /// Every kernel compiles (NVRTC to PTX needs no GPU: tests/env.sh installs NVRTC) and
    /// every entry point the launcher looks up is in the PTX.
    #[test]
    fn every_kernel_compiles_to_ptx_with_nvrtc() {
        let found = load_nvrtc().unwrap_or_else(|e| panic!("{e}"));
        let (major, _) = nvrtc_version().expect("nvrtcVersion");
        assert!(major >= 12, "NVRTC {major} from {found}");
        for arch in ["compute_80", "compute_90"] {
            let ptx = compile_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
            for kernel in all_kernels() {
                for suffix in ["f32", "bf16"] {
                    let entry = format!(".entry {kernel}_{suffix}(");
                    assert!(ptx.contains(&entry), "{entry} missing from the {arch} PTX");
                }
            }
            // The e4m3 conversion is the hardware's on sm_89 and newer only.
            assert_eq!(ptx.contains("cvt.rn.satfinite.e4m3x2.f32"), arch == "compute_90", "{arch}");
        }
    }

    /// NVRTC assembles the module to machine code for an A100 and an H100 (what the driver does
    /// with the PTX at load time): the inline PTX of fp8.cu is valid where it is compiled in.
    #[test]
    fn every_kernel_assembles_to_sm_80_and_sm_90_machine_code() {
        use cudarc::nvrtc::{result, sys};
        load_nvrtc().unwrap_or_else(|e| panic!("{e}"));
        let src = CString::new(SOURCE).unwrap();
        for arch in ["sm_80", "sm_90"] {
            let prog = result::create_program(&src, None).unwrap();
            // SAFETY: a program just created, destroyed below.
            unsafe {
                let compiled = result::compile_program(prog, &[format!("--gpu-architecture={arch}")]);
                let log = result::get_program_log(prog).map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned()).unwrap_or_default();
                assert!(compiled.is_ok(), "{arch}: {log}");
                let mut size = 0usize;
                assert_eq!(sys::nvrtcGetCUBINSize(prog, &mut size), sys::nvrtcResult::NVRTC_SUCCESS, "{arch}");
                assert!(size > 1000, "{arch}: a cubin of {size} bytes");
                result::destroy_program(prog).unwrap();
            }
        }
    }

    #[test]
    fn a_compile_error_carries_nvrtc_log() {
        load_nvrtc().unwrap_or_else(|e| panic!("{e}"));
        let opts = cudarc::nvrtc::CompileOptions { arch: Some("compute_90"), ..Default::default() };
        let err = cudarc::nvrtc::compile_ptx_with_opts("extern \"C\" __global__ void k() { undefined_name(); }", opts).unwrap_err();
        assert!(format!("{err:?}").contains("undefined_name"), "{err:?}");
    }

    #[test]
    fn rms_norm_threads_cover_every_pack_in_whole_warps() {
        for cap in [1024usize, 768, 384, 256, 200] {
            for packs in [1usize, 16, 31, 256, 512, 1000, 1024, 1025, 2048, 4096] {
                match rms_threads(packs, cap) {
                    Some(t) => {
                        let t = t as usize;
                        assert!(t % 32 == 0 && t <= cap, "{packs} packs, cap {cap}: {t}");
                        assert!(t * MAX_PACKS >= packs, "{packs} packs with {t} threads");
                        assert!(t >= packs.min(cap / 32 * 32), "{packs} packs, cap {cap}: only {t} threads");
                    }
                    None => assert!(packs > cap / 32 * 32 * MAX_PACKS, "{packs} packs refused under cap {cap}"),
                }
            }
        }
        // An 8b model's 4096-wide bf16 rows (512 packs) under a backward kernel limited to
        // 256 threads (its registers): two packs a thread, not a failed launch.
        assert_eq!(rms_threads(512, 256), Some(256));
        assert_eq!(rms_threads(512, 1024), Some(512));
        assert!(rms_norm_supported(Dtype::Bf16, 2048).is_ok());
        assert!(rms_norm_supported(Dtype::Bf16, 2047).is_err());
        assert!(rms_norm_supported(Dtype::F32, rms_norm_max_width(Dtype::F32) + 4).is_err());
    }
}
