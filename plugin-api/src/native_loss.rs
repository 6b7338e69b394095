//! Losses, natively: the same names and signatures as the WebAssembly bindings (`Tensor` is a
//! handle to a host tensor; every op runs in the host through [`crate::native::HostApi`]).

use crate::native::{host, op, take_host_bytes, OpArgs, OwnedBytes};
use serde::{Deserialize, Serialize};

/// A parameter a plugin accepts, with its default.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub default: f64,
    pub doc: String,
}

/// Which inputs the loss needs and which parameters it takes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LossSpec {
    pub inputs: Vec<String>,
    pub params: Vec<ParamSpec>,
}

/// A named quantity to log (reduced to its mean by the host).
pub struct Metric {
    pub name: String,
    pub value: Tensor,
}

/// The loss (a scalar the host calls backward on) and its metrics.
pub struct LossOutput {
    pub loss: Tensor,
    pub metrics: Vec<Metric>,
}

/// A loss.
pub trait Loss {
    fn describe() -> LossSpec;
    fn compute(params: Vec<(String, f64)>) -> Result<LossOutput, String>;
}

/// What the host asks a native loss.
#[derive(Debug, Serialize, Deserialize)]
pub enum LossRequest {
    Describe,
    Compute(Vec<(String, f64)>),
}

/// A computed loss as handles the host takes over.
#[derive(Debug, Serialize, Deserialize)]
pub struct LossReply {
    pub loss: u64,
    pub metrics: Vec<(String, u64)>,
}

/// A handle to a host tensor (dropped: given back to the host).
pub struct Tensor {
    handle: u64,
}

impl Drop for Tensor {
    fn drop(&mut self) {
        let h = host();
        // SAFETY: the handle came from the host during this call.
        unsafe { (h.tensor_drop)(h.ctx, self.handle) };
    }
}

fn run(code: u32, a: u64, b: u64, c: u64, x: Option<f64>, y: Option<f64>, dims: &[i32], keepdim: bool) -> Result<Tensor, String> {
    let flags = x.map_or(0, |_| op::HAS_X) | y.map_or(0, |_| op::HAS_Y) | if keepdim { op::KEEPDIM } else { 0 };
    let args = OpArgs { a, b, c, x: x.unwrap_or(0.0), y: y.unwrap_or(0.0), flags, dims: dims.as_ptr(), ndims: dims.len() };
    let (h, mut handle) = (host(), 0u64);
    let mut err = OwnedBytes { ptr: std::ptr::null_mut(), len: 0, cap: 0 };
    // SAFETY: `args`, `handle` and `err` outlive the call.
    let code = unsafe { (h.tensor_op)(h.ctx, code, &args, &mut handle, &mut err) };
    if code == 0 {
        Ok(Tensor { handle })
    } else {
        Err(String::from_utf8_lossy(&take_host_bytes(err)).into_owned())
    }
}

/// Ops that cannot fail on valid handles (a failure means a host bug: panic, caught at the boundary).
fn infallible(r: Result<Tensor, String>) -> Tensor {
    r.unwrap_or_else(|e| panic!("tensor op failed: {e}"))
}

impl Tensor {
    /// A scalar (0-d) tensor on the training device.
    pub fn new(value: f64) -> Tensor {
        infallible(run(op::NEW, 0, 0, 0, Some(value), None, &[], false))
    }
    fn read<T: for<'de> Deserialize<'de>>(&self, code: u32) -> Result<T, String> {
        let h = host();
        let mut out = OwnedBytes { ptr: std::ptr::null_mut(), len: 0, cap: 0 };
        // SAFETY: `out` outlives the call.
        let rc = unsafe { (h.tensor_read)(h.ctx, code, self.handle, &mut out) };
        let bytes = take_host_bytes(out);
        if rc != 0 {
            return Err(String::from_utf8_lossy(&bytes).into_owned());
        }
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }
    pub fn shape(&self) -> Vec<u32> {
        self.read(op::SHAPE).unwrap_or_else(|e| panic!("shape: {e}"))
    }
    /// The values of a small tensor (at most 65536 elements), for metrics.
    pub fn values(&self) -> Result<Vec<f32>, String> {
        self.read(op::VALUES)
    }
    pub fn detach(&self) -> Tensor {
        infallible(run(op::DETACH, self.handle, 0, 0, None, None, &[], false))
    }
    fn bin(&self, code: u32, other: &Tensor) -> Result<Tensor, String> {
        run(code, self.handle, other.handle, 0, None, None, &[], false)
    }
    pub fn add(&self, other: &Tensor) -> Result<Tensor, String> {
        self.bin(op::ADD, other)
    }
    pub fn sub(&self, other: &Tensor) -> Result<Tensor, String> {
        self.bin(op::SUB, other)
    }
    pub fn mul(&self, other: &Tensor) -> Result<Tensor, String> {
        self.bin(op::MUL, other)
    }
    pub fn div(&self, other: &Tensor) -> Result<Tensor, String> {
        self.bin(op::DIV, other)
    }
    pub fn minimum(&self, other: &Tensor) -> Result<Tensor, String> {
        self.bin(op::MINIMUM, other)
    }
    pub fn maximum(&self, other: &Tensor) -> Result<Tensor, String> {
        self.bin(op::MAXIMUM, other)
    }
    /// 1.0 where self > other, else 0.0.
    pub fn greater(&self, other: &Tensor) -> Result<Tensor, String> {
        self.bin(op::GREATER, other)
    }
    /// `cond ? self : other` elementwise.
    pub fn select(&self, cond: &Tensor, other: &Tensor) -> Result<Tensor, String> {
        run(op::SELECT, self.handle, cond.handle, other.handle, None, None, &[], false)
    }
    fn scalar(&self, code: u32, v: f64) -> Tensor {
        infallible(run(code, self.handle, 0, 0, Some(v), None, &[], false))
    }
    pub fn add_scalar(&self, v: f64) -> Tensor {
        self.scalar(op::ADD_SCALAR, v)
    }
    pub fn mul_scalar(&self, v: f64) -> Tensor {
        self.scalar(op::MUL_SCALAR, v)
    }
    pub fn pow_scalar(&self, v: f64) -> Tensor {
        self.scalar(op::POW_SCALAR, v)
    }
    pub fn clamp(&self, min: Option<f64>, max: Option<f64>) -> Tensor {
        infallible(run(op::CLAMP, self.handle, 0, 0, min, max, &[], false))
    }
    fn unary(&self, code: u32) -> Tensor {
        infallible(run(code, self.handle, 0, 0, None, None, &[], false))
    }
    pub fn neg(&self) -> Tensor {
        self.unary(op::NEG)
    }
    pub fn abs(&self) -> Tensor {
        self.unary(op::ABS)
    }
    pub fn exp(&self) -> Tensor {
        self.unary(op::EXP)
    }
    pub fn log(&self) -> Tensor {
        self.unary(op::LOG)
    }
    pub fn sigmoid(&self) -> Tensor {
        self.unary(op::SIGMOID)
    }
    pub fn log_sigmoid(&self) -> Tensor {
        self.unary(op::LOG_SIGMOID)
    }
    pub fn softplus(&self) -> Tensor {
        self.unary(op::SOFTPLUS)
    }
    /// Sum over `dims` (all when empty).
    pub fn sum(&self, dims: &[i32], keepdim: bool) -> Result<Tensor, String> {
        run(op::SUM, self.handle, 0, 0, None, None, dims, keepdim)
    }
    /// Mean over `dims` (all when empty).
    pub fn mean(&self, dims: &[i32], keepdim: bool) -> Result<Tensor, String> {
        run(op::MEAN, self.handle, 0, 0, None, None, dims, keepdim)
    }
    /// Hands the handle to the host (which takes it back as a result).
    pub fn into_handle(self) -> u64 {
        let h = self.handle;
        std::mem::forget(self);
        h
    }
}

/// The input called `name` (one the plugin declared), or an error naming it.
pub fn input(name: &str) -> Result<Tensor, String> {
    let h = host();
    // SAFETY: `name` outlives the call.
    match unsafe { (h.input)(h.ctx, name.as_ptr(), name.len()) } {
        0 => Err(format!("missing input {name}")),
        handle => Ok(Tensor { handle }),
    }
}

/// The parameter called `name` (the host always passes every declared parameter).
pub fn param(params: &[(String, f64)], name: &str) -> Result<f64, String> {
    params.iter().find(|p| p.0 == name).map(|p| p.1).ok_or_else(|| format!("missing parameter {name}"))
}

/// A parameter declaration.
pub fn param_spec(name: &str, default: f64, doc: &str) -> ParamSpec {
    ParamSpec { name: name.into(), default, doc: doc.into() }
}

/// Answers one host request with `L`.
pub fn handle<L: Loss>(req: LossRequest) -> Result<serde_json::Value, String> {
    match req {
        LossRequest::Describe => Ok(serde_json::to_value(L::describe()).expect("specs serialise")),
        LossRequest::Compute(params) => {
            let out = L::compute(params)?;
            let reply = LossReply { loss: out.loss.into_handle(), metrics: out.metrics.into_iter().map(|m| (m.name, m.value.into_handle())).collect() };
            Ok(serde_json::to_value(reply).expect("replies serialise"))
        }
    }
}

/// Exports a [`Loss`] implementation as a native plugin.
#[macro_export]
macro_rules! export_native_loss {
    ($t:ty) => {
        #[no_mangle]
        pub extern "C" fn ftx_plugin_vtable() -> *const $crate::native::PluginVTable {
            unsafe extern "C" fn call_host(host: *const $crate::native::HostApi, input: *const u8, len: usize, out: *mut $crate::native::OwnedBytes) -> i32 {
                $crate::native::serve_host(host, input, len, out, $crate::loss::handle::<$t>)
            }
            static TABLE: $crate::native::PluginVTable = $crate::native::PluginVTable {
                size: std::mem::size_of::<$crate::native::PluginVTable>() as u32,
                abi_major: $crate::native::ABI_MAJOR,
                abi_minor: $crate::native::ABI_MINOR,
                kind: $crate::native::KIND_LOSS,
                call: $crate::native::needs_host,
                free: $crate::native::free_bytes,
                call_host,
            };
            &TABLE
        }
    };
}
pub use crate::export_native_loss as export_loss;
