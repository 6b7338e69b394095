//! The run drivers, one floor above the engine's parts: each reads top to bottom, from the
//! configuration to the written outputs, and calls down into the parts that do the work —
//! data preparation, model building, the step, the optimizer, checkpoints and metrics
//! ([`crate::train`]), preference objectives and RL rollouts and advantages
//! ([`crate::align`]). Nothing below imports a driver.
//!
//! - [`sft`]: supervised fine-tuning, continued pretraining, chat tuning, and preference
//!   pairs (with [`preference`]'s objective);
//! - [`rl`]: GRPO and PPO from rewards (over several ranks with [`rl_ranks`]);
//! - [`bench`]: `ftx bench train`, the step and optimizer on a random model ([`bench_ledger`]:
//!   one step's kernels, bytes and FLOPs, `--ledger`).

pub mod bench;
pub mod bench_cross_entropy;
pub mod bench_fp8;
pub mod bench_kernels;
pub mod bench_ledger;
pub mod preference;
pub mod rl;
mod rl_ranks;
pub mod sft;

use crate::train::TrainConfig;
use anyhow::Result;
use std::path::PathBuf;

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
    pub tokens: i64,
    pub seconds: f64,
    pub output: PathBuf,
    /// Where the final weights went (adapter folder or model folder).
    pub final_dir: PathBuf,
    pub resumed_from: Option<usize>,
    /// Each plugin's calls and time in this run.
    pub plugins: Vec<crate::plugins::budget::PluginTime>,
}

/// How a run treats what its output folder already holds.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Refuse ([`RunFinished`]) to run again a run whose folder holds its final checkpoint and
    /// outputs; otherwise (the default, for programs that drive runs) such a run resumes at its
    /// last step and writes its outputs again.
    pub refuse_finished: bool,
}

/// The run in `output` already did all its steps and wrote its outputs.
#[derive(Debug)]
pub struct RunFinished {
    /// The run's output folder.
    pub output: PathBuf,
    /// Its steps.
    pub steps: usize,
    /// Where its final weights are.
    pub final_dir: PathBuf,
}

impl std::error::Error for RunFinished {}

impl std::fmt::Display for RunFinished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let out = self.output.display();
        write!(
            f,
            "{out} holds a finished run: all {} steps are done (final weights in {}).\n\
             To train more: raise the steps and run the same command again, which continues from the last checkpoint \
             (e.g. `--set train.max_steps={}`); or train into a new folder (`--out DIR`); or delete {out} to start over.",
            self.steps,
            self.final_dir.display(),
            self.steps * 2
        )
    }
}

/// Runs (or resumes) the training described by `cfg`: RL when it has an `[rl]` section,
/// otherwise SFT, CPT or preference training (as its data say).
pub fn train(cfg: &TrainConfig) -> Result<TrainReport> {
    train_with(cfg, &RunOptions::default())
}

/// [`train`] with `opts`.
pub fn train_with(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainReport> {
    crate::gpu::kernels::set_enabled(cfg.train.fused_kernels);
    if cfg.rl.is_some() {
        return rl::train_rl(cfg, opts);
    }
    sft::train_sft(cfg, opts)
}
