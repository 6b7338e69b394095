//! Evaluation (`ftx eval`): several models or checkpoints scored on the same tasks —
//! perplexity on held-out data, task metrics on their own generations, multiple-choice
//! accuracy by log-likelihood, and a judge plugin's grades — compared in one report.
//!
//! [`spec`] says what to run, [`tasks`] reads task files, [`likelihood`] and [`generation`]
//! score one model, [`judging`] grades answers through a judge plugin, [`run`] drives it all
//! and [`report`] writes report.html, report.json and samples.jsonl.

pub mod generation;
pub mod judging;
pub mod likelihood;
pub mod report;
pub mod run;
pub mod score;
pub mod spec;
pub mod tasks;

pub use run::{run, run_with_judge, RunOptions};
pub use spec::EvalSpec;

use crate::model::generate::{generate, GenerateOptions};
use crate::model::tokenizer::Message;
use crate::model::{CausalLm, ModelError, TextTokenizer};
use serde::Serialize;
use std::path::PathBuf;

/// Errors of an evaluation; each names the file (and line) or plugin at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {problem}", path.display())]
    Record { path: PathBuf, line: usize, problem: String },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Plugin(#[from] crate::plugins::PluginError),
    #[error("{0}")]
    Other(String),
}

/// Function-calling accuracy over a set of prompts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CallScores {
    /// The generated call equals the expected one (as JSON values: key order does not matter).
    pub exact_match: f64,
    /// The output is a JSON object with a string "name" and an object "arguments".
    pub valid_call: f64,
    /// The function name is right.
    pub name_accuracy: f64,
    pub n: usize,
}

/// Scores one generated text against the expected call: (exact, valid, name right).
pub fn score_call(output: &str, expected: &serde_json::Value) -> (bool, bool, bool) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(output.trim()) else { return (false, false, false) };
    let valid = v.get("name").is_some_and(|n| n.is_string()) && v.get("arguments").is_some_and(|a| a.is_object());
    (v == *expected, valid, valid && v["name"] == expected["name"])
}

/// Greedy-generates an answer for each chat prompt and scores it as a function call.
pub fn function_calls(
    model: &CausalLm,
    tok: &TextTokenizer,
    cases: &[(Vec<Message>, serde_json::Value)],
    max_new_tokens: usize,
) -> Result<(CallScores, Vec<String>), ModelError> {
    let opts = GenerateOptions { max_new_tokens, stop_ids: tok.stop_ids.clone(), ..Default::default() };
    let mut s = CallScores { n: cases.len(), ..Default::default() };
    let mut outputs = Vec::with_capacity(cases.len());
    for (prompt, expected) in cases {
        let ids = tok.encode_chat(prompt, true)?;
        let out = generate(model, tok, &ids, &opts, |_| {})?.text;
        let (exact, valid, name) = score_call(&out, expected);
        s.exact_match += exact as u8 as f64;
        s.valid_call += valid as u8 as f64;
        s.name_accuracy += name as u8 as f64;
        outputs.push(out);
    }
    let n = cases.len().max(1) as f64;
    s.exact_match /= n;
    s.valid_call /= n;
    s.name_accuracy /= n;
    Ok((s, outputs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_compared_as_json_values() {
        let want = serde_json::json!({"name": "set_timer", "arguments": {"minutes": 5}});
        assert_eq!(score_call(r#"{"arguments": {"minutes": 5}, "name": "set_timer"}"#, &want), (true, true, true));
        assert_eq!(score_call(r#"{"name": "set_timer", "arguments": {"minutes": 6}}"#, &want), (false, true, true));
        assert_eq!(score_call(r#"{"name": "play_music", "arguments": {}}"#, &want), (false, true, false));
        assert_eq!(score_call(r#"{"name": "set_timer""#, &want), (false, false, false));
    }
}
