//! Synthetic augmentation: raw-text records are sent to a teacher model behind an
//! OpenAI-compatible endpoint (host/src/llm), which rewrites each into instruction/response
//! pairs. A record becomes the pairs its teacher answered (Alpaca records); an answer that
//! holds no pair sends the record to the rejects with the reason and the answer's start, a
//! malformed element of an otherwise good answer goes to the rejects on its own, and a
//! request that fails for good sends its record there too — nothing is lost, and the report's
//! `added` column counts the records this stage made. Records that are not raw text pass
//! through untouched.

use super::PrepError;
use super::record::{Item, Reject, Stage, State};
use super::report::{AugmentCounts, Report};
use crate::data::Example;
use crate::llm::{ChatMessage, ChatRequest, Client, ClientStats, LlmError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};

/// `[prep.augment]`: raw-text records rewritten into instruction/response pairs by a teacher
/// model behind an OpenAI-compatible endpoint (`[prep.augment.endpoint]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// The teacher's endpoint, model, API-key variable, limits and cache
    /// (see [`crate::llm::EndpointConfig`]). Without `cache_dir`, answers are cached in
    /// `<out>/.llm-cache`.
    pub endpoint: crate::llm::EndpointConfig,
    /// Pairs asked for per record (`{{ n }}` in the prompt); extra pairs in an answer are ignored.
    #[serde(default = "default_pairs")]
    pub pairs_per_item: usize,
    /// The user message: a minijinja template with `{{ text }}` (the record) and `{{ n }}`.
    /// It must ask for a JSON array of objects with `instruction` and `response`.
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// An optional system message.
    #[serde(default)]
    pub system: Option<String>,
    /// New tokens the teacher may write per answer.
    #[serde(default = "default_aug_tokens")]
    pub max_tokens: u32,
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Sent as the request's `seed` (endpoints that honour it sample repeatably).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Keep the raw-text record too, before its pairs.
    #[serde(default)]
    pub keep_source: bool,
}

impl AugmentConfig {
    /// Checks the values of `[prep.augment]`; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        self.endpoint.validate().map_err(|e| format!("prep.augment.endpoint: {e}"))?;
        if self.pairs_per_item == 0 || self.max_tokens == 0 {
            return Err("prep.augment: pairs_per_item and max_tokens must be at least 1".into());
        }
        compile_prompt(&self.prompt)?;
        Ok(())
    }
}

fn default_pairs() -> usize { 3 }
fn default_prompt() -> String { DEFAULT_PROMPT.into() }
fn default_aug_tokens() -> u32 { 1024 }
fn default_temperature() -> f32 { 0.7 }

/// The template used when `[prep.augment]` sets no `prompt`.
pub const DEFAULT_PROMPT: &str = "Rewrite the text below into {{ n }} instruction/response pairs for fine-tuning a \
model. Each instruction must be a task or question a user could ask that the text answers; each response must \
answer it fully and stand on its own.\n\nAnswer with only a JSON array of {{ n }} objects with the keys \
\"instruction\" and \"response\".\n\nTEXT:\n{{ text }}";

/// Characters of a teacher's answer quoted in a reject.
const ANSWER_EXCERPT: usize = 300;

/// The built stage: the endpoint's client and the compiled prompt.
pub struct Augmenter {
    cfg: AugmentConfig,
    client: Client,
    env: minijinja::Environment<'static>,
    bar: indicatif::ProgressBar,
    counts: AugmentCounts,
}

/// Compiles a prompt template (an error names what is wrong with it).
pub fn compile_prompt(template: &str) -> Result<minijinja::Environment<'static>, String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_template_owned("prompt", template.to_owned()).map_err(|e| format!("prep.augment.prompt: {e:#}"))?;
    Ok(env)
}

impl Augmenter {
    /// Connects the stage to its endpoint; `bar` shows the teacher's answers as they come.
    pub fn new(cfg: &AugmentConfig, bar: indicatif::ProgressBar) -> Result<Augmenter, PrepError> {
        let client = Client::new(cfg.endpoint.clone()).map_err(|e| PrepError::Config(format!("prep.augment.endpoint: {e}")))?;
        let env = compile_prompt(&cfg.prompt).map_err(PrepError::Config)?;
        Ok(Augmenter { cfg: cfg.clone(), client, env, bar, counts: AugmentCounts::default() })
    }

    /// The request for one text.
    pub fn request(&self, text: &str) -> Result<ChatRequest, String> {
        let prompt = self
            .env
            .get_template("prompt")
            .and_then(|t| t.render(minijinja::context! { text => text, n => self.cfg.pairs_per_item }))
            .map_err(|e| format!("prep.augment.prompt: {e:#}"))?;
        let mut messages = Vec::new();
        if let Some(system) = &self.cfg.system {
            messages.push(ChatMessage::new("system", system.as_str()));
        }
        messages.push(ChatMessage::new("user", prompt));
        let mut req = self.client.request(messages, Some(self.cfg.max_tokens), Some(self.cfg.temperature));
        req.seed = self.cfg.seed;
        Ok(req)
    }

    /// Takes the progress bar off the terminal.
    pub fn finish_bar(&self) {
        self.bar.finish_and_clear();
    }

    /// What the stage counted (deterministic: the same inputs give the same counts).
    pub fn counts(&self) -> &AugmentCounts {
        &self.counts
    }

    /// What the client did (requests, retries, cache hits: these differ run to run).
    pub fn client_stats(&self) -> ClientStats {
        self.client.stats()
    }

    /// Sends the chunk's live text records to the teacher and puts its pairs in their place.
    /// Fails only when the endpoint's configuration is wrong (bad key, URL or model) or the
    /// cache cannot be written.
    pub fn run(&mut self, chunk: &mut Vec<Item>, report: &mut Report) -> Result<(), PrepError> {
        let mut sent = Vec::new();
        let mut reqs = Vec::new();
        for (i, it) in chunk.iter_mut().enumerate() {
            let Some(Example::Text { text }) = it.alive() else { continue };
            match self.request(text) {
                Ok(r) => {
                    sent.push(i);
                    reqs.push(r);
                }
                Err(e) => it.reject(Reject::new(Stage::Augment, "prompt_error", e)),
            }
        }
        if reqs.is_empty() {
            return Ok(());
        }
        let cached = AtomicU64::new(0);
        let bar = &self.bar;
        let answers = self.client.complete_all(&reqs, &|r| {
            if r.as_ref().is_ok_and(|c| c.cached) {
                cached.fetch_add(1, Ordering::Relaxed);
            }
            bar.set_message(format!("{} from the cache", cached.load(Ordering::Relaxed)));
            bar.inc(1);
        });
        if let Some(e) = answers.iter().find_map(|a| a.as_ref().err().filter(|e| e.is_configuration())) {
            return Err(PrepError::Config(format!("prep.augment: {e}")));
        }
        let mut answers = sent.into_iter().zip(answers).peekable();
        let mut out = Vec::with_capacity(chunk.len() + reqs.len() * self.cfg.pairs_per_item);
        for (i, it) in std::mem::take(chunk).into_iter().enumerate() {
            match answers.next_if(|(j, _)| *j == i) {
                Some((_, answer)) => self.expand(it, answer, &mut out, report),
                None => out.push(it),
            }
        }
        *chunk = out;
        Ok(())
    }

    /// The records one answer makes, pushed to `out`.
    fn expand(&mut self, mut it: Item, answer: Result<crate::llm::Completion, LlmError>, out: &mut Vec<Item>, report: &mut Report) {
        self.counts.records_sent += 1;
        let completion = match answer {
            Ok(c) => c,
            Err(e) => {
                self.counts.teacher_errors += 1;
                it.reject(Reject::new(Stage::Augment, "teacher_error", e.to_string()));
                out.push(it);
                return;
            }
        };
        let (pairs, bad) = match parse_pairs(&completion.content) {
            Ok(p) => p,
            Err(why) => {
                self.counts.unparseable += 1;
                let detail = format!("{why}; the teacher answered: {}", crate::llm::excerpt(&completion.content, ANSWER_EXCERPT));
                it.reject(Reject::new(Stage::Augment, "unparseable_teacher_output", detail));
                out.push(it);
                return;
            }
        };
        let keep = pairs.len().min(self.cfg.pairs_per_item);
        self.counts.surplus_pairs_ignored += (pairs.len() - keep) as u64;
        self.counts.pairs += keep as u64;
        let mut made = 0u64;
        if self.cfg.keep_source {
            out.push(it.clone());
            made += 1;
        }
        for (instruction, response) in pairs.into_iter().take(keep) {
            let example = Example::Alpaca { instruction, input: String::new(), output: response };
            out.push(Item { origin: it.origin, state: State::Alive(example), derived: made > 0, meta: it.meta.clone() });
            made += 1;
        }
        for (element, why) in bad {
            self.counts.bad_pairs += 1;
            let reject = Reject::new(Stage::Augment, "bad_pair", why);
            out.push(Item { origin: it.origin, state: State::Rejected { reject, record: Some(element) }, derived: made > 0, meta: it.meta.clone() });
            made += 1;
        }
        // The source record became `made` records: `made - 1` more than came in.
        report.add(Stage::Augment, made - 1);
    }
}

/// The instruction/response pairs of a teacher's answer, and the elements that are not
/// pairs (with why). The answer may be bare JSON or JSON inside a Markdown code fence or
/// prose; an array of objects, an object holding such an array, or a single object. Keys:
/// `instruction` (or `question`, `prompt`) and `response` (or `output`, `answer`). `Err` when
/// no pair is found.
pub fn parse_pairs(answer: &str) -> Result<(Vec<(String, String)>, Vec<(Value, String)>), String> {
    let v = find_json(answer).ok_or_else(|| "no JSON array or object in the answer".to_string())?;
    let elements = match v {
        Value::Array(a) => a,
        Value::Object(ref o) if pick(o, &["instruction", "question", "prompt"]).is_some() => vec![v],
        Value::Object(o) => match o.into_iter().find_map(|(_, x)| if let Value::Array(a) = x { Some(a) } else { None }) {
            Some(a) => a,
            None => return Err("the JSON object holds neither a pair nor an array of pairs".into()),
        },
        _ => return Err("the JSON is neither an array nor an object".into()),
    };
    let mut pairs = Vec::new();
    let mut bad = Vec::new();
    for e in elements {
        let pair = e.as_object().and_then(|o| Some((pick(o, &["instruction", "question", "prompt"])?, pick(o, &["response", "output", "answer"])?)));
        match pair {
            Some((i, r)) => pairs.push((i, r)),
            None => bad.push((e, "not an object with non-empty \"instruction\" and \"response\" strings".to_string())),
        }
    }
    if pairs.is_empty() {
        return Err(format!("none of the {} JSON elements is an instruction/response pair", bad.len()));
    }
    Ok((pairs, bad))
}

fn pick(o: &serde_json::Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| o.get(*k)?.as_str().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned))
}

/// The first JSON array or object in `s`: the whole text, a fenced block, or the span from
/// the first `[`/`{` to the last `]`/`}`.
fn find_json(s: &str) -> Option<Value> {
    let s = s.trim();
    if let Ok(v) = serde_json::from_str::<Value>(s) {
        return Some(v).filter(|v| v.is_array() || v.is_object());
    }
    if let Some(start) = s.find("```") {
        let body = &s[start + 3..];
        let body = body.split_once('\n').map_or(body, |(first, rest)| if first.trim().chars().all(char::is_alphanumeric) { rest } else { body });
        if let Some(end) = body.find("```") {
            if let Ok(v) = serde_json::from_str::<Value>(body[..end].trim()) {
                return Some(v);
            }
        }
    }
    for (open, close) in [('[', ']'), ('{', '}')] {
        if let (Some(a), Some(b)) = (s.find(open), s.rfind(close)) {
            if a < b {
                if let Ok(v) = serde_json::from_str::<Value>(&s[a..=b]) {
                    return Some(v);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_found_in_the_shapes_teachers_answer_in() {
        let bare = r#"[{"instruction": "What is X?", "response": "X is a letter."}, {"question": "Y?", "answer": "Yes."}]"#;
        let (p, bad) = parse_pairs(bare).unwrap();
        assert_eq!(p, vec![("What is X?".into(), "X is a letter.".into()), ("Y?".into(), "Yes.".into())]);
        assert!(bad.is_empty());
        let fenced = "Sure! Here they are:\n```json\n[{\"instruction\": \"a\", \"response\": \"b\"}]\n```\nEnjoy.";
        assert_eq!(parse_pairs(fenced).unwrap().0, vec![("a".into(), "b".into())]);
        let wrapped = r#"{"pairs": [{"instruction": "a", "output": "b"}, {"instruction": "", "response": "c"}, 7]}"#;
        let (p, bad) = parse_pairs(wrapped).unwrap();
        assert_eq!((p.len(), bad.len()), (1, 2));
        let single = r#"Here: {"instruction": "a", "response": "b"}"#;
        assert_eq!(parse_pairs(single).unwrap().0.len(), 1);
        assert!(parse_pairs("I cannot help with that.").unwrap_err().contains("no JSON"));
        assert!(parse_pairs("[1, 2]").unwrap_err().contains("none of the 2"));
    }

    #[test]
    fn the_default_prompt_renders() {
        let env = compile_prompt(DEFAULT_PROMPT).unwrap();
        let p = env.get_template("prompt").unwrap().render(minijinja::context! { text => "Cats purr.", n => 2 }).unwrap();
        assert!(p.contains("into 2 instruction/response pairs") && p.ends_with("TEXT:\nCats purr."), "{p}");
        assert!(compile_prompt("{{ text ").is_err());
    }
}
