//! Copies between the device and pinned host memory on a side stream, ordered against
//! libtorch's compute stream with events, so that offloading a layer input overlaps the
//! layers computing meanwhile instead of queueing in front of them.
//!
//! Through the CUDA runtime that libtorch loaded (as [`super::memory_used`] does), not
//! libtorch's C++ stream API: the binary links only libtorch's CPU half and loads the CUDA
//! half at run time ([`super::enable_cuda`]), so a shim calling `c10::cuda` would make every
//! binary need the CUDA libraries to start. libtorch's compute stream is its default stream,
//! CUDA's legacy stream (ftx never sets another); the side stream is created non-blocking, so
//! the two wait for each other only where an event says so.
//!
//! The rules the callers keep (train::offload): the device side of a copy stays allocated
//! until the compute stream has waited for the copy's event ([`Event::block_compute`]), so
//! the caching allocator cannot hand its memory to a later kernel before the copy has read or
//! written it; both directions run on the one side stream, so a pinned host buffer is never
//! written by one copy while an earlier one still reads it.

use std::ffi::c_void;

type Stream = *mut c_void;
type RawEvent = *mut c_void;

/// The CUDA runtime functions the side stream needs.
struct Runtime {
    stream_create: unsafe extern "C" fn(*mut Stream, u32) -> i32,
    event_create: unsafe extern "C" fn(*mut RawEvent, u32) -> i32,
    event_record: unsafe extern "C" fn(RawEvent, Stream) -> i32,
    event_destroy: unsafe extern "C" fn(RawEvent) -> i32,
    stream_wait_event: unsafe extern "C" fn(Stream, RawEvent, u32) -> i32,
    memcpy_async: unsafe extern "C" fn(*mut c_void, *const c_void, usize, i32, Stream) -> i32,
    set_device: unsafe extern "C" fn(i32) -> i32,
    host_alloc: unsafe extern "C" fn(*mut *mut c_void, usize, u32) -> i32,
}

const STREAM_NON_BLOCKING: u32 = 1;
const EVENT_DISABLE_TIMING: u32 = 2;
/// `cudaMemcpyDefault`: the direction from the pointers (unified addressing).
const MEMCPY_DEFAULT: i32 = 4;
/// libtorch's default stream: CUDA's legacy stream.
const COMPUTE: Stream = std::ptr::null_mut();

fn runtime() -> Option<&'static Runtime> {
    static RT: std::sync::OnceLock<Option<Runtime>> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        if !super::enable_cuda().available() {
            return None;
        }
        let lib = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"].iter().find_map(|n| unsafe { libloading::Library::new(n) }.ok())?;
        // SAFETY: the signatures are the CUDA runtime's (cuda_runtime_api.h); the library stays
        // loaded for the life of the process (forgotten below), so the pointers stay valid.
        unsafe fn sym<T: Copy>(lib: &libloading::Library, name: &[u8]) -> Option<T> {
            unsafe { lib.get::<T>(name).ok().map(|f| *f) }
        }
        let rt = unsafe {
            Runtime {
                stream_create: sym(&lib, b"cudaStreamCreateWithFlags\0")?,
                event_create: sym(&lib, b"cudaEventCreateWithFlags\0")?,
                event_record: sym(&lib, b"cudaEventRecord\0")?,
                event_destroy: sym(&lib, b"cudaEventDestroy\0")?,
                stream_wait_event: sym(&lib, b"cudaStreamWaitEvent\0")?,
                memcpy_async: sym(&lib, b"cudaMemcpyAsync\0")?,
                set_device: sym(&lib, b"cudaSetDevice\0")?,
                host_alloc: sym(&lib, b"cudaHostAlloc\0")?,
            }
        };
        std::mem::forget(lib);
        Some(rt)
    })
    .as_ref()
}

/// A copy stream beside libtorch's compute stream on one device.
pub struct SideStream {
    rt: &'static Runtime,
    stream: Stream,
    device: i32,
}

// SAFETY: a CUDA stream handle may be used from any thread.
unsafe impl Send for SideStream {}
unsafe impl Sync for SideStream {}

/// A point in one stream's work, for another stream to wait on.
pub struct Event {
    rt: &'static Runtime,
    raw: RawEvent,
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: `raw` came from cudaEventCreateWithFlags; destroying an event whose work is
        // still pending is allowed (CUDA releases it once the work completes).
        unsafe {
            (self.rt.event_destroy)(self.raw);
        }
    }
}

impl Event {
    /// Makes libtorch's compute stream wait (on the device, not the host) until this event.
    pub fn block_compute(&self) {
        // SAFETY: a live event; the legacy stream.
        unsafe {
            (self.rt.stream_wait_event)(COMPUTE, self.raw, 0);
        }
    }
}

impl SideStream {
    /// The side stream of CUDA device `device` (one per device, made on first use); `None`
    /// without CUDA or when the runtime lacks a function (callers then copy on the compute
    /// stream, as libtorch does).
    ///
    /// `FTX_OFFLOAD_SIDE_STREAM=0` turns it off (copies on the compute stream, as before), for
    /// before/after timings with one binary.
    pub fn of(device: tch::Device) -> Option<&'static SideStream> {
        let tch::Device::Cuda(i) = device else { return None };
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *OFF.get_or_init(|| std::env::var("FTX_OFFLOAD_SIDE_STREAM").is_ok_and(|v| v.trim() == "0")) {
            return None;
        }
        static STREAMS: std::sync::Mutex<Vec<(usize, &'static SideStream)>> = std::sync::Mutex::new(Vec::new());
        let mut streams = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = streams.iter().find(|(d, _)| *d == i) {
            return Some(s);
        }
        let rt = runtime()?;
        let mut stream: Stream = std::ptr::null_mut();
        // SAFETY: plain runtime calls with out-pointers to locals.
        let ok = unsafe { (rt.set_device)(i as i32) == 0 && (rt.stream_create)(&mut stream, STREAM_NON_BLOCKING) == 0 };
        if !ok {
            return None;
        }
        let s: &'static SideStream = Box::leak(Box::new(SideStream { rt, stream, device: i as i32 }));
        streams.push((i, s));
        Some(s)
    }

    fn record(&self, stream: Stream) -> Option<Event> {
        let mut raw: RawEvent = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; `stream` is the side stream or the legacy stream.
        unsafe {
            if (self.rt.set_device)(self.device) != 0 || (self.rt.event_create)(&mut raw, EVENT_DISABLE_TIMING) != 0 {
                return None;
            }
            let event = Event { rt: self.rt, raw };
            ((self.rt.event_record)(raw, stream) == 0).then_some(event)
        }
    }

    /// Makes the side stream wait for everything queued on the compute stream so far (the
    /// tensors a copy reads or overwrites are ready, or no longer used).
    pub fn wait_for_compute(&self) -> bool {
        let Some(e) = self.record(COMPUTE) else { return false };
        // SAFETY: a live event and the side stream.
        unsafe { (self.rt.stream_wait_event)(self.stream, e.raw, 0) == 0 }
    }

    /// Queues a copy of `src` into `dst` (same bytes, both contiguous; device and pinned host
    /// memory in either direction) on the side stream. False when CUDA refused it.
    pub fn copy(&self, dst: &tch::Tensor, src: &tch::Tensor) -> bool {
        let bytes = src.numel() * src.kind().elt_size_in_bytes();
        debug_assert_eq!(bytes, dst.numel() * dst.kind().elt_size_in_bytes());
        debug_assert!(src.is_contiguous() && dst.is_contiguous());
        // SAFETY: both tensors are alive, contiguous and `bytes` long; the callers keep them
        // alive until the event recorded after this copy has been waited for.
        unsafe { (self.rt.memcpy_async)(dst.data_ptr(), src.data_ptr(), bytes, MEMCPY_DEFAULT, self.stream) == 0 }
    }

    /// An event after every copy queued on the side stream so far.
    pub fn done(&self) -> Option<Event> {
        self.record(self.stream)
    }
}

/// A buffer of pinned host memory from a pool of equal buffers: taken by [`PinnedBuffer::take`],
/// back in the pool when dropped, never returned to the system (the pool is the run's
/// high-water mark, as libtorch's pinned cache is, without its rounding to powers of two).
/// Reuse is safe for the side stream's copies: they run in order on one stream.
pub struct PinnedBuffer {
    ptr: usize,
    bytes: usize,
}

static PINNED_POOL: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

impl PinnedBuffer {
    /// A pinned buffer of exactly `bytes`, from the pool or newly allocated; `None` without
    /// CUDA or when the host has no more to pin.
    pub fn take(bytes: usize) -> Option<PinnedBuffer> {
        let mut pool = PINNED_POOL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = pool.iter().position(|&(_, b)| b == bytes) {
            let (ptr, bytes) = pool.swap_remove(i);
            return Some(PinnedBuffer { ptr, bytes });
        }
        drop(pool);
        let rt = runtime()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; flags 0 = cudaHostAllocDefault.
        (unsafe { (rt.host_alloc)(&mut ptr, bytes, 0) } == 0).then_some(PinnedBuffer { ptr: ptr as usize, bytes })
    }

    /// The first `shape`'s elements of the buffer as a CPU tensor of `kind`, sharing its
    /// memory. The tensor must not outlive the buffer.
    pub fn tensor(&self, shape: &[i64], kind: tch::Kind) -> tch::Tensor {
        let n: i64 = shape.iter().product();
        assert!(n as usize * kind.elt_size_in_bytes() <= self.bytes, "a view of {n} elements is larger than the pinned buffer");
        let mut strides = vec![1i64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        // SAFETY: the memory is the buffer's, large enough (checked), and lives as long as the
        // buffer, which its callers keep beside the tensor.
        unsafe { tch::Tensor::from_blob(self.ptr as *const u8, shape, &strides, kind, tch::Device::Cpu) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        PINNED_POOL.lock().unwrap_or_else(|e| e.into_inner()).push((self.ptr, self.bytes));
    }
}
