//! The native plugin ABI: the same plugin source built for the host's target (a `cdylib`)
//! exports one C symbol, `ftx_plugin_vtable`, returning a versioned, size-prefixed,
//! append-only table. Filter records cross in a length-prefixed binary form ([`wire`]);
//! reward samples, which are few and small, as JSON.
//!
//! Losses, judges and exporters also call back into the host during a call: the host passes a
//! [`HostApi`] table to `call_host`, and the plugin's [`crate::loss::Tensor`] handles,
//! [`crate::judge::complete`] and an exporter's [`crate::exporter::read`], `create`, `write` and
//! `finish` go through it. A loss's tensors stay in the host (libtorch, on the training device,
//! inside autograd), exactly as with the WebAssembly `tensor` resource; an exporter never learns
//! where its output folder is: it names files relative to it and the host checks each name.
//!
//! Native plugins are trusted code: they run in the host process at full speed, without the
//! WebAssembly sandbox. Panics are caught at the boundary and returned as errors.

use serde::{Deserialize, Serialize};

/// Major version of the native ABI; the host refuses any other.
pub const ABI_MAJOR: u32 = 2;
/// Minor version: fields are only ever appended to [`PluginVTable`] and [`HostApi`]
/// (1: the exporter callbacks `read`, `create`, `write`, `finish`).
pub const ABI_MINOR: u32 = 1;

/// Plugin kinds as the table names them.
pub const KIND_FILTER: u32 = 1;
/// A reward function.
pub const KIND_REWARD: u32 = 2;
/// A loss.
pub const KIND_LOSS: u32 = 3;
/// A judge.
pub const KIND_JUDGE: u32 = 4;
/// An exporter.
pub const KIND_EXPORTER: u32 = 5;

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
    /// Like `call`, with the host's callbacks available for the duration of the call (losses
    /// judges and exporters).
    pub call_host: unsafe extern "C" fn(host: *const HostApi, input: *const u8, len: usize, out: *mut OwnedBytes) -> i32,
}

/// Operands of one tensor op: handles (0: unused), scalars, flags and dims.
#[repr(C)]
pub struct OpArgs {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub x: f64,
    pub y: f64,
    /// [`op::HAS_X`], [`op::HAS_Y`], [`op::KEEPDIM`].
    pub flags: u32,
    pub dims: *const i32,
    pub ndims: usize,
}

/// Tensor ops, one per method of the WIT `tensor` resource, and [`OpArgs::flags`] bits.
pub mod op {
    pub const NEW: u32 = 1;
    pub const DETACH: u32 = 2;
    pub const ADD: u32 = 3;
    pub const SUB: u32 = 4;
    pub const MUL: u32 = 5;
    pub const DIV: u32 = 6;
    pub const MINIMUM: u32 = 7;
    pub const MAXIMUM: u32 = 8;
    pub const GREATER: u32 = 9;
    pub const SELECT: u32 = 10;
    pub const ADD_SCALAR: u32 = 11;
    pub const MUL_SCALAR: u32 = 12;
    pub const POW_SCALAR: u32 = 13;
    pub const CLAMP: u32 = 14;
    pub const NEG: u32 = 15;
    pub const ABS: u32 = 16;
    pub const EXP: u32 = 17;
    pub const LOG: u32 = 18;
    pub const SIGMOID: u32 = 19;
    pub const LOG_SIGMOID: u32 = 20;
    pub const SOFTPLUS: u32 = 21;
    pub const SUM: u32 = 22;
    pub const MEAN: u32 = 23;
    /// Reads: the shape, as JSON `[u32]`.
    pub const SHAPE: u32 = 100;
    /// Reads: the values, as JSON `[f32]`.
    pub const VALUES: u32 = 101;
    /// `x` is set (`clamp`'s min).
    pub const HAS_X: u32 = 1;
    /// `y` is set (`clamp`'s max).
    pub const HAS_Y: u32 = 2;
    /// Reductions keep the reduced dims.
    pub const KEEPDIM: u32 = 4;
}

/// The host's side of a call: an opaque context and callbacks. `size` is
/// `size_of::<HostApi>()` as the host saw it.
#[repr(C)]
pub struct HostApi {
    pub size: u32,
    pub ctx: *mut std::ffi::c_void,
    /// Frees bytes the host wrote into an [`OwnedBytes`].
    pub free: unsafe extern "C" fn(ctx: *mut std::ffi::c_void, bytes: OwnedBytes),
    /// Loss: a fresh handle to the input called `name`, or 0 when there is none.
    pub input: unsafe extern "C" fn(ctx: *mut std::ffi::c_void, name: *const u8, len: usize) -> u64,
    /// Loss: runs tensor op `op`; 0 and the new handle in `handle`, or nonzero and a message in `err`.
    pub tensor_op: unsafe extern "C" fn(ctx: *mut std::ffi::c_void, op: u32, args: *const OpArgs, handle: *mut u64, err: *mut OwnedBytes) -> i32,
    /// Loss: reads a tensor ([`op::SHAPE`], [`op::VALUES`]) as JSON into `out` (0), or a message (nonzero).
    pub tensor_read: unsafe extern "C" fn(ctx: *mut std::ffi::c_void, op: u32, handle: u64, out: *mut OwnedBytes) -> i32,
    /// Loss: gives a handle back.
    pub tensor_drop: unsafe extern "C" fn(ctx: *mut std::ffi::c_void, handle: u64),
    /// Judge: the host model's completion of `prompt` into `out` (0), or a message (nonzero).
    pub complete: unsafe extern "C" fn(ctx: *mut std::ffi::c_void, prompt: *const u8, len: usize, max_tokens: u32, out: *mut OwnedBytes) -> i32,
    /// Exporter (ABI 2.1): `len` bytes of the tensor called `name` from byte `offset` into `out`
    /// (0), or a message (nonzero).
    pub read: unsafe extern "C" fn(ctx: *mut std::ffi::c_void, name: *const u8, name_len: usize, offset: u64, len: u64, out: *mut OwnedBytes) -> i32,
    /// Exporter: opens the file at the relative `path` in the host's output folder; 0 and its
    /// handle in `handle`, or nonzero and a message in `err`. The host checks the path.
    pub create: unsafe extern "C" fn(ctx: *mut std::ffi::c_void, path: *const u8, len: usize, handle: *mut u32, err: *mut OwnedBytes) -> i32,
    /// Exporter: appends `len` bytes to an open file; 0, or nonzero and a message in `err`.
    pub write: unsafe extern "C" fn(ctx: *mut std::ffi::c_void, handle: u32, bytes: *const u8, len: usize, err: *mut OwnedBytes) -> i32,
    /// Exporter: closes the file and moves it into place; 0, or nonzero and a message in `err`.
    pub finish: unsafe extern "C" fn(ctx: *mut std::ffi::c_void, handle: u32, err: *mut OwnedBytes) -> i32,
}


std::thread_local! {
    static HOST: std::cell::Cell<*const HostApi> = const { std::cell::Cell::new(std::ptr::null()) };
}

/// The host table of the call running on this thread.
///
/// # Panics
/// Outside a host call (a tensor op or completion called from nowhere): the panic becomes the
/// call's error at the boundary.
pub fn host() -> &'static HostApi {
    let p = HOST.with(|h| h.get());
    assert!(!p.is_null(), "ftx host functions are only available during a plugin call");
    // SAFETY: set by `serve_host` for the duration of the call; the host keeps it alive.
    unsafe { &*p }
}

/// Copies host-written bytes and gives them back to the host.
pub fn take_host_bytes(b: OwnedBytes) -> Vec<u8> {
    let h = host();
    // SAFETY: the host wrote `b` (ptr/len valid until freed).
    let v = if b.ptr.is_null() { Vec::new() } else { unsafe { std::slice::from_raw_parts(b.ptr, b.len).to_vec() } };
    if !b.ptr.is_null() {
        unsafe { (h.free)(h.ctx, b) };
    }
    v
}

/// Like [`serve`], with `host` installed for the call's duration.
///
/// # Safety
/// As [`serve`]; `host` must stay valid during the call.
pub unsafe fn serve_host<Req: for<'de> Deserialize<'de>, Resp: Serialize>(
    host: *const HostApi,
    input: *const u8,
    len: usize,
    out: *mut OwnedBytes,
    f: impl FnOnce(Req) -> Result<Resp, String> + std::panic::UnwindSafe,
) -> i32 {
    let prev = HOST.with(|h| h.replace(host));
    let bytes = std::slice::from_raw_parts(input, len);
    let result = match serde_json::from_slice::<Req>(bytes) {
        Ok(req) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || f(req))) {
            Ok(Ok(resp)) => serde_json::to_vec(&resp).map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e),
            Err(p) => Err(panic_message(p)),
        },
        Err(e) => Err(format!("bad request: {e}")),
    };
    HOST.with(|h| h.set(prev));
    finish(out, result)
}

/// `call_host` of kinds that need no host: plain `call`.
///
/// # Safety
/// As [`PluginVTable::call`].
pub unsafe fn no_host(call: unsafe extern "C" fn(*const u8, usize, *mut OwnedBytes) -> i32, input: *const u8, len: usize, out: *mut OwnedBytes) -> i32 {
    call(input, len, out)
}

/// `call` of kinds that need the host: refused.
///
/// # Safety
/// `out` must be writable.
pub unsafe extern "C" fn needs_host(_input: *const u8, _len: usize, out: *mut OwnedBytes) -> i32 {
    finish(out, Err("this plugin kind is called through call_host".into()))
}

/// The symbol every native plugin exports.
pub const VTABLE_SYMBOL: &[u8] = b"ftx_plugin_vtable\0";

/// The binary form of filter calls: little-endian, length-prefixed.
/// Request: `u32 n`, then per item `u64 id, u32 len, len bytes of JSON`.
/// Reply: `u32 n`, then per verdict `u8 tag (0 keep, 1 drop, 2 rewrite), u32 len, len bytes`.
pub mod wire {
    use crate::filter::{Item, Verdict};

    fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("truncated message".into());
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn u32(&mut self) -> Result<u32, String> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
        }
        fn text(&mut self) -> Result<String, String> {
            let n = self.u32()? as usize;
            String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
        }
    }

    /// Encodes a filter request.
    pub fn items(items: &[Item]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + items.iter().map(|i| 12 + i.json.len()).sum::<usize>());
        out.extend_from_slice(&(items.len() as u32).to_le_bytes());
        for i in items {
            out.extend_from_slice(&i.id.to_le_bytes());
            put(&mut out, i.json.as_bytes());
        }
        out
    }

    /// Decodes a filter request.
    pub fn read_items(bytes: &[u8]) -> Result<Vec<Item>, String> {
        let mut r = Reader(bytes);
        let n = r.u32()? as usize;
        (0..n).map(|_| Ok(Item { id: u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes")), json: r.text()? })).collect()
    }

    /// Encodes a filter reply.
    pub fn verdicts(vs: &[Verdict]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(vs.len() as u32).to_le_bytes());
        for v in vs {
            let (tag, text) = match v {
                Verdict::Keep => (0u8, ""),
                Verdict::Drop(r) => (1, r.as_str()),
                Verdict::Rewrite(j) => (2, j.as_str()),
            };
            out.push(tag);
            put(&mut out, text.as_bytes());
        }
        out
    }

    /// Decodes a filter reply.
    pub fn read_verdicts(bytes: &[u8]) -> Result<Vec<Verdict>, String> {
        let mut r = Reader(bytes);
        let n = r.u32()? as usize;
        (0..n)
            .map(|_| {
                let tag = r.take(1)?[0];
                let text = r.text()?;
                match tag {
                    0 => Ok(Verdict::Keep),
                    1 => Ok(Verdict::Drop(text)),
                    2 => Ok(Verdict::Rewrite(text)),
                    t => Err(format!("unknown verdict tag {t}")),
                }
            })
            .collect()
    }
}

/// Runs a filter on a binary request ([`wire`]), catching panics.
///
/// # Safety
/// `input` must point to `len` readable bytes and `out` to writable memory.
pub unsafe fn serve_filter(input: *const u8, len: usize, out: *mut OwnedBytes, f: impl FnOnce(Vec<crate::filter::Item>) -> Vec<crate::filter::Verdict>) -> i32 {
    let bytes = std::slice::from_raw_parts(input, len);
    let result = wire::read_items(bytes).map_err(|e| format!("bad request: {e}")).and_then(|items| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || f(items))).map(|v| wire::verdicts(&v)).map_err(panic_message)
    });
    finish(out, result)
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    format!("panicked: {}", p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default())
}

unsafe fn finish(out: *mut OwnedBytes, result: Result<Vec<u8>, String>) -> i32 {
    let (code, body) = match result {
        Ok(b) => (0, b),
        Err(msg) => (1, msg.into_bytes()),
    };
    out.write(OwnedBytes::from_vec(body));
    code
}

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
            Err(p) => Err(panic_message(p)),
        },
        Err(e) => Err(format!("bad request: {e}")),
    };
    finish(out, result)
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
                $crate::native::serve_filter(input, len, out, |items| <$t as $crate::filter::Filter>::filter(items))
            }
            unsafe extern "C" fn call_host(_: *const $crate::native::HostApi, input: *const u8, len: usize, out: *mut $crate::native::OwnedBytes) -> i32 {
                $crate::native::no_host(call, input, len, out)
            }
            static TABLE: $crate::native::PluginVTable = $crate::native::PluginVTable {
                size: std::mem::size_of::<$crate::native::PluginVTable>() as u32,
                abi_major: $crate::native::ABI_MAJOR,
                abi_minor: $crate::native::ABI_MINOR,
                kind: $crate::native::KIND_FILTER,
                call,
                free: $crate::native::free_bytes,
                call_host,
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
            unsafe extern "C" fn call_host(_: *const $crate::native::HostApi, input: *const u8, len: usize, out: *mut $crate::native::OwnedBytes) -> i32 {
                $crate::native::no_host(call, input, len, out)
            }
            static TABLE: $crate::native::PluginVTable = $crate::native::PluginVTable {
                size: std::mem::size_of::<$crate::native::PluginVTable>() as u32,
                abi_major: $crate::native::ABI_MAJOR,
                abi_minor: $crate::native::ABI_MINOR,
                kind: $crate::native::KIND_REWARD,
                call,
                free: $crate::native::free_bytes,
                call_host,
            };
            &TABLE
        }
    };
}
