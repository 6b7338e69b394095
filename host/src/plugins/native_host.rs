//! The host's side of native losses, judges and exporters: the [`HostApi`] callbacks a plugin
//! calls during `call_host`, over a [`NativeCtx`] — the tensors it holds (by handle), the judge's
//! model, the exporter's model and output sink (the same checks as the WebAssembly `output`).
//! Every callback catches panics: nothing unwinds across the C boundary.

use super::export_io::ExportCtx;
use super::judge_model::Llm;
use super::tensor_budget::MAX_LIVE;
use super::tensor_ops::{self, Operands};
use ftx_plugin_api::native::{op, HostApi, OpArgs, OwnedBytes};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::Tensor;

/// What one native plugin call may reach in the host.
pub struct NativeCtx {
    pub device: tch::Device,
    /// A loss call's inputs, handed out by `input`.
    pub inputs: Vec<(String, Tensor)>,
    /// Tensors the plugin holds; handle = index + 1.
    slots: Vec<Option<Tensor>>,
    live: usize,
    /// A judge's language model.
    pub llm: Option<Llm>,
    /// An exporter's model and output folder, lent for one `export` call.
    pub export: Option<ExportCtx>,
}

impl NativeCtx {
    /// An empty context on `device`.
    pub fn new(device: tch::Device) -> NativeCtx {
        NativeCtx { device, inputs: Vec::new(), slots: Vec::new(), live: 0, llm: None, export: None }
    }

    fn get(&self, h: u64) -> Result<&Tensor, String> {
        (h as usize).checked_sub(1).and_then(|i| self.slots.get(i)).and_then(Option::as_ref).ok_or_else(|| format!("no tensor with handle {h}"))
    }

    fn push(&mut self, t: Tensor) -> Result<u64, String> {
        if self.live >= MAX_LIVE {
            return Err(format!("the plugin holds more than {} tensors at once (a leak?)", MAX_LIVE));
        }
        self.live += 1;
        self.slots.push(Some(t));
        Ok(self.slots.len() as u64)
    }

    /// Takes the tensor behind a handle the plugin returned.
    pub fn take(&mut self, h: u64) -> Result<Tensor, String> {
        let t = (h as usize).checked_sub(1).and_then(|i| self.slots.get_mut(i)).and_then(Option::take).ok_or_else(|| format!("no tensor with handle {h}"))?;
        self.live -= 1;
        Ok(t)
    }

    /// Forgets every handle and input (after each call).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.inputs.clear();
        self.live = 0;
    }

    /// The callback table pointing at `self`, valid while `self` is borrowed.
    pub fn api(&mut self) -> HostApi {
        HostApi {
            size: std::mem::size_of::<HostApi>() as u32,
            ctx: self as *mut NativeCtx as *mut c_void,
            free,
            input,
            tensor_op,
            tensor_read,
            tensor_drop,
            complete,
            read,
            create,
            write,
            finish,
        }
    }
}

/// Runs `f` on the context, turning a panic into an error message.
unsafe fn with<R>(ctx: *mut c_void, f: impl FnOnce(&mut NativeCtx) -> Result<R, String>) -> Result<R, String> {
    // SAFETY: `ctx` is the `NativeCtx` whose `api()` the plugin was given, borrowed for the call.
    let ctx = &mut *(ctx as *mut NativeCtx);
    catch_unwind(AssertUnwindSafe(|| f(ctx))).unwrap_or_else(|_| Err("the host panicked in a plugin callback".into()))
}

unsafe fn answer(out: *mut OwnedBytes, r: Result<Vec<u8>, String>) -> i32 {
    let (code, body) = match r {
        Ok(b) => (0, b),
        Err(e) => (1, e.into_bytes()),
    };
    out.write(OwnedBytes::from_vec(body));
    code
}

unsafe extern "C" fn free(_ctx: *mut c_void, b: OwnedBytes) {
    ftx_plugin_api::native::free_bytes(b);
}

unsafe extern "C" fn input(ctx: *mut c_void, name: *const u8, len: usize) -> u64 {
    let name = String::from_utf8_lossy(std::slice::from_raw_parts(name, len)).into_owned();
    with(ctx, |c| match c.inputs.iter().find(|(n, _)| *n == name).map(|(_, t)| t.shallow_clone()) {
        Some(t) => c.push(t),
        None => Ok(0),
    })
    .unwrap_or(0)
}

unsafe extern "C" fn tensor_op(ctx: *mut c_void, code: u32, args: *const OpArgs, handle: *mut u64, err: *mut OwnedBytes) -> i32 {
    let a = &*args;
    let dims = if a.ndims == 0 { &[][..] } else { std::slice::from_raw_parts(a.dims, a.ndims) };
    let r = with(ctx, |c| {
        let get = |h: u64| if h == 0 { Ok(None) } else { c.get(h).map(Some) };
        let o = Operands {
            a: get(a.a)?,
            b: get(a.b)?,
            c: get(a.c)?,
            x: (a.flags & op::HAS_X != 0).then_some(a.x),
            y: (a.flags & op::HAS_Y != 0).then_some(a.y),
            dims,
            keepdim: a.flags & op::KEEPDIM != 0,
        };
        let t = tensor_ops::apply(code, &o, c.device)?;
        c.push(t)
    });
    match r {
        Ok(h) => {
            handle.write(h);
            0
        }
        Err(e) => answer(err, Err(e)),
    }
}

unsafe extern "C" fn tensor_read(ctx: *mut c_void, code: u32, handle: u64, out: *mut OwnedBytes) -> i32 {
    let r = with(ctx, |c| {
        let t = c.get(handle)?;
        match code {
            op::SHAPE => Ok(serde_json::to_vec(&t.size().iter().map(|&d| d as u32).collect::<Vec<_>>()).expect("serialises")),
            op::VALUES => tensor_ops::values(t).map(|v| serde_json::to_vec(&v).expect("serialises")),
            other => Err(format!("unknown read {other}")),
        }
    });
    answer(out, r)
}

unsafe extern "C" fn tensor_drop(ctx: *mut c_void, handle: u64) {
    let _ = with(ctx, |c| c.take(handle).map(drop));
}

unsafe extern "C" fn complete(ctx: *mut c_void, prompt: *const u8, len: usize, max_tokens: u32, out: *mut OwnedBytes) -> i32 {
    let prompt = String::from_utf8_lossy(std::slice::from_raw_parts(prompt, len)).into_owned();
    let r = with(ctx, |c| {
        let llm = c.llm.as_mut().ok_or("this plugin has no language model")?;
        llm.complete(&prompt, max_tokens).map(String::into_bytes)
    });
    answer(out, r)
}

/// The export in progress, or why there is none.
fn export(c: &mut NativeCtx) -> Result<&mut ExportCtx, String> {
    c.export.as_mut().ok_or_else(|| "no export is in progress".into())
}

/// Writes `err`'s message when `r` failed; 0 or 1.
unsafe fn status(err: *mut OwnedBytes, r: Result<(), String>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => answer(err, Err(e)),
    }
}

unsafe extern "C" fn read(ctx: *mut c_void, name: *const u8, name_len: usize, offset: u64, len: u64, out: *mut OwnedBytes) -> i32 {
    let name = String::from_utf8_lossy(std::slice::from_raw_parts(name, name_len)).into_owned();
    answer(out, with(ctx, |c| export(c)?.read(&name, offset, len)))
}

unsafe extern "C" fn create(ctx: *mut c_void, path: *const u8, len: usize, handle: *mut u32, err: *mut OwnedBytes) -> i32 {
    // A name that is not UTF-8 is refused, not repaired: the file written must be the one named.
    let r = std::str::from_utf8(std::slice::from_raw_parts(path, len)).map_err(|_| "the path is not UTF-8".to_owned());
    match r.and_then(|p| with(ctx, |c| export(c)?.sink.create(p))) {
        Ok(h) => {
            handle.write(h);
            0
        }
        Err(e) => answer(err, Err(e)),
    }
}

unsafe extern "C" fn write(ctx: *mut c_void, handle: u32, bytes: *const u8, len: usize, err: *mut OwnedBytes) -> i32 {
    let bytes = if len == 0 { &[][..] } else { std::slice::from_raw_parts(bytes, len) };
    status(err, with(ctx, |c| export(c)?.sink.write(handle, bytes)))
}

unsafe extern "C" fn finish(ctx: *mut c_void, handle: u32, err: *mut OwnedBytes) -> i32 {
    status(err, with(ctx, |c| export(c)?.sink.finish(handle)))
}
