//! The `[prep]` section of a TOML file: every key, its default, and what it does. Unknown
//! keys are rejected with the nearest known key suggested. The section may live in its own
//! `prep.toml` or inside `ftx.toml` beside the training sections (other tables are ignored).
//! Each stage owns its section's type and defaults (`[prep.filter]` in filter.rs, …); this
//! file composes them.

use super::augment::AugmentConfig;
use super::dedup::DedupConfig;
use super::extract::ExtractConfig;
use super::filter::FilterConfig;
use super::ingest::TextUnit;
use super::pii::PiiConfig;
use super::split::{OutputConfig, SplitConfig};
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
    /// `.parquet`, `.txt`/`.md`, and web pages `.html`/`.htm` and archives `.warc`/`.warc.gz`
    /// (see `[prep.extract]`).
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
    /// `[prep.extract]`: web pages and archives.
    #[serde(default)]
    pub extract: ExtractConfig,
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

fn default_text_unit() -> TextUnit { TextUnit::Line }
fn auto_format() -> DataFormat { DataFormat::Auto }
fn default_out() -> PathBuf { "prepared".into() }
fn default_stages() -> Vec<String> { vec!["filter".into(), "pii".into(), "dedup".into()] }
fn default_chunk() -> usize { 2048 }
fn default_plugin_budget() -> f64 { crate::plugins::budget::DEFAULT_RUN_BUDGET.as_secs_f64() }

impl PrepConfig {
    /// Reads the `[prep]` section of `path`; relative paths in it are taken relative to the
    /// file's folder.
    pub fn load(path: &Path) -> Result<PrepConfig, PrepError> {
        let bad = |m: String| PrepError::Config(format!("{}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut cfg = Self::parse(&text).map_err(bad)?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        for i in &mut cfg.inputs {
            // A Hub data reference (hf://…) is not a path.
            if Path::new(i.as_str()).is_relative() && !i.starts_with("hf://") {
                *i = base.join(i.as_str()).to_string_lossy().into_owned();
            }
        }
        for p in cfg.plugins.iter_mut().filter(|p| crate::plugins::manifest::is_explicit_path(p) && p.is_relative() && base.join(&**p).exists()) {
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
            .map_err(|e: toml::de::Error| crate::config::did_you_mean(&e.to_string()))?;
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
            a.validate()?;
        }
        if self.chunk_size == 0 {
            return Err("prep.chunk_size must be at least 1".into());
        }
        crate::plugins::budget::budget_from_secs(self.plugin_time_budget_s).map_err(|e| format!("prep.plugin_time_budget_s: {e}"))?;
        self.dedup.validate()?;
        self.split.validate()?;
        self.pii.validate()?;
        self.filter.validate()?;
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
    use crate::data::prep::pii::PiiMode;

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
