//! FSDP's checkpoints: every rank writes its optimizer slices, rank 0 the layout
//! ([`ShardLayout`]); a run reads the whole state back by parameter name (from however many
//! ranks wrote it, or from one process) and keeps its slices.

use super::super::adamw8bit::{blocks_of, Moments8bit, BLOCK};
use super::super::checkpoint::{self, per_block, RunState, ShardGroup, ShardLayout, SHARD_PARTS, SHARD_PARTS_8BIT};
use super::super::ddp::Ddp;
use super::Fsdp;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

impl Fsdp {
    /// This rank's optimizer slices as a checkpoint stores them (see [`ShardLayout`]).
    fn slice_state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, g) in self.groups.iter().filter(|g| g.spec.trainable).enumerate() {
            let s = g.state.as_ref().expect("trainable");
            match &s.moments_8bit {
                Some(m) => out.extend(m.state().into_iter().map(|(k, t)| (format!("g{i}.{k}"), t))),
                None => {
                    out.push((format!("g{i}.exp_avg"), s.exp_avg.shallow_clone()));
                    out.push((format!("g{i}.exp_avg_sq"), s.exp_avg_sq.shallow_clone()));
                }
            }
            out.push((format!("g{i}.master"), s.master.as_ref().map_or_else(|| g.slice.to_kind(Kind::Float), Tensor::shallow_clone)));
        }
        out
    }

    /// How the slices make the whole optimizer state.
    pub fn layout(&self) -> ShardLayout {
        let groups = self
            .groups
            .iter()
            .filter(|g| g.spec.trainable)
            .map(|g| ShardGroup { per: g.per, params: g.spec.names.iter().cloned().zip(g.shapes.iter().cloned()).collect(), eight_bit: g.spec.eight_bit })
            .collect();
        ShardLayout { world: self.world, groups }
    }

    /// Restores this rank's slices from a whole optimizer state by parameter name (as
    /// [`checkpoint::latest`] returns it, whichever number of ranks wrote it), at `step`.
    pub fn load_state(&mut self, saved: &[(String, Tensor)], step: i64) -> Result<(), String> {
        let _g = tch::no_grad_guard();
        let by_name: BTreeMap<&str, &Tensor> = saved.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let (rank, world) = (self.rank as i64, self.world as i64);
        for g in &mut self.groups {
            let Some(s) = g.state.as_mut() else { continue };
            let full = g.per * world;
            // The 8-bit parts' padding holds the zero moment (its code, scale 1), as a fresh
            // optimizer's does: the whole group's zero state is the canvas the parts go onto.
            let fresh = g.spec.eight_bit.then(|| Moments8bit::new(&[full], Device::Cpu));
            let parts: &[&str] = if g.spec.eight_bit { &SHARD_PARTS_8BIT } else { &SHARD_PARTS };
            for &part in parts {
                let blocks = per_block(part);
                let flat = match fresh.as_ref().and_then(|m| m.state().into_iter().find(|(k, _)| *k == part)) {
                    Some((_, t)) => t,
                    None => Tensor::zeros([full], (Kind::Float, Device::Cpu)),
                };
                for ((name, shape), &offset) in g.spec.names.iter().zip(&g.shapes).zip(&g.offsets) {
                    let key = format!("{name}.{part}");
                    let t = by_name.get(key.as_str()).ok_or_else(|| format!("checkpoint lacks {key}"))?;
                    let n: i64 = shape.iter().product();
                    let (at, want) = if blocks { (offset / BLOCK, vec![blocks_of(n)]) } else { (offset, shape.clone()) };
                    if t.size() != want {
                        return Err(format!("checkpoint's {key} has shape {:?}, the model's {want:?}", t.size()));
                    }
                    let len = want.iter().product();
                    flat.narrow(0, at, len).copy_(&t.reshape([-1]).to_kind(flat.kind()));
                }
                let per = if blocks { g.per / BLOCK } else { g.per };
                let slice = flat.narrow(0, rank * per, per);
                let mut target = match part {
                    "exp_avg" => s.exp_avg.shallow_clone(),
                    "exp_avg_sq" => s.exp_avg_sq.shallow_clone(),
                    "master" => {
                        g.slice.copy_(&slice);
                        match &s.master {
                            Some(m) => m.shallow_clone(),
                            None => continue,
                        }
                    }
                    _ => {
                        let m = s.moments_8bit.as_ref().expect("8-bit parts belong to 8-bit groups");
                        m.state().into_iter().find(|(k, _)| *k == part).expect("a part of the 8-bit state").1
                    }
                };
                target.copy_(&slice);
            }
        }
        self.step = step;
        Ok(())
    }

    /// Saves a checkpoint: every rank writes its optimizer slices into one temporary folder,
    /// then rank 0 the layout and what `extra` writes (the PEFT adapter, with the trainable
    /// tensors gathered when `extra_needs_weights`) and publishes it. Every rank calls it.
    pub fn save_checkpoint(
        &self,
        d: &Ddp,
        output: &Path,
        state: &RunState,
        config_toml: &str,
        keep: usize,
        extra_needs_weights: bool,
        extra: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> anyhow::Result<PathBuf> {
        use anyhow::Context;
        let tmp = checkpoint::sharded_tmp_dir(output, state.step);
        if d.is_main() {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
            }
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        }
        d.group.barrier()?;
        let file = tmp.join(checkpoint::shard_file(self.rank, self.world));
        crate::model::weights::write_safetensors(&file, &self.slice_state()).with_context(|| format!("rank {}: writing {}", self.rank, file.display()))?;
        if extra_needs_weights {
            self.gather_trainable(d)?;
        }
        d.group.barrier()?; // every shard is written
        let published = if d.is_main() {
            let layout = serde_json::to_string_pretty(&self.layout())?;
            crate::util::write_atomic(&tmp.join(checkpoint::SHARD_LAYOUT), layout.as_bytes())?;
            Some(checkpoint::publish(output, &tmp, state, config_toml, keep, extra).with_context(|| format!("publishing {}", tmp.display())))
        } else {
            None
        };
        if extra_needs_weights {
            self.free(|g| g.trainable);
        }
        let path = published.transpose()?.unwrap_or_else(|| checkpoint::step_dir(output, state.step));
        d.group.barrier()?; // the checkpoint is published before any rank goes on
        Ok(path)
    }
}
