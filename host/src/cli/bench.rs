//! `ftx bench train`: throughput and memory of training steps on a random model.
//! `ftx bench prep`: records/s of the data pipeline, and the recall/precision of its PII
//! scrubber and deduplicator on a generated corpus with planted PII and duplicates.

use crate::gpu::DeviceArg;
use crate::plan::ModelShape;
use crate::train::bench::{bench_train, BenchSettings};
use anyhow::Context;

/// `ftx bench …`
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Train steps on a random model of a public shape; prints one JSON line.
    Train(BenchTrainArgs),
    /// The data pipeline on a generated corpus; prints a table and one JSON line.
    Prep(BenchPrepArgs),
    /// The `length` filter as WebAssembly, as a native library and built in: records/s.
    Filter(BenchFilterArgs),
    /// Load an OpenAI-compatible server with concurrent chat requests: requests/s, latency.
    Serve(super::serve::BenchServeArgs),
}

/// Arguments of `ftx bench filter`.
#[derive(clap::Args, Debug)]
pub struct BenchFilterArgs {
    /// The length filter as a component (plugins/target/wasm32-wasip2/release/length.wasm).
    #[arg(long)]
    pub wasm: std::path::PathBuf,
    /// The same source built natively (plugins/target/release/liblength.so).
    #[arg(long)]
    pub native: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 200_000)]
    pub records: usize,
    /// Records per plugin call.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
}

/// Arguments of `ftx bench prep`.
#[derive(clap::Args, Debug)]
pub struct BenchPrepArgs {
    /// Records to generate.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: usize,
    /// Folder for the corpus and the outputs (default: a folder in the system's temporary
    /// folder, removed after).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Worker threads (0 = every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Arguments of `ftx bench train`.
#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {
    /// A public shape (llama-3.2-1b, llama-3.1-8b, …); `tiny` is a small Llama for CPU checks.
    #[arg(long, default_value = "llama-3.2-1b")]
    pub shape: String,
    /// lora, qlora, dora or full.
    #[arg(long, default_value = "lora")]
    pub method: String,
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 12)]
    pub steps: usize,
    /// Untimed steps at the start.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: i64,
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// The GPU's measured dense bf16 matmul rate in TFLOP/s, for MFU (790 on the H200).
    #[arg(long, default_value_t = 790.0)]
    pub peak_tflops: f64,
    /// Benchmark preference training with this loss plugin (pairs of random sequences,
    /// reference from disabled adapters), next to the same loss written in the host (ORPO for
    /// the orpo plugin, DPO otherwise).
    #[arg(long)]
    pub loss_plugin: Option<std::path::PathBuf>,
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let a = match cmd {
        BenchCommand::Train(a) => a,
        BenchCommand::Prep(a) => return bench_prep(a),
        BenchCommand::Filter(a) => return bench_filter(a),
        BenchCommand::Serve(a) => return super::serve::bench(a),
    };
    let shape = if a.shape == "tiny" {
        // The baseline script's "tiny" shape.
        let mut s = ModelShape::named("llama-3.2-1b").expect("known");
        (s.name, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab) =
            ("tiny".into(), 256, 1024, 4, 8, 4, 32, 32000);
        s
    } else {
        ModelShape::named(&a.shape).with_context(|| format!("unknown shape '{}': {}", a.shape, ModelShape::known_names().join(", ")))?
    };
    let device = a.device.resolve().map_err(anyhow::Error::msg)?;
    let kind = match &a.dtype {
        Some(d) => super::parse_dtype(d)?,
        None if device.is_cuda() => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    };
    anyhow::ensure!(a.steps > a.warmup, "--steps must exceed --warmup");
    let settings = BenchSettings {
        shape,
        method: a.method,
        seq: a.seq,
        batch: a.batch,
        steps: a.steps,
        warmup: a.warmup,
        rank: a.rank,
        grad_checkpointing: a.grad_checkpointing,
        device,
        kind,
        peak_flops: device.is_cuda().then_some(a.peak_tflops * 1e12),
    };
    let Some(plugin_path) = a.loss_plugin else {
        println!("{}", serde_json::to_string(&bench_train(&settings)?)?);
        return Ok(());
    };
    use crate::align::PreferenceLoss;
    let plugin = crate::plugins::loss::LossPlugin::load(&plugin_path, crate::plugins::Limits::default(), device)?;
    // The same loss written in the host: ORPO for the orpo plugin, DPO otherwise.
    let (name, builtin) = if plugin.name == "orpo" {
        ("ftx+builtin-orpo", PreferenceLoss::BuiltinOrpo { beta: 0.1 })
    } else {
        ("ftx+builtin-dpo", PreferenceLoss::BuiltinDpo { beta: 0.1 })
    };
    let runs = crate::train::bench::bench_preference(&settings, vec![("ftx+loss-plugin", PreferenceLoss::Plugin(plugin)), (name, builtin)])?;
    for r in &runs {
        println!("{}", serde_json::to_string(r)?);
    }
    let overhead = runs[1].tokens_per_s / runs[0].tokens_per_s - 1.0;
    println!("{}", serde_json::json!({"plugin_step_overhead_percent": (overhead * 1e4).round() / 1e2}));
    Ok(())
}

fn bench_prep(a: BenchPrepArgs) -> anyhow::Result<()> {
    use crate::data::prep::{self, bench};
    use std::io::Write;
    let dir = a.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("ftx-bench-prep-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let corpus = dir.join("corpus.jsonl");
    eprintln!("generating {} records into {}", a.records, corpus.display());
    let t = std::time::Instant::now();
    let mut w = std::io::BufWriter::new(std::fs::File::create(&corpus).with_context(|| corpus.display().to_string())?);
    let mut gen = bench::Corpus::new(a.seed);
    for _ in 0..a.records {
        serde_json::to_writer(&mut w, &crate::data::prep::split::format_record(&gen.next_record().example, prep::config::OutputFormat::Auto).expect("alpaca"))?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    eprintln!("generated in {:.1} s; running the pipeline", t.elapsed().as_secs_f64());
    let mut cfg = prep::PrepConfig::parse("[prep]\ninputs = [\"x\"]\n").map_err(anyhow::Error::msg)?;
    cfg.inputs = vec![corpus.display().to_string()];
    cfg.out = dir.join("out");
    cfg.threads = a.threads;
    let done = prep::run(&cfg, true)?;
    print!("{}", done.report.table(&done.timing));
    eprintln!("scoring the PII scrubber and the deduplicator against what was planted");
    let pii = bench::pii_quality(a.seed, a.records);
    let (dedup, dedup_rate) = bench::dedup_quality(a.seed, a.records);
    println!("PII  recall {:.4}  precision {:.4}  (planted {}, found {}, flagged {}; decoys scrubbed {} of {})", pii.overall.recall, pii.overall.precision, pii.overall.planted, pii.overall.found, pii.overall.flagged, pii.decoys_scrubbed, pii.decoys);
    for (e, q) in &pii.per_entity {
        println!("  {e:<12} recall {:.4}  precision {:.4}  (planted {}, flagged {})", q.recall, q.precision, q.planted, q.flagged);
    }
    println!("dedup recall {:.4}  precision {:.4}  (planted {}, flagged {})", dedup.recall, dedup.precision, dedup.planted, dedup.flagged);
    let line = serde_json::json!({
        "records": a.records,
        "pipeline": done.timing,
        "pii": pii,
        "dedup": dedup,
        "dedup_records_per_second_one_thread": dedup_rate,
    });
    println!("{}", serde_json::to_string(&line)?);
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn bench_filter(a: BenchFilterArgs) -> anyhow::Result<()> {
    use crate::plugins::filter::Verdict;
    // plugins/length in the host: the yardstick.
    let builtin = |json: &str| match json.chars().count() {
        n if n < 16 => Verdict::Drop(format!("shorter than 16 characters ({n})")),
        n if n > 16_384 => Verdict::Drop(format!("longer than 16384 characters ({n})")),
        _ => Verdict::Keep,
    };
    let records = crate::plugins::bench::corpus(a.records);
    let rows = crate::plugins::bench::compare(&a.wasm, a.native.as_deref(), builtin, &records, a.batch).map_err(anyhow::Error::msg)?;
    let builtin_rate = rows.last().map_or(1.0, |r| r.records_per_s);
    for r in &rows {
        println!("{}", serde_json::json!({"system": r.system, "records_per_s": r.records_per_s.round(), "kept": r.kept, "x_builtin": (r.records_per_s / builtin_rate * 1000.0).round() / 1000.0}));
    }
    Ok(())
}
