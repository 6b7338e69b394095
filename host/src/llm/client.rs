//! The endpoint client: one chat completion at a time ([`Client::complete`]) or many on a
//! bounded pool of worker threads ([`Client::complete_all`]), each through the cache, the rate
//! limit and the retry loop.

use super::schedule::{jittered, parse_retry_after, RateLimiter};
use super::{excerpt, ChatMessage, ChatRequest, DiskCache, EndpointConfig, LlmError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Characters of a response body quoted in an error.
const BODY_EXCERPT: usize = 400;
/// The largest response body read.
const MAX_BODY_BYTES: u64 = 64 << 20;

/// The text a model answered, and why it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub content: String,
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Whether the answer came from the cache (not stored in it).
    #[serde(skip)]
    pub cached: bool,
}

/// What the client did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClientStats {
    /// HTTP requests sent (retries included).
    pub http_requests: u64,
    /// Of them, retries after a transient failure.
    pub retries: u64,
    /// Completions answered from the cache (no request sent).
    pub cache_hits: u64,
    /// Completions that ended in an error.
    pub failures: u64,
}

#[derive(Default)]
struct Counters {
    http_requests: AtomicU64,
    retries: AtomicU64,
    cache_hits: AtomicU64,
    failures: AtomicU64,
}

/// A client of one OpenAI-compatible endpoint. Shared by reference between threads.
pub struct Client {
    cfg: EndpointConfig,
    url: String,
    agent: ureq::Agent,
    /// `Bearer <key>`; never printed (see the `Debug` impl).
    authorization: Option<String>,
    limiter: RateLimiter,
    cache: Option<DiskCache>,
    counters: Counters,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("url", &self.url).field("model", &self.cfg.model).finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the endpoint `cfg` describes; reads the API key from its variable.
    pub fn new(cfg: EndpointConfig) -> Result<Client, LlmError> {
        cfg.validate().map_err(LlmError::Config)?;
        let authorization = match &cfg.api_key_env {
            Some(var) => match std::env::var(var) {
                Ok(key) if !key.trim().is_empty() => Some(format!("Bearer {}", key.trim())),
                _ => return Err(LlmError::MissingKey { var: var.clone() }),
            },
            None => None,
        };
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs_f64(cfg.timeout_secs))
            .user_agent(&format!("ftx/{}", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client {
            url: cfg.completions_url(),
            agent,
            authorization,
            limiter: RateLimiter::new(cfg.requests_per_minute),
            cache: cfg.cache_dir.as_deref().map(DiskCache::new),
            counters: Counters::default(),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EndpointConfig {
        &self.cfg
    }

    /// A request to the configured model.
    pub fn request(&self, messages: Vec<ChatMessage>, max_tokens: Option<u32>, temperature: Option<f32>) -> ChatRequest {
        ChatRequest { model: self.cfg.model.clone(), messages, max_tokens, temperature, seed: None }
    }

    /// Counts so far.
    pub fn stats(&self) -> ClientStats {
        let c = &self.counters;
        ClientStats {
            http_requests: c.http_requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
        }
    }

    /// One completion: from the cache when this exact request was answered before, else
    /// from the endpoint (retried as configured) and then cached.
    pub fn complete(&self, req: &ChatRequest) -> Result<Completion, LlmError> {
        let out = self.complete_uncounted(req);
        if out.is_err() {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    fn complete_uncounted(&self, req: &ChatRequest) -> Result<Completion, LlmError> {
        let key = req.cache_key();
        if let Some(cache) = &self.cache {
            if let Some(text) = cache.get(&key)? {
                match serde_json::from_str::<Completion>(&text) {
                    Ok(c) => {
                        self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(Completion { cached: true, ..c });
                    }
                    Err(e) => tracing::warn!(key, "llm: unreadable cache entry ({e}); asking the endpoint again"),
                }
            }
        }
        let body = serde_json::to_vec(req).expect("requests serialise");
        let text = self.send_with_retries(&body)?;
        let completion = self.parse(&text)?;
        if let Some(cache) = &self.cache {
            cache.put(&key, &serde_json::to_string(&completion).expect("completions serialise"))?;
        }
        Ok(completion)
    }

    /// Completions of every request, in order, `concurrency` at a time; `on_done` sees each
    /// result as it arrives (a progress bar). After an error that every request would share
    /// (a bad key, URL or model) the requests not yet sent are not sent; they fail with a
    /// note saying why.
    pub fn complete_all(&self, reqs: &[ChatRequest], on_done: &(dyn Fn(&Result<Completion, LlmError>) + Sync)) -> Vec<Result<Completion, LlmError>> {
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let slots: Vec<Mutex<Option<Result<Completion, LlmError>>>> = reqs.iter().map(|_| Mutex::new(None)).collect();
        let workers = self.cfg.concurrency.min(reqs.len());
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(req) = reqs.get(i) else { break };
                    let r = if stop.load(Ordering::Relaxed) {
                        Err(LlmError::Config(format!("{}: not sent after an earlier configuration error", self.url)))
                    } else {
                        self.complete(req)
                    };
                    if r.as_ref().is_err_and(LlmError::is_configuration) {
                        stop.store(true, Ordering::Relaxed);
                    }
                    on_done(&r);
                    *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                });
            }
        });
        slots.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every request is answered")).collect()
    }

    /// POSTs `body`, retrying transient failures with backoff (or as `Retry-After` says).
    fn send_with_retries(&self, body: &[u8]) -> Result<String, LlmError> {
        let initial = Duration::from_millis(self.cfg.backoff_initial_ms);
        let max = Duration::from_millis(self.cfg.backoff_max_ms);
        let mut retry = 0u32;
        loop {
            self.limiter.acquire();
            self.counters.http_requests.fetch_add(1, Ordering::Relaxed);
            let err = match self.send_once(body) {
                Ok(text) => return Ok(text),
                Err(e) => e,
            };
            if !err.is_transient() || retry >= self.cfg.max_retries {
                return Err(if retry == 0 { err } else { LlmError::GaveUp { url: self.url.clone(), attempts: retry + 1, last: Box::new(err) } });
            }
            let wait = match &err {
                LlmError::Status { retry_after: Some(d), .. } => *d,
                _ => jittered(retry, initial, max),
            };
            tracing::warn!("llm: {err}; retry {} of {} in {:.2} s", retry + 1, self.cfg.max_retries, wait.as_secs_f64());
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(wait);
            retry += 1;
        }
    }

    fn send_once(&self, body: &[u8]) -> Result<String, LlmError> {
        let mut req = self.agent.post(&self.url).set("Content-Type", "application/json");
        if let Some(a) = &self.authorization {
            req = req.set("Authorization", a);
        }
        // ureq answers non-2xx statuses as errors that still carry the response.
        let resp = match req.send_bytes(body) {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(self.transport(t)),
        };
        let status = resp.status();
        let retry_after = resp.header("retry-after").and_then(|v| parse_retry_after(v, SystemTime::now()));
        let mut text = String::new();
        std::io::Read::take(resp.into_reader(), MAX_BODY_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| self.io_error(e))?;
        if !(200..300).contains(&status) {
            return Err(LlmError::Status { url: self.url.clone(), status, body: excerpt(&text, BODY_EXCERPT), retry_after });
        }
        Ok(text)
    }

    fn transport(&self, t: ureq::Transport) -> LlmError {
        match std::error::Error::source(&t).and_then(|e| e.downcast_ref::<std::io::Error>()) {
            Some(io) => self.io_error(std::io::Error::new(io.kind(), t.to_string())),
            None => LlmError::Transport { url: self.url.clone(), detail: t.to_string() },
        }
    }

    fn io_error(&self, io: std::io::Error) -> LlmError {
        let url = self.url.clone();
        if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
            LlmError::Timeout { url, detail: format!("{io} (timeout {} s)", self.cfg.timeout_secs) }
        } else {
            LlmError::Transport { url, detail: io.to_string() }
        }
    }

    /// The first choice's message of a chat-completion answer.
    fn parse(&self, text: &str) -> Result<Completion, LlmError> {
        let bad = |problem: &str| LlmError::BadResponse { url: self.url.clone(), problem: problem.into(), body: excerpt(text, BODY_EXCERPT) };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(&format!("not JSON: {e}")))?;
        if let Some(err) = v.get("error") {
            return Err(bad(&format!("the endpoint reported an error: {}", excerpt(&err.to_string(), BODY_EXCERPT))));
        }
        let choice = v.get("choices").and_then(|c| c.get(0)).ok_or_else(|| bad("no choices[0]"))?;
        let content = choice.pointer("/message/content").and_then(|c| c.as_str()).ok_or_else(|| bad("no choices[0].message.content string"))?;
        let finish_reason = choice.get("finish_reason").and_then(|f| f.as_str()).map(str::to_owned);
        Ok(Completion { content: content.to_owned(), finish_reason, cached: false })
    }
}
