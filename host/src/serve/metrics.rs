//! Prometheus metrics of a running server (`GET /metrics`, text exposition format), through
//! the `prometheus` crate. Tokens per second is `rate(ftx_completion_tokens_total[1m])`.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every series the server exports; cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by endpoint and HTTP status.
    pub requests: IntCounterVec,
    /// Whole-request latency of generations, by model (base or adapter).
    pub latency: HistogramVec,
    /// Time to the first generated text, by model.
    pub time_to_first_token: HistogramVec,
    /// Prompt tokens of answered generations, by model.
    pub prompt_tokens: IntCounterVec,
    /// Generated tokens (all choices), by model.
    pub completion_tokens: IntCounterVec,
    /// Generation requests queued for the model thread and not yet started.
    pub queue_depth: IntGauge,
    /// Sequences (choices) decoded in the current step: the batch occupancy.
    pub batch_sequences: IntGauge,
    /// Key/value positions held by running sequences.
    pub kv_cache_tokens: IntGauge,
    /// KV-cache blocks held by sequences (the paged pool).
    pub kv_blocks_used: IntGauge,
    /// KV-cache blocks in the pool.
    pub kv_blocks_total: IntGauge,
    /// Requests being answered (HTTP side, streams included).
    pub in_flight: IntGauge,
    /// Work preempted because the KV cache ran out (resumed later by recomputing what it had
    /// cached), by stage: `decode` (a sequence generating) or `prefill`.
    pub preemptions: IntCounterVec,
}

/// Latency buckets in seconds: 10 ms to 2 minutes.
const BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

impl Metrics {
    /// A fresh registry with every series registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()), &["model"]).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("registered once");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("registered once");
            g
        };
        Metrics {
            requests: counter("ftx_requests_total", "HTTP requests answered, by endpoint and status", &["endpoint", "status"]),
            latency: histogram("ftx_request_duration_seconds", "Generation request latency, by model"),
            time_to_first_token: histogram("ftx_time_to_first_token_seconds", "Time from request to first generated text, by model"),
            prompt_tokens: counter("ftx_prompt_tokens_total", "Prompt tokens processed, by model", &["model"]),
            completion_tokens: counter("ftx_completion_tokens_total", "Tokens generated, by model", &["model"]),
            queue_depth: gauge("ftx_queue_depth", "Generation requests waiting for the model thread"),
            batch_sequences: gauge("ftx_batch_sequences", "Sequences decoded together in the current step"),
            kv_cache_tokens: gauge("ftx_kv_cache_tokens", "Key/value positions held by running sequences"),
            kv_blocks_used: gauge("ftx_kv_cache_blocks_used", "KV-cache blocks held by running sequences"),
            kv_blocks_total: gauge("ftx_kv_cache_blocks_total", "KV-cache blocks in the preallocated pool"),
            in_flight: gauge("ftx_requests_in_flight", "Requests being answered"),
            preemptions: counter("ftx_preemptions_total", "Work preempted because the KV cache ran out (resumed by recomputing), by stage", &["stage"]),
            registry,
        }
    }

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
