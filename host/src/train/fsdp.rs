//! Fully sharded data parallel (`[distributed] strategy = "fsdp"`, ZeRO-3 style): the data
//! order and the per-rank shares of every global batch are DDP's ([`super::ddp`]); what
//! changes is where the state lives.
//!
//! The model's tensors are split into flat groups — per unit (the root: embeddings, final
//! norm and head; then each decoder layer), trainable or frozen, per dtype — and each group
//! into `world` equal slices (the last padded with zeros). Between steps a rank holds only
//! its slice of every group: the frozen base, the trainable weights, their gradients and the
//! optimizer state (fp32 master, both moments). For a step the groups are all-gathered into
//! the model's own tensors (which then point into the gathered buffers), the micro-batches run
//! as in one process, the gradients are reduce-scattered onto the slices and the full
//! tensors are freed again; AdamW then updates each rank's slice alone.
//!
//! With gradient checkpointing the model is gathered one decoder layer at a time, and the next
//! layer's all-gather is started (asynchronously, [`crate::dist::Work`]) before the current
//! layer computes, so the transfer overlaps the compute (FSDP's forward and backward prefetch).
//! With `[distributed] cpu_offload = true` the optimizer state (fp32 master and both moments)
//! lives in host memory (pinned on a CUDA machine) and AdamW updates it there; only the value
//! slice and the gradient slice stay on the device.
//!
//! Checkpoints: every rank writes its slice of the optimizer state into the checkpoint folder
//! and rank 0 the layout ([`checkpoint::ShardLayout`]) and the PEFT adapter; reading joins the
//! slices by parameter name, so a run resumes on any number of ranks (or in one process).

use super::checkpoint::{self, RunState, ShardGroup, ShardLayout, SHARD_PARTS};
use super::ddp::{unit_of, Ddp};
use super::head_loss::head_ce;
use super::optim::{flat_update, AdamWConfig};
use super::step::{layer_forward, seed_layer, StepPos, MLP_TILE};
use crate::data::Batch;
use crate::dist::{DistError, Work};
use crate::model::CausalLm;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// One flat group before sharding: tensors of one unit, one dtype, all trainable or all frozen.
pub struct GroupSpec {
    /// 0 for the root, `l + 1` for decoder layer `l`.
    pub unit: usize,
    /// Whether the optimizer updates these tensors.
    pub trainable: bool,
    /// Their dtype.
    pub kind: Kind,
    /// Names, in flat order.
    pub names: Vec<String>,
    /// The model's own tensors (handles sharing their storage), in flat order.
    pub tensors: Vec<Tensor>,
}

impl GroupSpec {
    /// Elements in the group.
    pub fn numel(&self) -> i64 {
        self.tensors.iter().map(|t| t.numel() as i64).sum()
    }

    /// Elements of each rank's slice among `world` ranks.
    pub fn per(&self, world: usize) -> i64 {
        let w = world.max(1) as i64;
        (self.numel() + w - 1) / w
    }
}

/// Splits the model's dense tensors and the trainable ones into flat groups (see [`GroupSpec`]).
/// Within a group tensors keep the model's order with the biases moved last, so q/k/v (and
/// gate/up) weights, side by side for the fused projections, stay side by side once gathered. NF4 weights are not dense
/// tensors of the model ([`CausalLm::named_tensors`]) and stay whole on every rank.
pub fn group_specs(model: &CausalLm, trainable: Vec<(String, Tensor)>) -> Vec<GroupSpec> {
    let train_names: HashSet<String> = trainable.iter().map(|(n, _)| n.clone()).collect();
    let frozen = model.named_tensors().into_iter().filter(|(n, _)| !train_names.contains(n)).map(|(n, t)| (n, t, false));
    let mut groups: BTreeMap<(usize, bool, String), Vec<(String, Tensor)>> = BTreeMap::new();
    for (name, t, is_trainable) in trainable.into_iter().map(|(n, t)| (n, t, true)).chain(frozen) {
        groups.entry((unit_of(&name), is_trainable, format!("{:?}", t.kind()))).or_default().push((name, t));
    }
    groups
        .into_iter()
        .map(|((unit, trainable, _), mut members)| {
            // Name order, biases last: the same on every rank (memory addresses are not).
            members.sort_by_key(|(n, _)| n.ends_with(".bias"));
            let kind = members[0].1.kind();
            let (names, tensors) = members.into_iter().unzip();
            GroupSpec { unit, trainable, kind, names, tensors }
        })
        .collect()
}

/// Bytes one of `world` ranks holds between steps: its slice of every group's values, and
/// for trainable groups the gradient slice (in the group's dtype) and the optimizer state
/// (fp32 moments, and an fp32 master when the dtype is not fp32). This is what `ftx plan`'s
/// multi-GPU rows count as the sharded state.
pub fn per_rank_state_bytes(specs: &[GroupSpec], world: usize) -> u64 {
    specs.iter().map(|g| slice_bytes(g.kind, g.trainable, g.per(world))).sum()
}

/// Bytes of a slice of `per` elements of `kind` (see [`per_rank_state_bytes`]).
fn slice_bytes(kind: Kind, trainable: bool, per: i64) -> u64 {
    let e = kind.elt_size_in_bytes() as u64;
    let per_element = if trainable { e + e + 8 + if kind == Kind::Float { 0 } else { 4 } } else { e };
    per as u64 * per_element
}

/// A trainable slice's optimizer state.
struct SliceState {
    /// fp32 master when the group's dtype is not fp32 or the state is offloaded (else the
    /// slice is its own master).
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The slice's gradient, summed over the ranks, in the group's dtype.
    grad: Tensor,
}

/// A flat group with this rank's slice.
struct Group {
    spec: GroupSpec,
    shapes: Vec<Vec<i64>>,
    per: i64,
    /// This rank's slice of the values, in the group's dtype.
    slice: Tensor,
    state: Option<SliceState>,
    /// The element ranges `(offset, len)` of the slice AdamW updates this step: `None` for
    /// the whole slice; set per HFT round by [`Fsdp::set_active`] to the slice's parts of the
    /// active tensors (frozen ones keep their values and moments, as in one process).
    active: Option<Vec<(i64, i64)>>,
}

/// A unit's all-gathers, started and not yet placed in the model (see [`Fsdp::prefetch`]).
struct Gathering {
    /// Group index and the buffer its gather fills.
    fulls: Vec<(usize, Tensor)>,
    works: Vec<Work>,
}

/// This rank's part of a fully sharded run: its slices, and AdamW over them.
pub struct Fsdp {
    groups: Vec<Group>,
    /// Gradient checkpointing on: one layer gathered at a time ([`Fsdp::forward_backward`]);
    /// off: the whole model gathered for a step's micro-batches.
    per_layer: bool,
    cfg: AdamWConfig,
    /// The optimizer state lives in host memory (`[distributed] cpu_offload`).
    offload: bool,
    /// Optimizer steps taken.
    step: i64,
    rank: usize,
    world: usize,
}

/// `flat`'s `rank`-th slice of `per` elements, zero-padded past its end, as a new tensor.
fn padded_slice(flat: &Tensor, per: i64, rank: usize) -> Tensor {
    let out = Tensor::zeros([per], (flat.kind(), flat.device()));
    let (start, n) = (rank as i64 * per, flat.numel() as i64);
    if start < n {
        let k = per.min(n - start);
        out.narrow(0, 0, k).copy_(&flat.narrow(0, start, k));
    }
    out
}

impl Fsdp {
    /// Shards the model across the ranks of `d`: every rank keeps its slice of each group and
    /// the model's tensors are freed (gathered again by [`Fsdp::begin_step`]). `trainable` are
    /// the tensors the optimizer updates (they must require grad); the rest of the model's
    /// dense tensors are the frozen base.
    pub fn new(model: &CausalLm, trainable: Vec<(String, Tensor)>, d: &Ddp, cfg: AdamWConfig, per_layer: bool) -> Result<Fsdp, DistError> {
        let offload = d.cpu_offload;
        // Offloaded state in page-locked memory on a CUDA machine: its copies to and from the
        // device then run at full speed.
        let host = |t: Tensor| if t.device().is_cuda() { t.to_device(tch::Device::Cpu).pin_memory(t.device()) } else { t };
        let _g = tch::no_grad_guard();
        let (rank, world) = (d.env.rank, d.env.world_size);
        let specs = group_specs(model, trainable);
        let mut groups = Vec::with_capacity(specs.len());
        for spec in specs {
            let per = spec.per(world);
            let flat = Tensor::cat(&spec.tensors.iter().map(|t| t.detach().reshape([-1])).collect::<Vec<_>>(), 0);
            let slice = padded_slice(&flat, per, rank);
            drop(flat);
            let state = spec.trainable.then(|| {
                let zeros = || Tensor::zeros([per], (Kind::Float, slice.device()));
                let place = |t: Tensor| if offload { host(t) } else { t };
                SliceState {
                    master: (spec.kind != Kind::Float || offload).then(|| place(slice.to_kind(Kind::Float))),
                    exp_avg: place(zeros()),
                    exp_avg_sq: place(zeros()),
                    grad: Tensor::zeros([per], (spec.kind, slice.device())),
                }
            });
            let shapes = spec.tensors.iter().map(Tensor::size).collect();
            groups.push(Group { spec, shapes, per, slice, state, active: None });
        }
        let f = Fsdp { groups, per_layer, cfg, offload, step: 0, rank, world };
        f.free(|_| true);
        let held: u64 = f.groups.iter().map(|g| slice_bytes(g.spec.kind, g.spec.trainable, g.per)).sum();
        tracing::info!(rank, groups = f.groups.len(), held_mib = held as f64 / (1 << 20) as f64, "sharded the model");
        Ok(f)
    }

    /// Fills the model's tensors of the groups `which` selects from every rank's slice.
    fn gather(&self, d: &Ddp, which: impl Fn(&GroupSpec) -> bool) -> Result<(), DistError> {
        let pending = self.start_gather(d, which)?;
        self.finish_gather(d, pending)
    }

    /// Starts the all-gathers of the groups `which` selects, without waiting for them.
    fn start_gather(&self, d: &Ddp, which: impl Fn(&GroupSpec) -> bool) -> Result<Gathering, DistError> {
        let mut pending = Gathering { fulls: Vec::new(), works: Vec::new() };
        for (i, g) in self.groups.iter().enumerate().filter(|(_, g)| which(&g.spec)) {
            let full = Tensor::empty([g.per * self.world as i64], (g.spec.kind, g.slice.device()));
            pending.works.push(d.group.all_gather_start(&full, &g.slice)?);
            pending.fulls.push((i, full));
        }
        Ok(pending)
    }

    /// Waits for started all-gathers and points the model's tensors into the gathered buffers.
    fn finish_gather(&self, d: &Ddp, pending: Gathering) -> Result<(), DistError> {
        let _g = tch::no_grad_guard();
        for w in pending.works {
            d.group.wait(w)?;
        }
        for (i, full) in pending.fulls {
            let g = &self.groups[i];
            let mut offset = 0;
            for (t, shape) in g.spec.tensors.iter().zip(&g.shapes) {
                let n: i64 = shape.iter().product();
                t.shallow_clone().set_data(&full.narrow(0, offset, n).view(shape.as_slice()));
                offset += n;
            }
        }
        Ok(())
    }

    /// Starts gathering decoder layer `unit - 1` (its unit) when there is such a layer among
    /// `layers`: the prefetch of the layer after (or, backwards, before) the current one.
    fn prefetch(&self, d: &Ddp, unit: usize, layers: usize) -> Result<Option<Gathering>, DistError> {
        if unit == 0 || unit > layers {
            return Ok(None);
        }
        self.start_gather(d, |g| g.unit == unit).map(Some)
    }

    /// Waits for a prefetched unit (started by [`Fsdp::prefetch`]).
    fn arrive(&self, d: &Ddp, pending: Option<Gathering>) -> Result<(), DistError> {
        self.finish_gather(d, pending.expect("every layer's gather is started one layer ahead"))
    }

    /// Frees the model's tensors of the groups `which` selects (they become empty).
    fn free(&self, which: impl Fn(&GroupSpec) -> bool) {
        for g in self.groups.iter().filter(|g| which(&g.spec)) {
            for t in &g.spec.tensors {
                t.shallow_clone().set_data(&Tensor::empty([0], (g.spec.kind, g.slice.device())));
            }
        }
    }

    /// Makes the whole model usable (for evaluation): every group gathered. Every rank calls it.
    pub fn gather_all(&self, d: &Ddp) -> Result<(), DistError> {
        self.gather(d, |_| true)
    }

    /// Makes the trainable tensors usable (to write an adapter or fully fine-tuned weights).
    pub fn gather_trainable(&self, d: &Ddp) -> Result<(), DistError> {
        self.gather(d, |g| g.trainable)
    }

    /// Frees what [`Fsdp::gather_all`] or [`Fsdp::gather_trainable`] gathered.
    pub fn free_all(&self) {
        self.free(|_| true);
    }

    /// True when the micro-batches run through [`Fsdp::forward_backward`], one layer gathered
    /// at a time (gradient checkpointing on).
    pub fn per_layer(&self) -> bool {
        self.per_layer
    }

    /// Before a step's micro-batches (whole-model mode): gathers the model and gives every
    /// trainable tensor that had a gradient a zeroed one of its size again. Nothing per layer.
    pub fn begin_step(&self, d: &Ddp) -> Result<(), DistError> {
        if self.per_layer {
            return Ok(());
        }
        self.gather_all(d)?;
        (0..self.units()).for_each(|u| self.restore_grads(u));
        Ok(())
    }

    /// After a step's micro-batches (whole-model mode): reduce-scatters the trainable
    /// gradients onto the slices, then frees the full gradients and the gathered model.
    pub fn end_step(&mut self, d: &Ddp) -> Result<(), DistError> {
        if self.per_layer {
            return Ok(());
        }
        for unit in 0..self.units() {
            let grads = self.current_grads(unit);
            self.reduce_unit(d, unit, &grads)?;
            self.release_grads(unit);
        }
        self.free_all();
        Ok(())
    }

    fn units(&self) -> usize {
        self.groups.iter().map(|g| g.spec.unit + 1).max().unwrap_or(0)
    }

    fn gather_unit(&self, d: &Ddp, unit: usize) -> Result<(), DistError> {
        self.gather(d, |g| g.unit == unit)
    }

    fn free_unit(&self, unit: usize) {
        self.free(|g| g.unit == unit)
    }

    /// The trainable groups of `unit`, in order.
    fn trainable_of(&self, unit: usize) -> impl Iterator<Item = &Group> {
        self.groups.iter().filter(move |g| g.spec.unit == unit && g.spec.trainable)
    }

    /// The model's trainable tensors of `unit`, in the order [`Fsdp::reduce_unit`] takes gradients.
    fn trainable_tensors(&self, unit: usize) -> Vec<Tensor> {
        self.trainable_of(unit).flat_map(|g| g.spec.tensors.iter().map(Tensor::shallow_clone)).collect()
    }

    /// The gradients autograd accumulated into `unit`'s trainable tensors (undefined where none).
    fn current_grads(&self, unit: usize) -> Vec<Tensor> {
        self.trainable_of(unit).flat_map(|g| g.spec.tensors.iter().map(Tensor::grad)).collect()
    }

    /// Gives `unit`'s trainable tensors that had a gradient a zeroed one of their size again
    /// (after [`Fsdp::release_grads`]; autograd accumulates into it in place).
    fn restore_grads(&self, unit: usize) {
        for g in self.trainable_of(unit) {
            for (t, shape) in g.spec.tensors.iter().zip(&g.shapes) {
                let grad = t.grad();
                if grad.defined() {
                    grad.shallow_clone().set_data(&Tensor::zeros(shape.as_slice(), (g.spec.kind, g.slice.device())));
                }
            }
        }
    }

    /// Frees the full gradients of `unit`'s trainable tensors (their slices hold the sum).
    fn release_grads(&self, unit: usize) {
        for g in self.trainable_of(unit) {
            for t in &g.spec.tensors {
                let grad = t.grad();
                if grad.defined() {
                    grad.shallow_clone().set_data(&Tensor::empty([0], (g.spec.kind, g.slice.device())));
                }
            }
        }
    }

    /// Adds the ranks' summed `grads` of `unit`'s trainable tensors (in
    /// [`Fsdp::trainable_tensors`] order; undefined or missing ones count as zero) onto this
    /// rank's gradient slices, one reduce-scatter per group. Every rank calls it alike.
    fn reduce_unit(&mut self, d: &Ddp, unit: usize, grads: &[Tensor]) -> Result<(), DistError> {
        let _g = tch::no_grad_guard();
        let world = self.world as i64;
        let mut next = grads.iter();
        for g in self.groups.iter_mut().filter(|g| g.spec.unit == unit && g.spec.trainable) {
            let (kind, device) = (g.spec.kind, g.slice.device());
            let mut parts: Vec<Tensor> = g
                .shapes
                .iter()
                .map(|shape| {
                    let n: i64 = shape.iter().product();
                    match next.next() {
                        Some(grad) if grad.defined() && grad.numel() as i64 == n => grad.to_kind(kind).reshape([-1]),
                        _ => Tensor::zeros([n], (kind, device)),
                    }
                })
                .collect();
            let pad = g.per * world - g.spec.numel();
            if pad > 0 {
                parts.push(Tensor::zeros([pad], (kind, device)));
            }
            let flat = Tensor::cat(&parts, 0);
            drop(parts);
            let mine = Tensor::empty([g.per], (kind, device));
            d.group.reduce_scatter(&mine, &flat)?;
            let state = g.state.as_mut().expect("trainable groups have optimizer state");
            let _ = state.grad.g_add_(&mine);
        }
        Ok(())
    }

    /// One micro-batch's forward and backward with gradient checkpointing, one decoder layer
    /// gathered at a time: the forward pass gathers, runs and frees each layer keeping only
    /// its input; the backward pass gathers each layer again, recomputes it, reduce-scatters
    /// its gradients onto the slices and frees it. The root (embeddings, final norm, head)
    /// stays gathered for the micro-batch. Returns the summed loss, as
    /// [`super::step::forward_backward`] does.
    ///
    /// `batch` is `None` on a rank with no data in this micro-batch: it takes part in the same
    /// collectives, in the same order, with zero gradients. With `offload` the layer inputs
    /// wait in host memory (on a CUDA device).
    pub fn forward_backward(&mut self, d: &Ddp, model: &CausalLm, batch: Option<&Batch>, denom: f64, pos: StepPos, offload: bool) -> Result<f64, DistError> {
        let layers = model.layers.len();
        self.gather_unit(d, 0)?;
        self.restore_grads(0);
        let mut loss = 0.0;
        // Every rank issues the same collectives in the same order, with data or without: each
        // layer's gather is started before the layer before it (forward: after) computes.
        let state = batch.map(|b| (b, model.attn_inputs(&b.positions, |w| b.mask(w)), model.embed(&b.input_ids)));
        let mut inputs = Vec::with_capacity(layers);
        let mut h = state.as_ref().map(|(_, _, h0)| h0.detach());
        let mut next = self.prefetch(d, 1, layers)?;
        for (l, layer) in model.layers.iter().enumerate() {
            self.arrive(d, next.take())?;
            next = self.prefetch(d, l + 2, layers)?;
            if let (Some((_, inp, _)), Some(x)) = (&state, h.as_mut()) {
                inputs.push(if offload && x.device().is_cuda() { x.to_device_(tch::Device::Cpu, x.kind(), true, false) } else { x.shallow_clone() });
                seed_layer(pos.seed, pos.step, pos.micro, l);
                let y = tch::no_grad(|| layer_forward(layer.as_ref(), x, inp, MLP_TILE));
                *x = y;
            }
            self.free_unit(l + 1);
        }
        let mut grad = match (&state, h) {
            (Some((b, _, _)), Some(h)) => {
                let last = h.detach().set_requires_grad(true);
                drop(h);
                loss = head_ce(model, &last, &b.targets, denom, true);
                Some(last.grad())
            }
            _ => None,
        };
        let mut next = self.prefetch(d, layers, layers)?;
        for (l, layer) in model.layers.iter().enumerate().rev() {
            self.arrive(d, next.take())?;
            next = self.prefetch(d, l, layers)?;
            let (Some((_, inp, _)), Some(g)) = (&state, grad.as_ref()) else {
                self.reduce_unit(d, l + 1, &[])?;
                self.free_unit(l + 1);
                continue;
            };
            let saved = std::mem::take(&mut inputs[l]);
            let x = saved.to_device_(g.device(), saved.kind(), true, false).detach().set_requires_grad(true);
            drop(saved);
            seed_layer(pos.seed, pos.step, pos.micro, l);
            let y = layer.forward(&x, inp, None, true);
            let params = self.trainable_tensors(l + 1);
            // HFT's frozen half does not require grad: it is left out, its gradients zero.
            let mut wrt = vec![x];
            wrt.extend(params.iter().filter(|t| t.requires_grad()).map(Tensor::shallow_clone));
            // The gradients of the layer's input and trainable tensors, handed back rather
            // than accumulated into `.grad`: nothing of the layer outlives it.
            let mut grads = Tensor::run_backward(&[(y * g).sum(Kind::Float)], &wrt, false, false).into_iter();
            drop(wrt);
            grad = grads.next();
            let grads: Vec<Tensor> = params.iter().map(|t| if t.requires_grad() { grads.next().expect("one per tensor") } else { Tensor::new() }).collect();
            self.reduce_unit(d, l + 1, &grads)?;
            drop(grads);
            self.free_unit(l + 1);
        }
        if let (Some((_, _, h0)), Some(g)) = (&state, grad) {
            if h0.requires_grad() {
                (h0 * g).sum(Kind::Float).backward();
            }
        }
        let root = self.current_grads(0);
        self.reduce_unit(d, 0, &root)?;
        drop(root);
        self.release_grads(0);
        self.free_unit(0);
        Ok(loss)
    }

    /// Validation without gradients, one layer gathered at a time: the summed token loss and
    /// target count over `batches`, one round of gathers each (`None`: a round this rank has
    /// no batch for, joined without data, so every rank runs as many rounds).
    pub fn eval_loss(&self, d: &Ddp, model: &CausalLm, batches: impl Iterator<Item = Option<Batch>>) -> Result<(f64, i64), DistError> {
        let _g = tch::no_grad_guard();
        let (mut sum, mut n) = (0.0, 0);
        let layers = model.layers.len();
        for batch in batches {
            self.gather_unit(d, 0)?;
            let mut state = batch.as_ref().map(|b| (model.embed(&b.input_ids), model.attn_inputs(&b.positions, |w| b.mask(w))));
            let mut next = self.prefetch(d, 1, layers)?;
            for (l, layer) in model.layers.iter().enumerate() {
                self.arrive(d, next.take())?;
                next = self.prefetch(d, l + 2, layers)?;
                if let Some((h, inp)) = state.as_mut() {
                    *h = layer.forward(h, inp, None, false);
                }
                self.free_unit(l + 1);
            }
            if let (Some((h, _)), Some(b)) = (&state, &batch) {
                sum += head_ce(model, h, &b.targets, 1.0, false);
                n += b.n_targets;
            }
            self.free_unit(0);
        }
        Ok((sum, n))
    }

    /// HFT: trains only the trainable tensors `active` names this round. The others stop
    /// requiring grad (as the single-process optimizer's inactive parameters do), so no
    /// gradient reaches them, and AdamW leaves their part of each slice (values, moments,
    /// weight decay) alone. Every rank calls it alike.
    pub fn set_active(&mut self, active: impl Fn(&str) -> bool) {
        let rank = self.rank as i64;
        for g in self.groups.iter_mut().filter(|g| g.spec.trainable) {
            let (lo, hi) = (rank * g.per, (rank + 1) * g.per);
            let mut ranges: Vec<(i64, i64)> = Vec::new();
            let mut offset = 0;
            for ((name, t), shape) in g.spec.names.iter().zip(&g.spec.tensors).zip(&g.shapes) {
                let n: i64 = shape.iter().product();
                let on = active(name);
                let _ = t.shallow_clone().set_requires_grad(on);
                let (a, b) = (offset.max(lo), (offset + n).min(hi));
                if on && a < b {
                    match ranges.last_mut() {
                        Some((o, len)) if *o + *len == a - lo => *len += b - a,
                        _ => ranges.push((a - lo, b - a)),
                    }
                }
                offset += n;
            }
            g.active = Some(ranges);
        }
    }

    /// The global L2 norm of the gradients: each rank's slices, summed across ranks.
    pub fn grad_norm(&self, d: &Ddp) -> Result<f64, DistError> {
        let _g = tch::no_grad_guard();
        let local: f64 = self.states().map(|s| s.grad.to_kind(Kind::Float).square().sum(Kind::Float).double_value(&[])).sum();
        Ok(d.sum(&[local])?[0].sqrt())
    }

    fn states(&self) -> impl Iterator<Item = &SliceState> {
        self.groups.iter().filter_map(|g| g.state.as_ref())
    }

    /// One AdamW update of this rank's slices (learning rate `lr`, gradients scaled by
    /// `grad_scale`, the clipping coefficient), as the single-process optimizer updates them.
    pub fn step(&mut self, lr: f64, grad_scale: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let (cfg, step) = (self.cfg, self.step);
        let offload = self.offload;
        for g in &mut self.groups {
            let Some(s) = g.state.as_mut() else { continue };
            let mut value = s.master.as_ref().unwrap_or(&g.slice).shallow_clone();
            // Offloaded: the gradient slice comes to the host state, the new values go back.
            let grad = if offload { s.grad.to_device(value.device()) } else { s.grad.shallow_clone() };
            match &g.active {
                None => flat_update(&mut value, &mut s.exp_avg, &mut s.exp_avg_sq, &grad, grad_scale, lr, step, &cfg),
                Some(ranges) => {
                    for &(o, n) in ranges {
                        let part = |t: &Tensor| t.narrow(0, o, n);
                        flat_update(&mut part(&value), &mut part(&s.exp_avg), &mut part(&s.exp_avg_sq), &part(&grad), grad_scale, lr, step, &cfg);
                    }
                }
            }
            if s.master.is_some() {
                g.slice.copy_(&value);
            }
        }
    }

    /// Clears the gradient slices.
    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            if let Some(s) = g.state.as_mut() {
                let _ = s.grad.zero_();
            }
        }
    }

    /// This rank's optimizer slices as a checkpoint stores them (see [`ShardLayout`]).
    fn slice_state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, g) in self.groups.iter().filter(|g| g.spec.trainable).enumerate() {
            let s = g.state.as_ref().expect("trainable");
            out.push((format!("g{i}.exp_avg"), s.exp_avg.shallow_clone()));
            out.push((format!("g{i}.exp_avg_sq"), s.exp_avg_sq.shallow_clone()));
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
            .map(|g| ShardGroup { per: g.per, params: g.spec.names.iter().cloned().zip(g.shapes.iter().cloned()).collect() })
            .collect();
        ShardLayout { world: self.world, groups }
    }

    /// Restores this rank's slices from a whole optimizer state by parameter name (as
    /// [`checkpoint::latest`] returns it, whichever number of ranks wrote it), at `step`.
    pub fn load_state(&mut self, saved: &[(String, Tensor)], step: i64) -> Result<(), String> {
        let _g = tch::no_grad_guard();
        let by_name: BTreeMap<&str, &Tensor> = saved.iter().map(|(k, t)| (k.as_str(), t)).collect();
        for g in &mut self.groups {
            let Some(s) = g.state.as_mut() else { continue };
            for part in SHARD_PARTS {
                let mut pieces = Vec::with_capacity(g.spec.names.len());
                for (name, shape) in g.spec.names.iter().zip(&g.shapes) {
                    let key = format!("{name}.{part}");
                    let t = by_name.get(key.as_str()).ok_or_else(|| format!("checkpoint lacks {key}"))?;
                    if t.size() != *shape {
                        return Err(format!("checkpoint's {key} has shape {:?}, the model's {shape:?}", t.size()));
                    }
                    pieces.push(t.to_kind(Kind::Float).reshape([-1]));
                }
                let slice = padded_slice(&Tensor::cat(&pieces, 0), g.per, self.rank);
                let target = match part {
                    "exp_avg" => &mut s.exp_avg,
                    "exp_avg_sq" => &mut s.exp_avg_sq,
                    _ => {
                        g.slice.copy_(&slice);
                        match &mut s.master {
                            Some(m) => m,
                            None => continue,
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_belong_to_their_layer_or_the_root() {
        assert_eq!(unit_of("model.embed_tokens.weight"), 0);
        assert_eq!(unit_of("model.norm.weight"), 0);
        assert_eq!(unit_of("lm_head.weight"), 0);
        assert_eq!(unit_of("model.layers.0.self_attn.q_proj.weight"), 1);
        assert_eq!(unit_of("base_model.model.model.layers.11.mlp.up_proj.lora_A.weight"), 12);
    }

    #[test]
    fn slices_are_padded_with_zeros() {
        let flat = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0]);
        let slices: Vec<Vec<f32>> = (0..3).map(|r| Vec::<f32>::try_from(padded_slice(&flat, 2, r)).unwrap()).collect();
        assert_eq!(slices, vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 0.0]]);
    }
}
