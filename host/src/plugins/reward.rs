//! Reward plugins: a score per (prompt, completion, reference) sample, in batches.

use super::sandbox::{self, State};
use super::{engine, plugin_name, Limits, PluginError, PluginKind};
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
    pre: RewardFnPre<State>,
    store: Store<State>,
    instance: RewardFn,
}

impl RewardPlugin {
    /// Loads and instantiates the component at `path`.
    pub fn load(path: &Path, limits: Limits) -> Result<RewardPlugin, PluginError> {
        let name = plugin_name(path);
        let component = engine::compile(path)?;
        let (kind, _) = engine::inspect(path, &component)?;
        if kind != PluginKind::Reward {
            return Err(PluginError::Load { plugin: name, problem: format!("is a {kind} plugin, not a reward") });
        }
        let pre = RewardFnPre::new(sandbox::pre(&sandbox::linker(), &component, &name)?)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let mut store = sandbox::store(&limits, tch::Device::Cpu);
        sandbox::arm(&mut store, &limits);
        let instance = pre.instantiate(&mut store).map_err(|e| sandbox::classify(e, &name, "instantiate", &limits))?;
        Ok(RewardPlugin { name, limits, pre, store, instance })
    }

    /// One finite score per sample.
    pub fn score(&mut self, samples: &[RewardSample]) -> Result<Vec<f32>, PluginError> {
        let wit: Vec<Sample> = samples
            .iter()
            .map(|s| Sample { prompt: s.prompt.clone(), completion: s.completion.clone(), reference: s.reference.clone() })
            .collect();
        let call = format!("score({} samples)", samples.len());
        sandbox::arm(&mut self.store, &self.limits);
        let scores = match self.instance.ftx_plugin_reward().call_score(&mut self.store, &wit) {
            Ok(s) => s,
            Err(e) => {
                let err = sandbox::classify(e, &self.name, &call, &self.limits);
                let mut store = sandbox::store(&self.limits, tch::Device::Cpu);
                sandbox::arm(&mut store, &self.limits);
                self.instance = self.pre.instantiate(&mut store).map_err(|e| sandbox::classify(e, &self.name, "instantiate", &self.limits))?;
                self.store = store;
                return Err(err);
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
