//! The run drivers, one floor above the engine's parts: each reads top to bottom, from the
//! configuration to the written outputs, and calls down into the parts that do the work —
//! data preparation, model building, the step, the optimizer, checkpoints and metrics
//! ([`crate::train`]), preference objectives and RL rollouts and advantages
//! ([`crate::align`]). Nothing below imports a driver.
//!
//! - [`sft`]: supervised fine-tuning, continued pretraining, chat tuning, and preference
//!   pairs (with [`preference`]'s objective);
//! - [`rl`]: GRPO and PPO from rewards;
//! - [`bench`]: `ftx bench train`, the step and optimizer on a random model.

pub mod bench;
pub mod preference;
pub mod rl;
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

/// Runs (or resumes) the training described by `cfg`: RL when it has an `[rl]` section,
/// otherwise SFT, CPT or preference training (as its data say).
pub fn train(cfg: &TrainConfig) -> Result<TrainReport> {
    if cfg.rl.is_some() {
        if crate::dist::DistEnv::from_env()?.is_some() {
            anyhow::bail!("distributed RL runs ([rl]) are not built yet: run GRPO/PPO in one process (without torchrun or --nproc-per-node)");
        }
        return rl::train_rl(cfg);
    }
    sft::train_sft(cfg)
}
