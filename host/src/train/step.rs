//! One micro-batch's forward and backward pass, plain or with gradient checkpointing.
//!
//! Checkpointing runs the layers without autograd, keeping only each layer's input; the
//! backward pass then walks the layers in reverse, recomputing each one with autograd and
//! pushing the incoming gradient through it with the surrogate `sum(y · g)`, whose gradient
//! is exactly the vector-Jacobian product. Dropout is seeded per (step, micro-batch, layer),
//! so the recomputation draws the same masks as the first pass.
//!
//! Two more savings for long sequences: `Offload` keeps the layer inputs in pinned host memory
//! instead of on the device (copied out and back on the compute stream, without a host sync),
//! and above `MLP_TILE` tokens the MLP — position-wise, and the widest activations of a layer —
//! runs in tiles of tokens, in the forward pass and in the recomputation, each tile
//! back-propagated on its own, so only one tile's intermediates are alive at a time.

use crate::data::Batch;
use super::head_loss::{head_ce, head_ce_plus};
use super::router_loss::{RouterLoss, Shares};
use crate::model::decoder::{AttnInputs, Block};
use crate::model::CausalLm;
use tch::{Device, Kind, Tensor};

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

/// What the backward pass keeps of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    /// Every activation autograd saves, on the device: fastest, most memory.
    #[default]
    Off,
    /// Only each layer's input, on the device; the rest recomputed in backward.
    Layers,
    /// Only each layer's input, in pinned host memory.
    Offload,
}

impl Checkpointing {
    pub fn enabled(self) -> bool {
        self != Checkpointing::Off
    }
}

/// `grad_checkpointing = false | true | "offload"` in the config.
impl<'de> serde::Deserialize<'de> for Checkpointing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Flag(false) => Ok(Checkpointing::Off),
            Raw::Flag(true) => Ok(Checkpointing::Layers),
            Raw::Name(n) if n == "offload" => Ok(Checkpointing::Offload),
            Raw::Name(n) => Err(serde::de::Error::custom(format!("grad_checkpointing = \"{n}\": use true, false or \"offload\""))),
        }
    }
}

impl serde::Serialize for Checkpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Checkpointing::Off => s.serialize_bool(false),
            Checkpointing::Layers => s.serialize_bool(true),
            Checkpointing::Offload => s.serialize_str("offload"),
        }
    }
}

/// Tokens per MLP tile under checkpointing: longer micro-batches run the MLP tile by tile.
pub const MLP_TILE: i64 = 16_384;

/// Forward and backward of `batch`, the loss divided by `denom` (the target tokens of the
/// whole accumulated step) before backward. Returns the summed loss (not divided). A
/// mixture-of-experts model whose config asks for it adds the router's load-balancing loss
/// ([`super::router_loss`]).
pub fn forward_backward(model: &CausalLm, batch: &Batch, denom: f64, pos: StepPos, checkpointing: Checkpointing) -> f64 {
    forward_backward_tiled(model, batch, denom, pos, checkpointing, MLP_TILE)
}

/// [`forward_backward`] with MLP tiles of `tile` tokens under checkpointing.
pub fn forward_backward_tiled(model: &CausalLm, batch: &Batch, denom: f64, pos: StepPos, checkpointing: Checkpointing, tile: i64) -> f64 {
    let inp = model.attn_inputs(&batch.positions, |w| batch.mask(w));
    let h0 = model.embed(&batch.input_ids);
    let router = RouterLoss::new(model, batch, denom);
    if checkpointing == Checkpointing::Off {
        let mut h = h0;
        for (l, layer) in model.layers.iter().enumerate() {
            seed_layer(pos.seed, pos.step, pos.micro, l);
            h = layer.forward(&h, &inp, None, true);
        }
        return match router.as_ref().and_then(|r| r.whole(model)) {
            // The balance term comes back summed like the cross-entropy: × denom.
            Some(aux) => head_ce_plus(model, &h, &batch.targets, denom, &aux) + aux.double_value(&[]) * denom,
            None => head_ce(model, &h, &batch.targets, denom, true),
        };
    }
    let mut inputs = Vec::with_capacity(model.layers.len());
    let mut router_logits = Vec::new();
    let mut h = h0.detach();
    tch::no_grad(|| {
        for (l, layer) in model.layers.iter().enumerate() {
            inputs.push(match checkpointing {
                // Non-blocking to the host lands in pinned memory, ordered on the compute stream.
                Checkpointing::Offload if h.device().is_cuda() => h.to_device_(Device::Cpu, h.kind(), true, false),
                _ => h.shallow_clone(),
            });
            seed_layer(pos.seed, pos.step, pos.micro, l);
            let sink = router.is_some().then_some(&mut router_logits);
            h = layer_forward_recording(layer.as_ref(), &h, &inp, tile, sink);
        }
    });
    let shares = router.as_ref().and_then(|r| r.shares(&router_logits).map(|s| (r, s)));
    drop(router_logits);
    let last = h.detach().set_requires_grad(true);
    drop(h);
    let mut loss = head_ce(model, &last, &batch.targets, denom, true);
    let mut grad = last.grad();
    drop(last);
    for (l, layer) in model.layers.iter().enumerate().rev() {
        let saved = std::mem::take(&mut inputs[l]);
        let x = saved.to_device_(grad.device(), saved.kind(), true, false).detach().set_requires_grad(true);
        drop(saved);
        seed_layer(pos.seed, pos.step, pos.micro, l);
        if let Some(aux) = layer_backward(layer.as_ref(), &x, &grad, &inp, tile, shares.as_ref()) {
            loss += aux * denom;
        }
        grad = x.grad();
    }
    if h0.requires_grad() {
        (h0 * grad).sum(Kind::Float).backward();
    }
    loss
}

/// A decoder layer, its MLP in tiles of `tile` tokens when the input is longer.
pub(crate) fn layer_forward(layer: &dyn Block, x: &Tensor, inp: &AttnInputs, tile: i64) -> Tensor {
    layer_forward_recording(layer, x, inp, tile, None)
}

/// [`layer_forward`], the router logits of a MoE layer (tile by tile) pushed onto `sink`.
fn layer_forward_recording(layer: &dyn Block, x: &Tensor, inp: &AttnInputs, tile: i64, mut sink: Option<&mut Vec<Tensor>>) -> Tensor {
    let (b, t, d) = x.size3().expect("hidden states are [B, T, D]");
    let mut record = |layer: &dyn Block| {
        if let (Some(sink), Some(l)) = (sink.as_deref_mut(), layer.take_router_logits()) {
            sink.push(l);
        }
    };
    if b * t <= tile {
        let y = layer.forward(x, inp, None, true);
        record(layer);
        return y;
    }
    let h = layer.attention_block(x, inp, None, true);
    let flat = h.view([b * t, d]);
    for s in (0..b * t).step_by(tile as usize) {
        let n = tile.min(b * t - s);
        let mut rows = flat.narrow(0, s, n);
        let y = layer.mlp_branch(&rows, true);
        record(layer);
        let _ = rows.g_add_(&y);
    }
    h
}

/// Recomputes `layer` on `x` (a leaf requiring grad) and back-propagates `grad` (the loss's
/// gradient with respect to the layer's output) into `x` and the layer's parameters. With
/// `router`, a MoE layer's balance-loss term joins its backward; returns that term's value.
fn layer_backward(layer: &dyn Block, x: &Tensor, grad: &Tensor, inp: &AttnInputs, tile: i64, router: Option<&(&RouterLoss, Shares)>) -> Option<f64> {
    let (b, t, d) = x.size3().expect("hidden states are [B, T, D]");
    let mut aux_sum: Option<f64> = None;
    let mut with_aux = |surrogate: Tensor, start: i64| match router.and_then(|(r, s)| r.layer_term(layer, s, start)) {
        Some(term) => {
            *aux_sum.get_or_insert(0.0) += term.double_value(&[]);
            surrogate + term
        }
        None => surrogate,
    };
    if b * t <= tile {
        let y = layer.forward(x, inp, None, true);
        with_aux((y * grad).sum(Kind::Float), 0).backward();
        return aux_sum;
    }
    let h = layer.attention_block(x, inp, None, true);
    // The MLP branch tile by tile: each tile's graph is built, back-propagated and freed
    // before the next, accumulating the gradient with respect to `h` in `hd.grad`.
    let hd = h.detach().set_requires_grad(true);
    let (flat_h, flat_g) = (hd.view([b * t, d]), grad.view([b * t, d]));
    for s in (0..b * t).step_by(tile as usize) {
        let n = tile.min(b * t - s);
        let rows = flat_h.narrow(0, s, n);
        let y = layer.mlp_branch(&rows, true);
        with_aux((y * flat_g.narrow(0, s, n)).sum(Kind::Float), s).backward();
    }
    // y = h + mlp(norm(h)): dL/dh = g + (the MLP branch's part, in hd.grad).
    (h * (grad + hd.grad())).sum(Kind::Float).backward();
    aux_sum
}

/// Summed loss and target count over batches, without gradients.
pub fn eval_loss(model: &CausalLm, batches: impl Iterator<Item = Batch>) -> (f64, i64) {
    let _g = tch::no_grad_guard();
    let mut sum = 0.0;
    let mut n = 0;
    for b in batches {
        let inp = model.attn_inputs(&b.positions, |w| b.mask(w));
        let h = model.hidden(&b.input_ids, &inp, None, false);
        sum += head_ce(model, &h, &b.targets, 1.0, false);
        n += b.n_targets;
    }
    (sum, n)
}

#[cfg(test)]
mod tests {
    use super::Checkpointing;

    #[test]
    fn checkpointing_reads_a_flag_or_offload() {
        #[derive(serde::Deserialize)]
        struct T {
            c: Checkpointing,
        }
        let read = |s: &str| toml::from_str::<T>(s).map(|t| t.c).map_err(|e| e.to_string());
        assert_eq!(read("c = false"), Ok(Checkpointing::Off));
        assert_eq!(read("c = true"), Ok(Checkpointing::Layers));
        assert_eq!(read("c = \"offload\""), Ok(Checkpointing::Offload));
        assert!(read("c = \"disk\"").unwrap_err().contains("use true, false or \"offload\""));
    }
}
