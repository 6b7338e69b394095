//! Loss plugins: the plugin declares the inputs and parameters it needs, and builds its loss
//! from host tensor ops on handles to tensors that stay on the training device, inside
//! autograd. The host lends the inputs for one call, takes back the loss tensor, and reads
//! the metrics.

use super::sandbox::{self, State};
use super::{engine, Limits, PluginError, PluginKind};
use std::path::Path;
use tch::{Kind, Tensor};
use wasmtime::component::Resource;
use wasmtime::Store;

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
const MAX_LIVE: usize = 4096;
/// Largest tensor `values` reads back.
const MAX_VALUES: i64 = 65_536;

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
    fn unary(&mut self, r: Res, f: impl FnOnce(&Tensor) -> Tensor) -> R<Res> {
        let out = f(self.tensor(&r)?);
        self.push(out)
    }
    fn binary(&mut self, a: Res, b: Res, f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor, tch::TchError>) -> R<Result<Res, String>> {
        match f(self.tensor(&a)?, self.tensor(&b)?) {
            Ok(t) => Ok(Ok(self.push(t)?)),
            Err(e) => Ok(Err(e.to_string())),
        }
    }
    fn reduce(&mut self, r: Res, dims: Vec<i32>, keep: bool, mean: bool) -> R<Result<Res, String>> {
        let t = self.tensor(&r)?;
        let dims: Vec<i64> = dims.into_iter().map(i64::from).collect();
        let out = match (dims.is_empty(), mean) {
            (true, true) => t.f_mean(Kind::Float),
            (true, false) => t.f_sum(Kind::Float),
            (false, true) => t.f_mean_dim(dims.as_slice(), keep, Kind::Float),
            (false, false) => t.f_sum_dim_intlist(dims.as_slice(), keep, Kind::Float),
        };
        match out {
            Ok(t) => Ok(Ok(self.push(t)?)),
            Err(e) => Ok(Err(e.to_string())),
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
        let t = self.tensor(&r)?;
        if t.numel() as i64 > MAX_VALUES {
            return Ok(Err(format!("values() reads at most {MAX_VALUES} elements; reduce the tensor first")));
        }
        let flat = t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu).flatten(0, -1);
        Ok(Vec::<f32>::try_from(&flat).map_err(|e| e.to_string()))
    }
    fn detach(&mut self, r: Res) -> R<Res> {
        self.unary(r, Tensor::detach)
    }
    fn add(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.binary(a, b, |x, y| x.f_add(y))
    }
    fn sub(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.binary(a, b, |x, y| x.f_sub(y))
    }
    fn mul(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.binary(a, b, |x, y| x.f_mul(y))
    }
    fn div(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.binary(a, b, |x, y| x.f_div(y))
    }
    fn minimum(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.binary(a, b, |x, y| x.f_minimum(y))
    }
    fn maximum(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.binary(a, b, |x, y| x.f_maximum(y))
    }
    fn greater(&mut self, a: Res, b: Res) -> R<Result<Res, String>> {
        self.binary(a, b, |x, y| x.f_gt_tensor(y).and_then(|m| m.f_to_kind(x.kind())))
    }
    fn select(&mut self, r: Res, cond: Res, other: Res) -> R<Result<Res, String>> {
        let out = {
            let (t, c, o) = (self.tensor(&r)?, self.tensor(&cond)?, self.tensor(&other)?);
            c.f_ne(0.0).and_then(|mask| t.f_where_self(&mask, o))
        };
        match out {
            Ok(t) => Ok(Ok(self.push(t)?)),
            Err(e) => Ok(Err(e.to_string())),
        }
    }
    fn add_scalar(&mut self, r: Res, v: f64) -> R<Res> {
        self.unary(r, |t| t + v)
    }
    fn mul_scalar(&mut self, r: Res, v: f64) -> R<Res> {
        self.unary(r, |t| t * v)
    }
    fn pow_scalar(&mut self, r: Res, v: f64) -> R<Res> {
        self.unary(r, |t| t.pow_tensor_scalar(v))
    }
    fn clamp(&mut self, r: Res, min: Option<f64>, max: Option<f64>) -> R<Res> {
        self.unary(r, |t| match (min, max) {
            (Some(a), Some(b)) => t.clamp(a, b),
            (Some(a), None) => t.clamp_min(a),
            (None, Some(b)) => t.clamp_max(b),
            (None, None) => t.shallow_clone(),
        })
    }
    fn neg(&mut self, r: Res) -> R<Res> {
        self.unary(r, Tensor::neg)
    }
    fn abs(&mut self, r: Res) -> R<Res> {
        self.unary(r, Tensor::abs)
    }
    fn exp(&mut self, r: Res) -> R<Res> {
        self.unary(r, Tensor::exp)
    }
    fn log(&mut self, r: Res) -> R<Res> {
        self.unary(r, Tensor::log)
    }
    fn sigmoid(&mut self, r: Res) -> R<Res> {
        self.unary(r, Tensor::sigmoid)
    }
    fn log_sigmoid(&mut self, r: Res) -> R<Res> {
        self.unary(r, Tensor::log_sigmoid)
    }
    fn softplus(&mut self, r: Res) -> R<Res> {
        // log(1 + e^x), computed stably as -log_sigmoid(-x).
        self.unary(r, |t| -(-t).log_sigmoid())
    }
    fn sum(&mut self, r: Res, dims: Vec<i32>, keepdim: bool) -> R<Result<Res, String>> {
        self.reduce(r, dims, keepdim, false)
    }
    fn mean(&mut self, r: Res, dims: Vec<i32>, keepdim: bool) -> R<Result<Res, String>> {
        self.reduce(r, dims, keepdim, true)
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
    pre: LossFnPre<State>,
    store: Store<State>,
    instance: LossFn,
    device: tch::Device,
}

impl LossPlugin {
    /// Loads the component at `path`; tensors it creates live on `device`.
    pub fn load(path: &Path, limits: Limits, device: tch::Device) -> Result<LossPlugin, PluginError> {
        let (name, component) = engine::compile_kind(path, PluginKind::Loss)?;
        let mut linker = sandbox::linker();
        LossFn::add_to_linker::<State, wasmtime::component::HasSelf<State>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let pre = LossFnPre::new(sandbox::pre(&linker, &component, &name)?)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let (mut store, instance) = Self::instantiate(&pre, &name, &limits, device)?;
        sandbox::arm(&mut store, &limits);
        let spec: LossSpec = instance.ftx_plugin_loss().call_describe(&mut store).map_err(|e| sandbox::classify(e, &name, "describe", &limits))?;
        let params = spec.params.into_iter().map(|p| ParamSpec { name: p.name, default: p.default, doc: p.doc }).collect();
        Ok(LossPlugin { name, limits, inputs: spec.inputs, params, pre, store, instance, device })
    }

    fn instantiate(pre: &LossFnPre<State>, name: &str, limits: &Limits, device: tch::Device) -> Result<(Store<State>, LossFn), PluginError> {
        let mut store = sandbox::store(limits, device);
        sandbox::arm(&mut store, limits);
        let instance = pre.instantiate(&mut store).map_err(|e| sandbox::classify(e, name, "instantiate", limits))?;
        Ok((store, instance))
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
        self.store.data_mut().inputs = inputs
            .iter()
            .filter(|(n, _)| self.inputs.iter().any(|w| w == n))
            .map(|(n, t)| (n.to_string(), t.shallow_clone()))
            .collect();
        sandbox::arm(&mut self.store, &self.limits);
        let result = self.instance.ftx_plugin_loss().call_compute(&mut self.store, &all_params);
        self.store.data_mut().inputs.clear();
        let out = match result {
            Ok(Ok(out)) => out,
            Ok(Err(msg)) => return Err(invalid(msg)),
            Err(e) => {
                let err = sandbox::classify(e, &self.name, &call, &self.limits);
                (self.store, self.instance) = Self::instantiate(&self.pre, &self.name, &self.limits, self.device)?;
                return Err(err);
            }
        };
        let state = self.store.data_mut();
        let loss = state.table.delete(out.loss).map_err(|e| invalid(e.to_string()))?.0;
        state.live = state.live.saturating_sub(1);
        let mut metrics = Vec::new();
        for m in out.metrics {
            let t = state.table.delete(m.value).map_err(|e| invalid(e.to_string()))?.0;
            state.live = state.live.saturating_sub(1);
            metrics.push((m.name, t.detach().to_kind(Kind::Double).mean(Kind::Double).double_value(&[])));
        }
        if loss.numel() != 1 {
            return Err(invalid(format!("returned a loss of shape {:?}; it must be a scalar", loss.size())));
        }
        Ok(LossValue { loss: loss.reshape([] as [i64; 0]), metrics })
    }
}
