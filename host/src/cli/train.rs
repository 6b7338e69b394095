//! `ftx train --config ftx.toml [--set section.key=value]… [--out DIR] [--report-to tensorboard,mlflow]
//! [--nproc-per-node N …]`

use crate::dist::launch::Launched;
use crate::recipes::{train_with, RunOptions};
use crate::train::TrainConfig;
use std::path::PathBuf;

/// Arguments of `ftx train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The run's configuration (TOML; see the README for every key).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a key, e.g. `--set train.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Start from this PEFT adapter folder (e.g. `runs/sft/final`): the same as
    /// `model.adapter` in the config.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The run's output folder (`train.output_dir`): checkpoints, metrics, final weights.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also report metrics to these trackers (`train.report_to`): tensorboard, mlflow
    /// (comma-separated or repeated).
    #[arg(long = "report-to", value_name = "TRACKER", value_delimiter = ',')]
    pub report_to: Vec<String>,
    /// A plugin for this run, e.g. a loss for preference training: a first-party or installed
    /// plugin's name (dpo, orpo, …), or a path to a .wasm/.so file or a plugin folder
    /// (repeatable; adds to the config's [[plugins]]).
    #[arg(long = "plugin", value_name = "NAME|PATH")]
    pub plugins: Vec<PathBuf>,
    /// Grant the run's plugins a permission their manifests ask for: `read:/folder`,
    /// `env:NAME` or `clock` (repeatable).
    #[arg(long = "grant", value_name = "PERMISSION")]
    pub grants: Vec<String>,
    /// Run RMSNorm, rotary embedding, SwiGLU and the head's cross-entropy as libtorch's ops instead of the fused CUDA
    /// kernels (`train.fused_kernels = false`), e.g. for before/after timings.
    #[arg(long)]
    pub no_fused_kernels: bool,
    /// Selective recompute (`train.recompute`): `mlp` keeps only the LoRA MLP's input and runs
    /// its gate/up GEMM again in backward instead of keeping its output.
    #[arg(long, value_enum, value_name = "WHAT")]
    pub recompute: Option<crate::train::recompute::Recompute>,
    /// LoRA / DoRA on a frozen base stored in FP8 (`method.fp8 = true`): half the base's memory,
    /// its GEMMs on Hopper's FP8 tensor cores.
    #[arg(long)]
    pub fp8: bool,
    #[command(flatten)]
    pub launch: crate::dist::launch::LaunchArgs,
}

/// Runs `ftx train`; `plugins` and `grants` come from before the command (`ftx --plugin P train`).
pub fn run(mut a: TrainArgs, plugins: Vec<PathBuf>, grants: Vec<String>) -> anyhow::Result<()> {
    a.plugins.splice(0..0, plugins);
    a.grants.splice(0..0, grants);
    let mut set = a.set.clone();
    if let Some(dir) = &a.adapter {
        // Through the overrides, so the checks of the config's keys apply to it as well.
        set.push(format!("model.adapter={}", toml::Value::String(dir.display().to_string())));
    }
    if let Some(out) = &a.out {
        set.push(format!("train.output_dir={}", toml::Value::String(out.display().to_string())));
    }
    if !a.report_to.is_empty() {
        set.push(format!("train.report_to={}", toml::Value::Array(a.report_to.iter().map(|r| toml::Value::String(r.trim().to_owned())).collect())));
    }
    if a.no_fused_kernels {
        set.push("train.fused_kernels=false".into());
    }
    if let Some(r) = a.recompute {
        set.push(format!("train.recompute=\"{}\"", r.name()));
    }
    if a.fp8 {
        set.push("method.fp8=true".into());
    }
    let mut cfg = TrainConfig::load(&a.config, &set).map_err(anyhow::Error::msg)?;
    // With --nproc-per-node, this process starts the ranks (this same command) and waits.
    match a.launch.launch()? {
        Launched::Done => return Ok(()),
        Launched::Stopped(signal) => return Err(crate::train::interrupt::RanksStopped(signal).into()),
        Launched::RunHere => {}
    }
    for p in &a.plugins {
        cfg.plugins.push(crate::train::config::PluginEntry::new(p.clone()));
    }
    // `--grant` applies to every plugin of the run.
    cfg.plugins.iter_mut().for_each(|p| p.grant.extend(a.grants.iter().cloned()));
    // Run again, a finished run says so (a run of a program such as `ftx demo` rewrites its outputs).
    let r = train_with(&cfg, &RunOptions { refuse_finished: true })?;
    if crate::dist::DistEnv::from_env()?.is_some_and(|e| e.rank != 0) {
        return Ok(()); // rank 0 reports
    }
    let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.4}"));
    println!("trained {} steps on {} tokens in {:.1}s", r.steps, r.tokens, r.seconds);
    println!("train loss      {} → {}", fmt(r.first_loss), fmt(r.last_loss));
    println!("validation loss {} → {}", fmt(r.eval_before), fmt(r.eval_after));
    println!("outputs         {} (final weights: {})", r.output.display(), r.final_dir.display());
    crate::plugins::budget::print_summary(&r.plugins, r.seconds);
    Ok(())
}
