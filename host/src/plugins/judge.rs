//! Judge plugins: a score and a rationale per (prompt, response, reference) sample, usually
//! obtained by asking a language model the host lends through the `llm` import. The host
//! routes `complete` to a callback — a local model ([`local_llm`]) or an OpenAI-compatible
//! endpoint the caller wires — so the plugin, which has no network, never talks to anything
//! but the host.

use super::native::{is_native, NativeCtx, NativePlugin};
use super::sandbox::{self, Sandboxed, State};
use super::{engine, permissions, Limits, PluginError, PluginKind};
use crate::model::generate::{generate, GenerateOptions};
use crate::model::tokenizer::Message;
use crate::model::{CausalLm, TextTokenizer};
use std::path::Path;

mod bindings {
    wasmtime::component::bindgen!({ world: "judge-fn", path: "../wit" });
}
use bindings::exports::ftx::plugin::judge::{Judgement as WitJudgement, Sample};
use bindings::{JudgeFn, JudgeFnPre};

/// The host's language model as a judge sees it: a prompt (one user turn) and a budget of new
/// tokens in, the reply (or why there is none) out.
pub type LlmFn = Box<dyn FnMut(&str, u32) -> Result<String, String> + Send>;

/// New tokens one completion may have unless [`JudgePlugin::set_max_tokens`] says otherwise.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Completions a judge may ask for per sample of a call.
pub const MAX_CALLS_PER_SAMPLE: usize = 4;

/// A judge's model and what it may still ask of it during the current call.
pub struct Llm {
    complete: LlmFn,
    max_tokens: u32,
    max_prompt_bytes: usize,
    calls_left: usize,
}

impl Llm {
    /// One completion within the call's budget: max-tokens clamped to the host's maximum, the
    /// prompt's size and the completions per sample bounded.
    pub(super) fn complete(&mut self, prompt: &str, max_tokens: u32) -> Result<String, String> {
        if self.calls_left == 0 {
            return Err(format!("no completions left in this call (at most {MAX_CALLS_PER_SAMPLE} per sample)"));
        }
        if prompt.len() > self.max_prompt_bytes {
            return Err(format!("the prompt is {} bytes; at most {} are accepted", prompt.len(), self.max_prompt_bytes));
        }
        self.calls_left -= 1;
        (self.complete)(prompt, max_tokens.min(self.max_tokens))
    }
}

impl bindings::ftx::plugin::llm::Host for State {
    fn complete(&mut self, prompt: String, max_tokens: u32) -> Result<String, String> {
        // wasmtime cannot interrupt a host call, so epochs do not bound the time spent in here:
        // max-tokens and the completions-per-sample budget do. The time is kept off the
        // plugin's own time limit (see `sandbox::arm_guest_time`).
        if self.llm.is_none() {
            return Err("this judge has no language model".into());
        }
        self.timed(|s| s.llm.as_mut().expect("checked above").complete(&prompt, max_tokens))
    }
}

/// One sample to judge.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeSample {
    pub prompt: String,
    pub response: String,
    pub reference: Option<String>,
}

/// A judge's verdict on one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// Finite; by convention in [0, 1], higher is better.
    pub score: f32,
    pub rationale: String,
}

/// A loaded judge plugin with its language model.
pub struct JudgePlugin {
    pub name: String,
    pub limits: Limits,
    backend: Backend,
}

enum Backend {
    Wasm(Sandboxed<JudgeFn>),
    /// Trusted native code: no time or memory limit; the model's budget still applies.
    Native(NativePlugin, NativeCtx),
}

impl JudgePlugin {
    /// Loads the component at `path` with no capabilities; its `complete` calls go to `llm`.
    pub fn load(path: &Path, limits: Limits, llm: LlmFn) -> Result<JudgePlugin, PluginError> {
        Self::load_granted(path, limits, llm, &[])
    }

    /// [`JudgePlugin::load`] with the user's `grants` (see `permissions`).
    pub fn load_granted(path: &Path, limits: Limits, llm: LlmFn, grants: &[String]) -> Result<JudgePlugin, PluginError> {
        let llm = Llm { complete: llm, max_tokens: DEFAULT_MAX_TOKENS, max_prompt_bytes: limits.max_output_bytes, calls_left: 0 };
        if is_native(path) {
            let native = NativePlugin::load_kind(path, PluginKind::Judge, &limits)?;
            let mut ctx = NativeCtx::new(tch::Device::Cpu);
            ctx.llm = Some(llm);
            return Ok(JudgePlugin { name: native.name.clone(), limits, backend: Backend::Native(native, ctx) });
        }
        let (name, component) = engine::compile_kind(path, PluginKind::Judge)?;
        let granted = permissions::for_component(&name, path, grants)?;
        let mut linker = sandbox::linker();
        JudgeFn::add_to_linker::<State, wasmtime::component::HasSelf<State>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let pre = JudgeFnPre::new(sandbox::pre(&linker, &component, &name)?)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let mut sandboxed = Sandboxed::new(name.clone(), limits, granted, tch::Device::Cpu, true, move |s| pre.instantiate(s))?;
        sandboxed.store.data_mut().llm = Some(llm);
        Ok(JudgePlugin { name, limits, backend: Backend::Wasm(sandboxed) })
    }

    fn llm(&mut self) -> Option<&mut Llm> {
        match &mut self.backend {
            Backend::Wasm(w) => w.store.data_mut().llm.as_mut(),
            Backend::Native(_, ctx) => ctx.llm.as_mut(),
        }
    }

    /// Caps the new tokens of each completion (a plugin asking for more gets this many).
    pub fn set_max_tokens(&mut self, max_tokens: u32) {
        if let Some(llm) = self.llm() {
            llm.max_tokens = max_tokens;
        }
    }

    /// A judgement, or the error that stands for one, per sample, in order; `Err` when the
    /// whole call failed (a trap, a timeout, a wrong number of answers).
    pub fn judge(&mut self, samples: &[JudgeSample]) -> Result<Vec<Result<Judgement, PluginError>>, PluginError> {
        let wit: Vec<Sample> = samples
            .iter()
            .map(|s| Sample { prompt: s.prompt.clone(), response: s.response.clone(), reference: s.reference.clone() })
            .collect();
        let call = format!("judge({} samples)", samples.len());
        if let Some(llm) = self.llm() {
            llm.calls_left = samples.len() * MAX_CALLS_PER_SAMPLE;
        }
        let out: Vec<Result<(f32, String), String>> = match &mut self.backend {
            Backend::Wasm(w) => w
                .call(&call, |i, s| i.ftx_plugin_judge().call_judge(s, &wit))?
                .into_iter()
                .map(|r| r.map(|j: WitJudgement| (j.score, j.rationale)))
                .collect(),
            Backend::Native(n, ctx) => {
                let req: Vec<ftx_plugin_api::judge::Sample> = samples
                    .iter()
                    .map(|s| ftx_plugin_api::judge::Sample { prompt: s.prompt.clone(), response: s.response.clone(), reference: s.reference.clone() })
                    .collect();
                n.call_host::<_, Vec<Result<ftx_plugin_api::judge::Judgement, String>>>(ctx, &req, &call)?
                    .into_iter()
                    .map(|r| r.map(|j| (j.score, j.rationale)))
                    .collect()
            }
        };
        if out.len() != samples.len() {
            return Err(PluginError::Invalid {
                plugin: self.name.clone(),
                call,
                problem: format!("returned {} judgements for {} samples", out.len(), samples.len()),
            });
        }
        Ok(out.into_iter().enumerate().map(|(i, r)| self.convert(i, r)).collect())
    }

    fn convert(&self, i: usize, r: Result<(f32, String), String>) -> Result<Judgement, PluginError> {
        let max = self.limits.max_output_bytes;
        let invalid = |problem: String| PluginError::Invalid { plugin: self.name.clone(), call: format!("judge(sample {i})"), problem };
        match r {
            Err(msg) => Err(invalid(super::untrusted::plugin_text(&msg))),
            Ok((score, rationale)) if rationale.len() <= max && score.is_finite() => Ok(Judgement { score, rationale }),
            Ok((score, rationale)) if rationale.len() <= max => Err(invalid(format!("score is {score}"))),
            _ => Err(invalid(format!("output larger than the {max} byte limit"))),
        }
    }
}

/// An [`LlmFn`] answering with `model`'s greedy continuation of the prompt sent as one user
/// turn of the tokenizer's chat template (the bare prompt when it has none), stopping at the
/// tokenizer's stop tokens.
pub fn local_llm(model: CausalLm, tok: TextTokenizer) -> LlmFn {
    Box::new(move |prompt: &str, max_tokens: u32| {
        let ids = match tok.chat_template {
            Some(_) => tok.encode_chat(&[Message::new("user", prompt)], true),
            None => tok.encode(prompt, true),
        }
        .map_err(|e| e.to_string())?;
        if ids.len() as i64 + i64::from(max_tokens) > model.config.max_positions {
            return Err(format!(
                "the prompt is {} tokens; with {max_tokens} new ones it exceeds the model's {} positions",
                ids.len(),
                model.config.max_positions
            ));
        }
        let opts = GenerateOptions { max_new_tokens: max_tokens as usize, stop_ids: tok.stop_ids.clone(), ..Default::default() };
        generate(&model, &tok, &ids, &opts, |_| {}).map(|g| g.text).map_err(|e| e.to_string())
    })
}
