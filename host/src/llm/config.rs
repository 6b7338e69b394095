//! Where an OpenAI-compatible endpoint is and how hard the client may use it. The same keys
//! serve `[prep.augment]` and a judge's endpoint.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// An endpoint and the client's manners towards it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Base URL up to the API version: `https://api.openai.com/v1`,
    /// `http://127.0.0.1:8000/v1` (vLLM, llama.cpp's server). `/chat/completions` is added.
    pub base_url: String,
    /// The model name the endpoint serves.
    pub model: String,
    /// Name of the environment variable holding the API key (sent as `Authorization: Bearer`);
    /// leave it out for endpoints without keys. The key itself never goes in a file.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Seconds one HTTP exchange may take (connect, send, answer) before it counts as a
    /// timeout (and is retried).
    #[serde(default = "default_timeout")]
    pub timeout_secs: f64,
    /// Retries of a request after a 408, 429 or 5xx answer, a timeout or a broken connection.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// The first backoff; it doubles each retry (with random jitter), up to `backoff_max_ms`.
    /// A `Retry-After` header takes precedence.
    #[serde(default = "default_backoff")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Requests per minute the client sends at most (retries included; cache hits are free);
    /// 0 for no limit.
    #[serde(default)]
    pub requests_per_minute: u32,
    /// Requests in flight at once (worker threads).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Folder of cached answers (one file per distinct request); none caches nothing.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

fn default_timeout() -> f64 { 120.0 }
fn default_retries() -> u32 { 5 }
fn default_backoff() -> u64 { 500 }
fn default_backoff_max() -> u64 { 60_000 }
fn default_concurrency() -> usize { 8 }

impl EndpointConfig {
    /// An endpoint with every setting at its default.
    pub fn new(base_url: &str, model: &str) -> EndpointConfig {
        let mut t = toml::Table::new();
        t.insert("base_url".into(), base_url.into());
        t.insert("model".into(), model.into());
        toml::Value::Table(t).try_into().expect("every other key has a default")
    }

    /// Checks the values (the URL's scheme, positive timeouts and concurrency).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(format!("base_url \"{}\" must start with http:// or https://", self.base_url));
        }
        if self.model.trim().is_empty() {
            return Err("model is empty: name the model the endpoint serves".into());
        }
        if !(self.timeout_secs > 0.0 && self.timeout_secs.is_finite()) {
            return Err(format!("timeout_secs must be positive, got {}", self.timeout_secs));
        }
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            return Err(format!("backoff_initial_ms ({}) exceeds backoff_max_ms ({})", self.backoff_initial_ms, self.backoff_max_ms));
        }
        if self.api_key_env.as_deref().is_some_and(|v| v.is_empty() || v.contains('=')) {
            return Err("api_key_env must be the NAME of an environment variable (the key itself never goes in a config file)".into());
        }
        Ok(())
    }

    /// `{base_url}/chat/completions`.
    pub fn completions_url(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }
}
