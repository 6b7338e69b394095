//! What every handler shares (the server's state) and the one way a job reaches the model
//! thread.

use super::aliases::Aliases;
use super::constrain::Constraints;
use super::error::ApiError;
use super::metrics::Metrics;
use super::ops::{ApiKey, RequestLog};
use super::scheduler::{Job, ModelNames};
use crate::model::TextTokenizer;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

/// What every handler shares.
pub struct AppState {
    pub jobs: SyncSender<Job>,
    pub names: ModelNames,
    pub tok: Arc<TextTokenizer>,
    pub constraints: Arc<Constraints>,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// The most a request may ask for (the model's context).
    pub max_tokens_limit: usize,
    pub started: u64,
    pub next_id: AtomicU64,
    pub metrics: Arc<Metrics>,
    /// Required `Authorization: Bearer` key, if any.
    pub api_key: Option<ApiKey>,
    /// Set when shutting down: new requests get 503, running ones finish.
    pub draining: AtomicBool,
    pub log: Option<RequestLog>,
    /// Alias → weighted served models (versions, canaries).
    pub aliases: Aliases,
}

/// Adapter and alias names: letters, digits and `- _ . : /` (versions read `sql:v2`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
}

pub fn server_error(message: &str) -> ApiError {
    ApiError { status: 500, message: message.into(), kind: "server_error", param: None, code: None }
}

/// Sends `job` to the model thread; a full queue is a 429.
pub fn enqueue(st: &AppState, job: Job) -> Result<(), ApiError> {
    let generation = matches!(job, Job::Generate(_));
    if generation {
        st.metrics.queue_depth.inc(); // before sending: the model thread decrements on receipt
    }
    st.jobs.try_send(job).map_err(|e| {
        if generation {
            st.metrics.queue_depth.dec();
        }
        match e {
            TrySendError::Full(_) => ApiError { status: 429, message: "the request queue is full; retry shortly".into(), kind: "rate_limit_error", param: None, code: Some("queue_full") },
            TrySendError::Disconnected(_) => server_error("the model thread stopped"),
        }
    })
}
