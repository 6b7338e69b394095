//! Distributed data parallel (`[distributed] strategy = "ddp"`): every rank holds the whole
//! model and its optimizer, trains on its slice of each global micro-batch, and the ranks sum
//! their gradients before the identical optimizer steps.
//!
//! `train.batch_size` is per rank, as in torch: the driver plans the run with the global batch
//! (`batch_size × world size`, the same seeded order a single process with that batch would
//! follow) and each rank takes its contiguous share of every global micro-batch (examples, or
//! packed rows). Every rank normalises its loss by the target tokens of the whole global step,
//! so the summed gradients are exactly the single-process run's gradient (the mean over all
//! target tokens), and so are the loss, the clipping norm and the step. The resolved config in
//! the output records the global batch, so a run resumes on another number of ranks as long as
//! the global batch stays the same.

use super::optim::AdamW;
use super::TrainConfig;
use crate::data::{batch, TokenizedExample};
use crate::dist::{Backend, DistEnv, DistError, ProcessGroup, ReduceOp, Reducer};
use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// This process's part in a data-parallel run.
pub struct Ddp {
    /// The process group of all ranks.
    pub group: ProcessGroup,
    /// Where this process sits (torchrun's variables).
    pub env: DistEnv,
    /// The device this rank computes on (its local GPU, or the CPU).
    pub device: Device,
    /// `strategy = "fsdp"`: the model and optimizer state are sharded (`super::fsdp`).
    pub sharded: bool,
    /// `cpu_offload = true`: FSDP keeps the optimizer state in host memory.
    pub cpu_offload: bool,
    bucket_bytes: usize,
    /// The gradient reducer over the trainable tensors it was made for (by name; HFT changes
    /// them every round).
    reducer: RefCell<Option<Overlap>>,
    /// Buckets the backward passes launched before their end, and buckets in all: the overlap.
    overlapped: Cell<(usize, usize)>,
}

impl Ddp {
    /// Joins the run when torchrun's variables say this process is one of several ranks
    /// (`None` otherwise: a single-process run). `device` is the configured device; a CUDA
    /// device becomes the rank's own GPU (`cuda:LOCAL_RANK`).
    pub fn join(cfg: &TrainConfig, device: Device) -> Result<Option<Ddp>, DistError> {
        let Some(env) = DistEnv::from_env()? else { return Ok(None) };
        let section = cfg.distributed.clone().unwrap_or_default();
        section.validate().map_err(DistError::Config)?;
        let device = match device {
            Device::Cuda(_) => Device::Cuda(env.local_rank),
            d => d,
        };
        let backend = section.backend_for(device);
        if (backend == Backend::Nccl) != device.is_cuda() {
            return Err(DistError::Config(format!(
                "distributed.backend = \"{}\" cannot carry tensors on {device:?}: NCCL is for CUDA devices, Gloo for the CPU (\"auto\" picks)",
                backend.name()
            )));
        }
        let timeout = Duration::from_secs(section.timeout_s);
        let group = ProcessGroup::init(&env, backend, timeout)?;
        tracing::info!(rank = env.rank, world = env.world_size, backend = backend.name(), device = ?device, "joined the process group");
        let bucket_bytes = (section.bucket_mib * 1024.0 * 1024.0) as usize;
        Ok(Some(Ddp {
            group,
            env,
            device,
            sharded: section.strategy == "fsdp",
            cpu_offload: section.cpu_offload,
            bucket_bytes: bucket_bytes.max(1),
            reducer: RefCell::new(None),
            overlapped: Cell::new((0, 0)),
        }))
    }

    /// True on rank 0, which logs, shows progress and writes checkpoints and outputs.
    pub fn is_main(&self) -> bool {
        self.env.rank == 0
    }

    /// The configuration the run is planned with: the global batch (`batch_size × world`).
    pub fn global_config(&self, cfg: &TrainConfig) -> TrainConfig {
        let mut global = cfg.clone();
        global.train.batch_size *= self.env.world_size;
        global
    }

    /// Rank `rank`'s share of a global micro-batch (example indices, in order): a contiguous
    /// run of its examples, of its packed rows when `packing` gives the row length, or of its
    /// pairs when `paired` (a pair's two rows stay on one rank).
    pub fn share_of(&self, rank: usize, global: &[usize], data: &[TokenizedExample], packing: Option<usize>, paired: bool) -> Vec<usize> {
        match packing {
            None if paired => {
                let pairs = rank_range(global.len() / 2, rank, self.env.world_size);
                global[2 * pairs.start..2 * pairs.end].to_vec()
            }
            Some(seq_len) => {
                // Greedy packing in order is repeatable: the rows of a run of rows repack the same.
                let rows = batch::pack_rows(global.iter().map(|&i| data[i].ids.len()), seq_len);
                rows[rank_range(rows.len(), rank, self.env.world_size)].iter().flatten().map(|&k| global[k]).collect()
            }
            None => global[rank_range(global.len(), rank, self.env.world_size)].to_vec(),
        }
    }

    /// This rank's share (see [`Ddp::share_of`]).
    pub fn share(&self, global: &[usize], data: &[TokenizedExample], packing: Option<usize>, paired: bool) -> Vec<usize> {
        self.share_of(self.env.rank, global, data, packing, paired)
    }

    /// True when some rank gets no example in any of these global micro-batches.
    pub fn some_rank_idle(&self, globals: &[&[usize]], data: &[TokenizedExample], packing: Option<usize>, paired: bool) -> bool {
        (0..self.env.world_size).any(|r| globals.iter().all(|g| self.share_of(r, g, data, packing, paired).is_empty()))
    }

    /// Every rank's `local` columns (`[c, k_rank]`, any k, 0 included), joined in rank order
    /// (`[c, Σ k]`, on the CPU or this rank's device), and where this rank's start. Every
    /// rank calls it alike.
    pub fn gather_columns(&self, local: &Tensor) -> Result<(Tensor, i64), DistError> {
        let _g = tch::no_grad_guard();
        let (c, k) = (local.size()[0], local.size()[1]);
        let mut counts = vec![0.0; self.env.world_size];
        counts[self.env.rank] = k as f64;
        let counts: Vec<i64> = self.sum(&counts)?.into_iter().map(|v| v as i64).collect();
        let most = counts.iter().copied().max().unwrap_or(0);
        let dev = self.comm_device();
        let padded = Tensor::zeros([c, most], (Kind::Float, dev));
        if k > 0 {
            padded.narrow(1, 0, k).copy_(&local.to_kind(Kind::Float).to_device(dev));
        }
        let all = Tensor::empty([self.env.world_size as i64 * c * most], (Kind::Float, dev));
        self.group.all_gather(&all, &padded.reshape([-1]))?;
        let all = all.view([self.env.world_size as i64, c, most]);
        let parts: Vec<Tensor> = counts.iter().enumerate().map(|(r, &n)| all.get(r as i64).narrow(1, 0, n)).collect();
        Ok((Tensor::cat(&parts, 1), counts[..self.env.rank].iter().sum()))
    }

    /// Sums small numbers across ranks (loss sums, token counts), in f64.
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>, DistError> {
        let t = Tensor::from_slice(values).to_kind(Kind::Double).to_device(self.comm_device());
        self.group.all_reduce(&[&t], ReduceOp::Sum)?;
        Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu)).expect("f64 tensor"))
    }

    fn comm_device(&self) -> Device {
        match self.group.backend {
            Backend::Nccl => self.device,
            Backend::Gloo => Device::Cpu,
        }
    }

    /// Makes the next backward pass (a step's last micro-batch) all-reduce the trainable
    /// gradients bucket by bucket as soon as it has written each bucket, overlapped with the
    /// rest of the backward; [`Ddp::reduce_gradients`] then waits for them. Every rank arms
    /// before the same micro-batch, or not at all when it has no data there (its buckets then
    /// all go at the end, in the same order).
    pub fn arm_overlap(&self, opt: &AdamW) -> Result<(), DistError> {
        if let Some(o) = self.reducer_for(opt)?.as_ref() {
            o.reducer.arm(&self.group)?;
        }
        Ok(())
    }

    /// The reducer over `opt`'s active tensors, made (again) when they changed. Buckets of
    /// about `bucket_mib` take the tensors in reverse order (the order the backward pass writes
    /// their gradients); the root's (embeddings, final norm, head: their gradients may be
    /// written twice in a backward, as tied embeddings are) are reduced after it.
    fn reducer_for(&self, opt: &AdamW) -> Result<std::cell::RefMut<'_, Option<Overlap>>, DistError> {
        let active: Vec<&super::optim::Param> = opt.params.iter().filter(|p| p.active).collect();
        let names: Vec<String> = active.iter().map(|p| p.name.clone()).collect();
        let mut slot = self.reducer.borrow_mut();
        if slot.as_ref().is_some_and(|o| o.names == names) || (active.is_empty() && slot.is_none()) {
            return Ok(slot);
        }
        *slot = None; // the old hooks go before new ones are set
        if active.is_empty() {
            return Ok(slot);
        }
        let (late, early): (Vec<&super::optim::Param>, Vec<&super::optim::Param>) = active.iter().rev().partition(|p| unit_of(&p.name) == 0);
        let (mut tensors, mut bucket, mut flags) = (Vec::new(), Vec::new(), Vec::new());
        let mut current: Option<(Kind, Device, usize, bool)> = None; // dtype, device, bytes, late
        let mut index = -1i64;
        for (p, is_late) in early.iter().map(|p| (p, false)).chain(late.iter().map(|p| (p, true))) {
            let t = &p.tensor;
            let size = t.numel() * t.kind().elt_size_in_bytes();
            let fits = current.is_some_and(|(k, d, bytes, l)| k == t.kind() && d == t.device() && l == is_late && bytes + size <= self.bucket_bytes);
            if fits {
                current.as_mut().expect("fits").2 += size;
            } else {
                index += 1;
                current = Some((t.kind(), t.device(), size, is_late));
            }
            tensors.push(t.shallow_clone());
            bucket.push(index);
            flags.push(is_late);
        }
        let reducer = self.group.reducer(&tensors, &bucket, &flags)?;
        *slot = Some(Overlap { names, reducer, buckets: (index + 1) as usize });
        Ok(slot)
    }

    /// Sums the trainable gradients across ranks, in place: waits for the buckets the backward
    /// pass launched (see [`Ddp::arm_overlap`]) and launches the rest, in bucket order. Every
    /// rank must have the same trainable tensors with gradients; `fill_missing` first gives a
    /// zero gradient to those that have none (for a step where some rank had no data).
    pub fn reduce_gradients(&self, opt: &AdamW, fill_missing: bool) -> Result<(), DistError> {
        if fill_missing {
            let active: Vec<&Tensor> = opt.params.iter().filter(|p| p.active).map(|p| &p.tensor).collect();
            let missing: Vec<Tensor> = active.iter().filter(|t| !t.grad().defined()).map(|t| (*t * 0.0).sum(Kind::Float)).collect();
            if !missing.is_empty() {
                Tensor::stack(&missing, 0).sum(Kind::Float).backward();
            }
        }
        let slot = self.reducer_for(opt)?;
        let Some(o) = slot.as_ref() else { return Ok(()) };
        let early = o.reducer.finish(&self.group)?;
        let (e, n) = self.overlapped.get();
        self.overlapped.set((e + early, n + o.buckets));
        Ok(())
    }

    /// Buckets all-reduced while a backward pass was still running, and buckets in all, over
    /// the run so far.
    pub fn overlap(&self) -> (usize, usize) {
        self.overlapped.get()
    }

    /// Ends a step's backward passes: sums the gradients across ranks (see
    /// [`Ddp::reduce_gradients`]) and this rank's part of the loss and its tokens, returning
    /// the step's loss and tokens.
    pub fn finish_step(&self, opt: &AdamW, some_rank_idle: bool, loss: f64, tokens: i64) -> Result<(f64, i64), DistError> {
        self.reduce_gradients(opt, some_rank_idle)?;
        let sums = self.sum(&[loss, tokens as f64])?;
        Ok((sums[0], sums[1] as i64))
    }

    /// Makes every rank start where rank 0 starts: its step, token count and optimizer state
    /// (weights, fp32 masters and moments), broadcast from rank 0. Only rank 0 needs to have
    /// read the checkpoint, so nodes need not share a filesystem.
    pub fn sync_from_main(&self, opt: &mut AdamW, step: usize, tokens: i64) -> Result<(usize, i64), DistError> {
        let _g = tch::no_grad_guard();
        let pos = Tensor::from_slice(&[step as i64, tokens]).to_device(self.comm_device());
        self.group.broadcast(&pos, 0)?;
        let pos = Vec::<i64>::try_from(pos.to_device(Device::Cpu)).expect("i64 tensor");
        let state = opt.state();
        for (_, t) in &state {
            // The optimizer's own buffers: the broadcast writes into them.
            self.group.broadcast(&t.detach(), 0)?;
        }
        if !self.is_main() {
            opt.load_state(&state, pos[0]).map_err(DistError::Config)?;
        }
        Ok((pos[0] as usize, pos[1]))
    }
}

/// The reducer over the trainable tensors `names`, in `buckets` buckets.
struct Overlap {
    names: Vec<String>,
    reducer: Reducer,
    buckets: usize,
}

/// The unit a tensor belongs to, by name: `l + 1` for decoder layer `l` (a `layers.{l}`
/// component, as in `model.layers.3.mlp.up_proj.weight` or its PEFT adapter's name), 0 for
/// the root (embeddings, final norm, head).
pub fn unit_of(name: &str) -> usize {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find(|w| w[0] == "layers").and_then(|w| w[1].parse::<usize>().ok()).map_or(0, |l| l + 1)
}

/// Rank `rank`'s contiguous part of `n` units split over `world` ranks: `⌈n / world⌉` each,
/// the last ones shorter (or empty) when `n` does not divide.
pub fn rank_range(n: usize, rank: usize, world: usize) -> Range<usize> {
    let per = n.div_ceil(world.max(1));
    (rank * per).min(n)..((rank + 1) * per).min(n)
}

#[cfg(test)]
mod tests {
    use super::rank_range;

    #[test]
    fn ranks_split_a_batch_into_contiguous_shares() {
        assert_eq!((0..3).map(|r| rank_range(6, r, 3)).collect::<Vec<_>>(), vec![0..2, 2..4, 4..6]);
        // A short last batch: earlier ranks full, the last short, none overlapping.
        assert_eq!((0..3).map(|r| rank_range(4, r, 3)).collect::<Vec<_>>(), vec![0..2, 2..4, 4..4]);
        assert_eq!((0..2).map(|r| rank_range(1, r, 2)).collect::<Vec<_>>(), vec![0..1, 1..1]);
    }
}
