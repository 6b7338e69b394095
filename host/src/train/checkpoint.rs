//! Checkpoints: weights (or adapter), optimizer state and the position in the run, written
//! atomically (a temporary folder renamed into place), the last K kept. Under FSDP every rank
//! writes its shard of the optimizer state ([`ShardLayout`]); reading joins them again.
//!
//! The run needs no saved RNG state: dropout and initialisation are seeded from
//! (seed, step, micro-batch, layer), and the data order from (seed, epoch), so the step
//! number alone puts a resumed run exactly where the interrupted one was.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use super::adamw8bit::{blocks_of, BLOCK};
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

/// The resolved config a checkpoint was written under (a refused resume names what changed).
const CONFIG: &str = "config.toml";

/// Saves a checkpoint for `state.step` with the resolved config (`config_toml`) it ran under,
/// then deletes all but the newest `keep`. `extra` writes additional files (e.g. a PEFT
/// adapter) into the folder before it is published.
pub fn save(
    output: &Path,
    state: &RunState,
    config_toml: &str,
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
    publish(output, &tmp, state, config_toml, keep, extra)
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
/// group is a flat run of parameters (in this order, at [`packed_offsets`]) split into `world`
/// slices of `per` elements (the last padded with zeros); every shard file holds its slice of
/// each group's [`ShardGroup::parts`] as `g{i}.<part>`.
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
    /// The moments are 8-bit (`train.optimizer = "adamw-8bit"`): codes per value and an fp32
    /// scale per block of [`BLOCK`], each parameter starting on a block.
    #[serde(default)]
    pub eight_bit: bool,
}

impl ShardGroup {
    /// The optimizer-state parts each shard holds of this group, as [`super::optim::AdamW::state`]
    /// names them.
    pub fn parts(&self) -> &'static [&'static str] {
        if self.eight_bit {
            &SHARD_PARTS_8BIT
        } else {
            &SHARD_PARTS
        }
    }
}

/// The optimizer-state parts of a group with fp32 moments.
pub const SHARD_PARTS: [&str; 3] = ["exp_avg", "exp_avg_sq", "master"];

/// The optimizer-state parts of a group with 8-bit moments: `absmax*` hold one scale per block.
pub const SHARD_PARTS_8BIT: [&str; 5] = ["state1", "absmax1", "state2", "absmax2", "master"];

/// Whether `part` of [`SHARD_PARTS_8BIT`] holds one value per block rather than per element.
pub fn per_block(part: &str) -> bool {
    part.starts_with("absmax")
}

/// Where each of tensors of `sizes` elements starts in a flat group: packed, or with `aligned`
/// each on a whole quantisation block ([`BLOCK`]) of the 8-bit optimizer.
pub fn packed_offsets(sizes: impl IntoIterator<Item = i64>, aligned: bool) -> Vec<i64> {
    let mut offset = 0;
    sizes
        .into_iter()
        .map(|n| {
            let at = offset;
            offset += if aligned { blocks_of(n) * BLOCK } else { n };
            at
        })
        .collect()
}

/// Publishes the temporary folder `tmp` (its optimizer state already written) as the
/// checkpoint of `state.step`: `extra` adds its files, `state.json` goes last, the folder is
/// renamed into place, and all but the newest `keep` checkpoints are deleted. The resolved config
/// the run ran under (`config_toml`) is kept beside it.
pub fn publish(
    output: &Path,
    tmp: &Path,
    state: &RunState,
    config_toml: &str,
    keep: usize,
    extra: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<PathBuf> {
    let root = dir(output);
    let final_dir = root.join(name(state.step));
    extra(tmp)?;
    crate::util::write_atomic(&tmp.join(CONFIG), config_toml.as_bytes())?;
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

/// The newest complete checkpoint of the run: its state, optimizer tensors and folder. Check
/// first that the run's config may resume it ([`check_config`]; `setup::start_output` does).
pub fn latest(output: &Path) -> std::io::Result<Option<(RunState, Vec<(String, Tensor)>, PathBuf)>> {
    let Some((_, path)) = list(output).pop() else { return Ok(None) };
    let state = read_state(&path)?;
    let whole = path.join("optimizer.safetensors");
    let tensors = if whole.exists() || !path.join(SHARD_LAYOUT).exists() {
        crate::model::weights::read_safetensors(&whole)?
    } else {
        consolidate(&path)?
    };
    Ok(Some((state, stack_per_expert_state(tensors), path)))
}

/// Optimizer state written while MoE experts' adapters were one leaf per expert (before
/// `peft::stacked`), converted to the stacked leaves' names and shapes, so that such a
/// checkpoint resumes exactly: every part of experts `0..E` of one projection
/// (`….experts.3.w1.lora_A.weight.exp_avg`) is stacked in expert order under the leaf's name
/// (`….experts.*.w1.lora_A.weight.exp_avg`), and kept under its own too. 8-bit moments
/// (`adamw-8bit`) convert when each expert's tensor is whole quantisation blocks (their
/// blocks are then the stacked tensor's); otherwise they are left out, and the resume names
/// what it lacks.
pub fn stack_per_expert_state(mut tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    const ADAPTER_PARTS: [&str; 3] = [".lora_A.weight.", ".lora_B.weight.", ".lora_magnitude_vector."];
    let mut groups: std::collections::BTreeMap<String, Vec<(i64, usize)>> = std::collections::BTreeMap::new();
    for (i, (name, _)) in tensors.iter().enumerate() {
        if let Some((key, e)) = ADAPTER_PARTS.iter().any(|p| name.contains(p)).then(|| crate::peft::stacked::split_expert(name)).flatten() {
            groups.entry(key).or_default().push((e, i));
        }
    }
    let present: std::collections::HashSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    let mut stacked = Vec::new();
    for (key, mut members) in groups.into_iter().filter(|(k, _)| !present.contains(k.as_str())) {
        members.sort();
        let parts: Vec<&Tensor> = members.iter().map(|&(_, i)| &tensors[i].1).collect();
        let in_order = members.iter().enumerate().all(|(i, &(e, _))| e == i as i64);
        if !in_order || parts.iter().any(|t| t.size() != parts[0].size()) {
            continue;
        }
        let part = key.rsplit('.').next().unwrap_or("");
        let value = if !part.starts_with("absmax") {
            Tensor::stack(&parts, 0)
        } else {
            // One scale per block: whole blocks per expert, else the blocks straddle experts.
            let param = key.strip_suffix(part).unwrap_or(&key);
            let master = members.first().and_then(|&(_, i)| {
                let name = &tensors[i].0;
                let own = name.strip_suffix(part)?;
                tensors.iter().find(|(n, _)| *n == format!("{own}master"))
            });
            match master {
                Some((_, m)) if m.numel() as i64 % BLOCK == 0 => Tensor::cat(&parts, 0),
                _ => {
                    tracing::warn!("{param}: 8-bit optimizer state of per-expert adapters not in whole blocks; not converted");
                    continue;
                }
            }
        };
        stacked.push((key, value));
    }
    tensors.extend(stacked);
    tensors
}

fn read_state(checkpoint: &Path) -> std::io::Result<RunState> {
    let file = checkpoint.join("state.json");
    serde_json::from_str(&std::fs::read_to_string(&file)?).map_err(|e| std::io::Error::other(format!("{}: {e}", file.display())))
}

/// Keys a run may change between an interrupted run and its resume: they decide when to save,
/// evaluate, report and stop, not what the steps compute. (`max_steps`/`epochs` continue the
/// run to a new total; the learning-rate schedule is planned over the new total.)
pub const RESUMABLE_KEYS: &[&str] = &[
    "train.save_every",
    "train.keep_last",
    "train.report_to",
    "train.output_dir",
    "train.eval_every",
    "train.max_steps",
    "train.epochs",
    "distributed.timeout_s",
    "distributed.bucket_mib",
    "distributed.cpu_offload",
];

/// Refuses to resume the newest checkpoint in `output` under a config other than the one it
/// was written with (`config_toml` is the new resolved config): the error lists each key that
/// differs, old → new. Changes to [`RESUMABLE_KEYS`] are allowed; a new total is announced.
/// Checkpoints written before ftx saved their config are compared with the run's `config.toml`
/// when its hash is theirs, else by hash alone.
pub fn check_config(output: &Path, config_toml: &str) -> std::io::Result<()> {
    let Some((step, path)) = list(output).pop() else { return Ok(()) };
    let refuse = |what: String| {
        std::io::Error::other(format!(
            "{} holds a checkpoint (step {step}) of a run with another configuration{what}\n\
             To resume it, put the old values back; to start a new run, train into a new folder \
             (`ftx train --out DIR`, or train.output_dir) or delete {}",
            output.display(),
            dir(output).display()
        ))
    };
    let old = match std::fs::read_to_string(path.join(CONFIG)) {
        Ok(old) => old,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A checkpoint from before ftx saved its config: its hash, and the run's config.toml
            // when that is the config the hash is of.
            let state = read_state(&path)?;
            if state.config_sha256 == crate::util::sha256_hex(config_toml.as_bytes()) {
                return Ok(());
            }
            match std::fs::read_to_string(output.join(CONFIG)) {
                Ok(old) if crate::util::sha256_hex(old.as_bytes()) == state.config_sha256 => old,
                _ => return Err(refuse(String::new())),
            }
        }
        Err(e) => return Err(e),
    };
    let (changed, allowed): (Vec<_>, Vec<_>) = config_diff(&old, config_toml)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.join(CONFIG).display())))?
        .into_iter()
        .partition(|(k, _, _)| !RESUMABLE_KEYS.contains(&k.as_str()));
    if !changed.is_empty() {
        let lines: Vec<String> = changed.iter().map(|(k, a, b)| format!("\n  {k}: {a} → {b}")).collect();
        return Err(refuse(format!(":{}", lines.concat())));
    }
    // Said once, by rank 0 of a distributed run (every rank checks).
    let rank0 = crate::dist::DistEnv::from_env().ok().flatten().is_none_or(|e| e.rank == 0);
    for (k, a, b) in allowed.iter().filter(|(k, _, _)| rank0 && (k == "train.max_steps" || k == "train.epochs")) {
        eprintln!("ftx: {k} changed since the checkpoint at step {step} ({a} → {b}): the run continues to the new total, with the learning-rate schedule planned over it");
    }
    Ok(())
}

/// The keys (`section.key`, `plugins.0.path`) whose values differ between two TOML documents,
/// with the old and new values as TOML writes them (`(absent)` for a missing key), sorted.
pub fn config_diff(old: &str, new: &str) -> Result<Vec<(String, String, String)>, toml::de::Error> {
    let (a, b) = (flatten_toml(&old.parse::<toml::Table>()?), flatten_toml(&new.parse::<toml::Table>()?));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let show = |v: Option<&toml::Value>| v.map_or_else(|| "(absent)".to_owned(), toml::Value::to_string);
    Ok(keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| (k.clone(), show(a.get(k)), show(b.get(k)))).collect())
}

/// Every leaf of a TOML table under its dotted key (`train.lr`; arrays of tables by index,
/// `plugins.0.path`; other arrays as one value), sorted.
pub fn flatten_toml(table: &toml::Table) -> std::collections::BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, toml::Value>) {
        match v {
            toml::Value::Table(t) => t.iter().for_each(|(k, v)| walk(&join(prefix, k), v, out)),
            toml::Value::Array(items) if !items.is_empty() && items.iter().all(toml::Value::is_table) => {
                items.iter().enumerate().for_each(|(i, v)| walk(&join(prefix, &i.to_string()), v, out))
            }
            v => {
                out.insert(prefix.to_owned(), v.clone());
            }
        }
    }
    fn join(prefix: &str, k: &str) -> String {
        if prefix.is_empty() { k.to_owned() } else { format!("{prefix}.{k}") }
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", &toml::Value::Table(table.clone()), &mut out);
    out
}

/// The state of the newest checkpoint, when it holds the whole run of `total` steps and the
/// run's outputs (`manifest.json`, written last) exist: the run is finished.
pub fn finished(output: &Path, total: usize) -> Option<RunState> {
    let (step, path) = list(output).pop()?;
    (step >= total && output.join("manifest.json").exists()).then(|| read_state(&path).ok()).flatten()
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
        let sizes: Vec<i64> = g.params.iter().map(|(_, shape)| shape.iter().product()).collect();
        let offsets = packed_offsets(sizes.iter().copied(), g.eight_bit);
        for part in g.parts() {
            let key = format!("g{i}.{part}");
            let blocks = per_block(part);
            let per = if blocks { g.per / BLOCK } else { g.per };
            let mut pieces = Vec::with_capacity(shards.len());
            for (r, shard) in shards.iter().enumerate() {
                let t = shard.iter().find(|(k, _)| *k == key).map(|(_, t)| t.shallow_clone()).filter(|t| t.numel() as i64 == per);
                pieces.push(t.ok_or_else(|| {
                    std::io::Error::other(format!("{}: no {key} of {per} elements; the checkpoint is damaged", path.join(shard_file(r, layout.world)).display()))
                })?);
            }
            let flat = Tensor::cat(&pieces, 0);
            for ((name, shape), (&offset, &n)) in g.params.iter().zip(offsets.iter().zip(&sizes)) {
                // A block part holds one scale per block the parameter covers (as one process keeps it).
                let (at, len) = if blocks { (offset / BLOCK, blocks_of(n)) } else { (offset, n) };
                if at + len > flat.numel() as i64 {
                    return Err(std::io::Error::other(format!("{}: group {i} is shorter than its parameters", layout_path.display())));
                }
                let piece = flat.narrow(0, at, len);
                out.push((format!("{name}.{part}"), if blocks { piece } else { piece.reshape(shape.as_slice()) }));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_diff_names_each_changed_key_with_both_values() {
        let old = "[train]\nlr = 0.0002\nsave_every = 4\n[[plugins]]\npath = \"a.wasm\"\n";
        let new = "[train]\nlr = 0.001\n[method]\nrank = 8\n[[plugins]]\npath = \"b.wasm\"\n";
        let d = config_diff(old, new).unwrap();
        assert_eq!(
            d,
            vec![
                ("method.rank".into(), "(absent)".into(), "8".into()),
                ("plugins.0.path".into(), "\"a.wasm\"".into(), "\"b.wasm\"".into()),
                ("train.lr".into(), "0.0002".into(), "0.001".into()),
                ("train.save_every".into(), "4".into(), "(absent)".into()),
            ]
        );
    }
}
