//! Checkpoints: weights (or adapter), optimizer state and the position in the run, written
//! atomically (a temporary folder renamed into place), the last K kept.
//!
//! The run needs no saved RNG state: dropout and initialisation are seeded from
//! (seed, step, micro-batch, layer), and the data order from (seed, epoch), so the step
//! number alone puts a resumed run exactly where the interrupted one was.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// What `state.json` in a checkpoint records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Micro-batches consumed (the data position).
    pub micro_batches: usize,
    /// Tokens trained on so far.
    pub tokens: i64,
    /// SHA-256 of the resolved config (a resume with another config is refused).
    pub config_sha256: String,
}

/// The checkpoints folder of a run.
pub fn dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

fn name(step: usize) -> String {
    format!("step-{step:07}")
}

/// Saves a checkpoint for `state.step`, then deletes all but the newest `keep`.
/// `extra` writes additional files (e.g. a PEFT adapter) into the folder before it is published.
pub fn save(
    output: &Path,
    state: &RunState,
    optimizer: &[(String, Tensor)],
    keep: usize,
    extra: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<PathBuf> {
    let root = dir(output);
    std::fs::create_dir_all(&root)?;
    let final_dir = root.join(name(state.step));
    let tmp = root.join(format!(".{}.tmp-{}", name(state.step), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    crate::model::weights::write_safetensors(&tmp.join("optimizer.safetensors"), optimizer)?;
    extra(&tmp)?;
    crate::util::write_atomic(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)?;
    if let Ok(d) = std::fs::File::open(&root) {
        let _ = d.sync_all();
    }
    let mut all = list(output);
    while all.len() > keep.max(1) {
        let (_, old) = all.remove(0);
        std::fs::remove_dir_all(old)?;
    }
    Ok(final_dir)
}

/// Complete checkpoints of a run, oldest first (temporary folders of interrupted saves are ignored).
pub fn list(output: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(dir(output))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let step = n.strip_prefix("step-")?.parse().ok()?;
            e.path().join("state.json").exists().then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The newest complete checkpoint of the run `config_sha256` describes: its state, optimizer
/// tensors and folder. Checkpoints of another configuration are an error, not a fresh start.
pub fn latest(output: &Path, config_sha256: &str) -> std::io::Result<Option<(RunState, Vec<(String, Tensor)>, PathBuf)>> {
    let Some((_, path)) = list(output).pop() else { return Ok(None) };
    let state: RunState = serde_json::from_str(&std::fs::read_to_string(path.join("state.json"))?)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.join("state.json").display())))?;
    if state.config_sha256 != config_sha256 {
        return Err(std::io::Error::other(format!(
            "{} holds checkpoints of a run with another configuration; use a new train.output_dir or delete {}",
            output.display(),
            dir(output).display()
        )));
    }
    let tensors = crate::model::weights::read_safetensors(&path.join("optimizer.safetensors"))?;
    Ok(Some((state, tensors, path)))
}
