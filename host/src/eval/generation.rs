//! Generation tasks: the model answers each prompt with the task's decoding settings, and
//! each answer is scored with the task's metrics (the judge's grade is added later, by
//! [`super::judging`], once the judge's model is loaded).

use super::score::{self, Schema};
use super::spec::{GenerationSpec, Metric};
use super::tasks::{GenerationSample, Prompt};
use super::EvalError;
use crate::model::generate::{generate, GenerateOptions};
use crate::model::tokenizer::Message;
use crate::model::{CausalLm, TextTokenizer};
use std::collections::BTreeMap;

/// A generation task ready to run: its settings, samples and compiled schemas.
pub struct GenerationTask {
    pub name: String,
    pub spec: GenerationSpec,
    pub samples: Vec<GenerationSample>,
    /// The task's schema (from `schema = ...`), if any.
    pub schema: Option<Schema>,
    /// Per-sample schemas, by sample index.
    pub sample_schemas: BTreeMap<usize, Schema>,
}

impl GenerationTask {
    /// Reads the task file and schema, and checks every sample has what its metrics need.
    pub fn load(name: String, spec: GenerationSpec, limit: Option<usize>) -> Result<GenerationTask, EvalError> {
        let samples = super::tasks::read_generation(&spec.file, limit)?;
        let schema = match &spec.schema {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| EvalError::Io { path: p.clone(), source: e })?;
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EvalError::Record { path: p.clone(), line: e.line(), problem: format!("not valid JSON: {e}") })?;
                Some(Schema::new(&v).map_err(|problem| EvalError::Record { path: p.clone(), line: 1, problem })?)
            }
            None => None,
        };
        let bad = |s: &GenerationSample, problem: String| EvalError::Record { path: spec.file.clone(), line: s.line, problem };
        let mut sample_schemas = BTreeMap::new();
        for (i, s) in samples.iter().enumerate() {
            let needs_reference = spec.metrics.iter().any(|m| matches!(m, Metric::ExactMatch | Metric::FunctionCall));
            if needs_reference && s.reference.is_none() {
                return Err(bad(s, "exact_match and function_call need a \"reference\" answer".into()));
            }
            if spec.metrics.contains(&Metric::FunctionCall) {
                score::score_function_call("", s.reference.as_ref().expect("checked")).map_err(|p| bad(s, p))?;
            }
            if let Some(v) = &s.schema {
                sample_schemas.insert(i, Schema::new(v).map_err(|p| bad(s, format!("\"schema\": {p}")))?);
            } else if spec.metrics.contains(&Metric::JsonSchema) && schema.is_none() {
                return Err(bad(s, "json_schema needs a schema: give the task a `schema` file or the sample a \"schema\"".into()));
            }
        }
        Ok(GenerationTask { name, spec, samples, schema, sample_schemas })
    }

    /// The prompt's token ids for `tok`.
    fn prompt_ids(&self, tok: &TextTokenizer, s: &GenerationSample) -> Result<Vec<u32>, String> {
        let chat = self.spec.chat.unwrap_or(tok.chat_template.is_some());
        let ids = match (&s.prompt, chat) {
            (Prompt::Text(t), false) => tok.encode(t, true),
            (Prompt::Text(t), true) => tok.encode_chat(&[Message::new("user", t)], true),
            (Prompt::Chat(m), true) => tok.encode_chat(m, true),
            (Prompt::Chat(_), false) => return Err("a \"messages\" prompt needs a chat template, and this model's tokenizer has none (or the task says chat = false)".into()),
        };
        ids.map_err(|e| e.to_string())
    }

    /// The model's answer to every sample; `progress` is called once per answer.
    pub fn answer(&self, model: &CausalLm, tok: &TextTokenizer, mut progress: impl FnMut()) -> Result<Vec<String>, EvalError> {
        let opts = GenerateOptions {
            max_new_tokens: self.spec.max_new_tokens,
            temperature: self.spec.temperature,
            seed: self.spec.seed,
            stop_ids: tok.stop_ids.clone(),
            stop_strings: self.spec.stop.clone(),
            ..Default::default()
        };
        let max = model.config.max_positions as usize;
        let mut out = Vec::with_capacity(self.samples.len());
        for s in &self.samples {
            let bad = |problem: String| EvalError::Record { path: self.spec.file.clone(), line: s.line, problem };
            let ids = self.prompt_ids(tok, s).map_err(bad)?;
            if ids.len() + self.spec.max_new_tokens > max {
                return Err(bad(format!(
                    "the prompt is {} tokens; with max_new_tokens = {} it exceeds the model's {max} positions",
                    ids.len(),
                    self.spec.max_new_tokens
                )));
            }
            out.push(generate(model, tok, &ids, &opts, |_| {})?.text);
            progress();
        }
        Ok(out)
    }

    /// The task's metrics (all but the judge's) for each answer, in order.
    pub fn score(&self, answers: &[String]) -> Vec<BTreeMap<String, f64>> {
        let flag = |b: bool| f64::from(u8::from(b));
        self.samples
            .iter()
            .zip(answers)
            .enumerate()
            .map(|(i, (s, a))| {
                let mut m = BTreeMap::new();
                for metric in &self.spec.metrics {
                    match metric {
                        Metric::ExactMatch => {
                            // A JSON reference (not a string) is matched as a JSON value: key order and spacing aside.
                            let exact = match &s.reference {
                                Some(serde_json::Value::String(r)) => score::exact_match(a, r),
                                Some(v) => score::parse_json(a).as_ref() == Some(v),
                                None => false,
                            };
                            m.insert("exact_match".into(), flag(exact));
                        }
                        Metric::JsonValid => {
                            m.insert("json_valid".into(), flag(score::parse_json(a).is_some()));
                        }
                        Metric::JsonSchema => {
                            let schema = self.sample_schemas.get(&i).or(self.schema.as_ref()).expect("checked at load");
                            m.insert("json_schema".into(), flag(schema.violation(a).is_none()));
                        }
                        Metric::FunctionCall => {
                            let c = score::score_function_call(a, s.reference.as_ref().expect("checked at load")).unwrap_or_default();
                            m.insert("call_valid".into(), flag(c.valid));
                            m.insert("call_name".into(), flag(c.name));
                            m.insert("call_arguments".into(), c.arguments);
                            m.insert("call_exact".into(), flag(c.exact));
                        }
                        Metric::Judge => {}
                    }
                }
                m
            })
            .collect()
    }
}

/// Means of per-sample metrics (a metric missing from a sample, e.g. a failed judgement, is
/// left out of that metric's mean).
pub fn mean_metrics(per_sample: &[BTreeMap<String, f64>]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for m in per_sample {
        for (k, v) in m {
            let e = sums.entry(k.clone()).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    sums.into_iter().map(|(k, (s, n))| (k, s / n.max(1) as f64)).collect()
}
