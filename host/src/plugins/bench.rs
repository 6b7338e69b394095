//! `ftx bench filter`: records/s of one filter run as a sandboxed WebAssembly component, as
//! a native library built from the same source, and written directly in the host.

use super::filter::{FilterPlugin, Verdict};
use super::{Limits, PluginError};
use std::path::Path;
use std::time::Instant;

/// Records/s of one way of running the filter, and how many it kept.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FilterRate {
    pub system: String,
    pub records_per_s: f64,
    pub kept: usize,
}

/// Deterministic records of varied lengths (JSON strings).
pub fn corpus(n: usize) -> Vec<(u64, String)> {
    (0..n as u64).map(|i| (i, serde_json::Value::String("word ".repeat((i as usize * 7919) % 400)).to_string())).collect()
}

/// Runs `plugin` over `records` in batches; returns records/s and the verdicts.
pub fn rate(mut plugin: FilterPlugin, records: &[(u64, String)], batch: usize) -> Result<(f64, Vec<Verdict>), PluginError> {
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(records.len());
    for chunk in records.chunks(batch) {
        for v in plugin.filter(chunk) {
            out.push(v?);
        }
    }
    Ok((records.len() as f64 / t0.elapsed().as_secs_f64(), out))
}

/// The WebAssembly and native builds of one filter plus a host-side `builtin` version of it,
/// on the same records; the verdicts must agree.
pub fn compare(
    wasm: &Path,
    native: Option<&Path>,
    builtin: impl Fn(&str) -> Verdict,
    records: &[(u64, String)],
    batch: usize,
) -> Result<Vec<FilterRate>, String> {
    let kept = |vs: &[Verdict]| vs.iter().filter(|v| **v == Verdict::Keep).count();
    let (w, wv) = rate(FilterPlugin::load(wasm, Limits::default()).map_err(|e| e.to_string())?, records, batch).map_err(|e| e.to_string())?;
    let mut rows = vec![FilterRate { system: "wasm".into(), records_per_s: w, kept: kept(&wv) }];
    if let Some(n) = native {
        let (r, nv) = rate(FilterPlugin::load(n, Limits::default()).map_err(|e| e.to_string())?, records, batch).map_err(|e| e.to_string())?;
        if nv != wv {
            return Err("the native build's verdicts differ from the WebAssembly build's".into());
        }
        rows.push(FilterRate { system: "native".into(), records_per_s: r, kept: kept(&nv) });
    }
    let t0 = Instant::now();
    let bv: Vec<Verdict> = records.iter().map(|(_, j)| builtin(j)).collect();
    let b = records.len() as f64 / t0.elapsed().as_secs_f64();
    if bv != wv {
        return Err("the built-in filter's verdicts differ from the plugin's".into());
    }
    rows.push(FilterRate { system: "built-in".into(), records_per_s: b, kept: kept(&bv) });
    Ok(rows)
}
