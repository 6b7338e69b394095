//! Exporters, natively: the same names as the WebAssembly bindings. [`read`] streams a tensor's
//! bytes from the host; [`create`], [`write`] and [`finish`] write files through the host's
//! output sink, which confines them to one folder the plugin never sees (relative names only,
//! no `..`, a cap on the bytes), exactly as the WebAssembly `output` import does.

use crate::native::{host, take_host_bytes, HostApi, OwnedBytes};
use serde::{Deserialize, Serialize};

/// Element types of tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    F64,
    F32,
    F16,
    Bf16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::Bf16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

/// One tensor of the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorInfo {
    /// The Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: Dtype,
}

impl TensorInfo {
    /// Size of the tensor's data in bytes.
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size()
    }
}

/// The model being exported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `architectures[0]` of config.json, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// The model's config.json.
    pub config: String,
    pub tensors: Vec<TensorInfo>,
}

/// An exporter.
pub trait Exporter {
    fn export(info: ModelInfo) -> Result<(), String>;
}

/// The host table, when it has the exporter callbacks (a host of ABI 2.1 or later).
fn exporter_host() -> Result<&'static HostApi, String> {
    let h = host();
    let needed = std::mem::offset_of!(HostApi, finish) + std::mem::size_of::<usize>();
    if (h.size as usize) < needed {
        return Err("this ftx has no native exporter callbacks: use a newer ftx".into());
    }
    Ok(h)
}

/// The host's message in `err` when `rc` is nonzero.
fn check(rc: i32, err: OwnedBytes) -> Result<(), String> {
    let msg = take_host_bytes(err);
    if rc == 0 { Ok(()) } else { Err(String::from_utf8_lossy(&msg).into_owned()) }
}

fn empty() -> OwnedBytes {
    OwnedBytes { ptr: std::ptr::null_mut(), len: 0, cap: 0 }
}

/// `len` bytes of the tensor called `name` from byte `offset` of its little-endian, row-major
/// data; fewer at its end. At most 16 MiB per call.
pub fn read(name: &str, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let h = exporter_host()?;
    let mut out = empty();
    // SAFETY: `name` and `out` outlive the call.
    let rc = unsafe { (h.read)(h.ctx, name.as_ptr(), name.len(), offset, len, &mut out) };
    let bytes = take_host_bytes(out);
    if rc == 0 { Ok(bytes) } else { Err(String::from_utf8_lossy(&bytes).into_owned()) }
}

/// Opens a new file at the relative `path` in the output folder; returns its handle.
pub fn create(path: &str) -> Result<u32, String> {
    let h = exporter_host()?;
    let (mut handle, mut err) = (0u32, empty());
    // SAFETY: `path`, `handle` and `err` outlive the call.
    let rc = unsafe { (h.create)(h.ctx, path.as_ptr(), path.len(), &mut handle, &mut err) };
    check(rc, err).map(|()| handle)
}

/// Appends to an open file.
pub fn write(handle: u32, bytes: &[u8]) -> Result<(), String> {
    let h = exporter_host()?;
    let mut err = empty();
    // SAFETY: `bytes` and `err` outlive the call.
    let rc = unsafe { (h.write)(h.ctx, handle, bytes.as_ptr(), bytes.len(), &mut err) };
    check(rc, err)
}

/// Closes the file and moves it into place.
pub fn finish(handle: u32) -> Result<(), String> {
    let h = exporter_host()?;
    let mut err = empty();
    // SAFETY: `err` outlives the call.
    let rc = unsafe { (h.finish)(h.ctx, handle, &mut err) };
    check(rc, err)
}

/// Exports an [`Exporter`] implementation as a native plugin.
#[macro_export]
macro_rules! export_native_exporter {
    ($t:ty) => {
        #[no_mangle]
        pub extern "C" fn ftx_plugin_vtable() -> *const $crate::native::PluginVTable {
            unsafe extern "C" fn call_host(host: *const $crate::native::HostApi, input: *const u8, len: usize, out: *mut $crate::native::OwnedBytes) -> i32 {
                $crate::native::serve_host(host, input, len, out, |info: $crate::exporter::ModelInfo| <$t as $crate::exporter::Exporter>::export(info))
            }
            static TABLE: $crate::native::PluginVTable = $crate::native::PluginVTable {
                size: std::mem::size_of::<$crate::native::PluginVTable>() as u32,
                abi_major: $crate::native::ABI_MAJOR,
                abi_minor: $crate::native::ABI_MINOR,
                kind: $crate::native::KIND_EXPORTER,
                call: $crate::native::needs_host,
                free: $crate::native::free_bytes,
                call_host,
            };
            &TABLE
        }
    };
}
pub use crate::export_native_exporter as export_exporter;
