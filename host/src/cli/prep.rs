//! `ftx prep --config prep.toml`: runs the data pipeline and prints its accounting.

use crate::data::prep::{self, PrepConfig};
use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `ftx prep`.
#[derive(clap::Args, Debug)]
pub struct PrepArgs {
    /// A TOML file with a [prep] section (see host/configs/prep.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder (overrides prep.out).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Worker threads (overrides prep.threads; 0 = every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(a: PrepArgs) -> anyhow::Result<()> {
    let mut cfg = PrepConfig::load(&a.config).with_context(|| "reading the prep config")?;
    if let Some(out) = a.out {
        cfg.out = out;
    }
    if let Some(t) = a.threads {
        cfg.threads = t;
    }
    let done = prep::run(&cfg, !a.quiet).with_context(|| format!("ftx prep ({})", a.config.display()))?;
    print!("{}", done.report.table(&done.timing));
    println!("written to {}", done.out.display());
    anyhow::ensure!(done.report.balanced(), "the accounting does not add up (a bug): see {}/report.json", done.out.display());
    Ok(())
}
