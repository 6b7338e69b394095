//! A client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, llama.cpp's
//! server, Ollama, TGI, …): what `ftx prep`'s augmentation stage asks its teacher model, and
//! where a judge plugin's `llm` calls can go. Blocking HTTP (ureq) on a bounded pool of worker
//! threads, a client-side rate limit, retries with exponential backoff and jitter on 429, 5xx
//! and timeouts (honouring `Retry-After`), and a disk cache keyed by the SHA-256 of the
//! request's JSON, so that a re-run pays for nothing twice.
//!
//! The API key is read from the environment variable the configuration names; it is sent as a
//! bearer token and never logged, cached, written to a manifest or shown in an error.

mod cache;
mod client;
mod config;
mod judge;
mod schedule;

pub use cache::DiskCache;
pub use client::{Client, ClientStats, Completion};
pub use config::EndpointConfig;
pub use judge::{judge_llm, openai_llm, JudgeLlm};
pub use schedule::{backoff_delay, parse_retry_after, RateLimiter};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` saying `content`.
    pub fn new(role: &str, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// The body of a `POST {base_url}/chat/completions` request. Its JSON (fields in this order,
/// unset options left out) is what the cache key is computed from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl ChatRequest {
    /// The cache key: the hex SHA-256 of the request's JSON.
    pub fn cache_key(&self) -> String {
        crate::util::sha256_hex(&serde_json::to_vec(self).expect("requests serialise"))
    }
}

/// Errors of the endpoint client. Messages name the URL and, for HTTP errors, the status and
/// the start of the body; never the API key.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("{url}: HTTP {status}: {body}")]
    Status { url: String, status: u16, body: String, retry_after: Option<std::time::Duration> },
    #[error("{url}: timed out ({detail})")]
    Timeout { url: String, detail: String },
    #[error("{url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("{url}: the answer is not a chat completion ({problem}): {body}")]
    BadResponse { url: String, problem: String, body: String },
    #[error("{url}: gave up after {attempts} attempts; last error: {last}")]
    GaveUp { url: String, attempts: u32, last: Box<LlmError> },
    #[error("the environment variable {var} (api_key_env) is not set: export {var}=<your API key>, or leave api_key_env out for an endpoint without keys")]
    MissingKey { var: String },
    #[error("response cache {}: {source}", path.display())]
    Cache { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Config(String),
}

impl LlmError {
    /// Whether trying again may help: 408, 429 and 5xx answers, timeouts and broken
    /// connections.
    pub fn is_transient(&self) -> bool {
        match self {
            LlmError::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            LlmError::Timeout { .. } | LlmError::Transport { .. } => true,
            _ => false,
        }
    }

    /// Whether the error says the configuration is wrong (bad key, URL or model: 401, 403,
    /// 404), so that every request would fail the same way.
    pub fn is_configuration(&self) -> bool {
        match self {
            LlmError::Status { status, .. } => matches!(status, 401 | 403 | 404),
            LlmError::GaveUp { last, .. } => last.is_configuration(),
            LlmError::MissingKey { .. } | LlmError::Config(_) => true,
            _ => false,
        }
    }
}

/// At most `max` characters of `s` (trimmed), with an ellipsis when cut: how error messages
/// and rejects quote bodies and answers.
pub fn excerpt(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}
