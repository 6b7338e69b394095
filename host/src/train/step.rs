//! One micro-batch's forward and backward pass, plain or with gradient checkpointing.
//!
//! Checkpointing runs the layers without autograd, keeping only each layer's input; the
//! backward pass then walks the layers in reverse, recomputing each one with autograd and
//! pushing the incoming gradient through it with the surrogate `sum(y · g)`, whose gradient
//! is exactly the vector-Jacobian product. Dropout is seeded per (step, micro-batch, layer),
//! so the recomputation draws the same masks as the first pass.

use crate::data::Batch;
use super::head_loss::head_ce;
use crate::model::CausalLm;
use tch::Kind;

/// Seeds libtorch's generator for one layer call.
pub fn seed_layer(seed: u64, step: usize, micro: usize, layer: usize) {
    let mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((step as u64) << 32)
        .wrapping_add((micro as u64) << 16)
        .wrapping_add(layer as u64);
    tch::manual_seed((mix & 0x7FFF_FFFF_FFFF_FFFF) as i64);
}

/// Where in the run a micro-batch sits (for dropout seeds).
#[derive(Debug, Clone, Copy)]
pub struct StepPos {
    pub seed: u64,
    pub step: usize,
    pub micro: usize,
}

/// Forward and backward of `batch`, the loss divided by `denom` (the target tokens of the
/// whole accumulated step) before backward. Returns the summed loss (not divided).
pub fn forward_backward(model: &CausalLm, batch: &Batch, denom: f64, pos: StepPos, checkpointing: bool) -> f64 {
    let inp = model.attn_inputs(&batch.positions, batch.mask(model.config.sliding_window));
    let h0 = model.embed(&batch.input_ids);
    if !checkpointing {
        let mut h = h0;
        for (l, layer) in model.layers.iter().enumerate() {
            seed_layer(pos.seed, pos.step, pos.micro, l);
            h = layer.forward(&h, &inp, None, true);
        }
        return head_ce(model, &h, &batch.targets, denom, true);
    }
    let mut inputs = Vec::with_capacity(model.layers.len());
    let mut h = h0.detach();
    tch::no_grad(|| {
        for (l, layer) in model.layers.iter().enumerate() {
            inputs.push(h.shallow_clone());
            seed_layer(pos.seed, pos.step, pos.micro, l);
            h = layer.forward(&h, &inp, None, true);
        }
    });
    let last = h.detach().set_requires_grad(true);
    let loss = head_ce(model, &last, &batch.targets, denom, true);
    let mut grad = last.grad();
    for (l, layer) in model.layers.iter().enumerate().rev() {
        let x = inputs[l].detach().set_requires_grad(true);
        seed_layer(pos.seed, pos.step, pos.micro, l);
        let y = layer.forward(&x, &inp, None, true);
        (y * &grad).sum(Kind::Float).backward();
        grad = x.grad();
    }
    if h0.requires_grad() {
        (h0 * grad).sum(Kind::Float).backward();
    }
    loss
}

/// Summed loss and target count over batches, without gradients.
pub fn eval_loss(model: &CausalLm, batches: impl Iterator<Item = Batch>) -> (f64, i64) {
    let _g = tch::no_grad_guard();
    let mut sum = 0.0;
    let mut n = 0;
    for b in batches {
        let inp = model.attn_inputs(&b.positions, b.mask(model.config.sliding_window));
        let h = model.hidden(&b.input_ids, &inp, None, false);
        sum += head_ce(model, &h, &b.targets, 1.0, false);
        n += b.n_targets;
    }
    (sum, n)
}
