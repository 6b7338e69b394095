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
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

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
    /// The tokenizer of each served adapter that saved the chat template and stop tokens it
    /// trained with (`chat_template.jinja` + `eos_token_id`, written by a run that set
    /// `data.chat_template` / `data.eot_token`): chat requests on that adapter render with its
    /// template, and its requests stop on its tokens, as `ftx generate --adapter` does.
    pub adapter_toks: RwLock<HashMap<String, Arc<TextTokenizer>>>,
}

impl AppState {
    /// The tokenizer requests on `adapter` (`None`: the base) render and stop with.
    pub fn tok_for(&self, adapter: Option<&str>) -> Arc<TextTokenizer> {
        adapter
            .and_then(|a| self.adapter_toks.read().unwrap_or_else(|e| e.into_inner()).get(a).cloned())
            .unwrap_or_else(|| self.tok.clone())
    }

    /// Records the template and stop tokens saved with the adapter `name` loaded from `path`,
    /// when it saved any.
    pub fn adopt_adapter(&self, name: &str, path: &Path) -> Result<(), String> {
        let dir = crate::peft::adapter_dir(path)?;
        if !dir.join(crate::data::chat_templates::TEMPLATE_FILE).exists() {
            return Ok(());
        }
        let mut tok = (*self.tok).clone();
        crate::data::chat_templates::adopt(&mut tok, &dir).map_err(|e| format!("adapter {name}: {e}"))?;
        tracing::info!(adapter = name, "using the chat template and stop tokens saved with the adapter");
        self.adapter_toks.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned(), Arc::new(tok));
        Ok(())
    }

    /// Forgets an unloaded adapter's tokenizer.
    pub fn forget_adapter(&self, name: &str) {
        self.adapter_toks.write().unwrap_or_else(|e| e.into_inner()).remove(name);
    }
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
