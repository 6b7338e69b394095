//! Checkpoints: weights (or adapter), optimizer state and the position in the run, written
//! atomically (a temporary folder renamed into place), the last K kept. Under FSDP every rank
//! writes its shard of the optimizer state ([`ShardLayout`]); reading joins them again.
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

/// The folder of the checkpoint at `step`.
pub fn step_dir(output: &Path, step: usize) -> PathBuf {
    dir(output).join(name(step))
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
    let tmp = dir(output).join(format!(".{}.tmp-{}", name(state.step), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    crate::model::weights::write_safetensors(&tmp.join("optimizer.safetensors"), optimizer)?;
    publish(output, &tmp, state, keep, extra)
}

/// The temporary folder all ranks of a sharded (FSDP) save write into: one name for every
/// rank, so it lives on a filesystem they share.
pub fn sharded_tmp_dir(output: &Path, step: usize) -> PathBuf {
    dir(output).join(format!(".{}.tmp-sharded", name(step)))
}

/// The file of rank `rank`'s optimizer shard in a sharded checkpoint.
pub fn shard_file(rank: usize, world: usize) -> String {
    format!("optimizer-shard-{rank:05}-of-{world:05}.safetensors")
}

/// The file describing how a sharded checkpoint's shards make the whole optimizer state.
pub const SHARD_LAYOUT: &str = "shards.json";

/// How the ranks' optimizer shards of a sharded (FSDP) checkpoint make the whole state: each
/// group is a flat run of parameters (in this order) split into `world` slices of `per`
/// elements (the last padded with zeros); every shard file holds its slice of each group as
/// `g{i}.exp_avg`, `g{i}.exp_avg_sq` and `g{i}.master` (fp32).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardLayout {
    /// Ranks that wrote the checkpoint.
    pub world: usize,
    /// The flat groups, in shard-file order.
    pub groups: Vec<ShardGroup>,
}

/// One flat group of a [`ShardLayout`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardGroup {
    /// Elements of each rank's slice.
    pub per: i64,
    /// Parameter names and shapes, in flat order.
    pub params: Vec<(String, Vec<i64>)>,
}

/// The optimizer-state parts each group of a [`ShardLayout`] holds, as [`super::optim::AdamW::state`] names them.
pub const SHARD_PARTS: [&str; 3] = ["exp_avg", "exp_avg_sq", "master"];

/// Publishes the temporary folder `tmp` (its optimizer state already written) as the
/// checkpoint of `state.step`: `extra` adds its files, `state.json` goes last, the folder is
/// renamed into place, and all but the newest `keep` checkpoints are deleted.
pub fn publish(
    output: &Path,
    tmp: &Path,
    state: &RunState,
    keep: usize,
    extra: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<PathBuf> {
    let root = dir(output);
    let final_dir = root.join(name(state.step));
    extra(tmp)?;
    crate::util::write_atomic(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(tmp, &final_dir)?;
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
    let whole = path.join("optimizer.safetensors");
    let tensors = if whole.exists() || !path.join(SHARD_LAYOUT).exists() {
        crate::model::weights::read_safetensors(&whole)?
    } else {
        consolidate(&path)?
    };
    Ok(Some((state, tensors, path)))
}

/// The whole optimizer state of a sharded checkpoint, by parameter name (as a single process
/// saves it): every group's slices joined in rank order, the padding dropped. This is what lets
/// a run resume on another number of ranks, or in one process.
pub fn consolidate(path: &Path) -> std::io::Result<Vec<(String, Tensor)>> {
    let layout_path = path.join(SHARD_LAYOUT);
    let layout: ShardLayout = serde_json::from_str(&std::fs::read_to_string(&layout_path)?)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", layout_path.display())))?;
    let shards = (0..layout.world)
        .map(|r| crate::model::weights::read_safetensors(&path.join(shard_file(r, layout.world))))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (i, g) in layout.groups.iter().enumerate() {
        for part in SHARD_PARTS {
            let key = format!("g{i}.{part}");
            let mut pieces = Vec::with_capacity(shards.len());
            for (r, shard) in shards.iter().enumerate() {
                let t = shard.iter().find(|(k, _)| *k == key).map(|(_, t)| t.shallow_clone()).filter(|t| t.numel() as i64 == g.per);
                pieces.push(t.ok_or_else(|| {
                    std::io::Error::other(format!("{}: no {key} of {} elements; the checkpoint is damaged", path.join(shard_file(r, layout.world)).display(), g.per))
                })?);
            }
            let flat = Tensor::cat(&pieces, 0);
            let mut offset = 0;
            for (name, shape) in &g.params {
                let n: i64 = shape.iter().product();
                if offset + n > flat.numel() as i64 {
                    return Err(std::io::Error::other(format!("{}: group {i} is shorter than its parameters", layout_path.display())));
                }
                out.push((format!("{name}.{part}"), flat.narrow(0, offset, n).reshape(shape.as_slice())));
                offset += n;
            }
        }
    }
    Ok(out)
}
