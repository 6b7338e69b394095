//! What `ftx eval` runs: the models to compare and the tasks to score them on, from an
//! `eval.toml` (relative paths are relative to that file) and/or command-line flags.

use super::EvalError;
use crate::data::DataFormat;
use crate::llm::JudgeLlm;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A whole evaluation: models × tasks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Where report.html, report.json and samples.jsonl go.
    pub output: Option<PathBuf>,
    /// At most this many samples of each task (all when absent).
    pub limit: Option<usize>,
    /// The models (or checkpoints, or base + adapter) to compare, in report order.
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    pub perplexity: Option<PerplexitySpec>,
    #[serde(default)]
    pub generation: Vec<GenerationSpec>,
    #[serde(default)]
    pub choice: Vec<ChoiceSpec>,
    pub judge: Option<JudgeSpec>,
}

/// One model to evaluate: a checkpoint folder, optionally with a PEFT adapter on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Name in the report (default: the folder names).
    pub name: Option<String>,
    /// Hugging Face checkpoint folder.
    pub path: PathBuf,
    /// PEFT adapter folder applied to `path`.
    pub adapter: Option<PathBuf>,
}

impl ModelSpec {
    /// The name shown in the report.
    pub fn display_name(&self) -> String {
        let leaf = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string());
        match (&self.name, &self.adapter) {
            (Some(n), _) => n.clone(),
            (None, Some(a)) => format!("{} + {}", leaf(&self.path), adapter_label(a)),
            (None, None) => leaf(&self.path),
        }
    }
}

/// The label of an adapter folder in a report: its folder's name, except where that name is the
/// same for every run — a run's `final/` is labelled by the run's folder, ftx's checkpoint
/// `run/checkpoints/step-N/adapter` as `run/step-N`, a Trainer's `run/checkpoint-N` as
/// `run/checkpoint-N`.
pub fn adapter_label(dir: &Path) -> String {
    let name = |p: Option<&Path>| p.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
    let leaf = name(Some(dir)).unwrap_or_else(|| dir.display().to_string());
    let parent = dir.parent();
    let up = |n: usize| name((0..n).try_fold(dir, |p, _| p.parent()));
    match (leaf.as_str(), name(parent)) {
        ("final", Some(run)) => run,
        ("adapter", Some(step)) if step.starts_with("step-") && up(2).as_deref() == Some("checkpoints") => {
            up(3).map_or(step.clone(), |run| format!("{run}/{step}"))
        }
        (l, Some(run)) if l.starts_with("checkpoint-") => format!("{run}/{l}"),
        _ => leaf,
    }
}

/// Perplexity on held-out data: the loss training takes, on the tokens training scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerplexitySpec {
    /// A data file in any format `ftx train` reads (text, Alpaca, chat).
    pub data: PathBuf,
    #[serde(default = "auto_format")]
    pub format: DataFormat,
    #[serde(default = "default_seq_len")]
    pub max_seq_len: usize,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

/// A task scored on the model's own generations.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSpec {
    /// Name in the report (default: the file name).
    pub name: Option<String>,
    /// JSONL: `prompt` or `messages` (or Alpaca `instruction`/`input`), and `reference`.
    pub file: PathBuf,
    /// Any of exact_match, json_valid, json_schema, function_call, judge.
    #[serde(default = "default_metrics")]
    pub metrics: Vec<Metric>,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub seed: u64,
    /// Strings that end an answer (the answer stops before them).
    #[serde(default)]
    pub stop: Vec<String>,
    /// JSON Schema file for `json_schema` (a record's own `schema` takes precedence).
    pub schema: Option<PathBuf>,
    /// Render prompts with the chat template (default: when the tokenizer has one).
    pub chat: Option<bool>,
}

/// A task metric of a generation task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// The answer (trimmed) equals the reference (trimmed); a JSON reference that is not a
    /// string is compared as a JSON value.
    ExactMatch,
    /// The answer parses as JSON.
    JsonValid,
    /// The answer is JSON that conforms to the task's schema.
    JsonSchema,
    /// The answer is the reference's function call: name and arguments.
    FunctionCall,
    /// A judge plugin's score.
    Judge,
}

/// A multiple-choice task scored by log-likelihood (lm-evaluation-harness style).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChoiceSpec {
    /// Name in the report (default: the file name).
    pub name: Option<String>,
    /// JSONL: `context` (or `question`/`query`), `choices` (or `endings`), `gold` (or `label`/`answer`).
    pub file: PathBuf,
    /// Put between context and each choice.
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Sequences per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

/// The judge of the `judge` metric.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeSpec {
    /// Judge plugin (`.wasm`).
    pub plugin: PathBuf,
    /// Where its `llm` calls go: `local:<checkpoint dir>` or `openai:<base url>`.
    pub llm: String,
    /// The endpoint's model name (with `openai:`).
    #[serde(default)]
    pub model: Option<String>,
    /// The environment variable holding the endpoint's API key (with `openai:`; never logged).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// New tokens per judge completion, at most.
    #[serde(default = "default_judge_tokens")]
    pub max_tokens: u32,
}

impl JudgeSpec {
    /// Where the judge's model runs, checked.
    pub fn resolve_llm(&self) -> Result<JudgeLlm, String> {
        JudgeLlm::parse(&self.llm, self.model.as_deref(), self.api_key_env.as_deref()).map_err(|e| e.to_string())
    }
}

fn auto_format() -> DataFormat {
    DataFormat::Auto
}
fn default_seq_len() -> usize {
    1024
}
fn default_batch() -> usize {
    8
}
fn default_new_tokens() -> usize {
    128
}
fn default_metrics() -> Vec<Metric> {
    vec![Metric::ExactMatch]
}
fn default_delimiter() -> String {
    " ".into()
}
fn default_judge_tokens() -> u32 {
    crate::plugins::judge::DEFAULT_MAX_TOKENS
}

impl EvalSpec {
    /// Reads an `eval.toml`; relative paths in it become relative to its folder.
    pub fn load(path: &Path) -> Result<EvalSpec, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io { path: path.to_owned(), source: e })?;
        let mut spec: EvalSpec = toml::from_str(&text).map_err(|e| {
            let line = e.span().map_or(1, |s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            EvalError::Record { path: path.to_owned(), line, problem: e.message().to_owned() }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        spec.output.iter_mut().for_each(fix);
        for m in &mut spec.models {
            fix(&mut m.path);
            m.adapter.iter_mut().for_each(fix);
        }
        if let Some(p) = &mut spec.perplexity {
            fix(&mut p.data);
        }
        for g in &mut spec.generation {
            fix(&mut g.file);
            g.schema.iter_mut().for_each(fix);
        }
        for c in &mut spec.choice {
            fix(&mut c.file);
        }
        if let Some(j) = &mut spec.judge {
            if crate::plugins::manifest::is_explicit_path(&j.plugin) {
                fix(&mut j.plugin);
            }
            if let Ok(JudgeLlm::Local(dir)) = JudgeLlm::parse(&j.llm, None, None) {
                if dir.is_relative() {
                    j.llm = format!("local:{}", base.join(dir).display());
                }
            }
        }
        Ok(spec)
    }

    /// Says what is missing or inconsistent before any model is loaded.
    pub fn check(&self) -> Result<(), String> {
        if self.models.is_empty() {
            return Err("no models to evaluate: give --model (or [[models]] in the tasks file)".into());
        }
        if self.perplexity.is_none() && self.generation.is_empty() && self.choice.is_empty() {
            return Err("no tasks: give --perplexity, --generation or --choice (or a tasks file with [perplexity], [[generation]] or [[choice]])".into());
        }
        let mut names: Vec<String> = Vec::new();
        for m in &self.models {
            let n = m.display_name();
            if names.contains(&n) {
                return Err(format!("two models are named '{n}': give each a distinct name (name = \"…\" in [[models]], or ftx eval --adapter NAME=PATH)"));
            }
            names.push(n);
        }
        for g in &self.generation {
            if g.metrics.contains(&Metric::Judge) && self.judge.is_none() {
                return Err(format!("task {} asks for the judge metric but no judge is set: give --judge and --judge-model", g.file.display()));
            }
        }
        if let Some(j) = &self.judge {
            j.resolve_llm()?;
        }
        Ok(())
    }
}

/// The name of a task: its own, else its file's stem.
pub fn task_name(name: &Option<String>, file: &Path) -> String {
    name.clone().unwrap_or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tasks_file_parses_and_its_paths_follow_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("eval.toml");
        std::fs::write(
            &f,
            "[[models]]\npath = \"m\"\n[[models]]\npath = \"m\"\nadapter = \"runs/a\"\n[perplexity]\ndata = \"h.jsonl\"\n[[generation]]\nfile = \"g.jsonl\"\nmetrics = [\"json_schema\", \"function_call\"]\nschema = \"s.json\"\nstop = [\"\\n\"]\n[[choice]]\nfile = \"mc.jsonl\"\n[judge]\nplugin = \"j.wasm\"\nllm = \"local:judge\"\n",
        )
        .unwrap();
        let s = EvalSpec::load(&f).unwrap();
        assert_eq!(s.models[1].adapter.as_deref(), Some(dir.path().join("runs/a").as_path()));
        assert_eq!(s.models[1].display_name(), "m + a");
        assert_eq!(s.generation[0].metrics, [Metric::JsonSchema, Metric::FunctionCall]);
        assert_eq!(s.judge.as_ref().unwrap().llm, format!("local:{}", dir.path().join("judge").display()));
        s.check().unwrap();
        let mut twice = s.clone();
        twice.models.push(twice.models[0].clone());
        assert!(twice.check().unwrap_err().starts_with("two models are named 'm': give each a distinct name (name = "));
        std::fs::write(&f, "[[models]]\npath = \"m\"\n\n[[generation]]\nfile = \"g.jsonl\"\nmetrics = [\"bleu\"]\n").unwrap();
        let e = EvalSpec::load(&f).unwrap_err().to_string();
        assert!(e.contains("eval.toml:6:") && e.contains("bleu"), "{e}");
    }

    #[test]
    fn adapters_are_labelled_by_their_run() {
        assert_eq!(adapter_label(Path::new("runs/sft/final")), "sft");
        assert_eq!(adapter_label(Path::new("runs/sft/checkpoints/step-0000003/adapter")), "sft/step-0000003");
        assert_eq!(adapter_label(Path::new("runs/sft/checkpoint-3")), "sft/checkpoint-3");
        assert_eq!(adapter_label(Path::new("my-adapter")), "my-adapter");
        let m = ModelSpec { name: None, path: "base".into(), adapter: Some("runs/dpo/final".into()) };
        assert_eq!(m.display_name(), "base + dpo");
    }

    #[test]
    fn judge_models_are_named_by_scheme() {
        let spec = |llm: &str, model: Option<&str>| JudgeSpec { plugin: "j.wasm".into(), llm: llm.into(), model: model.map(String::from), api_key_env: None, max_tokens: 8 };
        assert_eq!(spec("local:/m", None).resolve_llm().unwrap(), JudgeLlm::Local("/m".into()));
        assert_eq!(spec("/m", None).resolve_llm().unwrap(), JudgeLlm::Local("/m".into()));
        assert!(matches!(spec("openai:http://127.0.0.1:8000/v1", Some("judge")).resolve_llm().unwrap(), JudgeLlm::OpenAi(_)));
        assert!(spec("openai:http://127.0.0.1:8000/v1", None).resolve_llm().is_err(), "an endpoint needs a model name");
    }
}
