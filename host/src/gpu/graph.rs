//! CUDA graphs: a piece of device work captured once — every kernel libtorch (and the fused
//! kernels) launch while capturing — and replayed with one launch. What makes small-batch decoding
//! cheap: a decode step of a 1B model is hundreds of small kernels, and launching them one by one
//! from the host costs more than running them.
//!
//! Through libtorch's `at::cuda::CUDAGraph` (src/gpu/graph.cpp), so that memory the captured work
//! allocates comes from the caching allocator's private pool for graphs and stays valid for every
//! replay. The captured code must be shape-static and free of host synchronisation; its inputs are
//! tensors allocated before the capture and overwritten in place before each replay, and its
//! outputs are the tensors it returned during capture, rewritten by each replay.

use std::ffi::{c_char, c_void, CStr};

/// Why a graph could not be captured or replayed.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// This build has no C++ shim, the device is no CUDA device, or libtorch lacks the API.
    #[error("CUDA graphs are unavailable: {0}")]
    Unavailable(String),
    /// libtorch or the CUDA runtime refused a step.
    #[error("CUDA graph {step} failed: {message}")]
    Failed { step: &'static str, message: String },
    /// The captured code itself failed (a libtorch error while capturing, e.g. a host sync).
    #[error("the captured work failed while capturing (not capturable: a host sync or a dynamic shape?)")]
    Body,
}

/// A memory pool that graphs captured with it share: one graph's intermediates may reuse memory
/// another's used, so their outputs stay valid only until another graph of the pool replays.
#[derive(Debug, Clone, Copy)]
pub struct GraphPool(u64, u64);

/// A captured, replayable graph.
pub struct CudaGraph {
    raw: *mut c_void,
}

// SAFETY: the graph is an opaque libtorch object used only through its owner (one thread at a time).
unsafe impl Send for CudaGraph {}

const ERR_LEN: usize = 512;

fn message(err: &[c_char]) -> String {
    // SAFETY: the shim writes a NUL-terminated message into the buffer (or leaves it zeroed).
    unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned()
}

fn check(step: &'static str, f: impl FnOnce(*mut c_char, i32) -> i32) -> Result<(), GraphError> {
    let mut err = [0 as c_char; ERR_LEN];
    match f(err.as_mut_ptr(), ERR_LEN as i32) {
        0 => Ok(()),
        _ => Err(GraphError::Failed { step, message: message(&err) }),
    }
}

/// Whether graphs can be captured in this process: the shim is built and libtorch's CUDA half
/// (loaded by [`super::enable_cuda`]) has `CUDAGraph`.
pub fn available() -> Result<(), GraphError> {
    #[cfg(ftx_torch_shim)]
    {
        if !super::enable_cuda().available() {
            return Err(GraphError::Unavailable("no CUDA device".into()));
        }
        // SAFETY: no arguments; looks symbols up.
        if unsafe { shim::ftx_cuda_graph_available() } == 1 {
            return Ok(());
        }
        Err(GraphError::Unavailable("libtorch_cuda.so has no at::cuda::CUDAGraph with the expected members".into()))
    }
    #[cfg(not(ftx_torch_shim))]
    Err(GraphError::Unavailable("this build has no libtorch C++ shim".into()))
}

impl GraphPool {
    /// A new shared pool.
    pub fn new() -> Result<GraphPool, GraphError> {
        available()?;
        let (mut a, mut b) = (0u64, 0u64);
        #[cfg(ftx_torch_shim)]
        // SAFETY: the out-pointers are valid; the shim catches C++ exceptions.
        check("pool", |e, n| unsafe { shim::ftx_cuda_graph_pool(&mut a, &mut b, e, n) })?;
        Ok(GraphPool(a, b))
    }
}

impl CudaGraph {
    /// Captures `body` on `device`: `body` runs once eagerly on a side stream (a warm-up that also
    /// lets lazy initialisation — cuBLAS workspaces, kernel modules — happen outside the capture),
    /// then once under capture. Returns the graph, the warm-up's result (computed) and the
    /// captured run's result (its tensors are the graph's outputs, written by each replay; not yet
    /// computed until the first replay).
    pub fn capture<R>(device: usize, pool: GraphPool, mut body: impl FnMut() -> R) -> Result<(CudaGraph, R, R), GraphError> {
        available()?;
        let graph = CudaGraph::new(device)?;
        graph.side_stream(true)?;
        let warm = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut body));
        let warm = match warm {
            Ok(r) => r,
            Err(_) => {
                let _ = graph.side_stream(false);
                return Err(GraphError::Body);
            }
        };
        let begun = graph.step("capture begin", |g, e, n| shim_call::begin(g, pool, e, n));
        if let Err(e) = begun {
            let _ = graph.side_stream(false);
            return Err(e);
        }
        let captured = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut body));
        // Always end the capture, also after a failing body (it unwinds the stream's capture).
        let ended = graph.step("capture end", shim_call::end);
        let back = graph.side_stream(false);
        let captured = captured.map_err(|_| GraphError::Body)?;
        ended?;
        back?;
        Ok((graph, warm, captured))
    }

    /// Launches the captured work on libtorch's current stream.
    pub fn replay(&self) -> Result<(), GraphError> {
        self.step("replay", shim_call::replay)
    }

    fn new(device: usize) -> Result<CudaGraph, GraphError> {
        let mut err = [0 as c_char; ERR_LEN];
        let raw = shim_call::new(device as i32, err.as_mut_ptr(), ERR_LEN as i32);
        if raw.is_null() {
            return Err(GraphError::Failed { step: "creation", message: message(&err) });
        }
        Ok(CudaGraph { raw })
    }

    fn side_stream(&self, on: bool) -> Result<(), GraphError> {
        self.step(if on { "side stream" } else { "stream restore" }, |g, e, n| shim_call::side_stream(g, on, e, n))
    }

    fn step(&self, step: &'static str, f: impl FnOnce(*mut c_void, *mut c_char, i32) -> i32) -> Result<(), GraphError> {
        check(step, |e, n| f(self.raw, e, n))
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        shim_call::free(self.raw);
    }
}

/// The shim's entry points, or failures where the shim is not built.
mod shim_call {
    use super::GraphPool;
    use std::ffi::{c_char, c_void};

    #[cfg(ftx_torch_shim)]
    pub fn new(device: i32, e: *mut c_char, n: i32) -> *mut c_void {
        // SAFETY: the shim catches C++ exceptions and writes at most `n` bytes to `e`.
        unsafe { super::shim::ftx_cuda_graph_new(device, e, n) }
    }
    #[cfg(not(ftx_torch_shim))]
    pub fn new(_: i32, _: *mut c_char, _: i32) -> *mut c_void {
        std::ptr::null_mut()
    }

    pub fn free(g: *mut c_void) {
        #[cfg(ftx_torch_shim)]
        // SAFETY: `g` came from `new` and is freed once (by the owner's Drop).
        unsafe {
            super::shim::ftx_cuda_graph_free(g)
        }
        #[cfg(not(ftx_torch_shim))]
        let _ = g;
    }

    macro_rules! call {
        ($name:ident ( $($arg:ident : $ty:ty),* ) => $ffi:ident ( $($farg:expr),* )) => {
            pub fn $name(g: *mut c_void, $($arg: $ty,)* e: *mut c_char, n: i32) -> i32 {
                #[cfg(ftx_torch_shim)]
                // SAFETY: `g` is a live graph from `new`; the shim catches C++ exceptions.
                return unsafe { super::shim::$ffi(g, $($farg,)* e, n) };
                #[cfg(not(ftx_torch_shim))]
                {
                    let _ = (g, $($arg,)* e, n);
                    -1
                }
            }
        };
    }
    call!(side_stream(on: bool) => ftx_cuda_graph_side_stream(i32::from(on)));
    call!(begin(pool: GraphPool) => ftx_cuda_graph_capture_begin(pool.0, pool.1));
    call!(end() => ftx_cuda_graph_capture_end());
    call!(replay() => ftx_cuda_graph_replay());
}

#[cfg(ftx_torch_shim)]
mod shim {
    use std::ffi::{c_char, c_void};
    extern "C" {
        pub fn ftx_cuda_graph_available() -> i32;
        pub fn ftx_cuda_graph_new(device: i32, err: *mut c_char, len: i32) -> *mut c_void;
        pub fn ftx_cuda_graph_free(g: *mut c_void);
        pub fn ftx_cuda_graph_pool(first: *mut u64, second: *mut u64, err: *mut c_char, len: i32) -> i32;
        pub fn ftx_cuda_graph_side_stream(g: *mut c_void, on: i32, err: *mut c_char, len: i32) -> i32;
        pub fn ftx_cuda_graph_capture_begin(g: *mut c_void, first: u64, second: u64, err: *mut c_char, len: i32) -> i32;
        pub fn ftx_cuda_graph_capture_end(g: *mut c_void, err: *mut c_char, len: i32) -> i32;
        pub fn ftx_cuda_graph_replay(g: *mut c_void, err: *mut c_char, len: i32) -> i32;
    }
}
