//! Format and split: each kept record is written in the configured shape (Alpaca, ShareGPT,
//! OpenAI messages, or its own) and assigned to train, validation or test — by a seeded
//! hash of its content, or, stratified by source, in exact proportions per input file.

use super::dedup::hash64;
use super::record::{Origin, Reject, Stage};
use crate::data::Example;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;

/// `[prep.output]`: the shape of the written records and of the rejects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// `auto` (each record in its own shape: alpaca, messages, text, prompt/chosen/rejected),
    /// `alpaca`, `sharegpt` (`conversations` with `from`/`value`) or `messages` (OpenAI).
    /// A record that cannot take the shape (raw text as alpaca, …) is rejected at `format`.
    #[serde(default = "default_out_format")]
    pub format: OutputFormat,
    /// Put the record itself (as it was when rejected) in rejects.jsonl. Records rejected
    /// before the `pii` stage still hold their personal data.
    #[serde(default = "yes")]
    pub rejects_record: bool,
}

/// Output record shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    Auto,
    Alpaca,
    Sharegpt,
    Messages,
}

/// `[prep.split]`: train/validation/test fractions (they must add up to 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    #[serde(default = "default_train")]
    pub train: f64,
    #[serde(default = "default_heldout")]
    pub validation: f64,
    #[serde(default = "default_heldout")]
    pub test: f64,
    /// Seed of the assignment.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `none`: each record is drawn from a seeded hash of its content (identical records land
    /// together); `source`: every input file is split in the exact proportions (±1 record).
    #[serde(default = "default_stratify")]
    pub stratify: Stratify,
}

impl SplitConfig {
    /// Checks the values of `[prep.split]`; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        let (train, validation, test) = (self.train, self.validation, self.test);
        if [train, validation, test].iter().any(|f| !(0.0..=1.0).contains(f)) || (train + validation + test - 1.0).abs() > 1e-9 {
            return Err(format!("prep.split: train + validation + test must be 1, got {train} + {validation} + {test}"));
        }
        Ok(())
    }
}

/// How splits are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stratify {
    None,
    Source,
}

impl Default for OutputConfig {
    fn default() -> Self {
        crate::config::serde_defaults()
    }
}

impl Default for SplitConfig {
    fn default() -> Self {
        crate::config::serde_defaults()
    }
}

fn yes() -> bool { true }
fn default_out_format() -> OutputFormat { OutputFormat::Auto }
fn default_train() -> f64 { 0.9 }
fn default_heldout() -> f64 { 0.05 }
fn default_seed() -> u64 { 42 }
fn default_stratify() -> Stratify { Stratify::None }

/// The split names, in file order.
pub const SPLITS: [&str; 3] = ["train", "validation", "test"];

fn sharegpt_role(role: &str) -> &str {
    match role {
        "user" => "human",
        "assistant" => "gpt",
        other => other,
    }
}

/// The record as one JSON object in `format`, or why it cannot be written so.
pub fn format_record(e: &Example, format: OutputFormat) -> Result<Value, Reject> {
    let unconvertible = |what: &str| Err(Reject::new(Stage::Format, "unconvertible", format!("{what} cannot be written as {format:?}")));
    let messages = |e: &Example| -> Option<Vec<(String, String)>> {
        match e {
            Example::Chat { messages } => Some(messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect()),
            Example::Alpaca { instruction, input, output } => {
                let user = if input.is_empty() { instruction.clone() } else { format!("{instruction}\n\n{input}") };
                Some(vec![("user".into(), user), ("assistant".into(), output.clone())])
            }
            _ => None,
        }
    };
    match (format, e) {
        (OutputFormat::Auto, Example::Chat { messages }) | (OutputFormat::Messages, Example::Chat { messages }) => {
            Ok(json!({ "messages": messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>() }))
        }
        (OutputFormat::Auto, Example::Alpaca { instruction, input, output }) | (OutputFormat::Alpaca, Example::Alpaca { instruction, input, output }) => {
            Ok(json!({ "instruction": instruction, "input": input, "output": output }))
        }
        (OutputFormat::Auto, Example::Text { text }) => Ok(json!({ "text": text })),
        (OutputFormat::Auto, Example::Preference { prompt, chosen, rejected }) => {
            Ok(json!({ "prompt": prompt, "chosen": chosen, "rejected": rejected }))
        }
        (OutputFormat::Auto, Example::Unpaired { prompt, completion, label }) => Ok(json!({ "prompt": prompt, "completion": completion, "label": label })),
        (OutputFormat::Auto, Example::Prompt { prompt, reference }) => Ok(json!({ "prompt": prompt, "reference": reference })),
        (OutputFormat::Alpaca, Example::Chat { messages }) => match messages.as_slice() {
            [u, a] if u.role == "user" && a.role == "assistant" => Ok(json!({ "instruction": u.content, "input": "", "output": a.content })),
            _ => unconvertible(&format!("a conversation of {} turns", messages.len())),
        },
        (OutputFormat::Sharegpt, _) | (OutputFormat::Messages, _) => match messages(e) {
            Some(turns) if format == OutputFormat::Sharegpt => Ok(json!({
                "conversations": turns.iter().map(|(r, c)| json!({"from": sharegpt_role(r), "value": c})).collect::<Vec<_>>()
            })),
            Some(turns) => Ok(json!({ "messages": turns.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>() })),
            None => unconvertible(kind(e)),
        },
        (OutputFormat::Alpaca, _) => unconvertible(kind(e)),
    }
}

fn kind(e: &Example) -> &'static str {
    match e {
        Example::Text { .. } => "raw text",
        Example::Alpaca { .. } => "an alpaca record",
        Example::Chat { .. } => "a conversation",
        Example::Preference { .. } => "a preference pair",
        Example::Unpaired { .. } => "an unpaired (kto) record",
        Example::Prompt { .. } => "a prompt",
    }
}

/// Assigns records to splits.
pub struct Splitter {
    cfg: SplitConfig,
    /// Per source: records seen, and records seen that did not go to test.
    seen: HashMap<u32, (u64, u64)>,
}

fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether the `k`-th item of a systematic sample with rate `f` and start `r` is taken:
/// exactly `⌊n·f + r⌋` of the first `n` items are.
fn systematic(k: u64, f: f64, r: f64) -> bool {
    ((k + 1) as f64 * f + r).floor() > (k as f64 * f + r).floor()
}

impl Splitter {
    pub fn new(cfg: &SplitConfig) -> Splitter {
        Splitter { cfg: cfg.clone(), seen: HashMap::new() }
    }

    /// The split (an index into [`SPLITS`]) of a record written as `line`.
    pub fn assign(&mut self, origin: Origin, source_name: &str, line: &[u8]) -> usize {
        let c = &self.cfg;
        match c.stratify {
            Stratify::None => {
                let mut key = c.seed.to_le_bytes().to_vec();
                key.extend_from_slice(line);
                let u = unit(hash64(&key));
                if u < c.train {
                    0
                } else if u < c.train + c.validation {
                    1
                } else {
                    2
                }
            }
            Stratify::Source => {
                let start = |what: &str| unit(hash64(format!("{}\0{source_name}\0{what}", c.seed).as_bytes()));
                let (k, j) = self.seen.entry(origin.source).or_insert((0, 0));
                let to_test = systematic(*k, c.test, start("test"));
                *k += 1;
                if to_test {
                    return 2;
                }
                let f_val = if c.test < 1.0 { c.validation / (1.0 - c.test) } else { 0.0 };
                let to_val = systematic(*j, f_val, start("validation"));
                *j += 1;
                if to_val { 1 } else { 0 }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::Message;

    #[test]
    fn records_take_the_output_shapes() {
        let a = Example::Alpaca { instruction: "Add".into(), input: "2 and 3".into(), output: "5".into() };
        let v = format_record(&a, OutputFormat::Sharegpt).unwrap();
        assert_eq!(v, json!({"conversations": [{"from": "human", "value": "Add\n\n2 and 3"}, {"from": "gpt", "value": "5"}]}));
        let c = Example::Chat { messages: vec![Message::new("user", "q"), Message::new("assistant", "a")] };
        assert_eq!(format_record(&c, OutputFormat::Alpaca).unwrap(), json!({"instruction": "q", "input": "", "output": "a"}));
        assert_eq!(format_record(&c, OutputFormat::Auto).unwrap(), json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}));
        let t = Example::Text { text: "t".into() };
        assert_eq!(format_record(&t, OutputFormat::Alpaca).unwrap_err().reason, "unconvertible");
        assert_eq!(format_record(&t, OutputFormat::Auto).unwrap(), json!({"text": "t"}));
    }

    #[test]
    fn stratified_splits_are_exact_per_source() {
        let cfg = SplitConfig { train: 0.8, validation: 0.1, test: 0.1, seed: 7, stratify: Stratify::Source };
        let mut s = Splitter::new(&cfg);
        let mut counts = [[0u32; 3]; 2];
        for i in 0..1000u64 {
            let src = (i % 4 == 0) as u32; // source 1 gets 250 records, source 0 gets 750
            let split = s.assign(Origin { source: src, line: i }, &format!("s{src}"), b"x");
            counts[src as usize][split] += 1;
        }
        assert_eq!(counts[0][2], 75, "⌊750 · 0.1 + r⌋ for any start r in [0, 1)");
        assert!(counts[0][1].abs_diff(75) <= 1, "{:?}", counts[0]);
        assert_eq!(counts[1].iter().sum::<u32>(), 250);
        assert!(counts[1][1].abs_diff(25) <= 1 && counts[1][2].abs_diff(25) <= 1, "{:?}", counts[1]);
    }

    #[test]
    fn hashed_splits_follow_content_and_seed() {
        let cfg = SplitConfig { train: 0.5, validation: 0.25, test: 0.25, seed: 1, stratify: Stratify::None };
        let mut s = Splitter::new(&cfg);
        let o = Origin { source: 0, line: 1 };
        let mut counts = [0u32; 3];
        for i in 0..4000 {
            counts[s.assign(o, "s", format!("record {i}").as_bytes())] += 1;
        }
        // Binomial: 4000·0.25 = 1000 ± 27 (one standard deviation); allow five.
        assert!(counts[1].abs_diff(1000) < 140 && counts[2].abs_diff(1000) < 140, "{counts:?}");
        assert_eq!(s.assign(o, "s", b"same"), s.assign(Origin { source: 3, line: 9 }, "t", b"same"));
    }
}
