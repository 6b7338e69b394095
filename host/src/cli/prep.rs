//! `ftx prep --config prep.toml`: runs the data pipeline and prints its accounting.
//! `ftx prep --shard K/N` / `--reduce`: the same run spread over machines (see
//! `data::prep::shard`).
//! `ftx prep --pii-bench DIR`: writes the labelled PII benchmark and scores the scrubber on it.

use crate::data::prep::{self, PrepConfig};
use anyhow::Context;
use std::path::{Path, PathBuf};

/// Arguments of `ftx prep`.
#[derive(clap::Args, Debug)]
pub struct PrepArgs {
    /// A TOML file with a [prep] section (see host/configs/prep.toml). With --pii-bench, only
    /// its [prep.pii] is used.
    #[arg(long, required_unless_present = "pii_bench")]
    pub config: Option<PathBuf>,
    /// Output folder (overrides prep.out).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Worker threads (overrides prep.threads; 0 = every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Run only shard K of N (K from 0) of the records, through every stage before dedup, and
    /// write its records and MinHash signatures to OUT/shards/KKKKK-of-NNNNN/ for --reduce.
    /// `auto` takes K from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX (and N, when not
    /// given, from SLURM_ARRAY_TASK_COUNT): --shard auto/8.
    #[arg(long, value_name = "K/N", conflicts_with_all = ["reduce", "pii_bench"])]
    pub shard: Option<String>,
    /// Join finished shards: deduplicate across all of them and write the final splits,
    /// rejects, report and manifest to OUT, as one process would have. Takes shard folders or
    /// folders of them (default OUT/shards).
    #[arg(long, value_name = "SHARD_DIR", num_args = 0.., conflicts_with = "pii_bench")]
    pub reduce: Option<Vec<PathBuf>>,
    /// Instead of a run: write the labelled PII benchmark (support, email and chat text with
    /// true PII and lookalikes) to DIR/pii_bench.jsonl, score the scrubber on it per entity
    /// type, print the table and write DIR/ftx_scores.json and DIR/ftx_errors.jsonl.
    #[arg(long, value_name = "DIR")]
    pub pii_bench: Option<PathBuf>,
    /// Records of the PII benchmark.
    #[arg(long, default_value_t = 5000, requires = "pii_bench")]
    pub bench_records: usize,
    /// Seed of the PII benchmark.
    #[arg(long, default_value_t = 1, requires = "pii_bench")]
    pub bench_seed: u64,
}

pub fn run(a: PrepArgs) -> anyhow::Result<()> {
    if let Some(dir) = &a.pii_bench {
        return pii_bench(&a, dir);
    }
    let config = a.config.clone().context("--config is required")?;
    let mut cfg = PrepConfig::load(&config).with_context(|| "reading the prep config")?;
    if let Some(out) = &a.out {
        cfg.out = out.clone();
    }
    if let Some(t) = a.threads {
        cfg.threads = t;
    }
    if let Some(text) = &a.shard {
        let spec = prep::shard::ShardSpec::parse(text, |k| std::env::var(k).ok()).map_err(anyhow::Error::msg)?;
        let done = prep::run_shard(&cfg, !a.quiet, spec).with_context(|| format!("ftx prep --shard {}/{} ({})", spec.index, spec.count, config.display()))?;
        // The stage table without the split and total lines: a shard writes no splits yet.
        let table = done.report.table(&done.timing);
        table.lines().filter(|l| !l.starts_with("splits:") && !l.starts_with("total:")).for_each(|l| println!("{l}"));
        let r = &done.report;
        let kept = r.input_records + r.added_records - r.rejected_records;
        println!("total: {} in = {kept} kept for the reduce + {} rejected; {:.1} s", r.input_records, r.rejected_records, done.timing.total_seconds);
        let out = a.out.as_ref().map(|o| format!(" --out {}", o.display())).unwrap_or_default();
        println!("shard {} of {}: records and signatures written to {}; once all {} shards are done: ftx prep --config {}{out} --reduce", spec.index, spec.count, done.out.display(), spec.count, config.display());
        return Ok(());
    }
    let done = match &a.reduce {
        Some(dirs) => prep::shard::reduce(&cfg, dirs).with_context(|| format!("ftx prep --reduce ({})", config.display()))?,
        None => prep::run(&cfg, !a.quiet).with_context(|| format!("ftx prep ({})", config.display()))?,
    };
    print!("{}", done.report.table(&done.timing));
    println!("written to {}", done.out.display());
    anyhow::ensure!(done.report.balanced(), "the accounting does not add up (a bug): see {}/report.json", done.out.display());
    Ok(())
}

fn pii_bench(a: &PrepArgs, dir: &Path) -> anyhow::Result<()> {
    use prep::pii_bench::{score, scrubber_findings, Gen};
    let pii = match &a.config {
        Some(c) => PrepConfig::load(c).with_context(|| "reading the prep config")?.pii,
        None => prep::pii::PiiConfig::default(),
    };
    let scrubber = prep::pii::Scrubber::new(&pii).context("building the PII scrubber")?;
    let mut gen = Gen::new(a.bench_seed);
    let records: Vec<_> = (0..a.bench_records).map(|_| gen.next_record()).collect();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut corpus = Vec::new();
    for r in &records {
        serde_json::to_writer(&mut corpus, &r.to_json())?;
        corpus.push(b'\n');
    }
    let corpus_path = dir.join("pii_bench.jsonl");
    crate::util::write_atomic(&corpus_path, &corpus).with_context(|| format!("writing {}", corpus_path.display()))?;
    let scores = score(&records, |t| scrubber_findings(&scrubber, t));
    let scores_path = dir.join("ftx_scores.json");
    crate::util::write_atomic(&scores_path, &serde_json::to_vec_pretty(&scores)?).with_context(|| format!("writing {}", scores_path.display()))?;
    let errors_path = dir.join("ftx_errors.jsonl");
    let mut errors = Vec::new();
    for e in prep::pii_bench::disagreements(&records, |t| scrubber_findings(&scrubber, t)) {
        serde_json::to_writer(&mut errors, &e)?;
        errors.push(b'\n');
    }
    crate::util::write_atomic(&errors_path, &errors).with_context(|| format!("writing {}", errors_path.display()))?;
    println!("{:<15} {:>8} {:>8} {:>8} {:>8} {:>9}", "entity", "planted", "found", "flagged", "recall", "precision");
    let f = |x: f64| if x.is_nan() { "—".to_owned() } else { format!("{x:.4}") };
    for (e, q) in &scores {
        println!("{e:<15} {:>8} {:>8} {:>8} {:>8} {:>9}", q.planted, q.found, q.flagged, f(q.recall), f(q.precision));
    }
    println!("{} records in {}; scores in {}; misses and false findings in {}", records.len(), corpus_path.display(), scores_path.display(), errors_path.display());
    Ok(())
}
