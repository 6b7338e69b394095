//! `ftx train --config ftx.toml [--set section.key=value]… [--nproc-per-node N …]`

use crate::recipes::train;
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
    /// A plugin (`.wasm` component) for this run, e.g. a loss for preference training
    /// (repeatable; adds to the config's [[plugins]]).
    #[arg(long = "plugin", value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
    /// Grant the run's plugins a permission their manifests ask for: `read:/folder`,
    /// `env:NAME` or `clock` (repeatable).
    #[arg(long = "grant", value_name = "PERMISSION")]
    pub grants: Vec<String>,
    #[command(flatten)]
    pub launch: crate::dist::launch::LaunchArgs,
}

/// Runs `ftx train`; `plugins` and `grants` come from before the command (`ftx --plugin P train`).
pub fn run(mut a: TrainArgs, plugins: Vec<PathBuf>, grants: Vec<String>) -> anyhow::Result<()> {
    a.plugins.splice(0..0, plugins);
    a.grants.splice(0..0, grants);
    let mut cfg = TrainConfig::load(&a.config, &a.set).map_err(anyhow::Error::msg)?;
    // With --nproc-per-node, this process starts the ranks (this same command) and waits.
    if a.launch.launch()? == crate::dist::launch::Launched::Done {
        return Ok(());
    }
    for p in &a.plugins {
        cfg.plugins.push(crate::train::config::PluginEntry::new(p.clone()));
    }
    // `--grant` applies to every plugin of the run.
    cfg.plugins.iter_mut().for_each(|p| p.grant.extend(a.grants.iter().cloned()));
    let r = train(&cfg)?;
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
