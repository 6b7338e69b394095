//! Operating a server: the Bearer API key, in-flight counts, and the JSONL request log with
//! its metrics (the HTTP guard that applies them is `http::guard`).

use super::metrics::Metrics;
use crate::model::generate::StopReason;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;
use subtle::ConstantTimeEq;

/// The key clients must send as `Authorization: Bearer <key>`. Only its SHA-256 is kept, and
/// a presented key is compared by digest in constant time (neither the key's bytes nor its
/// length leak through timing).
pub struct ApiKey {
    digest: [u8; 32],
}

impl ApiKey {
    /// The key; an empty or blank key is refused, since it would let anyone in.
    pub fn new(key: &str) -> Result<ApiKey, String> {
        let key = key.trim();
        if key.is_empty() {
            return Err("the API key is empty".into());
        }
        Ok(ApiKey { digest: Sha256::digest(key.as_bytes()).into() })
    }

    /// Whether `presented` is the key.
    pub fn matches(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        d.ct_eq(&self.digest).into()
    }
}

/// The endpoint label of a path (known routes only, so a scanner cannot grow the series).
pub fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        "/v1/models" => "models",
        "/v1/adapters" => "adapters",
        "/health" => "health",
        "/metrics" => "metrics",
        _ => "other",
    }
}

/// The largest request body read (axum's default limit for a body read whole).
pub const MAX_BODY_BYTES: u64 = 2 << 20;

/// Counts a request as in flight until dropped (a stream holds it until its last chunk).
pub struct InFlight(prometheus::IntGauge);

impl InFlight {
    /// Counts one more request in flight.
    pub fn new(metrics: &Metrics) -> InFlight {
        metrics.in_flight.inc();
        InFlight(metrics.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Where the request log goes and how much of the content it keeps.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub path: PathBuf,
    /// The fraction of requests (0..=1) whose prompt and output are written too.
    pub content_sample: f64,
}

/// The JSONL request log: one line per request, appended and flushed as it ends.
pub struct RequestLog {
    file: Mutex<std::fs::File>,
    path: PathBuf,
    content_sample: f64,
}

impl RequestLog {
    /// Opens (creating or appending to) the log.
    pub fn open(opts: &LogOptions) -> Result<RequestLog, String> {
        if !(0.0..=1.0).contains(&opts.content_sample) {
            return Err(format!("the request-log content sample must be between 0 and 1, got {}", opts.content_sample));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&opts.path)
            .map_err(|e| format!("{}: cannot open the request log: {e}", opts.path.display()))?;
        Ok(RequestLog { file: Mutex::new(file), path: opts.path.clone(), content_sample: opts.content_sample })
    }

    fn write(&self, line: &Value) {
        let mut text = line.to_string();
        text.push('\n');
        // One write call per line on an O_APPEND file: lines from concurrent requests never interleave.
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(text.as_bytes()) {
            tracing::error!("{}: writing the request log: {e}", self.path.display());
        }
    }
}

/// What a generation produced, per choice.
#[derive(Debug, Default)]
pub struct Outcome {
    pub prompt_tokens: usize,
    /// Summed over the choices.
    pub completion_tokens: usize,
    /// Each choice's text so far.
    pub texts: Vec<String>,
    /// Why each choice ended (`None`: still running).
    pub finish: Vec<Option<StopReason>>,
    /// When the first text (or the end, if there was none) came.
    pub first_token: Option<Instant>,
}

impl Outcome {
    /// Nothing yet, for `n` choices.
    pub fn new(n: usize) -> Outcome {
        Outcome { texts: vec![String::new(); n], finish: vec![None; n], ..Default::default() }
    }
    /// Whether every choice has ended.
    pub fn complete(&self) -> bool {
        self.finish.iter().all(Option::is_some)
    }
}

/// One request's line in the log and its latency metrics, written once when it ends.
pub struct Record {
    pub id: String,
    start: Instant,
    endpoint: &'static str,
    pub model: Option<String>,
    /// The served model that answered (differs from `model` for an alias).
    pub served: Option<String>,
    pub user: Option<String>,
    pub stream: bool,
    /// Choices asked for.
    pub n: usize,
    /// The prompt (messages or text), kept only for a request sampled for content logging.
    pub input: Option<Value>,
    sample_content: bool,
}

impl Record {
    /// A record for a request to `endpoint` starting now; `id` is the response's id.
    pub fn start(log: Option<&RequestLog>, endpoint: &'static str, id: String) -> Record {
        let sample_content = log.is_some_and(|l| l.content_sample > 0.0 && rand::random::<f64>() < l.content_sample);
        Record { id, start: Instant::now(), endpoint, model: None, served: None, user: None, stream: false, n: 1, input: None, sample_content }
    }

    /// Whether this request's prompt and output go into the log.
    pub fn keeps_content(&self) -> bool {
        self.sample_content
    }

    /// Records the end: status, timings and tokens into the metrics and the log.
    pub fn finish(self, metrics: &Metrics, log: Option<&RequestLog>, status: u16, outcome: Option<&Outcome>) {
        let latency = self.start.elapsed().as_secs_f64();
        let ttft = outcome.and_then(|o| o.first_token).map(|t| t.duration_since(self.start).as_secs_f64());
        if let (Some(model), Some(o)) = (self.served.as_ref().or(self.model.as_ref()), outcome) {
            if status == 200 {
                metrics.latency.with_label_values(&[model]).observe(latency);
                if let Some(t) = ttft {
                    metrics.time_to_first_token.with_label_values(&[model]).observe(t);
                }
                metrics.prompt_tokens.with_label_values(&[model]).inc_by(o.prompt_tokens as u64);
                metrics.completion_tokens.with_label_values(&[model]).inc_by(o.completion_tokens as u64);
            }
        }
        let Some(log) = log else { return };
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut line = json!({
            "ts": ts, "id": self.id, "endpoint": self.endpoint, "model": self.model, "served": self.served, "status": status,
            "latency_ms": (latency * 1000.0).round(), "ttft_ms": ttft.map(|t| (t * 1000.0).round()),
            "prompt_tokens": outcome.map(|o| o.prompt_tokens), "completion_tokens": outcome.map(|o| o.completion_tokens),
            "n": self.n, "stream": self.stream, "user": self.user,
            "finish_reasons": outcome.map(|o| o.finish.iter().map(|f| match f {
                Some(StopReason::Stop) => json!("stop"),
                Some(StopReason::Length) => json!("length"),
                None => Value::Null,
            }).collect::<Vec<_>>()),
        });
        if self.sample_content {
            line["input"] = self.input.unwrap_or(Value::Null);
            line["output"] = outcome.map_or(Value::Null, |o| json!(o.texts));
        }
        log.write(&line);
    }
}
