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
//! HFT trains half of each layer per round: [`Fsdp::set_active`] marks the other half frozen,
//! and AdamW leaves its part of every slice alone. With `train.optimizer = "adamw-8bit"` the
//! moments are 8-bit, quantised per block of 256 values: each tensor of such a group starts on
//! a block and each slice is whole blocks ([`shard`]), so a rank quantises exactly the blocks
//! one process would.
//!
//! Checkpoints ([`state`]): every rank writes its slice of the optimizer state into the checkpoint folder
//! and rank 0 the layout ([`super::checkpoint::ShardLayout`]) and the PEFT adapter; reading joins the
//! slices by parameter name, so a run resumes on any number of ranks (or in one process).

mod shard;
mod state;

pub use shard::{group_specs, per_rank_state_bytes, GroupSpec};

use super::adamw8bit::{blocks_of, Moments8bit, BLOCK};
use super::checkpoint::per_block;
use super::ddp::Ddp;
use super::head_loss::head_ce;
use super::optim::{flat_update, AdamWConfig};
use super::step::{layer_forward, seed_layer, StepPos, MLP_TILE};
use crate::data::Batch;
use crate::dist::{DistError, Work};
use crate::model::CausalLm;
use shard::{place, slice_bytes, slice_of};
use tch::{Kind, Tensor};

/// A trainable slice's optimizer state.
struct SliceState {
    /// fp32 master when the group's dtype is not fp32 or the state is offloaded (else the
    /// slice is its own master).
    master: Option<Tensor>,
    /// fp32 moments (empty when `moments_8bit` holds them).
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The moments in 8 bits (an 8-bit group, see [`GroupSpec::eight_bit`]).
    moments_8bit: Option<Moments8bit>,
    /// The slice's gradient, summed over the ranks, in the group's dtype.
    grad: Tensor,
}

/// A flat group with this rank's slice.
struct Group {
    spec: GroupSpec,
    shapes: Vec<Vec<i64>>,
    /// Where each tensor starts in the flat group ([`GroupSpec::offsets`]).
    offsets: Vec<i64>,
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

impl Fsdp {
    /// Shards the model across the ranks of `d`: every rank keeps its slice of each group and
    /// the model's tensors are freed (gathered again by [`Fsdp::begin_step`]). `trainable` are
    /// the tensors the optimizer updates (they must require grad); the rest of the model's
    /// dense tensors are the frozen base.
    /// With `eight_bit` the moments are 8-bit (`train.optimizer = "adamw-8bit"`).
    pub fn new(model: &CausalLm, trainable: Vec<(String, Tensor)>, d: &Ddp, cfg: AdamWConfig, per_layer: bool, eight_bit: bool) -> Result<Fsdp, DistError> {
        let offload = d.cpu_offload;
        // Offloaded state in page-locked memory on a CUDA machine: its copies to and from the
        // device then run at full speed.
        let host = |t: Tensor| if t.device().is_cuda() { t.to_device(tch::Device::Cpu).pin_memory(t.device()) } else { t };
        let _g = tch::no_grad_guard();
        let (rank, world) = (d.env.rank, d.env.world_size);
        let specs = group_specs(model, trainable, eight_bit);
        let mut groups = Vec::with_capacity(specs.len());
        for spec in specs {
            let (per, offsets) = (spec.per(world), spec.offsets());
            let device = spec.tensors[0].device();
            let flat = place(spec.tensors.iter().map(Tensor::detach), &offsets, per * world as i64, spec.kind, device);
            let slice = slice_of(&flat, per, rank);
            drop(flat);
            let state = spec.trainable.then(|| {
                let moments = if spec.eight_bit { 0 } else { per };
                let zeros = || Tensor::zeros([moments], (Kind::Float, device));
                let placed = |t: Tensor| if offload { host(t) } else { t };
                SliceState {
                    master: (spec.kind != Kind::Float || offload).then(|| placed(slice.to_kind(Kind::Float))),
                    exp_avg: placed(zeros()),
                    exp_avg_sq: placed(zeros()),
                    moments_8bit: spec.eight_bit.then(|| Moments8bit::new(&[per], if offload { tch::Device::Cpu } else { device })),
                    grad: Tensor::zeros([per], (spec.kind, device)),
                }
            });
            let shapes = spec.tensors.iter().map(Tensor::size).collect();
            groups.push(Group { spec, shapes, offsets, per, slice, state, active: None });
        }
        let f = Fsdp { groups, per_layer, cfg, offload, step: 0, rank, world };
        f.free(|_| true);
        let held: u64 = f.groups.iter().map(|g| slice_bytes(&g.spec, g.per)).sum();
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
            for ((t, shape), &offset) in g.spec.tensors.iter().zip(&g.shapes).zip(&g.offsets) {
                let n: i64 = shape.iter().product();
                t.shallow_clone().set_data(&full.narrow(0, offset, n).view(shape.as_slice()));
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
            let parts: Vec<Tensor> = g
                .shapes
                .iter()
                .map(|shape| {
                    let n: i64 = shape.iter().product();
                    match next.next() {
                        Some(grad) if grad.defined() && grad.numel() as i64 == n => grad.shallow_clone(),
                        _ => Tensor::zeros([n], (kind, device)),
                    }
                })
                .collect();
            let flat = place(parts, &g.offsets, g.per * world, kind, device);
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
            for (((name, t), shape), &offset) in g.spec.names.iter().zip(&g.spec.tensors).zip(&g.shapes).zip(&g.offsets) {
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
            match (&mut s.moments_8bit, &g.active) {
                (Some(m), active) => step_8bit(m, &mut value, &grad, grad_scale, lr, step, &cfg, active.as_deref()),
                (None, None) => flat_update(&mut value, &mut s.exp_avg, &mut s.exp_avg_sq, &grad, grad_scale, lr, step, &cfg),
                (None, Some(ranges)) => {
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
}

/// One 8-bit AdamW update of a slice (`grad` before the clipping coefficient `grad_scale`),
/// as the single-process optimizer's: the slice's blocks are its blocks. With HFT's `active`
/// ranges, the rest of the slice (values, codes and block scales) is put back as it was.
#[allow(clippy::too_many_arguments)]
fn step_8bit(m: &mut Moments8bit, value: &mut Tensor, grad: &Tensor, grad_scale: f64, lr: f64, step: i64, cfg: &AdamWConfig, active: Option<&[(i64, i64)]>) {
    let g = if grad_scale != 1.0 { grad * grad_scale } else { grad.shallow_clone() };
    let parts = |m: &Moments8bit, value: &Tensor| -> Vec<(bool, Tensor)> {
        std::iter::once((false, value.shallow_clone())).chain(m.state().into_iter().map(|(k, t)| (per_block(k), t))).collect()
    };
    let before: Option<Vec<Tensor>> = active.map(|_| parts(m, value).iter().map(|(_, t)| t.copy()).collect());
    m.step(value, &g, lr, step, (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay));
    let (Some(ranges), Some(before)) = (active, before) else { return };
    for ((blocks, t), old) in parts(m, value).into_iter().zip(&before) {
        let updated = t.copy();
        t.shallow_clone().copy_(old);
        for &(o, n) in ranges {
            // Active ranges start on a block (tensors and slices do), and a block holds one tensor.
            let (at, len) = if blocks { (o / BLOCK, blocks_of(o + n) - o / BLOCK) } else { (o, n) };
            t.narrow(0, at, len).copy_(&updated.narrow(0, at, len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ddp::unit_of;

    #[test]
    fn tensors_belong_to_their_layer_or_the_root() {
        assert_eq!(unit_of("model.embed_tokens.weight"), 0);
        assert_eq!(unit_of("model.norm.weight"), 0);
        assert_eq!(unit_of("lm_head.weight"), 0);
        assert_eq!(unit_of("model.layers.0.self_attn.q_proj.weight"), 1);
        assert_eq!(unit_of("base_model.model.model.layers.11.mlp.up_proj.lora_A.weight"), 12);
    }
}
