//! `ftx bench train`: throughput and memory of training steps on a random model.
//! `ftx bench prep`: records/s of the data pipeline, and the recall/precision of its PII
//! scrubber and deduplicator on a generated corpus with planted PII and duplicates.

use crate::gpu::DeviceArg;
use crate::plan::ModelShape;
use crate::recipes::bench::{bench_train, BenchSettings};
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
    /// Write a random model of a public shape as a checkpoint folder (config.json,
    /// model.safetensors, a word-level tokenizer "t0 t1 …"): the serving benchmark's model.
    RandomModel(RandomModelArgs),
    /// The fused CUDA kernels (RMSNorm with the residual add, RoPE, SwiGLU, each way; the LM head's cross-entropy; the FP8
    /// GEMMs' rowwise e4m3 quantisation): checked against their CPU references and libtorch's ops, and timed against
    /// libtorch's ops; one JSON line per kernel and type (per width for the quantisation, which must match bit for bit),
    /// exit status 1 when any is outside its tolerance.
    Kernels(BenchKernelsArgs),
}

/// Arguments of `ftx bench kernels`.
#[derive(clap::Args, Debug)]
pub struct BenchKernelsArgs {
    /// A public shape (llama-3.2-1b, …); `tiny` is a small Llama for CPU checks.
    #[arg(long, default_value = "llama-3.2-1b")]
    pub shape: String,
    #[arg(long, default_value_t = 2048)]
    pub seq: i64,
    #[arg(long, default_value_t = 8)]
    pub batch: i64,
    /// fp32, bf16 or both.
    #[arg(long, default_value = "both")]
    pub dtype: String,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// On the CPU the fused path is the kernels' reference versions, checked against libtorch.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
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
    /// Also run Presidio, scrubadub and datatrove's MinHash (where installed) on the same
    /// corpus with host/bench/prep_compare.py, score them by the same rules, and print the
    /// ratios.
    #[arg(long)]
    pub compare: bool,
    /// The Python that has the tools (default: $FTX_PREP_PYTHON, else python3).
    #[arg(long)]
    pub python: Option<String>,
    /// Records (a prefix of the corpus) the Python PII tools and ftx's scrubber are compared on.
    #[arg(long, default_value_t = 20_000)]
    pub compare_pii_records: usize,
    /// Records (a prefix of the corpus) datatrove and ftx's deduplicator are compared on.
    #[arg(long, default_value_t = 100_000)]
    pub compare_dedup_records: usize,
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
    /// LoRA/DoRA target modules, comma-separated PEFT names (q_proj,k_proj,…) or all-linear.
    #[arg(long, value_delimiter = ',', default_value = "all-linear")]
    pub target_modules: Vec<String>,
    /// Build only this many decoder layers of the shape (a model too large for one card,
    /// compared layer for layer; the JSON line's `layers` says how many ran).
    #[arg(long)]
    pub layers: Option<u64>,
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// With --grad-checkpointing: keep the layer inputs in pinned host memory.
    #[arg(long, requires = "grad_checkpointing")]
    pub offload: bool,
    /// Selective recompute: `mlp` runs the LoRA MLP's gate/up again in backward instead of
    /// keeping its output (`train.recompute`).
    #[arg(long, value_enum, default_value = "none")]
    pub recompute: crate::train::recompute::Recompute,
    /// Before timing, count what one forward pass keeps for backward, layer by layer
    /// (`saved_bytes_per_layer`), beside the planner's count (`planned_bytes_per_layer`).
    #[arg(long)]
    pub saved_tensors: bool,
    /// LoRA / DoRA on a frozen base stored in FP8 (`method.fp8`): the base GEMMs on FP8 tensor
    /// cores (the JSON line's `fp8`).
    #[arg(long)]
    pub fp8: bool,
    /// adamw (fp32 moments) or adamw-8bit (bitsandbytes' 8-bit moments).
    #[arg(long, default_value = "adamw")]
    pub optimizer: crate::plan::Optimizer,
    /// Run as on a card with this much memory: once the model is built, the run's tensors
    /// (weights included) are confined to it and the rest of the GPU is set aside (CUDA only).
    #[arg(long)]
    pub device_memory_gib: Option<f64>,
    /// Each projection on its own (no fused q/k/v and gate/up GEMMs, no SwiGLU node): the
    /// reference path, for before/after timings with one binary.
    #[arg(long)]
    pub unfused: bool,
    /// MoE experts' LoRA/DoRA factors as one leaf per expert, stacked on every forward (the
    /// layout before they were stored stacked): the reference, for before/after timings with
    /// one binary.
    #[arg(long)]
    pub per_expert_adapters: bool,
    /// Before timing, one step with fused projections and one without from the same weights;
    /// report the largest relative gradient difference (`fused_grad_rel_diff`), and likewise
    /// with the fused CUDA kernels and without (`kernels_grad_rel_diff`).
    #[arg(long)]
    pub check_fused: bool,
    /// RMSNorm, rotary embedding, SwiGLU and the head's cross-entropy as libtorch's ops instead of the fused CUDA kernels.
    #[arg(long)]
    pub no_fused_kernels: bool,
    /// Run the benchmark twice, with the fused CUDA kernels and without (two JSON lines).
    #[arg(long, conflicts_with = "no_fused_kernels")]
    pub compare_kernels: bool,
    /// Before timing, one step with offloaded checkpointing and one without from the same
    /// weights; report the largest relative gradient difference (`offload_grad_rel_diff`).
    #[arg(long)]
    pub check_offload: bool,
    /// The GPU's measured dense bf16 matmul rate in TFLOP/s, for MFU (790 on the H200).
    #[arg(long, default_value_t = 790.0)]
    pub peak_tflops: f64,
    /// Benchmark preference training with this loss plugin (pairs of random sequences,
    /// reference from disabled adapters), next to the same loss written in the host (ORPO for
    /// the orpo plugin, DPO otherwise).
    #[arg(long)]
    pub loss_plugin: Option<std::path::PathBuf>,
    /// With --loss-plugin: run the plugin's loss alone (one model on the device, so the peak
    /// memory is one preference run's), without the host-written comparison.
    #[arg(long, requires = "loss_plugin")]
    pub plugin_only: bool,
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Instead of timing: record the step after the warm-up steps kernel by kernel (bytes moved,
    /// GEMM and attention FLOPs, per class, op and ftx node) and price it at the rates below;
    /// prints a table (stderr) and one JSON line. On the CPU the fused kernels run their
    /// reference versions, counted as the CUDA kernels they stand for.
    #[arg(long, conflicts_with_all = ["loss_plugin", "compare_kernels", "check_fused", "check_offload"])]
    pub ledger: bool,
    /// With --ledger: the memory bandwidth bytes are priced at, TB/s (an H100's achievable HBM3).
    #[arg(long, default_value_t = 3.0, requires = "ledger")]
    pub ledger_bandwidth_tbs: f64,
    /// With --ledger: the GEMMs' rate, TFLOP/s (an H100's achievable dense bf16).
    #[arg(long, default_value_t = 700.0, requires = "ledger")]
    pub ledger_gemm_tflops: f64,
    /// With --ledger: the attention kernels' rate, TFLOP/s (flash attention, bf16, H100).
    #[arg(long, default_value_t = 400.0, requires = "ledger")]
    pub ledger_attention_tflops: f64,
    /// With --ledger: the least time a kernel takes on the device, µs (a small kernel's launch,
    /// ramp-up and tail on an H100).
    #[arg(long, default_value_t = 2.0, requires = "ledger")]
    pub ledger_kernel_floor_us: f64,
    /// With --ledger: the most expensive entries the table lists.
    #[arg(long, default_value_t = 30, requires = "ledger")]
    pub ledger_top: usize,
}

/// A public shape by name, "tiny" (the baseline script's small Llama), "tiny-moe" (a small
/// Qwen3-MoE: 2 layers of 8 experts, 2 a token) or "small-moe" (2 layers of hidden 256 with
/// qwen3-30b-a3b's 128 experts, 8 a token, of width 128), for CPU checks.
pub fn bench_shape(name: &str) -> anyhow::Result<ModelShape> {
    if name == "tiny" {
        let mut s = ModelShape::named("llama-3.2-1b").expect("known");
        (s.name, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab) =
            ("tiny".into(), 256, 1024, 4, 8, 4, 32, 32000);
        return Ok(s);
    }
    if name == "tiny-moe" {
        let mut s = ModelShape::named("qwen3-30b-a3b").expect("known");
        (s.name, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab) =
            ("tiny-moe".into(), 64, 32, 2, 4, 2, 16, 1000);
        if let crate::plan::Layout::Moe(m) = &mut s.layout {
            (m.experts, m.top_k, m.expert_intermediate) = (8, 2, 32);
        }
        return Ok(s);
    }
    if name == "small-moe" {
        // qwen3-30b-a3b's expert count and top-k at a CPU's size: what per-expert overheads
        // (128 experts × 3 projections of adapters a layer) cost, not the GEMMs.
        let mut s = ModelShape::named("qwen3-30b-a3b").expect("known");
        (s.name, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab) =
            ("small-moe".into(), 256, 128, 2, 4, 2, 64, 1000);
        if let crate::plan::Layout::Moe(m) = &mut s.layout {
            m.expert_intermediate = 128;
        }
        return Ok(s);
    }
    ModelShape::named(name).with_context(|| format!("unknown shape '{name}': {}", ModelShape::known_names().join(", ")))
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let a = match cmd {
        BenchCommand::Train(a) => a,
        BenchCommand::Prep(a) => return bench_prep(a),
        BenchCommand::Filter(a) => return bench_filter(a),
        BenchCommand::Serve(a) => return super::serve::bench(a),
        BenchCommand::Kernels(a) => return bench_kernels(a),
        BenchCommand::RandomModel(a) => return random_model(a),
    };
    let mut shape = bench_shape(&a.shape)?;
    if let Some(n) = a.layers {
        anyhow::ensure!((1..=shape.layers).contains(&n), "--layers {n}: {} has {} decoder layers; give 1 to {}", shape.name, shape.layers, shape.layers);
        shape.layers = n;
    }
    let device = a.device.resolve().map_err(anyhow::Error::msg)?;
    let kind = match &a.dtype {
        Some(d) => crate::model::parse_dtype(d)?,
        None if device.is_cuda() => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    };
    anyhow::ensure!(a.steps > a.warmup, "--steps must exceed --warmup");
    anyhow::ensure!(a.device_memory_gib.is_none() || device.is_cuda(), "--device-memory-gib needs a CUDA device");
    let settings = BenchSettings {
        shape,
        method: a.method,
        seq: a.seq,
        batch: a.batch,
        steps: a.steps,
        warmup: a.warmup,
        rank: a.rank,
        grad_checkpointing: match (a.grad_checkpointing, a.offload) {
            (false, _) => crate::train::step::Checkpointing::Off,
            (true, false) => crate::train::step::Checkpointing::Layers,
            (true, true) => crate::train::step::Checkpointing::Offload,
        },
        device,
        kind,
        peak_flops: device.is_cuda().then_some(a.peak_tflops * 1e12),
        memory_cap: a.device_memory_gib.map(|g| (g * (1u64 << 30) as f64) as u64),
        fused: !a.unfused,
        stacked_experts: !a.per_expert_adapters,
        check_fused: a.check_fused,
        fused_kernels: !a.no_fused_kernels,
        optimizer: a.optimizer,
        check_offload: a.check_offload,
        target_modules: a.target_modules,
        recompute: a.recompute,
        saved_tensors: a.saved_tensors,
        fp8: a.fp8,
    };
    if a.ledger {
        let rates = crate::gpu::ledger::Rates {
            bandwidth_tbs: a.ledger_bandwidth_tbs,
            gemm_tflops: a.ledger_gemm_tflops,
            attention_tflops: a.ledger_attention_tflops,
            kernel_floor_us: a.ledger_kernel_floor_us,
        };
        anyhow::ensure!(
            [rates.bandwidth_tbs, rates.gemm_tflops, rates.attention_tflops].iter().all(|r| r.is_finite() && *r > 0.0) && rates.kernel_floor_us.is_finite() && rates.kernel_floor_us >= 0.0,
            "--ledger-bandwidth-tbs, --ledger-gemm-tflops and --ledger-attention-tflops must be positive, --ledger-kernel-floor-us at least 0"
        );
        let result = crate::recipes::bench_ledger::ledger_train(&settings, rates)?;
        eprint!("{}", result.ledger.table(a.ledger_top));
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }
    let Some(plugin_path) = a.loss_plugin else {
        println!("{}", serde_json::to_string(&bench_train(&settings)?)?);
        if a.compare_kernels {
            let without = BenchSettings { fused_kernels: false, check_fused: false, ..settings };
            println!("{}", serde_json::to_string(&bench_train(&without)?)?);
        }
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
    let mut losses = vec![("ftx+loss-plugin", PreferenceLoss::Plugin(plugin))];
    if !a.plugin_only {
        losses.push((name, builtin));
    }
    let runs = crate::recipes::bench::bench_preference(&settings, losses)?;
    for r in &runs {
        println!("{}", serde_json::to_string(r)?);
    }
    if a.plugin_only {
        return Ok(());
    }
    let overhead = runs[1].tokens_per_s / runs[0].tokens_per_s - 1.0;
    println!("{}", serde_json::json!({"plugin_step_overhead_percent": (overhead * 1e4).round() / 1e2}));
    Ok(())
}

fn bench_kernels(a: BenchKernelsArgs) -> anyhow::Result<()> {
    use crate::recipes::bench_kernels::{bench_kernels, KernelBenchSettings};
    let shape = bench_shape(&a.shape)?;
    let device = a.device.resolve().map_err(anyhow::Error::msg)?;
    let kinds = match a.dtype.as_str() {
        "both" => vec![tch::Kind::Float, tch::Kind::BFloat16],
        "fp32" | "float32" => vec![tch::Kind::Float],
        "bf16" | "bfloat16" => vec![tch::Kind::BFloat16],
        other => anyhow::bail!("--dtype {other}: use fp32, bf16 or both"),
    };
    let settings = KernelBenchSettings { shape, batch: a.batch, seq: a.seq, device, kinds, iters: a.iters };
    let mut results = bench_kernels(&settings)?;
    for &kind in &settings.kinds {
        results.push(crate::recipes::bench_cross_entropy::bench_cross_entropy(&settings, kind)?);
    }
    for r in &results {
        println!("{}", serde_json::to_string(r)?);
    }
    let fp8 = crate::recipes::bench_fp8::bench_fp8_quantize(&settings)?;
    for r in &fp8 {
        println!("{}", serde_json::to_string(r)?);
    }
    let mut failed: Vec<String> = results.iter().filter(|r| !r.pass).map(|r| format!("{} {}", r.kernel, r.dtype)).collect();
    failed.extend(fp8.iter().filter(|r| !r.pass && r.skipped.is_none()).map(|r| format!("{} {}×{}{}", r.kernel, r.shape[0], r.shape[1], if r.col_scale { " with col_scale" } else { "" })));
    anyhow::ensure!(failed.is_empty(), "fused kernels outside their tolerance: {}", failed.join(", "));
    let skipped = fp8.iter().filter(|r| r.skipped.is_some()).count();
    let checked = results.len() + fp8.len() - skipped;
    let note = if skipped > 0 { format!(" ({skipped} fp8_quantize_rows checks skipped: the kernel does not run on this GPU)") } else { String::new() };
    eprintln!("ftx bench kernels: all {checked} kernel checks within tolerance on {device:?}{note}");
    Ok(())
}

fn bench_prep(a: BenchPrepArgs) -> anyhow::Result<()> {
    use crate::data::prep::{self, bench};
    use std::io::Write;
    let dir = a.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("ftx-bench-prep-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let corpus = dir.join("corpus.jsonl");
    let truth = dir.join("truth.jsonl");
    eprintln!("generating {} records into {}", a.records, corpus.display());
    let t = std::time::Instant::now();
    let mut w = std::io::BufWriter::new(std::fs::File::create(&corpus).with_context(|| corpus.display().to_string())?);
    let mut tw = std::io::BufWriter::new(std::fs::File::create(&truth).with_context(|| truth.display().to_string())?);
    let mut gen = bench::Corpus::new(a.seed);
    for _ in 0..a.records {
        let p = gen.next_record();
        serde_json::to_writer(&mut w, &crate::data::prep::split::format_record(&p.example, prep::split::OutputFormat::Auto).expect("alpaca"))?;
        w.write_all(b"\n")?;
        serde_json::to_writer(&mut tw, &p.truth_json())?;
        tw.write_all(b"\n")?;
    }
    w.flush()?;
    tw.flush()?;
    eprintln!("generated in {:.1} s; running the pipeline", t.elapsed().as_secs_f64());
    let mut cfg = prep::PrepConfig::parse("[prep]\ninputs = [\"x\"]\n").map_err(anyhow::Error::msg)?;
    cfg.inputs = vec![corpus.display().to_string()];
    cfg.out = dir.join("out");
    cfg.threads = a.threads;
    let done = prep::run(&cfg, true)?;
    print!("{}", done.report.table(&done.timing));
    eprintln!("scoring the PII scrubber and the deduplicator against what was planted");
    let pii = bench::pii_quality(a.seed, a.records);
    let dq = bench::dedup_quality(a.seed, a.records);
    let (dedup, dedup_rate) = (&dq.quality, dq.records_per_second_one_thread);
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
        "dedup_records_per_cpu_second": dq.records_per_cpu_second,
    });
    println!("{}", serde_json::to_string(&line)?);
    if a.compare {
        compare_python(&a, &corpus, &truth, &dir)?;
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Runs host/bench/prep_compare.py on the corpus and prints each tool's figures beside
/// ftx's on the same prefix, with the ratios of records per CPU-second (one thread each: on
/// a shared machine, wall time would measure the neighbours too).
fn compare_python(a: &BenchPrepArgs, corpus: &std::path::Path, truth: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<()> {
    use crate::data::prep::bench;
    let script = dir.join("prep_compare.py");
    std::fs::write(&script, include_str!("../../bench/prep_compare.py"))?;
    let python = a.python.clone().or_else(|| std::env::var("FTX_PREP_PYTHON").ok()).unwrap_or_else(|| "python3".into());
    let (n_pii, n_dedup) = (a.compare_pii_records.min(a.records), a.compare_dedup_records.min(a.records));
    eprintln!("running the Python tools with {python} on {n_pii} (PII) and {n_dedup} (dedup) records");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(["--corpus", &corpus.display().to_string(), "--truth", &truth.display().to_string()])
        .args(["--pii-records", &n_pii.to_string(), "--dedup-records", &n_dedup.to_string(), "--work", &dir.join("python").display().to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {python} (set --python or FTX_PREP_PYTHON to a Python with the tools)"))?;
    anyhow::ensure!(out.status.success(), "{} failed ({})", script.display(), out.status);
    let pii = bench::pii_quality(a.seed, n_pii);
    let dq = bench::dedup_quality(a.seed, n_dedup);
    let (dedup, dedup_rate) = (&dq.quality, dq.records_per_cpu_second.unwrap_or(dq.records_per_second_one_thread));
    let pii_rate = pii.records_per_cpu_second.unwrap_or(pii.records_per_second_one_thread);
    println!("{:<22} {:>9} {:>14} {:>12} {:>10} {:>10}", "tool", "records", "records/cpu-s", "ftx speedup", "recall", "precision");
    println!("{:<22} {:>9} {:>14.0} {:>12} {:>10.4} {:>10.4}", "ftx pii", n_pii, pii_rate, "-", pii.overall.recall, pii.overall.precision);
    println!("{:<22} {:>9} {:>14.0} {:>12} {:>10.4} {:>10.4}", "ftx dedup", n_dedup, dedup_rate, "-", dedup.recall, dedup.precision);
    // The tools print progress of their own; the script's results are the JSON lines.
    for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("{\"tool\"")) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("the compare script printed {line:?}"))?;
        let tool = v["tool"].as_str().unwrap_or("?").to_owned();
        if let Some(why) = v["skipped"].as_str() {
            println!("{tool:<22} skipped: {why}");
            continue;
        }
        let rate = v["records_per_cpu_second"].as_f64().unwrap_or(0.0);
        let ftx_rate = if tool.starts_with("datatrove") { dedup_rate } else { pii_rate };
        let ratio = ftx_rate / rate.max(1e-9);
        println!(
            "{tool:<22} {:>9} {:>14.0} {:>12} {:>10.4} {:>10.4}",
            v["records"].as_u64().unwrap_or(0), rate, format!("{ratio:.1}x"), v["recall"].as_f64().unwrap_or(0.0), v["precision"].as_f64().unwrap_or(0.0)
        );
        let mut row = v.clone();
        row["ftx_records_per_cpu_second"] = ftx_rate.into();
        row["ftx_speedup"] = ((ratio * 10.0).round() / 10.0).into();
        println!("{}", serde_json::to_string(&row)?);
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

/// Arguments of `ftx bench random-model`.
#[derive(clap::Args, Debug)]
pub struct RandomModelArgs {
    /// A public shape (llama-3.2-1b, llama-3.1-8b, …; see `ftx bench train --help`) or "tiny".
    #[arg(long)]
    pub shape: String,
    /// The checkpoint folder to write.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Where the weights are drawn: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: crate::gpu::DeviceArg,
    /// Stored dtype: fp32, bf16 or fp16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

/// Writes a random model of a public shape with a word-level tokenizer whose token `i` is the
/// word `t{i}` (so a prompt of known token ids is plain text) and no end-of-sequence token
/// (generation always runs to max_tokens): what `bench/serve_vs_hf.sh` loads into both ftx
/// and transformers.
pub fn random_model(a: RandomModelArgs) -> anyhow::Result<()> {
    use crate::util::write_atomic;
    let shape = bench_shape(&a.shape)?;
    let device = a.device.resolve().map_err(anyhow::Error::msg)?;
    let kind = crate::model::parse_dtype(&a.dtype)?;
    let torch_dtype = match kind {
        tch::Kind::BFloat16 => "bfloat16",
        tch::Kind::Half => "float16",
        _ => "float32",
    };
    let mut config = shape.to_hf_config();
    config["torch_dtype"] = torch_dtype.into();
    config["bos_token_id"] = serde_json::Value::Null;
    config["eos_token_id"] = serde_json::Value::Null;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let config_path = a.out.join("config.json");
    let cfg = crate::model::ModelConfig::from_json(config.clone(), &config_path)?;
    let model = crate::model::CausalLm::random(cfg, crate::model::decoder::LoadOptions { device, kind }, a.seed).context("building the random model")?;
    let weights = a.out.join("model.safetensors");
    crate::model::weights::write_safetensors(&weights, &model.named_tensors()).with_context(|| format!("writing {}", weights.display()))?;
    drop(model);
    let vocab: serde_json::Map<String, serde_json::Value> = (0..shape.vocab).map(|i| (format!("t{i}"), i.into())).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        // Byte-level decoding (the words are ASCII, so their bytes) for llguidance's vocabulary.
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    });
    write_atomic(&a.out.join("tokenizer.json"), tokenizer.to_string().as_bytes()).context("writing tokenizer.json")?;
    write_atomic(&config_path, serde_json::to_string_pretty(&config)?.as_bytes()).context("writing config.json")?;
    eprintln!("ftx: wrote a random {} ({} parameters, {torch_dtype}) to {}", shape.name, shape.params(), a.out.display());
    Ok(())
}
