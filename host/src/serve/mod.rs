//! `ftx serve`: an OpenAI-compatible HTTP server for a checkpoint and any number of LoRA
//! adapters over it.
//!
//! Threads: tokio runs the HTTP side ([`http`]); one model thread ([`scheduler`]) owns the
//! tensors and decodes all running requests together. They talk through a bounded job queue
//! (full → HTTP 429) and one event channel per request. Structured outputs are enforced
//! while decoding by llguidance ([`constrain`]). Operating it: API-key auth, draining,
//! the request log ([`ops`]) and Prometheus metrics ([`metrics`]).

pub mod alias_routes;
pub mod aliases;
pub mod api;
pub mod bench;
pub mod constrain;
pub mod error;
pub mod graphs;
pub mod http;
pub mod lora_rows;
pub mod metrics;
pub mod ops;
pub mod paged;
pub mod profile;
pub mod scheduler;
pub mod state;
pub mod tools;

use crate::model::decoder::LoadOptions;
use crate::model::{ModelConfig, TextTokenizer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Checkpoint folder.
    pub model_dir: PathBuf,
    /// Name of the base model in requests (default: the folder's name).
    pub served_name: Option<String>,
    /// `(name, PEFT adapter folder)` pairs loaded at start.
    pub adapters: Vec<(String, PathBuf)>,
    pub load: LoadOptions,
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Requests that may wait for a slot before new ones get 429.
    pub queue: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Requests must send `Authorization: Bearer <key>` (all endpoints but `/health`).
    pub api_key: Option<String>,
    /// The JSONL request log, if any.
    pub request_log: Option<ops::LogOptions>,
    /// KV-cache pool and prefill chunking.
    pub engine: paged::EngineOptions,
}

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Constraint(#[from] constrain::ConstraintError),
    #[error("{0}")]
    Load(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("starting the HTTP runtime: {0}")]
    Runtime(std::io::Error),
    #[error("--api-key: {0}")]
    ApiKey(String),
    #[error("--request-log: {0}")]
    RequestLog(String),
}

/// A running server; dropping it shuts the HTTP side down (the model thread follows once
/// the last request is answered).
pub struct Server {
    /// The address it listens on (useful after binding port 0).
    pub addr: SocketAddr,
    /// Names requests may use in `model`.
    pub names: Vec<String>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<std::thread::JoinHandle<()>>,
    state: Arc<state::AppState>,
}

impl Server {
    /// Loads the model and adapters, binds `addr`, and serves in background threads.
    pub fn start(opts: ServeOptions, addr: SocketAddr) -> Result<Server, ServeError> {
        let api_key = opts.api_key.as_deref().map(ops::ApiKey::new).transpose().map_err(ServeError::ApiKey)?;
        let log = opts.request_log.as_ref().map(ops::RequestLog::open).transpose().map_err(ServeError::RequestLog)?;
        let metrics = Arc::new(metrics::Metrics::new());
        let config = ModelConfig::load(&opts.model_dir)?;
        let tok = Arc::new(TextTokenizer::load(&opts.model_dir, config.vocab)?);
        let constraints = Arc::new(constrain::Constraints::load(&opts.model_dir, &tok.stop_ids, config.vocab as usize)?);
        let base = opts.served_name.clone().unwrap_or_else(|| {
            let dir = opts.model_dir.canonicalize().unwrap_or_else(|_| opts.model_dir.clone());
            dir.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
        });
        for (name, _) in &opts.adapters {
            if *name == base || opts.adapters.iter().filter(|(n, _)| n == name).count() > 1 {
                return Err(ServeError::Load(format!("adapter name '{name}' is used twice (the base model is served as '{base}')")));
            }
        }
        let names = Arc::new(RwLock::new(vec![base]));
        let (jobs, queue) = std::sync::mpsc::sync_channel(opts.queue.max(1));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let cfg = scheduler::SchedulerConfig { model_dir: opts.model_dir.clone(), load: opts.load, adapters: opts.adapters.clone(), max_batch: opts.max_batch, metrics: metrics.clone(), engine: opts.engine };
        let (t, n) = (tok.clone(), names.clone());
        std::thread::Builder::new()
            .name("ftx-model".into())
            .spawn(move || scheduler::run(cfg, t, n, queue, ready_tx))
            .map_err(ServeError::Runtime)?;
        ready.recv().map_err(|_| ServeError::Load("the model thread stopped while loading".into()))?.map_err(ServeError::Load)?;

        let listener = std::net::TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
        listener.set_nonblocking(true).map_err(|source| ServeError::Bind { addr, source })?;
        let local = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
        let state = Arc::new(state::AppState {
            jobs,
            names: names.clone(),
            tok,
            constraints,
            default_max_tokens: opts.default_max_tokens,
            max_tokens_limit: config.max_positions.max(1) as usize,
            started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            next_id: Default::default(),
            metrics,
            api_key,
            draining: Default::default(),
            log,
            aliases: Default::default(),
            adapter_toks: Default::default(),
        });
        for (name, path) in &opts.adapters {
            state.adopt_adapter(name, path).map_err(ServeError::Load)?;
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(ServeError::Runtime)?;
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let app_state = state.clone();
        let http = std::thread::Builder::new()
            .name("ftx-http".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return tracing::error!("listening: {e}"),
                    };
                    let app = http::router(state);
                    let served = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = stop.await;
                    });
                    if let Err(e) = served.await {
                        tracing::error!("HTTP server stopped: {e}");
                    }
                })
            })
            .map_err(ServeError::Runtime)?;
        let names = names.read().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(Server { addr: local, names, shutdown: Some(shutdown), http: Some(http), state: app_state })
    }

    /// Starts draining: from now on new requests get 503 (`/health` too, so a load balancer
    /// stops sending traffic), while running ones go on.
    pub fn drain(&self) {
        self.state.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Requests being answered now (streams included).
    pub fn in_flight(&self) -> i64 {
        self.state.metrics.in_flight.get()
    }

    /// Graceful shutdown: drains, waits up to `grace` for running requests to finish, then
    /// stops the HTTP side. Returns how many requests were still running when it stopped.
    pub fn shutdown(mut self, grace: std::time::Duration) -> i64 {
        self.drain();
        let deadline = std::time::Instant::now() + grace;
        while self.in_flight() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let left = self.in_flight();
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        left
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}
