//! The `[prep]` section of a TOML file: every key, its default, and what it does. Unknown
//! keys are rejected with the nearest known key suggested. The section may live in its own
//! `prep.toml` or inside `ftx.toml` beside the training sections (other tables are ignored).

use super::PrepError;
use crate::data::DataFormat;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `[prep]`: where records come from, which stages run in which order, and where they go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepConfig {
    /// Files, folders (walked recursively, sorted) and glob patterns to read. A folder takes
    /// the files whose extension ftx reads: `.jsonl`/`.ndjson`, `.json`, `.csv`, `.tsv`,
    /// `.parquet`, `.txt`/`.md`.
    pub inputs: Vec<String>,
    /// Record shape: `auto` (per record, from its keys), `alpaca`, `chat` (messages or
    /// ShareGPT), `text`, `preference` (prompt/chosen/rejected).
    #[serde(default = "auto_format")]
    pub format: DataFormat,
    /// Plain-text files (`.txt`, `.md`): `line` makes one text record per non-empty line,
    /// `file` one record per file.
    #[serde(default = "default_text_unit")]
    pub text_unit: TextUnit,
    /// Output folder (created if absent; its files are replaced atomically).
    #[serde(default = "default_out")]
    pub out: PathBuf,
    /// The middle stages, in the order they run: any of `filter`, `pii`, `dedup`, `plugins`,
    /// `augment`, each at most once. Ingest runs first; format and split run last.
    #[serde(default = "default_stages")]
    pub stages: Vec<String>,
    /// Records handed to the worker threads at a time (memory is proportional to it).
    #[serde(default = "default_chunk")]
    pub chunk_size: usize,
    /// Worker threads; 0 uses every core.
    #[serde(default)]
    pub threads: usize,
    /// Data-filter plugins (`.wasm` components or native `.so` libraries), run in this order
    /// by the stage `plugins`; a record a plugin drops, or whose call fails, goes to the
    /// rejects with the plugin's reason.
    #[serde(default)]
    pub plugins: Vec<PathBuf>,
    /// Permissions granted to those plugins (`read:/folder`, `env:NAME`, `clock`; see the
    /// README's Plugins section): a plugin whose manifest asks for one not granted is refused.
    #[serde(default)]
    pub plugin_grants: Vec<String>,
    /// Seconds all of one plugin's calls may take over the run (each plugin has its own budget;
    /// see `plugins::budget`). Once it is spent, the plugin's remaining records are rejected.
    #[serde(default = "default_plugin_budget")]
    pub plugin_time_budget_s: f64,
    #[serde(default)]
    pub filter: FilterConfig,
    #[serde(default)]
    pub pii: PiiConfig,
    #[serde(default)]
    pub dedup: DedupConfig,
    #[serde(default)]
    pub output: OutputConfig,
    #[serde(default)]
    pub split: SplitConfig,
    /// `[prep.augment]`: the teacher model of the `augment` stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<AugmentConfig>,
}

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

fn default_pairs() -> usize { 3 }
fn default_prompt() -> String { super::augment::DEFAULT_PROMPT.into() }
fn default_aug_tokens() -> u32 { 1024 }
fn default_temperature() -> f32 { 0.7 }

/// How plain-text files become records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextUnit {
    /// One record per non-empty line.
    Line,
    /// One record per file.
    File,
}

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

/// `[prep.pii]`: what personal data and secrets to find, and what to put in their place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PiiConfig {
    /// Entity types to scrub: `EMAIL`, `PHONE`, `IP_ADDRESS`, `CREDIT_CARD`, `IBAN`, `US_SSN`,
    /// `URL_CREDENTIALS`, `SECRET` (API keys and tokens), `PRIVATE_KEY`.
    #[serde(default = "all_entities")]
    pub entities: Vec<String>,
    /// `redact` (`<EMAIL>`), `mask` (letters and digits become `*`), or `hash`
    /// (`<EMAIL:1a2b3c4d5e6f>`, a salted SHA-256: equal values stay equal across records).
    #[serde(default = "default_mode")]
    pub mode: PiiMode,
    /// Salt for `hash` mode. Never written to the manifest.
    #[serde(default)]
    pub salt: String,
    /// Name of an environment variable holding the salt (used when set, over `salt`).
    #[serde(default)]
    pub salt_env: Option<String>,
    /// Regions (ISO 3166 codes) in which numbers written without `+` are read; numbers with
    /// a `+` country code are read in any region.
    #[serde(default = "default_regions")]
    pub phone_regions: Vec<String>,
    /// Patterns of your own; they take precedence over the built-in detectors.
    #[serde(default)]
    pub custom: Vec<CustomPattern>,
}

/// `[[prep.pii.custom]]`: a named regular expression (Rust `regex` syntax).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomPattern {
    /// Entity name used in the placeholder and the report (`EMPLOYEE_ID` gives `<EMPLOYEE_ID>`).
    pub name: String,
    /// The regular expression.
    pub pattern: String,
}

/// What replaces a detected entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiMode {
    Redact,
    Mask,
    Hash,
}

/// `[prep.dedup]`: exact and near-duplicate removal; the first record of a cluster is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Drop records whose normalised text (NFKC, lower case, whitespace collapsed) was seen.
    #[serde(default = "yes")]
    pub exact: bool,
    /// Drop near-duplicates found by MinHash LSH.
    #[serde(default = "yes")]
    pub near: bool,
    /// Words per shingle.
    #[serde(default = "default_shingle")]
    pub shingle_size: usize,
    /// MinHash permutations (signature length); a multiple of `bands`.
    #[serde(default = "default_perms")]
    pub permutations: usize,
    /// LSH bands; `permutations / bands` rows each. More bands find lower similarities.
    #[serde(default = "default_bands")]
    pub bands: usize,
    /// Estimated Jaccard similarity at or above which a candidate is a duplicate.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Seed of the permutations.
    #[serde(default = "one_u64")]
    pub seed: u64,
}

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

/// How splits are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stratify {
    None,
    Source,
}

fn auto_format() -> DataFormat { DataFormat::Auto }
fn default_text_unit() -> TextUnit { TextUnit::Line }
fn default_out() -> PathBuf { "prepared".into() }
fn default_stages() -> Vec<String> { vec!["filter".into(), "pii".into(), "dedup".into()] }
fn default_chunk() -> usize { 2048 }
fn default_plugin_budget() -> f64 { crate::plugins::budget::DEFAULT_RUN_BUDGET.as_secs_f64() }
fn yes() -> bool { true }
fn one() -> usize { 1 }
fn one_u64() -> u64 { 1 }
fn default_lang_conf() -> f64 { 0.5 }
fn default_mode() -> PiiMode { PiiMode::Redact }
fn default_regions() -> Vec<String> { vec!["US".into(), "GB".into(), "DE".into(), "FR".into()] }
fn default_shingle() -> usize { 5 }
fn default_perms() -> usize { 128 }
fn default_bands() -> usize { 16 }
fn default_threshold() -> f64 { 0.7 }
fn default_out_format() -> OutputFormat { OutputFormat::Auto }
fn default_train() -> f64 { 0.9 }
fn default_heldout() -> f64 { 0.05 }
fn default_seed() -> u64 { 42 }
fn default_stratify() -> Stratify { Stratify::None }

/// Every built-in entity type.
pub fn all_entities() -> Vec<String> {
    super::pii::BUILTIN_ENTITIES.iter().map(|s| s.to_string()).collect()
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                toml::Value::Table(Default::default()).try_into().expect("every key has a default")
            }
        }
    )*};
}
default_from_serde!(FilterConfig, PiiConfig, DedupConfig, OutputConfig, SplitConfig);

impl PrepConfig {
    /// Reads the `[prep]` section of `path`; relative paths in it are taken relative to the
    /// file's folder.
    pub fn load(path: &Path) -> Result<PrepConfig, PrepError> {
        let bad = |m: String| PrepError::Config(format!("{}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut cfg = Self::parse(&text).map_err(bad)?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        for i in &mut cfg.inputs {
            if Path::new(i.as_str()).is_relative() {
                *i = base.join(i.as_str()).to_string_lossy().into_owned();
            }
        }
        for p in cfg.plugins.iter_mut().filter(|p| p.is_relative() && base.join(&**p).exists()) {
            *p = base.join(&*p);
        }
        if cfg.out.is_relative() {
            cfg.out = base.join(&cfg.out);
        }
        if let Some(dir) = cfg.augment.as_mut().and_then(|a| a.endpoint.cache_dir.as_mut()) {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        if let Some(f) = &mut cfg.filter.refusal_file {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        Ok(cfg)
    }

    /// Parses TOML text holding a `[prep]` table, and validates it.
    pub fn parse(text: &str) -> Result<PrepConfig, String> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        let mut prep = match table.remove("prep") {
            Some(toml::Value::Table(t)) => t,
            Some(_) => return Err("`prep` must be a table ([prep])".into()),
            None => return Err("no [prep] section".into()),
        };
        // A single path is accepted where a list is expected.
        if let Some(v @ toml::Value::String(_)) = prep.get_mut("inputs") {
            *v = toml::Value::Array(vec![v.clone()]);
        }
        let cfg: PrepConfig = toml::Value::Table(prep)
            .try_into()
            .map_err(|e: toml::de::Error| crate::train::config::did_you_mean(&e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.inputs.is_empty() {
            return Err("prep.inputs names nothing to read".into());
        }
        let mut seen = Vec::new();
        for s in &self.stages {
            if s == "plugins" && self.plugins.is_empty() {
                return Err("prep.stages names \"plugins\" but prep.plugins lists none".into());
            }
            if s == "augment" && self.augment.is_none() {
                return Err("prep.stages names \"augment\" but there is no [prep.augment] section (with [prep.augment.endpoint] base_url and model)".into());
            }
            if !["filter", "pii", "dedup", "plugins", "augment"].contains(&s.as_str()) {
                return Err(format!("prep.stages: unknown stage \"{s}\"; use filter, pii, dedup, plugins, augment"));
            }
            if seen.contains(&s) {
                return Err(format!("prep.stages: \"{s}\" is listed twice"));
            }
            seen.push(s);
        }
        if let Some(a) = &self.augment {
            a.endpoint.validate().map_err(|e| format!("prep.augment.endpoint: {e}"))?;
            if a.pairs_per_item == 0 || a.max_tokens == 0 {
                return Err("prep.augment: pairs_per_item and max_tokens must be at least 1".into());
            }
            super::augment::compile_prompt(&a.prompt)?;
        }
        if self.chunk_size == 0 {
            return Err("prep.chunk_size must be at least 1".into());
        }
        crate::plugins::budget::budget_from_secs(self.plugin_time_budget_s).map_err(|e| format!("prep.plugin_time_budget_s: {e}"))?;
        let d = &self.dedup;
        if d.bands == 0 || d.permutations == 0 || d.permutations % d.bands != 0 {
            return Err(format!("prep.dedup.permutations ({}) must be a positive multiple of bands ({})", d.permutations, d.bands));
        }
        if d.shingle_size == 0 || !(0.0..=1.0).contains(&d.threshold) {
            return Err("prep.dedup: shingle_size must be ≥ 1 and threshold in [0, 1]".into());
        }
        let s = &self.split;
        if [s.train, s.validation, s.test].iter().any(|f| !(0.0..=1.0).contains(f)) || (s.train + s.validation + s.test - 1.0).abs() > 1e-9 {
            return Err(format!("prep.split: train + validation + test must be 1, got {} + {} + {}", s.train, s.validation, s.test));
        }
        for e in &self.pii.entities {
            if !super::pii::BUILTIN_ENTITIES.contains(&e.as_str()) {
                return Err(format!("prep.pii.entities: unknown entity \"{e}\"; known: {}", super::pii::BUILTIN_ENTITIES.join(", ")));
            }
        }
        for c in &self.pii.custom {
            regex::Regex::new(&c.pattern).map_err(|e| format!("prep.pii.custom \"{}\": {e}", c.name))?;
        }
        for l in &self.filter.languages {
            if whatlang::Lang::from_code(l.as_str()).is_none() {
                return Err(format!("prep.filter.languages: \"{l}\" is not an ISO 639-3 code the detector knows (eng, deu, fra, spa, …)"));
            }
        }
        Ok(())
    }

    /// The configuration as JSON for the manifest, with the salt left out.
    pub fn to_manifest_json(&self) -> serde_json::Value {
        let mut c = self.clone();
        if !c.pii.salt.is_empty() {
            c.pii.salt = "<set>".into();
        }
        serde_json::to_value(&c).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_everything_not_given() {
        let c = PrepConfig::parse("[prep]\ninputs = \"data\"\n").unwrap();
        assert_eq!(c.inputs, vec!["data".to_string()]);
        assert_eq!(c.stages, vec!["filter", "pii", "dedup"]);
        assert_eq!((c.dedup.permutations, c.dedup.bands), (128, 16));
        assert_eq!(c.pii.mode, PiiMode::Redact);
        assert_eq!(c.split.train, 0.9);
    }

    #[test]
    fn the_example_config_parses_and_states_the_defaults() {
        let example = PrepConfig::parse(include_str!("../../../configs/prep.toml")).unwrap();
        let defaults = PrepConfig::parse("[prep]\ninputs = \"../../data/raw\"\nout = \"../../data/prepared\"\n[prep.filter]\nlanguages = [\"eng\"]\n").unwrap();
        assert_eq!(example, defaults);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let e = PrepConfig::parse("[prep]\ninputs = [\"d\"]\n[prep.dedup]\nthreshhold = 0.5\n").unwrap_err();
        assert!(e.contains("unknown field `threshhold`") && e.contains("did you mean `threshold`"), "{e}");
        let e = PrepConfig::parse("[prep]\ninputs = [\"d\"]\nstages = [\"augment\"]\n").unwrap_err();
        assert!(e.contains("no [prep.augment] section"), "{e}");
        let e = PrepConfig::parse("[prep]\ninputs = [\"d\"]\nstages = [\"augment\"]\n[prep.augment.endpoint]\nbase_url = \"localhost:8000\"\nmodel = \"m\"\n").unwrap_err();
        assert!(e.contains("prep.augment.endpoint: base_url") && e.contains("http://"), "{e}");
        let e = PrepConfig::parse("[prep]\ninputs = [\"d\"]\n[prep.split]\ntrain = 0.5\n").unwrap_err();
        assert!(e.contains("must be 1"), "{e}");
        let e = PrepConfig::parse("[prep]\ninputs = [\"d\"]\n[prep.dedup]\npermutations = 100\n").unwrap_err();
        assert!(e.contains("multiple of bands"), "{e}");
        assert!(PrepConfig::parse("[model]\npath = \"m\"\n").unwrap_err().contains("no [prep]"));
    }
}
