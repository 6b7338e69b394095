//! Filter: record-level quality checks — broken UTF-8 and mojibake, refusals (a maintained
//! phrase list, refusals.txt, plus the config's), non-target languages (whatlang), length
//! bounds, and conversations that repeat a turn word for word.

use super::PrepError;
use super::record::{answers, texts, Reject, Stage};
use crate::data::Example;
use aho_corasick::AhoCorasick;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[prep.filter]`: record-level quality checks. A record failing one is rejected with the
/// check's name as its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Most U+FFFD replacement characters (left by broken UTF-8) a record may hold.
    #[serde(default)]
    pub max_replacement_chars: usize,
    /// Reject text that shows UTF-8 read as Latin-1/CP1252 (`Ã©`, `â€™`, …).
    #[serde(default = "yes")]
    pub mojibake: bool,
    /// Reject answers containing a phrase of the built-in refusal list
    /// (host/src/data/prep/refusals.txt): "I cannot answer that", "As an AI language model", …
    #[serde(default = "yes")]
    pub refusals: bool,
    /// More refusal phrases (matched case-insensitively anywhere in an answer).
    #[serde(default)]
    pub refusal_phrases: Vec<String>,
    /// A file of more refusal phrases, one a line (`#` starts a comment).
    #[serde(default)]
    pub refusal_file: Option<PathBuf>,
    /// Languages to keep, as ISO 639-3 codes (`eng`, `deu`, `fra`, …); empty keeps all.
    #[serde(default)]
    pub languages: Vec<String>,
    /// A record is rejected for its language only when the detector is at least this sure.
    #[serde(default = "default_lang_conf")]
    pub min_language_confidence: f64,
    /// Fewest characters (all text fields together) a record may have.
    #[serde(default = "one")]
    pub min_chars: usize,
    /// Most characters (all text fields together); 0 means no bound.
    #[serde(default)]
    pub max_chars: usize,
    /// Reject conversations in which one role repeats a turn word for word.
    #[serde(default = "yes")]
    pub duplicate_turns: bool,
}

impl FilterConfig {
    /// Checks the values of `[prep.filter]`; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        for l in &self.languages {
            if whatlang::Lang::from_code(l.as_str()).is_none() {
                return Err(format!("prep.filter.languages: \"{l}\" is not an ISO 639-3 code the detector knows (eng, deu, fra, spa, …)"));
            }
        }
        Ok(())
    }
}

impl Default for FilterConfig {
    fn default() -> Self {
        crate::config::serde_defaults()
    }
}

fn yes() -> bool { true }
fn one() -> usize { 1 }
fn default_lang_conf() -> f64 { 0.5 }

/// The refusal phrases shipped with ftx.
pub const BUILTIN_REFUSALS: &str = include_str!("refusals.txt");

/// Sequences that UTF-8 text shows after being decoded as Latin-1 or CP1252.
const MOJIBAKE: [&str; 12] = ["Ã©", "Ã¨", "Ã¤", "Ã¶", "Ã¼", "Ã±", "Ã§", "Ã¡", "Ã³", "â€™", "â€œ", "â€\u{9d}"];

/// Characters of text the language detector looks at (enough to decide, bounded cost).
const LANG_SAMPLE: usize = 2000;

/// The filter stage, built once from its config.
pub struct Filter {
    cfg: FilterConfig,
    refusals: Option<(AhoCorasick, Vec<String>)>,
    mojibake: AhoCorasick,
    languages: Vec<whatlang::Lang>,
}

/// Phrases of a refusal list: one a line, `#` comments and blank lines skipped, lower case,
/// curly apostrophes straightened.
pub fn parse_phrases(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(normalise_quotes)
        .collect()
}

fn normalise_quotes(s: &str) -> String {
    s.replace(['\u{2019}', '\u{2018}'], "'").to_lowercase()
}

impl Filter {
    /// Builds the filter: reads the refusal file and compiles the phrase matcher.
    pub fn new(cfg: &FilterConfig) -> Result<Filter, PrepError> {
        let mut phrases = Vec::new();
        if cfg.refusals {
            phrases.extend(parse_phrases(BUILTIN_REFUSALS));
        }
        phrases.extend(cfg.refusal_phrases.iter().map(|p| normalise_quotes(p.trim())).filter(|p| !p.is_empty()));
        if let Some(f) = &cfg.refusal_file {
            let text = std::fs::read_to_string(f).map_err(|source| PrepError::Io { path: f.clone(), source })?;
            phrases.extend(parse_phrases(&text));
        }
        let refusals = if phrases.is_empty() {
            None
        } else {
            let ac = AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(&phrases)
                .map_err(|e| PrepError::Config(format!("refusal phrases: {e}")))?;
            Some((ac, phrases))
        };
        let languages = cfg.languages.iter().filter_map(|l| whatlang::Lang::from_code(l.as_str())).collect();
        Ok(Filter { cfg: cfg.clone(), refusals, mojibake: AhoCorasick::new(MOJIBAKE).expect("fixed patterns"), languages })
    }

    /// Why `e` should be dropped, or `None` to keep it.
    pub fn check(&self, e: &Example) -> Option<Reject> {
        let reject = |reason, detail: String| Some(Reject::new(Stage::Filter, reason, detail));
        let fields = texts(e);
        let replacement: usize = fields.iter().map(|t| t.matches('\u{FFFD}').count()).sum();
        if replacement > self.cfg.max_replacement_chars {
            return reject("broken_utf8", format!("{replacement} replacement characters (U+FFFD)"));
        }
        if self.cfg.mojibake {
            if let Some(m) = fields.iter().find_map(|t| self.mojibake.find(t).map(|m| t[m.range()].to_owned())) {
                return reject("mojibake", format!("\"{m}\": UTF-8 read as Latin-1/CP1252"));
            }
        }
        let chars: usize = fields.iter().map(|t| t.chars().count()).sum();
        if chars < self.cfg.min_chars {
            return reject("too_short", format!("{chars} characters, fewer than {}", self.cfg.min_chars));
        }
        if self.cfg.max_chars > 0 && chars > self.cfg.max_chars {
            return reject("too_long", format!("{chars} characters, more than {}", self.cfg.max_chars));
        }
        if let Some((ac, phrases)) = &self.refusals {
            for a in answers(e) {
                let found = if a.contains(['\u{2019}', '\u{2018}']) { ac.find(&normalise_quotes(a)) } else { ac.find(a) };
                if let Some(m) = found {
                    return reject("refusal", format!("answer contains \"{}\"", phrases[m.pattern().as_usize()]));
                }
            }
        }
        if self.cfg.duplicate_turns {
            if let Example::Chat { messages } = e {
                for (j, b) in messages.iter().enumerate() {
                    if let Some(i) = messages[..j].iter().position(|a| a.role == b.role && a.content.trim() == b.content.trim()) {
                        return reject("duplicate_turn", format!("turn {j} ({}) repeats turn {i}", b.role));
                    }
                }
            }
        }
        if !self.languages.is_empty() {
            let mut sample = String::new();
            for t in &fields {
                if sample.len() >= LANG_SAMPLE {
                    break;
                }
                let end = t.char_indices().nth(LANG_SAMPLE - sample.len()).map_or(t.len(), |(i, _)| i);
                sample.push_str(&t[..end]);
                sample.push('\n');
            }
            if let Some(info) = whatlang::detect(&sample) {
                if !self.languages.contains(&info.lang()) && info.confidence() >= self.cfg.min_language_confidence {
                    return reject("language", format!("{} (confidence {:.2})", info.lang().code(), info.confidence()));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::Message;

    fn alpaca(output: &str) -> Example {
        Example::Alpaca { instruction: "Tell me about the weather today please".into(), input: String::new(), output: output.into() }
    }

    fn reason(f: &Filter, e: &Example) -> Option<&'static str> {
        f.check(e).map(|r| r.reason)
    }

    #[test]
    fn each_check_names_its_reason() {
        let mut cfg = FilterConfig::default();
        cfg.languages = vec!["eng".into()];
        cfg.max_chars = 400;
        cfg.refusal_phrases = vec!["Computer says no".into()];
        let f = Filter::new(&cfg).unwrap();
        assert_eq!(reason(&f, &alpaca("It will be sunny and warm all afternoon, with a light breeze.")), None);
        assert_eq!(reason(&f, &alpaca("Sunny \u{FFFD} warm")), Some("broken_utf8"));
        assert_eq!(reason(&f, &alpaca("It\u{e2}\u{20ac}\u{2122}s sunny")), Some("mojibake"));
        assert_eq!(reason(&f, &alpaca("I\u{2019}m sorry, but I can\u{2019}t share that.")), Some("refusal"));
        assert_eq!(reason(&f, &alpaca("AS AN AI LANGUAGE MODEL I have no window.")), Some("refusal"));
        assert_eq!(reason(&f, &alpaca("well... computer says NO")), Some("refusal"));
        assert_eq!(reason(&f, &alpaca(&"x".repeat(400))), Some("too_long"));
        let german = Example::Text { text: "Heute wird es den ganzen Nachmittag sonnig und warm, mit einer leichten Brise aus Westen.".into() };
        assert_eq!(reason(&f, &german), Some("language"));
        let chat = Example::Chat {
            messages: vec![
                Message::new("user", "What is two plus two?"),
                Message::new("assistant", "Four."),
                Message::new("user", "And times three?"),
                Message::new("assistant", " Four. "),
            ],
        };
        let r = f.check(&chat).unwrap();
        assert_eq!((r.reason, r.detail.as_str()), ("duplicate_turn", "turn 3 (assistant) repeats turn 1"));
        assert_eq!(reason(&f, &Example::Text { text: String::new() }), Some("too_short"));
    }

    #[test]
    fn the_shipped_list_parses() {
        let p = parse_phrases(BUILTIN_REFUSALS);
        assert!(p.len() > 30 && p.contains(&"i cannot answer that".to_string()));
        assert!(p.iter().all(|l| !l.starts_with('#') && l == &l.to_lowercase()));
    }
}
