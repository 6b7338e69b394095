//! Drops records in which the model's side gives a canned refusal, so a model is not
//! fine-tuned to refuse.
//!
//! The record's JSON string values are checked, decoded, at any depth — not its keys; the raw
//! line when it is not JSON. What the user wrote is skipped, as a prompt may well quote a
//! refusal: messages whose `role` (or ShareGPT `from`) is `user`, `human` or `system`, and the
//! values of the top-level keys `prompt`, `instruction`, `input`, `question`, `query` and
//! `system`. Everything else (assistant turns, `completion`, `output`, `response`, `chosen`,
//! `rejected`, `text`, unknown keys) is checked after lower-casing, turning curly apostrophes
//! (’) into straight ones and runs of whitespace into one space. A phrase must start and end
//! at word boundaries. The phrases are below: fixed openers ("I'm sorry, but", "As an AI
//! language model", …), and "I cannot" / "I can't" / "I'm unable to" / … only when followed by
//! a refusing verb ("assist", "help with", "provide", "fulfill", "comply", …), so "I cannot
//! stress this enough" and "I can't help but smile" are kept.

use ftx_plugin_api::filter::{export_filter, Filter, Item, Verdict};
use serde_json::Value;

/// Refusals as they stand.
const PHRASES: &[&str] = &[
    "i'm sorry, but",
    "i am sorry, but",
    "i apologize, but",
    "i'm sorry, i can't",
    "i'm sorry, i cannot",
    "as an ai language model",
    "as a language model",
    "as an ai assistant, i",
    "as an ai, i",
    "i must decline",
    "i'm not able to comply",
    "against my programming",
    "my guidelines prevent me",
];

/// "I cannot" and its forms, refusals only with a verb from `VERBS` after them.
const SUBJECTS: &[&str] = &["i cannot", "i can't", "i can not", "i won't", "i will not", "i'm unable to", "i am unable to", "i'm not able to", "i am not able to"];
const VERBS: &[&str] = &[
    "assist", "help with", "help you with", "provide", "fulfill", "fulfil", "comply", "engage in", "support", "create", "generate", "produce",
    "answer that", "do that", "share", "participate",
];

/// Lower-cased, straight apostrophes, single spaces.
fn normalise(s: &str) -> String {
    let lower = s.to_lowercase().replace(['\u{2019}', '\u{2018}', '\u{02bc}'], "'");
    lower.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `phrase` occurs in `text` with a word boundary on both sides.
fn contains_word(text: &str, phrase: &str) -> bool {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
    text.match_indices(phrase).any(|(i, _)| !word(text[..i].chars().next_back()) && !word(text[i + phrase.len()..].chars().next()))
}

/// The refusal phrase in `text`, if any.
fn refusal(text: &str) -> Option<String> {
    let text = normalise(text);
    if let Some(p) = PHRASES.iter().find(|p| contains_word(&text, p)) {
        return Some(p.to_string());
    }
    SUBJECTS.iter().flat_map(|s| VERBS.iter().map(move |v| format!("{s} {v}"))).find(|p| contains_word(&text, p))
}

/// Top-level keys that hold what the user wrote.
const PROMPT_KEYS: &[&str] = &["prompt", "instruction", "input", "question", "query", "system"];
/// Message authors other than the model.
const NOT_MODEL: &[&str] = &["user", "human", "system"];

/// The strings of `v` the model wrote (or may have: everything not known to be the user's).
fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => {
            let author = o.get("role").or_else(|| o.get("from")).and_then(Value::as_str);
            if !author.is_some_and(|a| NOT_MODEL.contains(&a.to_lowercase().as_str())) {
                o.iter().filter(|(k, _)| !matches!(k.as_str(), "role" | "from")).for_each(|(_, x)| strings(x, out));
            }
        }
        _ => {}
    }
}

/// The model-side strings of a record.
fn record_strings(v: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    match v {
        Value::Object(o) => o.iter().filter(|(k, _)| !PROMPT_KEYS.contains(&k.as_str())).for_each(|(_, x)| strings(x, &mut out)),
        v => strings(v, &mut out),
    }
    out
}

struct Refusal;

impl Filter for Refusal {
    fn filter(items: Vec<Item>) -> Vec<Verdict> {
        items
            .iter()
            .map(|i| {
                let found = match serde_json::from_str::<Value>(&i.json) {
                    Ok(v) => record_strings(&v).into_iter().find_map(refusal),
                    Err(_) => refusal(&i.json),
                };
                match found {
                    Some(p) => Verdict::Drop(format!("refusal: \"{p}\"")),
                    None => Verdict::Keep,
                }
            })
            .collect()
    }
}

export_filter!(Refusal);
