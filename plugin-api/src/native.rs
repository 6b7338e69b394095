//! The native plugin ABI: the same plugin source built for the host's target (a `cdylib`)
//! exports one C symbol, `ftx_plugin_vtable`, returning a versioned, size-prefixed,
//! append-only table. Records cross as JSON, so the ABI stays small and stable.
//!
//! Native plugins are trusted code: they run in the host process at full speed, without the
//! WebAssembly sandbox. Panics are caught at the boundary and returned as errors.

use serde::{Deserialize, Serialize};

/// Major version of the native ABI; the host refuses any other.
pub const ABI_MAJOR: u32 = 1;
/// Minor version: fields are only ever appended to [`PluginVTable`].
pub const ABI_MINOR: u32 = 0;

/// Plugin kinds as the table names them.
pub const KIND_FILTER: u32 = 1;
/// A reward function.
pub const KIND_REWARD: u32 = 2;

/// Bytes the plugin allocated and the host must give back through [`PluginVTable::free`].
#[repr(C)]
pub struct OwnedBytes {
    pub ptr: *mut u8,
    pub len: usize,
    pub cap: usize,
}

impl OwnedBytes {
    /// Hands a buffer to the host.
    pub fn from_vec(v: Vec<u8>) -> OwnedBytes {
        let mut v = std::mem::ManuallyDrop::new(v);
        OwnedBytes { ptr: v.as_mut_ptr(), len: v.len(), cap: v.capacity() }
    }
}

/// The table a native plugin exports. `size` is `size_of::<PluginVTable>()` as the plugin
/// saw it: the host reads only fields that lie inside it.
#[repr(C)]
pub struct PluginVTable {
    pub size: u32,
    pub abi_major: u32,
    pub abi_minor: u32,
    pub kind: u32,
    /// Runs the plugin on a JSON request; writes a JSON reply (or an error message) to
    /// `out` and returns 0 on success, nonzero on error.
    pub call: unsafe extern "C" fn(input: *const u8, len: usize, out: *mut OwnedBytes) -> i32,
    /// Frees what `call` returned.
    pub free: unsafe extern "C" fn(bytes: OwnedBytes),
}

/// The symbol every native plugin exports.
pub const VTABLE_SYMBOL: &[u8] = b"ftx_plugin_vtable\0";

/// Runs `f` on the decoded request and encodes its reply, catching panics.
///
/// # Safety
/// `input` must point to `len` readable bytes and `out` to writable memory.
pub unsafe fn serve<Req: for<'de> Deserialize<'de>, Resp: Serialize>(
    input: *const u8,
    len: usize,
    out: *mut OwnedBytes,
    f: impl FnOnce(Req) -> Resp + std::panic::UnwindSafe,
) -> i32 {
    let bytes = std::slice::from_raw_parts(input, len);
    let result = match serde_json::from_slice::<Req>(bytes) {
        Ok(req) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || f(req))) {
            Ok(resp) => serde_json::to_vec(&resp).map_err(|e| e.to_string()),
            Err(p) => Err(format!(
                "panicked: {}",
                p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
            )),
        },
        Err(e) => Err(format!("bad request: {e}")),
    };
    let (code, body) = match result {
        Ok(b) => (0, b),
        Err(msg) => (1, msg.into_bytes()),
    };
    out.write(OwnedBytes::from_vec(body));
    code
}

/// Gives back a buffer made by [`OwnedBytes::from_vec`].
///
/// # Safety
/// `b` must come from [`OwnedBytes::from_vec`] and not be freed twice.
pub unsafe extern "C" fn free_bytes(b: OwnedBytes) {
    drop(Vec::from_raw_parts(b.ptr, b.len, b.cap));
}

/// Exports a [`crate::filter::Filter`] implementation as a native plugin.
#[macro_export]
macro_rules! export_native_filter {
    ($t:ty) => {
        #[no_mangle]
        pub extern "C" fn ftx_plugin_vtable() -> *const $crate::native::PluginVTable {
            unsafe extern "C" fn call(input: *const u8, len: usize, out: *mut $crate::native::OwnedBytes) -> i32 {
                $crate::native::serve(input, len, out, |items: Vec<$crate::filter::Item>| <$t as $crate::filter::Filter>::filter(items))
            }
            static TABLE: $crate::native::PluginVTable = $crate::native::PluginVTable {
                size: std::mem::size_of::<$crate::native::PluginVTable>() as u32,
                abi_major: $crate::native::ABI_MAJOR,
                abi_minor: $crate::native::ABI_MINOR,
                kind: $crate::native::KIND_FILTER,
                call,
                free: $crate::native::free_bytes,
            };
            &TABLE
        }
    };
}

/// Exports a [`crate::reward::Reward`] implementation as a native plugin.
#[macro_export]
macro_rules! export_native_reward {
    ($t:ty) => {
        #[no_mangle]
        pub extern "C" fn ftx_plugin_vtable() -> *const $crate::native::PluginVTable {
            unsafe extern "C" fn call(input: *const u8, len: usize, out: *mut $crate::native::OwnedBytes) -> i32 {
                $crate::native::serve(input, len, out, |samples: Vec<$crate::reward::Sample>| <$t as $crate::reward::Reward>::score(samples))
            }
            static TABLE: $crate::native::PluginVTable = $crate::native::PluginVTable {
                size: std::mem::size_of::<$crate::native::PluginVTable>() as u32,
                abi_major: $crate::native::ABI_MAJOR,
                abi_minor: $crate::native::ABI_MINOR,
                kind: $crate::native::KIND_REWARD,
                call,
                free: $crate::native::free_bytes,
            };
            &TABLE
        }
    };
}
