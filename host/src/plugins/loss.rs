//! Loss plugins: the plugin declares the inputs and parameters it needs, and builds its loss
//! from host tensor ops on handles to tensors that stay on the training device, inside
//! autograd. The host lends the inputs for one call, takes back the loss tensor, and reads
//! the metrics.

use super::native::{is_native, NativeCtx, NativePlugin};
use super::sandbox::{self, Sandboxed, State};
use super::tensor_budget::{broadcast_bound, HostRefusal, TensorCall};
use super::tensor_ops::{self, Operands};
use ftx_plugin_api::loss::{LossReply, LossRequest};
use ftx_plugin_api::native::op;
use super::{engine, permissions, Limits, PluginError, PluginKind};
use std::path::Path;
use tch::{Kind, Tensor};
use wasmtime::component::Resource;

/// A host tensor as the plugin's handle table holds it; `None` once the call that made it has
/// returned (the handle stays valid to drop, but not to use: see `tensor_budget`).
pub struct HostTensor(pub Option<Tensor>);

mod bindings {
    wasmtime::component::bindgen!({
        world: "loss-fn",
        path: "../wit",
        with: { "ftx:plugin/tensor-ops.tensor": super::HostTensor },
        imports: { default: trappable },
    });
}
use bindings::exports::ftx::plugin::loss::LossSpec;
use bindings::ftx::plugin::tensor_ops::{Host, HostTensor as HostTensorOps};
use bindings::{LossFn, LossFnPre};

/// Handles a plugin may hold at once (a runaway loop cannot exhaust host memory by handles).
pub(super) const MAX_LIVE: usize = 4096;

/// Why a handle kept from an earlier call cannot be used.
const EXPIRED: &str = "used a tensor handle kept from an earlier call; a handle lives for the call that made it (build the loss from this call's inputs)";

type R<T> = wasmtime::Result<T>;
type Res = Resource<HostTensor>;

impl State {
    fn tensor(&self, r: &Res) -> R<&Tensor> {
        match &self.table.get(r)?.0 {
            Some(t) => Ok(t),
            None => Err(HostRefusal(EXPIRED.into()).into()),
        }
    }
    /// Hands `t` to the plugin as a new handle, which expires when this call returns.
    fn push(&mut self, t: Tensor) -> R<Res> {
        if self.live >= MAX_LIVE {
            wasmtime::bail!("the plugin holds more than {MAX_LIVE} tensors at once (a leak?)");
        }
        self.live += 1;
        let r = self.table.push(HostTensor(Some(t)))?;
        self.tensor_call.created.push(r.rep());
        Ok(r)
    }
    /// Ends a call's tensors: every handle it made expires, so what the plugin kept in its own
    /// memory no longer holds host tensors (or their autograd graphs) alive.
    fn expire_call_tensors(&mut self) {
        for rep in std::mem::take(&mut self.tensor_call.created) {
            if let Ok(entry) = self.table.get_mut(&Res::new_own(rep)) {
                entry.0 = None;
            }
        }
    }
    /// Runs op `code` (see `tensor_ops`) on handles; a shape error comes back as `Err`.
    fn op(&mut self, code: u32, ts: &[&Res], x: Option<f64>, y: Option<f64>, dims: &[i32], keepdim: bool) -> R<Result<Res, String>> {
        let shapes: Vec<Vec<i64>> = ts.iter().map(|r| self.tensor(r).map(Tensor::size)).collect::<R<_>>()?;
        self.tensor_call.begin_op(broadcast_bound(&shapes))?;
        let out = {
            let t: Vec<&Tensor> = ts.iter().map(|r| self.tensor(r)).collect::<R<_>>()?;
            let o = Operands { a: t.first().copied(), b: t.get(1).copied(), c: t.get(2).copied(), x, y, dims, keepdim };
            tensor_ops::apply(code, &o, self.device)
        };
        match out {
            Ok(t) => {
                self.tensor_call.charge(t.numel() as u64);
                Ok(Ok(self.push(t)?))
            }
            Err(e) => Ok(Err(e)),
        }
    }
    /// An op that cannot fail on valid operands.
    fn op1(&mut self, code: u32, r: Res, x: Option<f64>, y: Option<f64>) -> R<Res> {
        match self.op(code, &[&r], x, y, &[], false)? {
            Ok(t) => Ok(t),
            Err(e) => wasmtime::bail!(e),
        }
    }
}

impl Host for State {
    fn input(&mut self, name: String) -> R<Option<Res>> {
        match self.inputs.iter().find(|(n, _)| *n == name).map(|(_, t)| t.shallow_clone()) {
            Some(t) => {
                // A lent input allocates nothing: it counts as an op, not as elements.
                self.tensor_call.begin_op(0)?;
                Ok(Some(self.push(t)?))
            }
            None => Ok(None),
        }
    }
}
impl bindings::ftx::plugin::types::Host for State {}

impl HostTensorOps for State {
    fn new(&mut self, value: f64) -> R<Res> {
        self.tensor_call.begin_op(1)?;
        self.tensor_call.charge(1);
        let t = Tensor::from(value as f32).to_device(self.device);
        self.push(t)
    }
    fn shape(&mut self, r: Res) -> R<Vec<u32>> {
        Ok(self.tensor(&r)?.size().iter().map(|&d| d as u32).collect())
    }
    fn values(&mut self, r: Res) -> R<Result<Vec<f32>, String>> {
        let t = self.tensor(&r)?.shallow_clone();
        self.tensor_call.begin_op((t.numel() as u64).min(tensor_ops::MAX_VALUES as u64))?;
        Ok(tensor_ops::values(&t))
    }
    fn detach(&mut self, r: Res) -> R<Res> {
        self.op1(op::DETACH, r, None, None)
    }
    fn add(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.op(op::ADD, &[&a, &b], None, None, &[], false)
    }
    fn sub(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.op(op::SUB, &[&a, &b], None, None, &[], false)
    }
    fn mul(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.op(op::MUL, &[&a, &b], None, None, &[], false)
    }
    fn div(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.op(op::DIV, &[&a, &b], None, None, &[], false)
    }
    fn minimum(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.op(op::MINIMUM, &[&a, &b], None, None, &[], false)
    }
    fn maximum(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.op(op::MAXIMUM, &[&a, &b], None, None, &[], false)
    }
    fn greater(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.op(op::GREATER, &[&a, &b], None, None, &[], false)
    }
    fn select(&mut self, r: Res, cond: Res, other: Res) -> R<Result<Res, String>> {
        self.op(op::SELECT, &[&r, &cond, &other], None, None, &[], false)
    }
    fn add_scalar(&mut self, r: Res, v: f64) -> R<Res> {
        self.op1(op::ADD_SCALAR, r, Some(v), None)
    }
    fn mul_scalar(&mut self, r: Res, v: f64) -> R<Res> {
        self.op1(op::MUL_SCALAR, r, Some(v), None)
    }
    fn pow_scalar(&mut self, r: Res, v: f64) -> R<Res> {
        self.op1(op::POW_SCALAR, r, Some(v), None)
    }
    fn clamp(&mut self, r: Res, min: Option<f64>, max: Option<f64>) -> R<Res> {
        self.op1(op::CLAMP, r, min, max)
    }
    fn neg(&mut self, r: Res) -> R<Res> {
        self.op1(op::NEG, r, None, None)
    }
    fn abs(&mut self, r: Res) -> R<Res> {
        self.op1(op::ABS, r, None, None)
    }
    fn exp(&mut self, r: Res) -> R<Res> {
        self.op1(op::EXP, r, None, None)
    }
    fn log(&mut self, r: Res) -> R<Res> {
        self.op1(op::LOG, r, None, None)
    }
    fn sigmoid(&mut self, r: Res) -> R<Res> {
        self.op1(op::SIGMOID, r, None, None)
    }
    fn log_sigmoid(&mut self, r: Res) -> R<Res> {
        self.op1(op::LOG_SIGMOID, r, None, None)
    }
    fn softplus(&mut self, r: Res) -> R<Res> {
        self.op1(op::SOFTPLUS, r, None, None)
    }
    fn sum(&mut self, r: Res, dims: Vec<i32>, keepdim: bool) -> R<Result<Res, String>> {
        self.op(op::SUM, &[&r], None, None, &dims, keepdim)
    }
    fn mean(&mut self, r: Res, dims: Vec<i32>, keepdim: bool) -> R<Result<Res, String>> {
        self.op(op::MEAN, &[&r], None, None, &dims, keepdim)
    }
    fn drop(&mut self, r: Res) -> R<()> {
        self.table.delete(r)?;
        self.live = self.live.saturating_sub(1);
        Ok(())
    }
}

/// The loss and the metrics (reduced by `mean`) a call returned, taken out of the plugin's
/// handle table; a handle kept from an earlier call is refused.
fn take_output(
    state: &mut State,
    out: bindings::exports::ftx::plugin::loss::LossOutput,
    invalid: &dyn Fn(String) -> PluginError,
    mean: impl Fn(Tensor) -> f64,
) -> Result<(Tensor, Vec<(String, f64)>), PluginError> {
    let mut take = |r: Res, what: &str| -> Result<Tensor, PluginError> {
        let t = state.table.delete(r).map_err(|e| invalid(format!("{what}: {e}")))?.0;
        state.live = state.live.saturating_sub(1);
        t.ok_or_else(|| invalid(format!("returned as {what} a tensor kept from an earlier call (its graph is gone); build it from this call's inputs")))
    };
    // Every handle is taken out of the table before any error is returned: none is left behind.
    let loss = take(out.loss, "its loss");
    let metrics: Vec<(String, Result<Tensor, PluginError>)> =
        out.metrics.into_iter().map(|m| { let t = take(m.value, &format!("metric {:?}", super::untrusted::plugin_text(&m.name))); (m.name, t) }).collect();
    let loss = loss?;
    let metrics = metrics.into_iter().map(|(name, t)| Ok((name, mean(t?)))).collect::<Result<_, PluginError>>()?;
    Ok((loss, metrics))
}

/// Whether autograd records ops on this thread now (off inside `tch::no_grad`).
fn grad_mode_on() -> bool {
    Tensor::from(0f32).set_requires_grad(true).f_mul_scalar(1.0).is_ok_and(|t| t.requires_grad())
}

/// A parameter the loss takes.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub default: f64,
    pub doc: String,
}

/// The loss's value (a scalar in autograd) and its metrics (means, as numbers).
pub struct LossValue {
    pub loss: Tensor,
    pub metrics: Vec<(String, f64)>,
}

/// A loaded loss plugin.
pub struct LossPlugin {
    pub name: String,
    pub limits: Limits,
    /// Inputs the plugin declared.
    pub inputs: Vec<String>,
    pub params: Vec<ParamSpec>,
    backend: Backend,
}

enum Backend {
    Wasm(Sandboxed<LossFn>),
    /// Trusted native code; its tensors are handles into `NativeCtx`.
    Native(NativePlugin, NativeCtx),
}

impl LossPlugin {
    /// Loads the component at `path` with no capabilities; tensors it creates live on `device`.
    pub fn load(path: &Path, limits: Limits, device: tch::Device) -> Result<LossPlugin, PluginError> {
        Self::load_granted(path, limits, device, &[])
    }

    /// [`LossPlugin::load`] with the user's `grants` (see `permissions`).
    pub fn load_granted(path: &Path, limits: Limits, device: tch::Device, grants: &[String]) -> Result<LossPlugin, PluginError> {
        if is_native(path) {
            let mut native = NativePlugin::load_kind(path, PluginKind::Loss, &limits)?;
            let mut ctx = NativeCtx::new(device);
            let spec: ftx_plugin_api::loss::LossSpec = native.call_host(&mut ctx, &LossRequest::Describe, "describe")?;
            let params = spec.params.into_iter().map(|p| ParamSpec { name: p.name, default: p.default, doc: p.doc }).collect();
            return Ok(LossPlugin { name: native.name.clone(), limits, inputs: spec.inputs, params, backend: Backend::Native(native, ctx) });
        }
        let (name, component) = engine::compile_kind(path, PluginKind::Loss)?;
        let granted = permissions::for_component(&name, path, grants)?;
        let mut linker = sandbox::linker();
        LossFn::add_to_linker::<State, wasmtime::component::HasSelf<State>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let pre = LossFnPre::new(sandbox::pre(&linker, &component, &name)?)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let mut sandboxed = Sandboxed::new(name.clone(), limits, granted, device, false, move |s| pre.instantiate(s))?;
        let spec: LossSpec = sandboxed.call("describe", |i, s| i.ftx_plugin_loss().call_describe(s))?;
        let params = spec.params.into_iter().map(|p| ParamSpec { name: p.name, default: p.default, doc: p.doc }).collect();
        Ok(LossPlugin { name, limits, inputs: spec.inputs, params, backend: Backend::Wasm(sandboxed) })
    }

    /// The plugin's calls and time so far in this run, against its run budget.
    pub fn time(&self) -> super::budget::PluginTime {
        match &self.backend {
            Backend::Wasm(w) => w.clock.usage(&self.name),
            Backend::Native(n, _) => n.clock.usage(&self.name),
        }
    }

    /// The value of `name`: the user's setting, else the plugin's default.
    pub fn param(&self, name: &str, overrides: &[(String, f64)]) -> Option<f64> {
        overrides.iter().find(|(n, _)| n == name).map(|p| p.1).or_else(|| self.params.iter().find(|p| p.name == name).map(|p| p.default))
    }

    /// Computes the loss from `inputs` (each must be one the plugin declared).
    pub fn compute(&mut self, inputs: &[(&str, &Tensor)], params: &[(String, f64)]) -> Result<LossValue, PluginError> {
        let call = "compute".to_owned();
        let invalid = |problem: String| PluginError::Invalid { plugin: self.name.clone(), call: call.clone(), problem };
        for want in &self.inputs {
            if !inputs.iter().any(|(n, _)| n == want) {
                return Err(invalid(format!("needs input \"{want}\", which this training objective does not provide")));
            }
        }
        let mut all_params: Vec<(String, f64)> = self.params.iter().map(|p| (p.name.clone(), p.default)).collect();
        for (k, v) in params {
            match all_params.iter_mut().find(|(n, _)| n == k) {
                Some(p) => p.1 = *v,
                None => return Err(invalid(format!("takes no parameter \"{k}\" (it takes: {})", self.params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")))),
            }
        }
        // Lend the declared inputs for this call only.
        let lent: Vec<(String, Tensor)> = inputs
            .iter()
            .filter(|(n, _)| self.inputs.iter().any(|w| w == n))
            .map(|(n, t)| (n.to_string(), t.shallow_clone()))
            .collect();
        let mean = |t: Tensor| t.detach().to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        let (loss, metrics) = match &mut self.backend {
            Backend::Wasm(w) => {
                let state = w.store.data_mut();
                state.inputs = lent;
                state.tensor_call = TensorCall::new(&self.limits);
                let result = w.call(&call, |i, s| i.ftx_plugin_loss().call_compute(s, &all_params));
                let state = w.store.data_mut();
                state.inputs.clear();
                let taken = match result {
                    Ok(Ok(out)) => take_output(state, out, &invalid, mean),
                    Ok(Err(msg)) => Err(invalid(super::untrusted::plugin_text(&msg))),
                    Err(e) => Err(e),
                };
                state.expire_call_tensors();
                taken?
            }
            Backend::Native(n, ctx) => {
                ctx.inputs = lent;
                let result = n.call_host::<_, LossReply>(ctx, &LossRequest::Compute(all_params), &call);
                let taken = result.and_then(|r| {
                    let loss = ctx.take(r.loss).map_err(&invalid)?;
                    let metrics = r.metrics.into_iter().map(|(name, h)| Ok((name, mean(ctx.take(h).map_err(&invalid)?)))).collect::<Result<Vec<_>, PluginError>>()?;
                    Ok((loss, metrics))
                });
                ctx.clear();
                taken?
            }
        };
        super::metrics::check_names(&self.name, &call, metrics.iter().map(|(n, _)| n.as_str()))?;
        if loss.numel() != 1 {
            return Err(invalid(format!("returned a loss of shape {:?}; it must be a scalar", loss.size())));
        }
        // In training (autograd on, inputs that need gradients) the loss must carry their graph.
        if !loss.requires_grad() && grad_mode_on() && inputs.iter().any(|(_, t)| t.requires_grad()) {
            return Err(invalid(format!(
                "returned a loss that does not require grad (value {}, no autograd history: a constant, or detached from the inputs), so training cannot differentiate it; build the loss from this call's inputs with tensor ops",
                loss.f_double_value(&[]).map_or_else(|e| e.to_string(), |v| v.to_string())
            )));
        }
        Ok(LossValue { loss: loss.reshape([] as [i64; 0]), metrics })
    }
}
