//! Reward plugins: a score per (prompt, completion, reference) sample, in batches.

use super::native::{is_native, NativePlugin};
use super::sandbox::{self, State};
use super::{engine, Limits, PluginError, PluginKind};
use std::path::Path;
use wasmtime::Store;

mod bindings {
    wasmtime::component::bindgen!({ world: "reward-fn", path: "../wit" });
}
use bindings::exports::ftx::plugin::reward::Sample;
use bindings::{RewardFn, RewardFnPre};

/// One sample to score.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardSample {
    pub prompt: String,
    pub completion: String,
    pub reference: Option<String>,
}

/// A loaded reward plugin.
pub struct RewardPlugin {
    pub name: String,
    pub limits: Limits,
    backend: Backend,
}

enum Backend {
    Wasm { pre: RewardFnPre<State>, store: Store<State>, instance: RewardFn },
    Native(NativePlugin),
}

impl RewardPlugin {
    /// Loads a WebAssembly component (`.wasm`) or a native library (`.so`).
    pub fn load(path: &Path, limits: Limits) -> Result<RewardPlugin, PluginError> {
        if is_native(path) {
            let native = NativePlugin::load(path)?;
            if native.kind != PluginKind::Reward {
                return Err(PluginError::Load { plugin: native.name, problem: format!("is a {} plugin, not a reward", native.kind) });
            }
            return Ok(RewardPlugin { name: native.name.clone(), limits, backend: Backend::Native(native) });
        }
        let (name, component) = engine::compile_kind(path, PluginKind::Reward)?;
        let pre = RewardFnPre::new(sandbox::pre(&sandbox::linker(), &component, &name)?)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let mut store = sandbox::store(&limits, tch::Device::Cpu);
        sandbox::arm(&mut store, &limits);
        let instance = pre.instantiate(&mut store).map_err(|e| sandbox::classify(e, &name, "instantiate", &limits))?;
        Ok(RewardPlugin { name, limits, backend: Backend::Wasm { pre, store, instance } })
    }

    /// One finite score per sample.
    pub fn score(&mut self, samples: &[RewardSample]) -> Result<Vec<f32>, PluginError> {
        let wit: Vec<Sample> = samples
            .iter()
            .map(|s| Sample { prompt: s.prompt.clone(), completion: s.completion.clone(), reference: s.reference.clone() })
            .collect();
        let call = format!("score({} samples)", samples.len());
        let scores = match &mut self.backend {
            Backend::Native(n) => {
                let req: Vec<ftx_plugin_api::reward::Sample> = samples
                    .iter()
                    .map(|s| ftx_plugin_api::reward::Sample { prompt: s.prompt.clone(), completion: s.completion.clone(), reference: s.reference.clone() })
                    .collect();
                n.call::<_, Vec<f32>>(&req, &call)?
            }
            Backend::Wasm { pre, store, instance } => {
                sandbox::arm(store, &self.limits);
                match instance.ftx_plugin_reward().call_score(&mut *store, &wit) {
                    Ok(s) => s,
                    Err(e) => {
                        let err = sandbox::classify(e, &self.name, &call, &self.limits);
                        let mut fresh = sandbox::store(&self.limits, tch::Device::Cpu);
                        sandbox::arm(&mut fresh, &self.limits);
                        *instance = pre.instantiate(&mut fresh).map_err(|e| sandbox::classify(e, &self.name, "instantiate", &self.limits))?;
                        *store = fresh;
                        return Err(err);
                    }
                }
            }
        };
        let invalid = |problem: String| PluginError::Invalid { plugin: self.name.clone(), call: call.clone(), problem };
        if scores.len() != samples.len() {
            return Err(invalid(format!("returned {} scores for {} samples", scores.len(), samples.len())));
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            return Err(invalid(format!("score {i} is {}", scores[i])));
        }
        Ok(scores)
    }
}
