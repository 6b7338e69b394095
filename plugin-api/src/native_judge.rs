//! Judges, natively: the same names as the WebAssembly bindings; [`complete`] asks the host's
//! language model through [`crate::native::HostApi`].

use crate::native::{host, take_host_bytes, OwnedBytes};
use serde::{Deserialize, Serialize};

/// One sample to judge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub response: String,
    pub reference: Option<String>,
}

/// A score (finite, by convention in [0, 1]) and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Judgement {
    pub score: f32,
    pub rationale: String,
}

/// A judge.
pub trait Judge {
    fn judge(samples: Vec<Sample>) -> Vec<Result<Judgement, String>>;
}

/// The host model's reply to `prompt` (one user turn), in at most `max_tokens` new tokens.
pub fn complete(prompt: &str, max_tokens: u32) -> Result<String, String> {
    let h = host();
    let mut out = OwnedBytes { ptr: std::ptr::null_mut(), len: 0, cap: 0 };
    // SAFETY: `prompt` and `out` outlive the call.
    let rc = unsafe { (h.complete)(h.ctx, prompt.as_ptr(), prompt.len(), max_tokens, &mut out) };
    let text = String::from_utf8_lossy(&take_host_bytes(out)).into_owned();
    if rc == 0 { Ok(text) } else { Err(text) }
}

/// Exports a [`Judge`] implementation as a native plugin.
#[macro_export]
macro_rules! export_native_judge {
    ($t:ty) => {
        #[no_mangle]
        pub extern "C" fn ftx_plugin_vtable() -> *const $crate::native::PluginVTable {
            unsafe extern "C" fn call_host(host: *const $crate::native::HostApi, input: *const u8, len: usize, out: *mut $crate::native::OwnedBytes) -> i32 {
                $crate::native::serve_host(host, input, len, out, |samples: Vec<$crate::judge::Sample>| {
                    Ok::<_, String>(<$t as $crate::judge::Judge>::judge(samples))
                })
            }
            static TABLE: $crate::native::PluginVTable = $crate::native::PluginVTable {
                size: std::mem::size_of::<$crate::native::PluginVTable>() as u32,
                abi_major: $crate::native::ABI_MAJOR,
                abi_minor: $crate::native::ABI_MINOR,
                kind: $crate::native::KIND_JUDGE,
                call: $crate::native::needs_host,
                free: $crate::native::free_bytes,
                call_host,
            };
            &TABLE
        }
    };
}
pub use crate::export_native_judge as export_judge;
