//! `ftx prep`: the data pipeline. Records stream from the inputs through ingest, the
//! configured middle stages (filter, PII scrubbing, deduplication, in the configured order)
//! and format/split, a chunk at a time: a reader thread fills chunks, the worker threads
//! (rayon) run each stage over a chunk, and the records leave in input order — so memory is
//! bounded by the chunk size (plus the dedup index) and the outputs do not depend on the
//! number of threads. Every record ends in a split or in rejects.jsonl with its stage and
//! reason; report.json counts them and manifest.json records inputs, config and outputs.
//! The `augment` stage (a teacher model behind an OpenAI-compatible endpoint) may turn one
//! raw-text record into several pairs; the report counts those as `added`.
//! A corpus larger than one machine runs as shards (`--shard K/N`, each on its share of the
//! records) and one reduce that deduplicates across them and writes the splits: see [`shard`].

pub mod augment;
pub mod bench;
pub mod checks;
pub mod config;
pub mod dedup;
pub mod extract;
pub mod filter;
pub mod ingest;
pub mod output;
pub mod pii;
pub mod pii_address;
pub mod pii_bench;
pub mod pii_detector;
pub mod pii_person;
mod pii_phone;
pub mod record;
pub mod report;
pub mod shard;
pub mod split;
pub mod warc;

pub use config::PrepConfig;
pub use report::{Report, Timing};

use output::{SplitSink, Written};
use rayon::prelude::*;
use record::{Item, Stage, State};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Errors of a prep run (a bad record is never one: it goes to the rejects).
#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    #[error("{0}")]
    Config(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// What a finished run produced.
#[derive(Debug)]
pub struct PrepOutcome {
    pub report: Report,
    pub timing: Timing,
    pub out: PathBuf,
}

/// The built stages.
enum Middle {
    Filter(filter::Filter),
    Pii(pii::Scrubber),
    Dedup(dedup::Deduper),
    Plugins(Vec<crate::plugins::filter::FilterPlugin>),
    Augment(Box<augment::Augmenter>),
}

/// Runs the pipeline as `cfg` says; `progress` shows a bar with records/s on the terminal.
pub fn run(cfg: &PrepConfig, progress: bool) -> Result<PrepOutcome, PrepError> {
    in_pool(cfg, |cfg| run_in_pool(cfg, progress, None))
}

/// Runs one shard of the pipeline (`ftx prep --shard K/N`): the records of `spec`'s share of
/// the input through every stage before dedup, written with their MinHash signatures to the
/// shard's folder for [`shard::reduce`].
pub fn run_shard(cfg: &PrepConfig, progress: bool, spec: shard::ShardSpec) -> Result<PrepOutcome, PrepError> {
    in_pool(cfg, |cfg| run_in_pool(cfg, progress, Some(spec)))
}

fn in_pool<T: Send>(cfg: &PrepConfig, f: impl FnOnce(&PrepConfig) -> Result<T, PrepError> + Send) -> Result<T, PrepError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads)
        .build()
        .map_err(|e| PrepError::Config(format!("thread pool: {e}")))?;
    pool.install(|| f(cfg))
}

/// The stage order of a run's report: ingest, the middle stages, format.
fn stage_order(cfg: &PrepConfig) -> Vec<Stage> {
    let middle = cfg.stages.iter().map(|s| match s.as_str() {
        "filter" => Stage::Filter,
        "pii" => Stage::Pii,
        "dedup" => Stage::Dedup,
        "plugins" => Stage::Plugin,
        _ => Stage::Augment,
    });
    std::iter::once(Stage::Ingest).chain(middle).chain([Stage::Format]).collect()
}

/// Where the records go: the final splits, or a shard's records and signatures.
enum Sink {
    Splits(SplitSink),
    Shard(shard::ShardSink),
}

fn run_in_pool(cfg: &PrepConfig, progress: bool, shard: Option<shard::ShardSpec>) -> Result<PrepOutcome, PrepError> {
    let started = Instant::now();
    let sources = ingest::resolve_inputs(&cfg.inputs, cfg.extract.format)?;
    let names: Vec<String> = sources.iter().map(|s| s.path.display().to_string()).collect();
    tracing::info!(files = sources.len(), "prep: reading inputs");
    if shard.is_some() {
        shard::check_stages(cfg)?;
    }
    let bar = progress_bar(progress);
    let multi = indicatif::MultiProgress::new();
    if progress {
        multi.add(bar.clone());
    }
    let mut middle = Vec::new();
    for s in &cfg.stages {
        middle.push(match s.as_str() {
            "filter" => Middle::Filter(filter::Filter::new(&cfg.filter)?),
            "pii" => Middle::Pii(pii::Scrubber::new(&cfg.pii)?),
            "dedup" => Middle::Dedup(dedup::Deduper::new(&cfg.dedup)),
            "plugins" => Middle::Plugins(
                cfg.plugins
                    .iter()
                    .map(|p| {
                        let path = crate::plugins::manifest::locate(p).map_err(|e| PrepError::Config(e.to_string()))?;
                        let run_budget = crate::plugins::budget::budget_from_secs(cfg.plugin_time_budget_s).map_err(PrepError::Config)?;
                        let limits = crate::plugins::Limits { run_budget, ..Default::default() };
                        crate::plugins::filter::FilterPlugin::load_granted(&path, limits, &cfg.plugin_grants).map_err(|e| PrepError::Config(e.to_string()))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            "augment" => {
                let mut a = cfg.augment.clone().ok_or_else(|| PrepError::Config("prep.stages names augment but [prep.augment] is missing".into()))?;
                a.endpoint.cache_dir.get_or_insert_with(|| cfg.out.join(".llm-cache"));
                let abar = if progress { multi.add(augment_bar()) } else { indicatif::ProgressBar::hidden() };
                Middle::Augment(Box::new(augment::Augmenter::new(&a, abar)?))
            }
            other => return Err(PrepError::Config(format!("unknown stage {other}"))),
        });
    }
    let order = stage_order(cfg);
    let mut report = Report::new(&order);
    let pii_names: Vec<String> = middle.iter().find_map(|m| if let Middle::Pii(p) = m { Some(p.entity_names().to_vec()) } else { None }).unwrap_or_default();
    let mut pii_counts = vec![0u64; pii_names.len()];
    let mut spent = vec![Duration::ZERO; order.len()];

    std::fs::create_dir_all(&cfg.out).map_err(|source| PrepError::Io { path: cfg.out.clone(), source })?;
    let mut sink = match &shard {
        None => Sink::Splits(SplitSink::create(cfg, names.clone())?),
        Some(spec) => Sink::Shard(shard::ShardSink::create(cfg, spec, names.clone())?),
    };

    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Item>>(4);
    let result = std::thread::scope(|scope| -> Result<(), PrepError> {
        let reader = scope.spawn(|| -> Result<(), PrepError> {
            let mut send = move |chunk: Vec<Item>| tx.send(chunk).is_ok();
            let mut chunks = ingest::Chunker::new(cfg.chunk_size, &mut send);
            if let Some(spec) = &shard {
                chunks = chunks.sharded(spec.index, spec.count);
            }
            for (i, src) in sources.iter().enumerate() {
                ingest::read_source(src, i as u32, cfg.text_unit, &mut chunks)?;
            }
            chunks.flush();
            Ok(())
        });
        let mut written = Ok(());
        for mut chunk in rx.iter() {
            let n = chunk.len() as u64;
            report.input_records += n;
            let t = Instant::now();
            chunk.par_iter_mut().for_each(|it| ingest::parse_item(it, cfg.format, &cfg.extract));
            spent[0] += t.elapsed();
            for (k, m) in middle.iter_mut().enumerate() {
                let t = Instant::now();
                // A shard signs its records (in its sink); the reduce deduplicates them all.
                let signed_later = shard.is_some() && matches!(m, Middle::Dedup(_));
                if !signed_later {
                    if let Err(e) = run_stage(m, &mut chunk, &mut pii_counts, &mut report) {
                        written = Err(e);
                        break;
                    }
                }
                spent[k + 1] += t.elapsed();
            }
            if written.is_err() {
                break;
            }
            let t = Instant::now();
            written = match &mut sink {
                Sink::Splits(s) => s.write_chunk(cfg, &mut chunk, &mut report),
                Sink::Shard(s) => s.write_chunk(cfg, &mut chunk, &mut report),
            };
            *spent.last_mut().expect("format stage") += t.elapsed();
            bar.inc(n);
            if written.is_err() {
                break;
            }
        }
        drop(rx);
        let read = reader.join().unwrap_or_else(|_| Err(PrepError::Config("the reader thread panicked".into())));
        written.and(read)
    });
    bar.finish_and_clear();
    middle.iter().for_each(|m| if let Middle::Augment(a) = m { a.finish_bar() });
    if let Err(e) = result {
        match sink {
            Sink::Splits(s) => s.abandon(),
            Sink::Shard(s) => s.abandon(),
        }
        return Err(e);
    }

    report.pii_entities = pii_names.into_iter().zip(pii_counts).collect();
    let augmenter = middle.iter().find_map(|m| if let Middle::Augment(a) = m { Some(a) } else { None });
    report.augment = augmenter.map(|a| a.counts().clone());
    let total = started.elapsed().as_secs_f64();
    let timing = Timing {
        stages: order
            .iter()
            .zip(&spent)
            .map(|(s, d)| report::StageTiming { stage: s.name().into(), seconds: d.as_secs_f64(), records_per_second: 0.0 })
            .collect(),
        total_seconds: total,
        records_per_second: report.input_records as f64 / total.max(1e-9),
        peak_rss_bytes: None,
        augment_client: augmenter.map(|a| a.client_stats()),
        plugins: middle.iter().flat_map(|m| if let Middle::Plugins(ps) = m { ps.iter().map(|p| p.time()).collect() } else { Vec::new() }).collect(),
    };
    match sink {
        Sink::Shard(s) => s.commit(cfg, report, timing),
        Sink::Splits(s) => finish(cfg, &sources, s, report, timing),
    }
}

/// Fills in each stage's records/s (from the closed report's counts) and the peak memory.
fn fill_rates(timing: &mut Timing, report: &Report) {
    for (t, c) in timing.stages.iter_mut().zip(&report.stages) {
        t.records_per_second = c.input as f64 / t.seconds.max(1e-9);
    }
    timing.peak_rss_bytes = report::peak_rss_bytes();
}

/// Closes a run whose records are all in `sink`: commits the splits and the rejects, and
/// writes report.json, manifest.json (inputs with their hashes and record counts, config,
/// outputs) and timing.json.
fn finish(cfg: &PrepConfig, sources: &[ingest::Source], sink: SplitSink, mut report: Report, mut timing: Timing) -> Result<PrepOutcome, PrepError> {
    report.close();
    let per_source = sink.per_source.clone();
    let outputs: Vec<Written> = sink.commit(&mut report)?;
    fill_rates(&mut timing, &report);
    write_json(cfg, "report.json", &serde_json::to_value(&report).expect("report serialises"))?;
    let inputs: Vec<Value> = sources
        .iter()
        .zip(&per_source)
        .map(|(s, n)| {
            let sha = crate::util::sha256_file(&s.path).map_err(|source| PrepError::Io { path: s.path.clone(), source })?;
            let bytes = std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0);
            Ok(json!({ "path": s.path.display().to_string(), "bytes": bytes, "sha256": sha, "records": n }))
        })
        .collect::<Result<_, PrepError>>()?;
    let manifest = json!({
        "tool": format!("ftx {}", env!("CARGO_PKG_VERSION")),
        "inputs": inputs,
        "config": cfg.to_manifest_json(),
        "counts": { "input_records": report.input_records, "output_records": report.output_records, "rejected_records": report.rejected_records, "splits": report.splits },
        "outputs": outputs,
    });
    write_json(cfg, "manifest.json", &manifest)?;
    write_json(cfg, "timing.json", &serde_json::to_value(&timing).expect("timing serialises"))?;
    tracing::info!(records = report.input_records, written = report.output_records, rejected = report.rejected_records, "prep: done");
    Ok(PrepOutcome { report, timing, out: cfg.out.clone() })
}

fn progress_bar(show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    let style = indicatif::ProgressStyle::with_template("{spinner} prep: {human_pos} records  {per_sec}  {elapsed}").expect("template");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn augment_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    let style = indicatif::ProgressStyle::with_template("{spinner} augment: {human_pos} teacher answers ({msg})  {per_sec}").expect("template");
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

pub(crate) fn write_json(cfg: &PrepConfig, name: &str, v: &Value) -> Result<(), PrepError> {
    let path = cfg.out.join(name);
    let mut text = serde_json::to_string_pretty(v).expect("JSON serialises");
    text.push('\n');
    crate::util::write_atomic(&path, text.as_bytes()).map_err(|source| PrepError::Io { path, source })
}

/// Runs one middle stage over the live records of a chunk (augmentation may add records).
fn run_stage(m: &mut Middle, chunk: &mut Vec<Item>, pii_counts: &mut [u64], report: &mut Report) -> Result<(), PrepError> {
    match m {
        Middle::Augment(a) => return a.run(chunk, report),
        Middle::Filter(f) => chunk.par_iter_mut().for_each(|it| {
            if let Some(r) = it.alive().and_then(|e| f.check(e)) {
                it.reject(r);
            }
        }),
        Middle::Pii(p) => {
            let n = pii_counts.len();
            let (counts, changed) = chunk
                .par_iter_mut()
                .fold(
                    || (vec![0u64; n], 0u64),
                    |(mut c, k), it| {
                        let changed = it.alive().is_some_and(|e| p.scrub(e, &mut c));
                        (c, k + u64::from(changed))
                    },
                )
                .reduce(|| (vec![0u64; n], 0), |(a, ka), (b, kb)| (a.iter().zip(&b).map(|(x, y)| x + y).collect(), ka + kb));
            pii_counts.iter_mut().zip(counts).for_each(|(t, c)| *t += c);
            report.pii_records_changed += changed;
        }
        Middle::Plugins(plugins) => {
            for plugin in plugins {
                run_plugin(plugin, chunk);
            }
        }
        Middle::Dedup(d) => {
            let sigs: Vec<Option<dedup::Signature>> = chunk
                .par_iter_mut()
                .map(|it| it.alive().map(|e| d.signature(&record::joined(e))))
                .collect();
            for (it, sig) in chunk.iter_mut().zip(sigs) {
                if let Some(r) = sig.and_then(|s| d.check(&s, it.origin)) {
                    it.reject(r);
                }
            }
        }
    }
    Ok(())
}

/// Sends the live records of a chunk through one filter plugin, in batches, and applies its
/// verdicts: a drop or a failed call rejects the record with the plugin's words; a rewrite
/// replaces it (or rejects it when the rewrite is not a record).
fn run_plugin(plugin: &mut crate::plugins::filter::FilterPlugin, chunk: &mut [Item]) {
    use crate::plugins::filter::Verdict;
    let live: Vec<(usize, u64, String)> = chunk
        .iter_mut()
        .enumerate()
        .filter_map(|(i, it)| {
            let id = it.origin.line as u64;
            it.alive().map(|e| (i, id, serde_json::to_string(e).expect("examples serialise")))
        })
        .collect();
    for batch in live.chunks(256) {
        let records: Vec<(u64, String)> = batch.iter().map(|(_, id, j)| (*id, j.clone())).collect();
        for ((i, _, _), verdict) in batch.iter().zip(plugin.filter(&records)) {
            let it = &mut chunk[*i];
            match verdict {
                Ok(Verdict::Keep) => {}
                Ok(Verdict::Drop(why)) => it.reject(record::Reject::new(Stage::Plugin, "plugin_drop", format!("{}: {why}", plugin.name))),
                Ok(Verdict::Rewrite(json)) => match rewritten(&json) {
                    Ok(example) => it.state = State::Alive(example),
                    Err(e) => it.reject(record::Reject::new(Stage::Plugin, "plugin_bad_rewrite", format!("{}: rewrote the record into something that is not a record: {e}", plugin.name))),
                },
                Err(e) => it.reject(record::Reject::new(Stage::Plugin, "plugin_error", e.to_string())),
            }
        }
    }
}

/// A plugin's rewrite: an `Example` as ftx serialises it, or any record shape ftx reads.
fn rewritten(json: &str) -> Result<crate::data::Example, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    serde_json::from_value(v.clone()).or_else(|_| crate::data::read::parse_record(&v, crate::data::DataFormat::Auto))
}

