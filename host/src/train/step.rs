//! One micro-batch's forward and backward pass, plain or with gradient checkpointing.
//!
//! Checkpointing runs the layers without autograd, keeping only each layer's input; the
//! backward pass then walks the layers in reverse, recomputing each one with autograd and
//! pushing the incoming gradient through it with the surrogate `sum(y · g)`, whose gradient
//! is exactly the vector-Jacobian product. Dropout is seeded per (step, micro-batch, layer),
//! so the recomputation draws the same masks as the first pass.
//!
//! Two more savings for long sequences: `Offload` keeps the layer inputs in pinned host memory
//! instead of on the device (copied out and back on the compute stream, without a host sync;
//! only every `k`-th when the host cannot hold them all: [`super::offload`]),
//! and above `MLP_TILE` tokens the MLP — position-wise, and the widest activations of a layer —
//! runs in tiles of tokens, in the forward pass and in the recomputation, each tile
//! back-propagated on its own, so only one tile's intermediates are alive at a time; longer
//! still ([`attn_slice_above`]), causal attention runs its backward in slices of heads
//! (`AttnInputs::sliced_backward`), so only one slice's transient buffers are.

use crate::data::Batch;
use super::head_loss::{head_ce, head_ce_plus};
use super::offload::{self, Restoring, SavedInput};
use super::router_loss::{RouterLoss, Shares};
use crate::model::decoder::{AttnInputs, Block};
use crate::model::CausalLm;
use tch::{Device, Kind, Tensor};

/// Seeds libtorch's generator for one layer call. The position is mixed (splitmix64's
/// finaliser) into every bit: libtorch's CPU generator keeps only the low 32 bits of a seed, so
/// the step (once in the high bits) would otherwise not change the CPU's dropout masks.
pub fn seed_layer(seed: u64, step: usize, micro: usize, layer: usize) {
    let mut mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((step as u64) << 32)
        .wrapping_add((micro as u64) << 16)
        .wrapping_add(layer as u64);
    mix = (mix ^ (mix >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mix = (mix ^ (mix >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    mix ^= mix >> 31;
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

/// Under checkpointing, micro-batches of more tokens than this run the MLP tile by tile…
pub const MLP_TILE: i64 = 16_384;

/// …and so do those whose tokens × intermediate width exceed this (llama-3.2-1b's 16,384 ×
/// 8,192): 9,362 tokens for llama-3.1-8b, 4,681 for llama-3.1-70b, whose untiled MLP at
/// 14.5k tokens would hold 3.3 GB of gate/up activations and their gradients.
pub const MLP_TILE_ELEMS: i64 = 16_384 * 8_192;

/// Tokens above which a model of MLP width `intermediate` runs its MLP in tiles.
pub fn mlp_tile_above(intermediate: i64) -> i64 {
    MLP_TILE.min(MLP_TILE_ELEMS / intermediate.max(1))
}

/// Tokens per MLP tile once a micro-batch is tiled: each tile's gate/up output and its
/// gradient (llama-3.1-8b: 4 × 14,336 × 2 bytes a token, 0.9 GiB at 4,096 tokens) are the
/// largest transient of a long-context layer, while 4,096-row GEMMs still run at full speed.
pub const MLP_TILE_ROWS: i64 = 4096;

/// Causal attention runs its backward in slices of heads (`AttnInputs::sliced_backward`) on
/// tiled micro-batches whose tokens × query width (heads × head_dim) exceed this: where the
/// backward's transient buffers over every head at once (flash attention's fp32 dq accumulator,
/// dq and, for grouped-query attention, the k/v gradients expanded to every query head: about
/// 10 bytes per token and query dimension) would pass 2.5 GiB — from 65,536 tokens for
/// llama-3.1-8b, 32,768 for llama-3.1-70b. A slice costs one more attention forward pass in
/// backward (about 15% of an 8b step at 96k tokens), so shorter micro-batches keep one call.
pub const ATTN_SLICE_ELEMS: i64 = 1 << 28;

/// Tokens above which a tiled micro-batch of a model with `query_width` (heads × head_dim)
/// runs its attention's backward in head slices.
pub fn attn_slice_above(query_width: i64) -> i64 {
    ATTN_SLICE_ELEMS / query_width.max(1)
}

/// How a checkpointed micro-batch runs (see [`forward_backward_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOptions {
    /// What the backward pass keeps of the forward pass.
    pub checkpointing: Checkpointing,
    /// Under checkpointing, micro-batches of more tokens than this run the MLP in tiles (or of
    /// fewer, when the model's MLP is wide: [`mlp_tile_above`]).
    pub mlp_tile: i64,
    /// Tokens per MLP tile then.
    pub mlp_tile_rows: i64,
    /// Tiled micro-batches of more tokens than this (or of fewer, where the model's attention
    /// is wide: [`attn_slice_above`]) run the attention's backward in head slices.
    pub attn_slice: i64,
    /// Layers per checkpointed segment: only every `k`-th layer's input is kept, the others
    /// recomputed from it in backward. `None`: 1, or as few as the host's memory needs when
    /// offloading ([`checkpoint_segment`]).
    pub segment: Option<usize>,
}

impl StepOptions {
    /// `checkpointing` with [`MLP_TILE`], head slices as [`attn_slice_above`] says and segments
    /// as the host needs.
    pub fn new(checkpointing: Checkpointing) -> StepOptions {
        StepOptions { checkpointing, mlp_tile: MLP_TILE, mlp_tile_rows: MLP_TILE_ROWS, attn_slice: i64::MAX, segment: None }
    }
}

/// Forward and backward of `batch`, the loss divided by `denom` (the target tokens of the
/// whole accumulated step) before backward. Returns the summed loss (not divided). A
/// mixture-of-experts model whose config asks for it adds the router's load-balancing loss
/// ([`super::router_loss`]).
pub fn forward_backward(model: &CausalLm, batch: &Batch, denom: f64, pos: StepPos, checkpointing: Checkpointing) -> f64 {
    forward_backward_with(model, batch, denom, pos, StepOptions::new(checkpointing))
}

/// [`forward_backward`] with MLP tiles of `tile` tokens under checkpointing (above `tile`).
pub fn forward_backward_tiled(model: &CausalLm, batch: &Batch, denom: f64, pos: StepPos, checkpointing: Checkpointing, tile: i64) -> f64 {
    forward_backward_with(model, batch, denom, pos, StepOptions { mlp_tile: tile, mlp_tile_rows: tile, ..StepOptions::new(checkpointing) })
}

/// Layers per checkpointed segment for layer inputs of `input_bytes` on `device`: 1 unless
/// offloading to the host, whose memory then decides ([`offload::segment_len`]).
pub fn checkpoint_segment(layers: usize, input_bytes: u64, checkpointing: Checkpointing, device: Device) -> usize {
    if checkpointing != Checkpointing::Offload || !device.is_cuda() {
        return 1;
    }
    offload::segment_len(layers, input_bytes, offload::host_budget())
}

/// [`forward_backward`] as `opts` says.
pub fn forward_backward_with(model: &CausalLm, batch: &Batch, denom: f64, pos: StepPos, opts: StepOptions) -> f64 {
    let mut inp = model.attn_inputs(&batch.positions, |w| batch.mask(w));
    let h0 = model.embed(&batch.input_ids);
    let tile = Tiles { above: opts.mlp_tile.min(mlp_tile_above(model.config.intermediate)), rows: opts.mlp_tile_rows };
    let tokens = h0.size()[..2].iter().product::<i64>();
    let router = RouterLoss::new(model, batch, denom);
    if opts.checkpointing == Checkpointing::Off {
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
    let query_width = model.config.heads * model.config.head_dim;
    inp.sliced_backward = tokens > tile.above && tokens > opts.attn_slice.min(attn_slice_above(query_width));
    let layers = model.layers.len();
    let input_bytes = (h0.numel() * h0.kind().elt_size_in_bytes()) as u64;
    let device = h0.device();
    let k = opts.segment.unwrap_or_else(|| checkpoint_segment(layers, input_bytes, opts.checkpointing, device)).clamp(1, layers.max(1));
    let offload = opts.checkpointing == Checkpointing::Offload;
    let mut saved: Vec<Option<SavedInput>> = (0..layers).map(|_| None).collect();
    let mut h = h0.detach();
    // The embedding output is kept only when it trains: else its memory (a layer input's) goes
    // once the first layer has read it (and, offloaded, once its copy is out).
    let h0 = h0.requires_grad().then_some(h0);
    let mut router_logits = Vec::new();
    tch::no_grad(|| {
        for (l, layer) in model.layers.iter().enumerate() {
            if l % k == 0 {
                saved[l] = Some(SavedInput::save(&h, offload));
            }
            seed_layer(pos.seed, pos.step, pos.micro, l);
            let sink = router.is_some().then_some(&mut router_logits);
            h = layer_forward_recording(layer.as_ref(), &h, &inp, tile, sink);
            // The layer that reads the input is queued: its copy out overlaps that layer.
            if let Some(s) = saved[l].as_mut() {
                s.release_source();
            }
        }
    });
    let shares = router.as_ref().and_then(|r| r.shares(&router_logits).map(|s| (r, s)));
    drop(router_logits);
    let last = h.detach().set_requires_grad(true);
    drop(h);
    let mut loss = head_ce(model, &last, &batch.targets, denom, true);
    let mut grad = last.grad();
    drop(last);
    // Short micro-batches fetch the next segment's input while the current one runs backward
    // (one more input on the device); long ones, where a layer's compute dwarfs the copy and
    // memory is what counts, fetch it just before use.
    let prefetch = tokens <= tile.above;
    let mut fetching: Option<Restoring> = None;
    for start in (0..layers).step_by(k).rev() {
        let end = (start + k).min(layers);
        let first = match fetching.take() {
            Some(r) => r,
            None => saved[start].take().expect("each segment keeps its first input").restore(device),
        }
        .wait();
        if prefetch && start >= k {
            fetching = saved[start - k].take().map(|s| s.restore(device));
        }
        // The segment's other inputs again, without autograd (the same dropout seeds).
        let mut xs = vec![first];
        tch::no_grad(|| {
            for l in start..end - 1 {
                seed_layer(pos.seed, pos.step, pos.micro, l);
                let next = layer_forward_tiles(model.layers[l].as_ref(), xs.last().expect("an input"), &inp, tile);
                xs.push(next);
            }
        });
        for l in (start..end).rev() {
            let x = xs.pop().expect("one input per layer").detach().set_requires_grad(true);
            seed_layer(pos.seed, pos.step, pos.micro, l);
            if let Some(aux) = layer_backward(model.layers[l].as_ref(), &x, grad, &inp, tile, shares.as_ref()) {
                loss += aux * denom;
            }
            grad = x.grad();
        }
    }
    if let Some(h0) = h0 {
        (h0 * grad).sum(Kind::Float).backward();
    }
    loss
}

/// When and how finely the MLP runs in tiles of tokens.
#[derive(Debug, Clone, Copy)]
struct Tiles {
    /// Inputs of more tokens than this are tiled.
    above: i64,
    /// Tokens per tile.
    rows: i64,
}

impl Tiles {
    fn spans(self, tokens: i64) -> impl Iterator<Item = (i64, i64)> {
        (0..tokens).step_by(self.rows.max(1) as usize).map(move |s| (s, self.rows.min(tokens - s)))
    }
}

/// A decoder layer, its MLP in tiles of `tile` tokens when the input is longer.
pub(crate) fn layer_forward(layer: &dyn Block, x: &Tensor, inp: &AttnInputs, tile: i64) -> Tensor {
    layer_forward_tiles(layer, x, inp, Tiles { above: tile, rows: tile })
}

fn layer_forward_tiles(layer: &dyn Block, x: &Tensor, inp: &AttnInputs, tile: Tiles) -> Tensor {
    layer_forward_recording(layer, x, inp, tile, None)
}

/// [`layer_forward_tiles`], the router logits of a MoE layer (tile by tile) pushed onto `sink`.
fn layer_forward_recording(layer: &dyn Block, x: &Tensor, inp: &AttnInputs, tile: Tiles, mut sink: Option<&mut Vec<Tensor>>) -> Tensor {
    let (b, t, d) = x.size3().expect("hidden states are [B, T, D]");
    let mut record = |layer: &dyn Block| {
        if let (Some(sink), Some(l)) = (sink.as_deref_mut(), layer.take_router_logits()) {
            sink.push(l);
        }
    };
    if b * t <= tile.above {
        let y = layer.forward(x, inp, None, true);
        record(layer);
        return y;
    }
    let h = layer.attention_block(x, inp, None, true);
    let flat = h.view([b * t, d]);
    for (s, n) in tile.spans(b * t) {
        let mut rows = flat.narrow(0, s, n);
        let y = layer.mlp_branch(&rows, true);
        record(layer);
        let _ = rows.g_add_(&y);
    }
    h
}

/// Recomputes `layer` on `x` (a leaf requiring grad) and back-propagates `grad` (the loss's
/// gradient with respect to the layer's output) into `x` and the layer's parameters. `grad` is
/// taken by value: only the graph holds it (until its node has run), never a second copy.
/// With `router`, a MoE layer's balance-loss term joins its backward; returns that term's value.
fn layer_backward(layer: &dyn Block, x: &Tensor, grad: Tensor, inp: &AttnInputs, tile: Tiles, router: Option<&(&RouterLoss, Shares)>) -> Option<f64> {
    let (b, t, d) = x.size3().expect("hidden states are [B, T, D]");
    let mut aux_sum: Option<f64> = None;
    let mut with_aux = |surrogate: Tensor, start: i64| match router.and_then(|(r, s)| r.layer_term(layer, s, start)) {
        Some(term) => {
            *aux_sum.get_or_insert(0.0) += term.double_value(&[]);
            surrogate + term
        }
        None => surrogate,
    };
    if b * t <= tile.above {
        let y = layer.forward(x, inp, None, true);
        let surrogate = with_aux((y * grad).sum(Kind::Float), 0);
        surrogate.backward();
        return aux_sum;
    }
    let h = layer.attention_block(x, inp, None, true);
    // The MLP branch tile by tile: each tile's graph is built, back-propagated and freed
    // before the next. y = h + mlp(norm(h)), so dL/dh = g + the MLP branch's part: each tile's
    // part (the gradient of its own rows, a tile-sized leaf) is summed in place into its rows
    // of `grad` once the tile's backward has run, so no second token-sized gradient is held.
    {
        let (flat_h, flat_g) = (h.detach().view([b * t, d]), grad.view([b * t, d]));
        for (s, n) in tile.spans(b * t) {
            let rows = flat_h.narrow(0, s, n).detach().set_requires_grad(true);
            let mut g_rows = flat_g.narrow(0, s, n);
            let y = layer.mlp_branch(&rows, true);
            with_aux((y * &g_rows).sum(Kind::Float), s).backward();
            let _ = g_rows.g_add_(&rows.grad());
        }
    }
    let surrogate = (h * &grad).sum(Kind::Float);
    drop(grad);
    surrogate.backward();
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
    use super::{mlp_tile_above, Checkpointing};

    #[test]
    fn attention_backward_is_sliced_from_2_pow_28_query_elements() {
        // llama-3.1-8b (32 × 128) from 65,536 tokens, llama-3.1-70b (64 × 128) from 32,768,
        // llama-3.2-1b (32 × 64) from 131,072.
        assert_eq!(super::attn_slice_above(4096), 65_536);
        assert_eq!(super::attn_slice_above(8192), 32_768);
        assert_eq!(super::attn_slice_above(2048), 131_072);
    }

    #[test]
    fn wide_mlps_are_tiled_from_fewer_tokens() {
        // 16,384 × 8,192 MLP elements: llama-3.2-1b (8,192) at 16,384 tokens, llama-3.1-8b
        // (14,336) from 9,362, llama-3.1-70b (28,672) from 4,681; narrow ones at 16,384.
        assert_eq!(mlp_tile_above(8_192), 16_384);
        assert_eq!(mlp_tile_above(14_336), 9_362);
        assert_eq!(mlp_tile_above(28_672), 4_681);
        assert_eq!(mlp_tile_above(128), 16_384);
    }

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
