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
    /// Start from this PEFT adapter folder (e.g. `runs/sft/final`): the same as
    /// `model.adapter` in the config.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub launch: crate::dist::launch::LaunchArgs,
}

pub fn run(a: TrainArgs, plugins: &[PathBuf], grants: &[String]) -> anyhow::Result<()> {
    let mut set = a.set.clone();
    if let Some(dir) = &a.adapter {
        // Through the overrides, so the checks of the config's keys apply to it as well.
        set.push(format!("model.adapter={}", toml::Value::String(dir.display().to_string())));
    }
    let mut cfg = TrainConfig::load(&a.config, &set).map_err(anyhow::Error::msg)?;
    // With --nproc-per-node, this process starts the ranks (this same command) and waits.
    if a.launch.launch()? == crate::dist::launch::Launched::Done {
        return Ok(());
    }
    for p in plugins {
        cfg.plugins.push(crate::train::config::PluginEntry::new(p.clone()));
    }
    // `--grant` applies to every plugin of the run.
    cfg.plugins.iter_mut().for_each(|p| p.grant.extend(grants.iter().cloned()));
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
