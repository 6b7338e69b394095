//! Native plugins: a shared library built from the same plugin source, loaded with
//! libloading. Trusted code at full speed — no sandbox — behind a versioned, size-prefixed
//! `repr(C)` table (see `ftx_plugin_api::native`); another ABI major version is refused.

use super::{plugin_name, PluginError, PluginKind};
use ftx_plugin_api::native::{OwnedBytes, PluginVTable, ABI_MAJOR, KIND_FILTER, KIND_REWARD, VTABLE_SYMBOL};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// Fields the host reads: everything up to and including `free`.
const REQUIRED: usize = std::mem::size_of::<PluginVTable>();

/// A loaded native plugin.
pub struct NativePlugin {
    pub name: String,
    pub kind: PluginKind,
    table: *const PluginVTable,
    // Keeps the code behind `table` mapped.
    _lib: libloading::Library,
}

// SAFETY: the table is immutable static data of the loaded library; calls are serialised by
// `&mut self` at the call sites.
unsafe impl Send for NativePlugin {}

/// True when `path` names a shared library rather than a WebAssembly component.
pub fn is_native(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}

impl NativePlugin {
    /// Loads the library and checks its table.
    pub fn load(path: &Path) -> Result<NativePlugin, PluginError> {
        let name = plugin_name(path).trim_start_matches("lib").to_owned();
        let fail = |problem: String| PluginError::Load { plugin: name.clone(), problem };
        // SAFETY: loading a native plugin runs its initialisers: native plugins are trusted.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| fail(format!("{}: {e}", path.display())))?;
        let table = unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn() -> *const PluginVTable> =
                lib.get(VTABLE_SYMBOL).map_err(|_| fail("exports no ftx_plugin_vtable: not an ftx native plugin".into()))?;
            f()
        };
        if table.is_null() {
            return Err(fail("returned no plugin table".into()));
        }
        // The three leading u32s are in every version of the table.
        let (size, major, minor, kind) = unsafe { ((*table).size, (*table).abi_major, (*table).abi_minor, (*table).kind) };
        if major != ABI_MAJOR {
            return Err(fail(format!("was built for native plugin ABI {major}.{minor}; this ftx speaks {ABI_MAJOR}.x: rebuild it against this ftx-plugin-api")));
        }
        if (size as usize) < REQUIRED {
            return Err(fail(format!("its plugin table is {size} bytes, smaller than the {REQUIRED} this ABI requires")));
        }
        let kind = match kind {
            KIND_FILTER => PluginKind::DataFilter,
            KIND_REWARD => PluginKind::Reward,
            k => return Err(fail(format!("has unknown plugin kind {k}"))),
        };
        Ok(NativePlugin { name, kind, table, _lib: lib })
    }

    /// Sends `req` as JSON and decodes the JSON reply.
    pub fn call<Req: Serialize, Resp: DeserializeOwned>(&mut self, req: &Req, call: &str) -> Result<Resp, PluginError> {
        let bytes = self.call_raw(&serde_json::to_vec(req).expect("requests serialise"), call)?;
        serde_json::from_slice(&bytes).map_err(|e| PluginError::Invalid { plugin: self.name.clone(), call: call.into(), problem: format!("unreadable reply ({e}): {}", String::from_utf8_lossy(&bytes)) })
    }

    /// A filter call in the binary wire form.
    pub fn filter(&mut self, items: &[ftx_plugin_api::filter::Item], call: &str) -> Result<Vec<ftx_plugin_api::filter::Verdict>, PluginError> {
        let bytes = self.call_raw(&ftx_plugin_api::native::wire::items(items), call)?;
        ftx_plugin_api::native::wire::read_verdicts(&bytes).map_err(|problem| PluginError::Invalid { plugin: self.name.clone(), call: call.into(), problem })
    }

    /// Calls the plugin with raw request bytes; returns the raw reply.
    fn call_raw(&mut self, input: &[u8], call: &str) -> Result<Vec<u8>, PluginError> {
        let mut out = OwnedBytes { ptr: std::ptr::null_mut(), len: 0, cap: 0 };
        // SAFETY: the table was checked at load; `out` is written by the plugin's `call`.
        let (code, bytes) = unsafe {
            let t = &*self.table;
            let code = (t.call)(input.as_ptr(), input.len(), &mut out);
            let bytes = if out.ptr.is_null() { Vec::new() } else { std::slice::from_raw_parts(out.ptr, out.len).to_vec() };
            if !out.ptr.is_null() {
                (t.free)(out);
            }
            (code, bytes)
        };
        if code != 0 {
            return Err(PluginError::Trap { plugin: self.name.clone(), call: call.into(), detail: String::from_utf8_lossy(&bytes).into_owned() });
        }
        Ok(bytes)
    }
}
