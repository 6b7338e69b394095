//! The load test behind `ftx bench serve`: N chat requests from C client threads against a
//! server, reporting throughput and latency percentiles.

use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to fire.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Server root, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    /// The `model` field of every request.
    pub model: String,
    pub requests: usize,
    pub concurrency: usize,
    pub max_tokens: usize,
    pub prompt: String,
}

/// What came back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    pub requests: usize,
    pub concurrency: usize,
    pub ok: usize,
    pub errors: usize,
    /// The first error message, if any.
    pub first_error: Option<String>,
    pub wall_s: f64,
    pub requests_per_s: f64,
    pub completion_tokens: u64,
    pub completion_tokens_per_s: f64,
    pub latency_p50_ms: f64,
    pub latency_p90_ms: f64,
    pub latency_p99_ms: f64,
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn one(agent: &ureq::Agent, spec: &LoadSpec, i: usize) -> Result<u64, String> {
    let body = json!({
        "model": spec.model,
        "messages": [{"role": "user", "content": format!("{} (#{i})", spec.prompt)}],
        "max_tokens": spec.max_tokens,
        "temperature": 0,
    });
    let url = format!("{}/v1/chat/completions", spec.url.trim_end_matches('/'));
    let resp = agent.post(&url).send_json(body).map_err(|e| match e {
        ureq::Error::Status(code, r) => format!("HTTP {code}: {}", r.into_string().unwrap_or_default()),
        other => other.to_string(),
    })?;
    let v: Value = resp.into_json().map_err(|e| e.to_string())?;
    Ok(v["usage"]["completion_tokens"].as_u64().unwrap_or(0))
}

/// Fires the requests and measures; `progress` is called after each one.
pub fn run(spec: &LoadSpec, progress: impl Fn() + Sync) -> LoadReport {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Result<(f64, u64), String>>> = Mutex::new(Vec::new());
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..spec.concurrency.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= spec.requests {
                    break;
                }
                let start = Instant::now();
                let r = one(&agent, spec, i).map(|toks| (start.elapsed().as_secs_f64() * 1000.0, toks));
                results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                progress();
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut lat: Vec<f64> = results.iter().filter_map(|r| r.as_ref().ok().map(|x| x.0)).collect();
    lat.sort_by(f64::total_cmp);
    let tokens: u64 = results.iter().filter_map(|r| r.as_ref().ok().map(|x| x.1)).sum();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    LoadReport {
        requests: spec.requests,
        concurrency: spec.concurrency,
        ok: lat.len(),
        errors: errors.len(),
        first_error: errors.first().map(|e| (*e).clone()),
        wall_s: wall,
        requests_per_s: lat.len() as f64 / wall.max(1e-9),
        completion_tokens: tokens,
        completion_tokens_per_s: tokens as f64 / wall.max(1e-9),
        latency_p50_ms: percentile(&lat, 0.50),
        latency_p90_ms: percentile(&lat, 0.90),
        latency_p99_ms: percentile(&lat, 0.99),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(super::percentile(&v, 0.5), 5.0);
        assert_eq!(super::percentile(&v, 0.9), 9.0);
        assert_eq!(super::percentile(&v, 0.99), 10.0);
        assert_eq!(super::percentile(&[], 0.5), 0.0);
    }
}
