//! Reward plugins: a score per (prompt, completion, reference) sample, in batches.

use super::native::{is_native, NativePlugin};
use super::sandbox::{self, Sandboxed};
use super::{engine, permissions, Limits, PluginError, PluginKind};
use std::path::Path;

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
    Wasm(Sandboxed<RewardFn>),
    Native(NativePlugin),
}

impl RewardPlugin {
    /// Loads a WebAssembly component (`.wasm`) or a native library (`.so`), with no capabilities.
    pub fn load(path: &Path, limits: Limits) -> Result<RewardPlugin, PluginError> {
        Self::load_granted(path, limits, &[])
    }

    /// [`RewardPlugin::load`] with the user's `grants` (see `permissions`).
    pub fn load_granted(path: &Path, limits: Limits, grants: &[String]) -> Result<RewardPlugin, PluginError> {
        if is_native(path) {
            let native = NativePlugin::load_kind(path, PluginKind::Reward, &limits)?;
            return Ok(RewardPlugin { name: native.name.clone(), limits, backend: Backend::Native(native) });
        }
        let (name, component) = engine::compile_kind(path, PluginKind::Reward)?;
        let granted = permissions::for_component(&name, path, grants)?;
        let pre = RewardFnPre::new(sandbox::pre(&sandbox::linker(), &component, &name)?)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let sandboxed = Sandboxed::new(name.clone(), limits, granted, tch::Device::Cpu, false, move |s| pre.instantiate(s))?;
        Ok(RewardPlugin { name, limits, backend: Backend::Wasm(sandboxed) })
    }

    /// The plugin's calls and time so far in this run, against its run budget.
    pub fn time(&self) -> super::budget::PluginTime {
        match &self.backend {
            Backend::Wasm(w) => w.clock.usage(&self.name),
            Backend::Native(n) => n.clock.usage(&self.name),
        }
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
            Backend::Wasm(w) => w.call(&call, |i, s| i.ftx_plugin_reward().call_score(s, &wit))?,
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
