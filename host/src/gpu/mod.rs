//! Finding accelerators and picking the device a model runs on.
//!
//! tch links only `libtorch_cpu`; the CUDA half of libtorch registers itself when
//! `libtorch_cuda.so` is loaded. So the binary loads it with `dlopen` first thing in `main`,
//! and remembers why it could not when it could not.

pub mod cross_entropy;
pub mod kernels;

use std::str::FromStr;
use tch::Device;

pub mod graph;
pub mod ledger;
pub mod stream;

/// Outcome of trying to load libtorch's CUDA backend.
#[derive(Debug, Clone)]
pub enum CudaStatus {
    /// `libtorch_cuda.so` is loaded; libtorch sees this many devices.
    Enabled { devices: i64 },
    /// The library loaded but no device is visible (driver missing, or no GPU).
    NoDevice { reason: String },
    /// The library could not be loaded (a CPU-only libtorch, or missing CUDA libraries).
    NotLoaded { reason: String },
}

impl CudaStatus {
    /// True when at least one CUDA device can run tensors.
    pub fn available(&self) -> bool {
        matches!(self, CudaStatus::Enabled { devices } if *devices > 0)
    }
}

/// Loads `libtorch_cuda.so` into the process (once) so libtorch registers its CUDA backend.
/// Must run before anything asks libtorch about CUDA.
pub fn enable_cuda() -> CudaStatus {
    static STATUS: std::sync::OnceLock<CudaStatus> = std::sync::OnceLock::new();
    STATUS.get_or_init(load_cuda).clone()
}

fn load_cuda() -> CudaStatus {
    // RTLD_GLOBAL so the CUDA kernels' registrations see libtorch_cpu's symbols and stay.
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
    let lib = unsafe { libloading::os::unix::Library::open(Some("libtorch_cuda.so"), flags) };
    match lib {
        Ok(lib) => {
            // Keep it loaded for the life of the process.
            std::mem::forget(lib);
            let devices = tch::Cuda::device_count();
            if devices > 0 {
                CudaStatus::Enabled { devices }
            } else {
                CudaStatus::NoDevice {
                    reason: "libtorch_cuda.so loaded, but the CUDA driver reports no device".into(),
                }
            }
        }
        Err(e) => CudaStatus::NotLoaded { reason: format!("libtorch_cuda.so could not be loaded: {e}") },
    }
}

/// `--device auto|cpu|cuda|cuda:N`, as the user wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    /// The first GPU when CUDA is enabled, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N (`cuda` means 0).
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" | "gpu" => Ok(DeviceArg::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceArg::Cuda(n)),
                _ => Err(format!("unknown device '{s}': use auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Auto => write!(f, "auto"),
            DeviceArg::Cpu => write!(f, "cpu"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// Resolves to a libtorch device, or says why the asked-for GPU cannot be used.
    pub fn resolve(self) -> Result<Device, String> {
        let status = enable_cuda();
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Auto => Ok(if status.available() { Device::Cuda(0) } else { Device::Cpu }),
            DeviceArg::Cuda(n) => match status {
                CudaStatus::Enabled { devices } if (n as i64) < devices => Ok(Device::Cuda(n)),
                CudaStatus::Enabled { devices } => {
                    Err(format!("cuda:{n} asked for, but only {devices} CUDA device(s) exist (0..{})", devices - 1))
                }
                CudaStatus::NoDevice { reason } | CudaStatus::NotLoaded { reason } => {
                    Err(format!("cuda:{n} asked for, but CUDA is not available: {reason}; use --device cpu"))
                }
            },
        }
    }
}

/// One GPU as `ftx doctor` reports it.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    /// Index as in `cuda:N`.
    pub index: usize,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
}

/// Lists the visible GPUs through the CUDA runtime that libtorch loaded.
pub fn gpus() -> Vec<GpuInfo> {
    let CudaStatus::Enabled { devices } = enable_cuda() else { return Vec::new() };
    (0..devices as usize).filter_map(cudart::device_info).collect()
}

/// Peak bytes libtorch's CUDA caching allocator has handed out on `device` since the last
/// [`reset_peak_memory`] (what `torch.cuda.max_memory_allocated` reports), if CUDA.
pub fn peak_allocated(device: Device) -> Option<u64> {
    allocator::peak(device, false)
}

/// Peak bytes the caching allocator has reserved from the driver (allocated plus cached).
pub fn peak_reserved(device: Device) -> Option<u64> {
    allocator::peak(device, true)
}

/// Starts the peak statistics afresh from what is allocated now.
pub fn reset_peak_memory(device: Device) {
    allocator::reset(device)
}

/// The allocator statistics shim (src/gpu/allocator.cpp), when built against a CUDA libtorch.
mod allocator {
    use tch::Device;

    #[cfg(ftx_allocator_stats)]
    extern "C" {
        fn ftx_cuda_peak_allocated(device: i32) -> i64;
        fn ftx_cuda_peak_reserved(device: i32) -> i64;
        fn ftx_cuda_reset_peak(device: i32) -> i32;
        fn ftx_cuda_current_reserved(device: i32) -> i64;
        fn ftx_cuda_empty_cache() -> i32;
    }

    /// Bytes reserved now on CUDA device `i` (allocated plus what stays cached), after
    /// returning the cache to the driver.
    pub fn empty_cache_and_reserved(i: usize) -> Option<u64> {
        #[cfg(ftx_allocator_stats)]
        // SAFETY: as in `peak`.
        unsafe {
            if ftx_cuda_empty_cache() != 0 {
                return None;
            }
            u64::try_from(ftx_cuda_current_reserved(i as i32)).ok()
        }
        #[cfg(not(ftx_allocator_stats))]
        {
            let _ = i;
            None
        }
    }

    pub fn peak(device: Device, reserved: bool) -> Option<u64> {
        let Device::Cuda(i) = device else { return None };
        #[cfg(ftx_allocator_stats)]
        {
            // SAFETY: plain C functions of the shim; they catch every C++ exception.
            let bytes = unsafe { if reserved { ftx_cuda_peak_reserved(i as i32) } else { ftx_cuda_peak_allocated(i as i32) } };
            u64::try_from(bytes).ok()
        }
        #[cfg(not(ftx_allocator_stats))]
        {
            let _ = (i, reserved);
            None
        }
    }

    pub fn reset(device: Device) {
        if let Device::Cuda(i) = device {
            #[cfg(ftx_allocator_stats)]
            // SAFETY: as above.
            unsafe {
                ftx_cuda_reset_peak(i as i32);
            }
            #[cfg(not(ftx_allocator_stats))]
            let _ = i;
        }
    }
}

/// Device memory in use on `device` (total minus free, as the driver reports it), if CUDA.
pub fn memory_used(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(i) => cudart::mem_used(i),
        _ => None,
    }
}

/// Confines libtorch's allocator on `device` to `bytes` in all (what it holds already included),
/// as on a card with that much memory: its cache goes back to the driver, and the rest of the
/// free memory to one raw allocation outside libtorch, held until the process exits (the
/// allocator then frees its cache and retries, or fails, as it would on that card). Returns
/// the bytes set aside.
pub fn cap_memory(device: Device, bytes: u64) -> Result<u64, String> {
    let Device::Cuda(i) = device else { return Err("a memory cap needs a CUDA device".into()) };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let reserved = allocator::empty_cache_and_reserved(i).ok_or("this libtorch does not report its allocator's statistics")?;
    let room = bytes.checked_sub(reserved).ok_or(format!("{:.2} GiB are in use already", gib(reserved)))?;
    let free = cudart::mem_free(i).ok_or("the CUDA runtime did not report free memory")?;
    let hold = free.checked_sub(room).ok_or(format!("only {:.1} GiB are free on cuda:{i}", gib(free)))?;
    cudart::hold(i, hold).ok_or(format!("could not set aside {:.1} GiB on cuda:{i}", gib(hold)))?;
    Ok(hold)
}

/// Minimal CUDA runtime queries for `doctor` (libtorch does not expose device names).
mod cudart {
    use super::GpuInfo;

    // The leading fields of cudaDeviceProp (stable across CUDA 11-13): a 256-byte name,
    // a 16-byte UUID, 8 bytes of LUID, the LUID node mask (u32), then totalGlobalMem (usize).
    // We read only those and give the call a buffer larger than any version's struct.
    const PROP_BUF: usize = 4096;

    fn runtime() -> Option<&'static libloading::Library> {
        static LIB: std::sync::OnceLock<Option<libloading::Library>> = std::sync::OnceLock::new();
        LIB.get_or_init(|| {
            ["libcudart.so.13", "libcudart.so.12", "libcudart.so"].iter().find_map(|n| unsafe { libloading::Library::new(n) }.ok())
        })
        .as_ref()
    }

    /// (free, total) bytes on device `index`.
    fn mem_info(index: usize) -> Option<(u64, u64)> {
        let lib = runtime()?;
        unsafe {
            type SetDevice = unsafe extern "C" fn(i32) -> i32;
            type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
            let set: libloading::Symbol<SetDevice> = lib.get(b"cudaSetDevice\0").ok()?;
            let info: libloading::Symbol<MemGetInfo> = lib.get(b"cudaMemGetInfo\0").ok()?;
            let (mut free, mut total) = (0usize, 0usize);
            if set(index as i32) != 0 || info(&mut free, &mut total) != 0 {
                return None;
            }
            Some((free as u64, total as u64))
        }
    }

    pub fn mem_used(index: usize) -> Option<u64> {
        mem_info(index).map(|(free, total)| total - free)
    }

    pub fn mem_free(index: usize) -> Option<u64> {
        mem_info(index).map(|(free, _)| free)
    }

    /// Allocates `bytes` on device `index` and never frees them.
    pub fn hold(index: usize, bytes: u64) -> Option<()> {
        let lib = runtime()?;
        unsafe {
            type SetDevice = unsafe extern "C" fn(i32) -> i32;
            type Malloc = unsafe extern "C" fn(*mut *mut u8, usize) -> i32;
            let set: libloading::Symbol<SetDevice> = lib.get(b"cudaSetDevice\0").ok()?;
            let malloc: libloading::Symbol<Malloc> = lib.get(b"cudaMalloc\0").ok()?;
            let mut ptr = std::ptr::null_mut();
            (set(index as i32) == 0 && malloc(&mut ptr, bytes as usize) == 0).then_some(())
        }
    }

    pub fn device_info(index: usize) -> Option<GpuInfo> {
        let lib = runtime()?;
        unsafe {
            type GetProps = unsafe extern "C" fn(*mut u8, i32) -> i32;
            type Attr = unsafe extern "C" fn(*mut i32, i32, i32) -> i32;
            let props: libloading::Symbol<GetProps> = lib
                .get(b"cudaGetDeviceProperties_v2\0")
                .or_else(|_| lib.get(b"cudaGetDeviceProperties\0"))
                .ok()?;
            let attr: libloading::Symbol<Attr> = lib.get(b"cudaDeviceGetAttribute\0").ok()?;
            let mut buf = vec![0u8; PROP_BUF];
            if props(buf.as_mut_ptr(), index as i32) != 0 {
                return None;
            }
            let name_end = buf[..256].iter().position(|&b| b == 0).unwrap_or(256);
            let name = String::from_utf8_lossy(&buf[..name_end]).into_owned();
            let mem_off = 256 + 16 + 8 + 8; // name, uuid, luid, node mask (padded to 8)
            let total = usize::from_ne_bytes(buf[mem_off..mem_off + 8].try_into().ok()?) as u64;
            let (mut major, mut minor) = (0, 0);
            // cudaDevAttrComputeCapabilityMajor = 75, Minor = 76
            attr(&mut major, 75, index as i32);
            attr(&mut minor, 76, index as i32);
            Some(GpuInfo { index, name, total_bytes: total, capability: (major, minor) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_arg_parses_every_form_and_rejects_others() {
        assert_eq!("auto".parse::<DeviceArg>(), Ok(DeviceArg::Auto));
        assert_eq!("CPU".parse::<DeviceArg>(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(3)));
        assert!("cuda:x".parse::<DeviceArg>().unwrap_err().contains("cuda:N"));
        assert!("tpu".parse::<DeviceArg>().is_err());
    }

    #[test]
    fn cpu_always_resolves() {
        assert_eq!(DeviceArg::Cpu.resolve(), Ok(Device::Cpu));
    }
}
