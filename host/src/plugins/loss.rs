//! Loss plugins: the plugin declares the inputs and parameters it needs, and builds its loss
//! from host tensor ops on handles to tensors that stay on the training device, inside
//! autograd. The host lends the inputs for one call, takes back the loss tensor, and reads
//! the metrics.

use super::native::{is_native, NativeCtx, NativePlugin};
use super::sandbox::{self, Sandboxed, State};
use super::tensor_ops::{self, Operands};
use ftx_plugin_api::loss::{LossReply, LossRequest};
use ftx_plugin_api::native::op;
use super::{engine, permissions, Limits, PluginError, PluginKind};
use std::path::Path;
use tch::{Kind, Tensor};
use wasmtime::component::Resource;

/// A host tensor as the plugin's handle table holds it.
pub struct HostTensor(pub Tensor);

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

type R<T> = wasmtime::Result<T>;
type Res = Resource<HostTensor>;

impl State {
    fn tensor(&self, r: &Res) -> R<&Tensor> {
        Ok(&self.table.get(r)?.0)
    }
    fn push(&mut self, t: Tensor) -> R<Res> {
        if self.live >= MAX_LIVE {
            wasmtime::bail!("the plugin holds more than {MAX_LIVE} tensors at once (a leak?)");
        }
        self.live += 1;
        Ok(self.table.push(HostTensor(t))?)
    }
    /// Runs op `code` (see `tensor_ops`) on handles; a shape error comes back as `Err`.
    fn op(&mut self, code: u32, ts: &[&Res], x: Option<f64>, y: Option<f64>, dims: &[i32], keepdim: bool) -> R<Result<Res, String>> {
        let out = {
            let t: Vec<&Tensor> = ts.iter().map(|r| self.tensor(r)).collect::<R<_>>()?;
            let o = Operands { a: t.first().copied(), b: t.get(1).copied(), c: t.get(2).copied(), x, y, dims, keepdim };
            tensor_ops::apply(code, &o, self.device)
        };
        match out {
            Ok(t) => Ok(Ok(self.push(t)?)),
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
            Some(t) => Ok(Some(self.push(t)?)),
            None => Ok(None),
        }
    }
}
impl bindings::ftx::plugin::types::Host for State {}

impl HostTensorOps for State {
    fn new(&mut self, value: f64) -> R<Res> {
        let t = Tensor::from(value as f32).to_device(self.device);
        self.push(t)
    }
    fn shape(&mut self, r: Res) -> R<Vec<u32>> {
        Ok(self.tensor(&r)?.size().iter().map(|&d| d as u32).collect())
    }
    fn values(&mut self, r: Res) -> R<Result<Vec<f32>, String>> {
        Ok(tensor_ops::values(self.tensor(&r)?))
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
                w.store.data_mut().inputs = lent;
                let result = w.call(&call, |i, s| i.ftx_plugin_loss().call_compute(s, &all_params));
                w.store.data_mut().inputs.clear();
                let out = match result {
                    Ok(Ok(out)) => out,
                    Ok(Err(msg)) => return Err(invalid(msg)),
                    Err(e) => return Err(e),
                };
                let state = w.store.data_mut();
                let loss = state.table.delete(out.loss).map_err(|e| invalid(e.to_string()))?.0;
                state.live = state.live.saturating_sub(1);
                let mut metrics = Vec::new();
                for m in out.metrics {
                    let t = state.table.delete(m.value).map_err(|e| invalid(e.to_string()))?.0;
                    state.live = state.live.saturating_sub(1);
                    metrics.push((m.name, mean(t)));
                }
                (loss, metrics)
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
        Ok(LossValue { loss: loss.reshape([] as [i64; 0]), metrics })
    }
}
