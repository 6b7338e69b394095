//! One layer's device memory on a long checkpointed micro-batch, as the engine runs it there:
//! the MLP in tiles of tokens and, longer still, the attention's backward in head slices
//! (`train::step`). What [`super::activation_bytes`] adds to the kept inputs above the tiling
//! threshold.

use super::{shapes, Method, PlanRequest, MLP_TILE_ROWS};

/// Slices of key/value heads a long micro-batch's attention backward runs in.
const ATTN_BACKWARD_SLICES: u64 = crate::model::attention::ATTN_BACKWARD_SLICES as u64;

/// Bytes of one layer's recomputation and backward under checkpointing on a micro-batch of
/// `tokens` above the tiling threshold (`train::step`), beside the kept inputs: the larger of
/// its two phases, each counted as the engine holds it, with `attention` the bytes a token
/// that the attention half's graph keeps (as in [`super::activation_bytes`]).
///
/// The MLP in tiles: the attention half's graph (less the MLP norm's input and output, which
/// a tile keeps only for its own rows), its output `h` and the incoming gradient, into which
/// each tile's part of `h`'s gradient is summed (`2 * 2h`); one tile of [`MLP_TILE_ROWS`] tokens holds its gate/up
/// output, that output's gradient, the SwiGLU output and its gradient (`2*(2i + 2i + i + i)`,
/// full fine-tuning one more `i`), and QLoRA the gate/up weights dequantised (`2 * 2i * h`, once).
///
/// The attention's backward: the graph, the residual's gradient (`2h`), the SDPA output's
/// gradient (`2q`) and the q/k/v gradients (`2*(q + 2kv)`); in one call (up to
/// `train::step::attn_slice_above` tokens) flash attention's fp32 dq accumulator (`4q`) and,
/// grouped, the k/v gradients expanded to every query head (`2 * 2q`); in head slices
/// (`model::attention::ATTN_BACKWARD_SLICES`) the SDPA output has gone with o_proj's backward
/// (the node keeps only q, k, v) and one slice's transients are `1/n` of: its output again
/// (`2q`), the dq accumulator (`4q`), dq and the k/v gradients expanded (`3 * 2q`), and the
/// grouped k/v gradients (`2 * 2kv`).
pub fn long_layer_peak(req: &PlanRequest, tokens: u64, attention: u64) -> u64 {
    let s = &req.shape;
    let (h, i) = (s.hidden, s.intermediate);
    let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let full = req.method == Method::Full;
    let i = match s.layout {
        shapes::Layout::Moe(m) => m.top_k * m.expert_intermediate,
        _ => i,
    };
    let graph = attention - 2 * 2 * h;
    let tile = MLP_TILE_ROWS * 2 * (6 * i + if full { i } else { 0 });
    let dequantised = if req.method == Method::Qlora { 2 * 2 * i * h } else { 0 };
    let mlp_phase = tokens * (graph + 2 * 2 * h) + tile + dequantised;
    let gradients = 2 * h + 2 * q + 2 * (q + 2 * kv);
    let attention_phase = if tokens > crate::train::step::attn_slice_above(q as i64) as u64 {
        let kv_heads = s.kv_heads.max(1);
        let slices = kv_heads.div_ceil(kv_heads.div_ceil(ATTN_BACKWARD_SLICES));
        tokens * (graph - 2 * q + gradients) + tokens * (12 * q + 4 * kv) / slices
    } else {
        let expanded = if s.heads != s.kv_heads { 2 * 2 * q } else { 0 };
        tokens * (graph + gradients + 4 * q + expanded)
    };
    mlp_phase.max(attention_phase)
}
