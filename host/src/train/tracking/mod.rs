//! Experiment tracking (`train.report_to`): every metric a run writes to metrics.jsonl also
//! goes, under the same name and step, to TensorBoard event files ([`tensorboard`]) and to an
//! MLflow tracking server ([`mlflow`]). The metrics log (`super::metrics::MetricsLog`) is the
//! one place that feeds them, so SFT, preference and RL runs all report alike.
//!
//! A tracker never stops training: a failing backend warns once and is left out from then on.

pub mod mlflow;
pub mod tensorboard;

use super::TrainConfig;
use std::path::Path;

/// How a run ended, as a tracker records it (MLflow's run statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// The run did all its steps and wrote its outputs.
    Finished,
    /// The run stopped on an error.
    Failed,
    /// The run was stopped by a signal (after writing a checkpoint).
    Killed,
}

impl RunStatus {
    /// MLflow's name for it.
    pub fn mlflow_name(self) -> &'static str {
        match self {
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }
}

/// A backend that receives the run's metrics.
pub trait Tracker: Send {
    /// Records the metrics of one step (metrics.jsonl's names and values).
    fn log(&mut self, step: usize, values: &[(String, f64)]);
    /// Ends the run with `status` (called once; later metrics are not expected).
    fn finish(&mut self, status: RunStatus);
}

/// The trackers `cfg.train.report_to` names, for a run writing into `out` that starts after
/// `resume_step` steps. An MLflow server that cannot be reached gives a warning, not an error;
/// a configuration that cannot work (no tracking URI, an event file that cannot be created) is
/// an error before training starts.
pub fn start(cfg: &TrainConfig, out: &Path, resume_step: usize) -> Result<Vec<Box<dyn Tracker>>, String> {
    let mut trackers: Vec<Box<dyn Tracker>> = Vec::new();
    for name in &cfg.train.report_to {
        match name.as_str() {
            "tensorboard" => trackers.push(Box::new(tensorboard::EventWriter::create(&out.join("tensorboard"))?)),
            "mlflow" => trackers.push(Box::new(mlflow::MlflowRun::start(cfg, out, resume_step)?)),
            other => return Err(format!("train.report_to: \"{other}\" is not one of {}", super::config::REPORT_TO.join(", "))),
        }
    }
    Ok(trackers)
}
