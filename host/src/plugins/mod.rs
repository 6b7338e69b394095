//! Plugins: data filters, reward functions, losses, judges and exporters written by anyone, run
//! sandboxed as WebAssembly components against the versioned WIT package `ftx:plugin` (see `wit/`).
//!
//! The host owns everything fast or trusted — the tensors stay on the training device and a
//! loss plugin only holds handles to them — and every call runs under a time limit (epoch
//! interruption), a memory limit, and no WASI capability beyond a frozen clock. A plugin that
//! traps, loops, or exhausts its memory becomes an error naming the plugin and the call; the
//! instance is rebuilt and the host carries on.

pub mod bench;
pub mod budget;
pub mod cache;
pub mod engine;
pub mod export_io;
pub mod exporter;
pub mod filter;
pub mod first_party;
pub mod grant;
pub mod inspect;
pub mod judge;
pub mod judge_model;
pub mod loss;
pub mod manifest;
pub mod metrics;
pub mod native;
mod native_host;
pub mod permissions;
pub mod registry;
pub mod reward;
pub mod sandbox;
pub mod tensor_budget;
pub mod tensor_ops;
pub mod untrusted;

use std::path::Path;
use std::time::Duration;

/// The WIT package version this host speaks; guests of the same major (0.x: same minor) load.
pub const API_VERSION: &str = "0.1.0";

/// What a plugin does, read from the interface its component exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    DataFilter,
    Reward,
    Loss,
    Judge,
    Exporter,
}

impl PluginKind {
    /// The WIT interface a component of this kind exports.
    pub fn interface(self) -> &'static str {
        match self {
            PluginKind::DataFilter => "filter",
            PluginKind::Reward => "reward",
            PluginKind::Loss => "loss",
            PluginKind::Judge => "judge",
            PluginKind::Exporter => "exporter",
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PluginKind::DataFilter => "data-filter",
            PluginKind::Reward => "reward",
            PluginKind::Loss => "loss",
            PluginKind::Judge => "judge",
            PluginKind::Exporter => "exporter",
        })
    }
}

/// "a data-filter", "an exporter": the kind with its article, for messages.
pub fn with_article(kind: PluginKind) -> String {
    let k = kind.to_string();
    let article = if k.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {k}")
}

/// Per-call limits of a sandboxed plugin.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wall time one call may take. For judges only the plugin's own compute counts, not the
    /// model it waits on; an exporter's call gets an allowance for the size of the model.
    pub call_timeout: Duration,
    /// Linear memory a plugin instance may grow to.
    pub memory_bytes: usize,
    /// Largest output one record may produce.
    pub max_output_bytes: usize,
    /// Host tensor ops one loss call may run (see `tensor_budget`).
    pub max_tensor_ops: u64,
    /// Elements the results of one loss call's tensor ops may hold in all.
    pub max_tensor_elements: u64,
    /// Time all of the plugin's calls may take over one run (see `budget`).
    pub run_budget: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_timeout: Duration::from_secs(5),
            memory_bytes: 64 << 20,
            max_output_bytes: 1 << 20,
            max_tensor_ops: tensor_budget::MAX_OPS_PER_CALL,
            max_tensor_elements: tensor_budget::MAX_ELEMENTS_PER_CALL,
            run_budget: budget::DEFAULT_RUN_BUDGET,
        }
    }
}

/// Everything that can go wrong with a plugin. Every message names the plugin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {plugin}: cannot load: {problem}")]
    Load { plugin: String, problem: String },
    #[error("plugin {plugin} was built for ftx:plugin@{found}; this ftx speaks ftx:plugin@{API_VERSION}: rebuild it against ftx-plugin-api {API_VERSION}")]
    Version { plugin: String, found: String },
    #[error("plugin {plugin}: {call} exceeded its time limit of {limit_ms} ms and was stopped")]
    Timeout { plugin: String, call: String, limit_ms: u128 },
    #[error("plugin {plugin}: {call}: the plugin used up its time budget of {budget_s} s for this run (calls made: {calls}) and was stopped; raise the budget if that is expected (train: time_budget_s in its [[plugins]] table; prep: prep.plugin_time_budget_s; export: --plugin-time-budget-s)")]
    Budget { plugin: String, call: String, budget_s: f64, calls: u64 },
    #[error("plugin {plugin}: {call} exceeded its memory limit of {limit_mib} MiB and was stopped")]
    Memory { plugin: String, call: String, limit_mib: usize },
    #[error("plugin {plugin}: {call} trapped: {detail}")]
    Trap { plugin: String, call: String, detail: String },
    #[error("plugin {plugin}: {call}: {problem}")]
    Invalid { plugin: String, call: String, problem: String },
}

/// The plugin's name as messages show it: the file name without extension (and, for a native
/// library, without its `lib` prefix).
pub fn plugin_name(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
    if native::is_native(path) { stem.strip_prefix("lib").unwrap_or(stem) } else { stem }.to_owned()
}

/// The kind and API version of the component at `path`.
pub fn inspect_file(path: &Path) -> Result<(PluginKind, String), PluginError> {
    let component = engine::compile(path)?;
    engine::inspect(path, &component)
}

/// The kind and API version of the plugin at `path`: a component's exports, or a native
/// library's table (whose API is this SDK's).
pub fn kind_of(path: &Path) -> Result<(PluginKind, String), PluginError> {
    if native::is_native(path) {
        return Ok((native::NativePlugin::load(path)?.kind, API_VERSION.to_owned()));
    }
    inspect_file(path)
}
