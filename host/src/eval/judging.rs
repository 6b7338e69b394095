//! The `judge` metric: a judge plugin grades (prompt, answer, reference) samples, asking a
//! language model the host lends it: a local checkpoint or an OpenAI-compatible endpoint
//! ([`crate::llm::JudgeLlm`]).

use super::spec::JudgeSpec;
use super::EvalError;
use crate::model::decoder::LoadOptions;
use crate::plugins::judge::{JudgePlugin, JudgeSample};
use crate::plugins::judge_model::LlmFn;
use crate::plugins::Limits;

/// Samples per plugin call: a trap or timeout loses this many grades, no more.
const SAMPLES_PER_CALL: usize = 4;

/// A loaded judge.
pub struct Judge {
    plugin: JudgePlugin,
}

/// A grade, or why the judge could not give one.
pub type Grade = Result<(f64, String), String>;

impl Judge {
    /// Loads the plugin and its model.
    pub fn load(spec: &JudgeSpec, opts: LoadOptions) -> Result<Judge, EvalError> {
        let which = spec.resolve_llm().map_err(EvalError::Other)?;
        let llm = crate::llm::judge_llm(&which, opts).map_err(|e| EvalError::Other(e.to_string()))?;
        Self::with_llm(spec, llm)
    }

    /// Loads the plugin with `llm` as its model (whatever answers: a local model, an
    /// endpoint client, a test's stand-in); `spec.llm` is not read.
    pub fn with_llm(spec: &JudgeSpec, llm: LlmFn) -> Result<Judge, EvalError> {
        // A path, or a plugin's name (installed, or first-party: rubric-judge).
        let path = crate::plugins::manifest::locate(&spec.plugin)?;
        let mut plugin = JudgePlugin::load(&path, Limits::default(), llm)?;
        plugin.set_max_tokens(spec.max_tokens);
        Ok(Judge { plugin })
    }

    /// Grades each sample; `progress` gets the number graded after each plugin call. A failed
    /// call (trap, timeout) becomes an error grade for its samples; the rest go on.
    pub fn grade(&mut self, samples: &[JudgeSample], mut progress: impl FnMut(usize)) -> Vec<Grade> {
        let mut out = Vec::with_capacity(samples.len());
        for chunk in samples.chunks(SAMPLES_PER_CALL) {
            match self.plugin.judge(chunk) {
                Ok(results) => out.extend(results.into_iter().map(|r| r.map(|j| (f64::from(j.score), j.rationale)).map_err(|e| e.to_string()))),
                Err(e) => out.extend(chunk.iter().map(|_| Err(e.to_string()))),
            }
            progress(chunk.len());
        }
        out
    }
}
