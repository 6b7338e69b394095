//! Native plugins: a shared library built from the same plugin source, loaded with
//! libloading. Trusted code at full speed — no sandbox — behind a versioned, size-prefixed
//! `repr(C)` table (see `ftx_plugin_api::native`); another ABI major version is refused.

use super::budget::{RunClock, DEFAULT_RUN_BUDGET};
use super::{plugin_name, PluginError, PluginKind};
pub use super::native_host::NativeCtx;
use ftx_plugin_api::native::{OwnedBytes, PluginVTable, ABI_MAJOR, KIND_EXPORTER, KIND_FILTER, KIND_JUDGE, KIND_LOSS, KIND_REWARD, VTABLE_SYMBOL};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// Fields the host reads: everything up to and including `free`.
const REQUIRED: usize = std::mem::size_of::<PluginVTable>();

/// A loaded native plugin.
pub struct NativePlugin {
    pub name: String,
    pub kind: PluginKind,
    /// The plugin's run budget and what its calls took (native code is never stopped midway:
    /// a call is refused once the budget is spent).
    pub clock: RunClock,
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
        let name = plugin_name(path);
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
        // SAFETY: the table is the library's static data.
        let kind = unsafe { check_table(table) }.map_err(fail)?;
        Ok(NativePlugin { name, kind, clock: RunClock::new(DEFAULT_RUN_BUDGET), table, _lib: lib })
    }

    /// Sends `req` as JSON with the host's callbacks over `ctx` (losses, judges, exporters); decodes the reply.
    pub fn call_host<Req: Serialize, Resp: DeserializeOwned>(&mut self, ctx: &mut NativeCtx, req: &Req, call: &str) -> Result<Resp, PluginError> {
        let input = serde_json::to_vec(req).expect("requests serialise");
        let api = ctx.api();
        // SAFETY: the table was checked at load; `api` and the context it points to outlive the call.
        let bytes = self.finish_call(call, |t, out| unsafe { (t.call_host)(&api, input.as_ptr(), input.len(), out) })?;
        serde_json::from_slice(&bytes).map_err(|e| PluginError::Invalid { plugin: self.name.clone(), call: call.into(), problem: format!("unreadable reply ({e}): {}", String::from_utf8_lossy(&bytes)) })
    }

    /// Loads the library and checks it is a `want` plugin; its calls draw on `limits.run_budget`.
    pub fn load_kind(path: &Path, want: PluginKind, limits: &super::Limits) -> Result<NativePlugin, PluginError> {
        let mut native = NativePlugin::load(path)?;
        if native.kind != want {
            return Err(PluginError::Load { plugin: native.name, problem: format!("is a {} plugin, not {}", native.kind, super::with_article(want)) });
        }
        native.clock = RunClock::new(limits.run_budget);
        Ok(native)
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
        // SAFETY: the table was checked at load.
        self.finish_call(call, |t, out| unsafe { (t.call)(input.as_ptr(), input.len(), out) })
    }

    /// Runs `f` (one call through the table), collects its reply and frees it.
    fn finish_call(&mut self, call: &str, f: impl FnOnce(&PluginVTable, &mut OwnedBytes) -> i32) -> Result<Vec<u8>, PluginError> {
        self.clock.ensure(&self.name, call)?;
        let t0 = std::time::Instant::now();
        let mut out = OwnedBytes { ptr: std::ptr::null_mut(), len: 0, cap: 0 };
        // SAFETY: the table was checked at load; `out` is written by the plugin.
        let (code, bytes) = unsafe {
            let t = &*self.table;
            let code = f(t, &mut out);
            let bytes = if out.ptr.is_null() { Vec::new() } else { std::slice::from_raw_parts(out.ptr, out.len).to_vec() };
            if !out.ptr.is_null() {
                (t.free)(out);
            }
            (code, bytes)
        };
        self.clock.charge(t0.elapsed());
        if code != 0 {
            return Err(PluginError::Trap { plugin: self.name.clone(), call: call.into(), detail: super::untrusted::plugin_text(&String::from_utf8_lossy(&bytes)) });
        }
        Ok(bytes)
    }
}

/// Checks a plugin table's ABI version and size; returns its kind.
///
/// # Safety
/// `table` must point to at least the three leading `u32`s of a table.
unsafe fn check_table(table: *const PluginVTable) -> Result<PluginKind, String> {
    // The leading u32s are in every version of the table.
    let (size, major, minor, kind) = ((*table).size, (*table).abi_major, (*table).abi_minor, (*table).kind);
    if major != ABI_MAJOR {
        return Err(format!("was built for native plugin ABI {major}.{minor}; this ftx speaks {ABI_MAJOR}.x: rebuild it against this ftx-plugin-api"));
    }
    if (size as usize) < REQUIRED {
        return Err(format!("its plugin table is {size} bytes, smaller than the {REQUIRED} this ABI requires"));
    }
    Ok(match kind {
        KIND_FILTER => PluginKind::DataFilter,
        KIND_REWARD => PluginKind::Reward,
        KIND_LOSS => PluginKind::Loss,
        KIND_JUDGE => PluginKind::Judge,
        KIND_EXPORTER => PluginKind::Exporter,
        k => return Err(format!("has unknown plugin kind {k}")),
    })
}

#[cfg(test)]
mod tests {
    use ftx_plugin_api::native::{free_bytes, needs_host, HostApi, OwnedBytes, PluginVTable, ABI_MAJOR, KIND_LOSS};

    unsafe extern "C" fn call_host(_: *const HostApi, _: *const u8, _: usize, out: *mut OwnedBytes) -> i32 {
        needs_host(std::ptr::null(), 0, out)
    }

    fn table(abi_major: u32, size: u32, kind: u32) -> PluginVTable {
        PluginVTable { size, abi_major, abi_minor: 0, kind, call: needs_host, free: free_bytes, call_host }
    }

    #[test]
    fn another_abi_version_a_short_table_or_an_unknown_kind_is_refused() {
        let full = std::mem::size_of::<PluginVTable>() as u32;
        assert_eq!(unsafe { super::check_table(&table(ABI_MAJOR, full, KIND_LOSS)) }, Ok(super::PluginKind::Loss));
        let e = unsafe { super::check_table(&table(ABI_MAJOR + 1, full, KIND_LOSS)) }.unwrap_err();
        assert!(e.contains(&format!("ABI {}.0", ABI_MAJOR + 1)) && e.contains("rebuild it"), "{e}");
        assert!(unsafe { super::check_table(&table(ABI_MAJOR, 24, KIND_LOSS)) }.unwrap_err().contains("smaller"));
        assert!(unsafe { super::check_table(&table(ABI_MAJOR, full, 99)) }.unwrap_err().contains("unknown plugin kind 99"));
    }
}
