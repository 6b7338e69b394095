//! What selective MLP recompute (`train.recompute = "mlp"`, `train::recompute`) changes in a
//! plan: the LoRA MLP node keeps no gate/up output (`2·i` bf16 values a token and layer) and
//! runs the gate/up GEMM once more in backward.

use super::{shapes::Layout, Method, PlanRequest};

/// True where the engine runs selective recompute for `req`: asked for, on a frozen base with
/// plain LoRA adapters (lora, qlora: the LoRA MLP node) and a dense MLP. Elsewhere `ftx train`
/// refuses the option, and the plan counts gate/up's output as before.
pub fn mlp_recompute_applies(req: &PlanRequest) -> bool {
    req.recompute_mlp && matches!(req.method, Method::Lora | Method::Qlora) && !matches!(req.shape.layout, Layout::Moe(_))
}

/// Bytes per token and layer the option drops: the gate/up output, `2·i` values in bf16.
pub(super) fn gate_up_bytes_dropped(req: &PlanRequest) -> u64 {
    if mlp_recompute_applies(req) {
        2 * 2 * req.shape.intermediate
    } else {
        0
    }
}

/// The option's cost as `(extra, step)`: FLOPs per token of the one more gate/up GEMM a layer
/// runs in backward (`2·h·2i`), and of the step without it (a frozen base: forward and input
/// gradient, 4 FLOPs per weight and token, with the head; causal attention `6·seq·q` a layer
/// forward and backward — `ftx bench train`'s count). `extra / step` is the arithmetic it adds.
pub fn recompute_extra_flops(req: &PlanRequest) -> (f64, f64) {
    let s = &req.shape;
    let (h, i, layers) = (s.hidden as f64, s.intermediate as f64, s.layers as f64);
    let weights: f64 = s.linears().iter().map(|(_, inp, out)| (*inp * *out) as f64).sum::<f64>() * layers + h * s.vocab as f64;
    let attention = 6.0 * layers * req.seq_len as f64 * (s.heads * s.head_dim) as f64;
    let step = 4.0 * weights + attention;
    let extra = if mlp_recompute_applies(req) { 2.0 * h * 2.0 * i * layers } else { 0.0 };
    (extra, step)
}
