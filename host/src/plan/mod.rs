//! Memory planning behind `ftx plan`: how many bytes a fine-tuning run needs for weights,
//! gradients, optimizer state and activations, and the smallest GPU tier that holds them.
//!
//! The numbers are the practitioner's back-of-envelope made exact, not a profiler trace:
//! every rule is written next to the code that applies it. What is deliberately left out
//! (CUDA context, allocator fragmentation, transient backward buffers, FSDP's gathered
//! layer) is what [`USABLE_PERCENT`] leaves room for.

mod long_context;
mod options;
mod recompute;
mod report;
mod shapes;
mod tiers;

pub use long_context::long_layer_peak;
pub use options::{Method, Optimizer};
pub use recompute::{mlp_recompute_applies, recompute_extra_flops};
pub use shapes::{Layout, ModelShape, MoeFamily, MoeShape};
pub use tiers::{Tier, TIERS, USABLE_PERCENT};

use options::names;

/// Errors from reading shapes and parsing plan options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A required `config.json` key is absent.
    #[error("config.json has no `{0}`")]
    MissingKey(&'static str),
    /// A `config.json` key holds something other than a non-negative integer.
    #[error("config.json key `{key}` must be a non-negative integer, got {value}")]
    BadValue {
        /// The offending key.
        key: &'static str,
        /// Its value, as JSON.
        value: String,
    },
    /// A method name that is not one of [`Method::ALL`].
    #[error("unknown method `{0}` (valid: {valid})", valid = names(Method::ALL.map(Method::name)))]
    UnknownMethod(String),
    /// An optimizer name that is not one of [`Optimizer::ALL`].
    #[error("unknown optimizer `{0}` (valid: {valid})", valid = names(Optimizer::ALL.map(Optimizer::name)))]
    UnknownOptimizer(String),
}

/// Logit entries per chunk of ftx's chunked cross-entropy (4× that when the head trains).
const CE_CHUNK_LOGITS: u64 = crate::train::head_loss::CHUNK_ELEMS as u64;

/// Tokens per MLP tile once checkpointed micro-batches are tiled.
pub(crate) const MLP_TILE_ROWS: u64 = crate::train::step::MLP_TILE_ROWS as u64;

/// A run to size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRequest {
    /// The model.
    pub shape: ModelShape,
    /// Full fine-tuning or an adapter method.
    pub method: Method,
    /// Tokens per sequence.
    pub seq_len: u64,
    /// Sequences per step (the global micro-batch; multi-GPU tiers split it).
    pub batch: u64,
    /// Recompute each layer in backward instead of keeping its activations.
    pub grad_checkpointing: bool,
    /// With checkpointing, keep the layer inputs in host memory instead of on the GPU.
    pub offload: bool,
    /// Selective MLP recompute (`train.recompute = "mlp"`): the LoRA MLP node keeps no gate/up
    /// output (see [`mlp_recompute_applies`]).
    pub recompute_mlp: bool,
    /// `method.fp8`: the decoder layers' dense projections stored in FP8 ([`fp8_base_bytes`]).
    pub fp8_base: bool,
    /// Optimizer for the trainable parameters.
    pub optimizer: Optimizer,
    /// LoRA rank `r` (ignored for full fine-tuning).
    pub lora_rank: u64,
    /// Chunked cross-entropy (ftx's own): never materialise the full `b*s*V` logits.
    pub chunked_ce: bool,
    /// With checkpointing, layers per checkpointed segment: only every `segment`-th layer's
    /// input is kept, the segment's others recomputed on the device in backward (ftx offloads
    /// so when the host cannot hold every input: `train::offload::segment_len`). 1 = every one.
    pub segment: u64,
}

impl PlanRequest {
    /// A request with common defaults: seq 2048, batch 1, no checkpointing, AdamW, r=16,
    /// chunked cross-entropy (as ftx always runs it).
    pub fn new(shape: ModelShape, method: Method) -> PlanRequest {
        PlanRequest {
            shape,
            method,
            seq_len: 2048,
            batch: 1,
            grad_checkpointing: false,
            offload: false,
            recompute_mlp: false,
            fp8_base: false,
            optimizer: Optimizer::Adamw,
            lora_rank: 16,
            chunked_ce: true,
            segment: 1,
        }
    }
}

/// The sized run. Byte fields are for a single GPU holding everything; `fits` and
/// `per_gpu` apply the multi-GPU sharding assumption of [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What was planned.
    pub request: PlanRequest,
    /// Parameters in the base model.
    pub total_params: u64,
    /// Parameters the optimizer updates (all of them for full, the adapters otherwise).
    pub trainable_params: u64,
    /// Every copy of the weights: frozen base, trainable weights, fp32 masters.
    pub weights: u64,
    /// Gradients of the trainable parameters.
    pub gradients: u64,
    /// Optimizer state.
    pub optimizer: u64,
    /// Tensors saved for backward, plus the logits.
    pub activations: u64,
    /// Sum of the four above.
    pub total: u64,
    /// Each tier of [`TIERS`] and whether the run fits it.
    pub fits: Vec<(Tier, bool)>,
    /// Bytes per GPU on the matching entry of `fits`.
    pub per_gpu: Vec<u64>,
}

impl Plan {
    /// Host memory the offloaded layer inputs take (checkpointing with offload): every
    /// segment's first input, `2h` bytes a token. 0 without offload.
    pub fn host_offload_bytes(&self) -> u64 {
        let r = &self.request;
        if !(r.offload && r.grad_checkpointing) {
            return 0;
        }
        let k = r.segment.clamp(1, r.shape.layers.max(1));
        r.shape.layers.div_ceil(k) * r.seq_len * r.batch * 2 * r.shape.hidden
    }

    /// The first (smallest) tier that fits; `None` means it does not fit on 8x80GB.
    pub fn smallest_tier(&self) -> Option<Tier> {
        self.fits.iter().find(|(_, ok)| *ok).map(|(t, _)| *t)
    }

    /// Bytes of weights, gradients and optimizer state each of `gpus` ranks holds between
    /// steps under ftx's FSDP (`train::fsdp`): everything sharded evenly, QLoRA's NF4
    /// projections too.
    pub fn state_per_gpu(&self, gpus: u64) -> u64 {
        sharded_state(self.weights + self.gradients + self.optimizer, gpus)
    }
}

/// LoRA parameters for rank `r` on every "all-linear" target: `r*(in+out)` per linear
/// (A is `r x in`, B is `out x r`); DoRA adds a magnitude vector of `out` per linear.
pub fn adapter_params(shape: &ModelShape, r: u64, dora: bool) -> u64 {
    let per_layer: u64 = shape
        .layer_linears()
        .iter()
        .map(|&(i, o, n)| n * (r * (i + o) + if dora { o } else { 0 }))
        .sum();
    shape.layers * per_layer
}

/// Bytes of the frozen QLoRA base. The linear weights are NF4 with bitsandbytes' defaults:
/// 4 bits per parameter, blocksize 64 with double-quantized absmax (an 8-bit absmax per
/// 64-block, and an fp32 scale per 256 of those, i.e. per 16384 parameters), so
/// 4 + 8/64 + 32/16384 = 4.127 bits per parameter. Embeddings, `lm_head`, norms and biases
/// are not quantized and stay bf16. Per-tensor codebooks and offsets (a few bytes) are ignored.
pub fn qlora_base_bytes(shape: &ModelShape) -> u64 {
    let bf16_params = shape.params() - shape.layers * shape.layer_linear_params();
    nf4_bytes(shape) + 2 * bf16_params
}

/// The frozen base's bytes under `method.fp8`: the decoder layers' projections (MoE layers:
/// attention's; routers and experts stay bf16, as `peft::quantize_fp8` leaves them) at one
/// byte a weight plus an fp32 scale per output row, everything else bf16.
pub fn fp8_base_bytes(shape: &ModelShape) -> u64 {
    let (fp8_params, rows): (u64, u64) = match shape.layout {
        Layout::Moe(_) => shape.linears()[..4].iter().fold((0, 0), |(p, r), &(_, i, o)| (p + i * o, r + o)),
        _ => shape.linears().iter().fold((0, 0), |(p, r), &(_, i, o)| (p + i * o, r + o)),
    };
    let fp8 = shape.layers * (fp8_params + 4 * rows);
    fp8 + 2 * (shape.params() - shape.layers * fp8_params)
}

/// The NF4 part of [`qlora_base_bytes`]: every decoder layer's projections.
fn nf4_bytes(shape: &ModelShape) -> u64 {
    let nf4: u64 = shape
        .layer_linears()
        .iter()
        .map(|&(i, o, count)| {
            let n = i * o;
            count * (n.div_ceil(2) + n.div_ceil(64) + 4 * n.div_ceil(16384))
        })
        .sum();
    shape.layers * nf4
}

/// Per-GPU bytes of `state` sharded among `gpus`.
fn sharded_state(state: u64, gpus: u64) -> u64 {
    state.div_ceil(gpus)
}

/// Layer inputs an offloaded run holds on the device at once (see [`activation_bytes`]).
pub const OFFLOAD_IN_FLIGHT: u64 = 2;

/// Bytes per token and layer that DoRA keeps beyond LoRA: its node (`model::nodes::dora_linear`)
/// keeps each adapted projection's output for the magnitude's gradient. Where the output's
/// consumer keeps it anyway that is shared: the SwiGLU node keeps gate/up's, Gemma's sandwich
/// norms keep o's and down's. Left: the q/k/v output (`q + 2kv`; SDPA keeps its own copy of v
/// and the rotated q and k) and o's and down's outputs where they go straight into the residual
/// sum (`h` each; a MoE layer's down once per routed expert, `top_k·h`).
pub fn dora_output_bytes(s: &ModelShape) -> u64 {
    let (h, q, kv) = (s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let residual = match s.layout {
        shapes::Layout::Gemma2 | shapes::Layout::Gemma3 => 0,
        shapes::Layout::Moe(m) => h + m.top_k * h,
        _ => 2 * h,
    };
    2 * (q + 2 * kv + residual)
}

/// Activation bytes for `batch` sequences: what ftx's engine keeps for the backward pass,
/// tensor by tensor, in bf16 unless noted. Flash attention / SDPA never stores the attention
/// matrix, so nothing grows with `s²`. Per token and layer, with `q = heads*head_dim`,
/// `kv = kv_heads*head_dim`, `i = intermediate`:
///
/// | kept for backward                                                  | elements  |
/// |--------------------------------------------------------------------|-----------|
/// | attention RMSNorm input and output (the fused q/k/v GEMM's input)  | `2h`      |
/// | q and k after RoPE, v (SDPA's inputs)                              | `q + 2kv` |
/// | SDPA output (also o_proj's input)                                  | `q`       |
/// | MLP RMSNorm input and output (the fused gate/up GEMM's input)      | `2h`      |
/// | fused gate/up output, the SwiGLU node's only saved tensor (not with | `2i`      |
/// | selective recompute: [`mlp_recompute_applies`])                     |           |
/// | full fine-tuning: SwiGLU output (the trainable down GEMM's input)  | `i`       |
/// | Qwen3's q/k norms: their inputs                                    | `q + kv`  |
///
/// plus fp32: each RMSNorm's `1/rms` (4 bytes a row) and SDPA's logsumexp (`4*heads`).
/// Adapters add `x·Aᵀ` per target (`r` each; the down projection's comes out of the SwiGLU
/// node), DoRA the outputs its node keeps that nothing else keeps ([`dora_output_bytes`]). QLoRA keeps no
/// dequantised weight (its GEMMs dequantise again in backward). Per layer rather than per
/// token, full fine-tuning keeps the stacked q/k/v and gate/up weights of the fused GEMMs
/// (`2*(q + 2kv + 2i)*h`).
///
/// With checkpointing each layer keeps only its input (`2h` per token; offloaded to the host,
/// [`OFFLOAD_IN_FLIGHT`] of them on the device at a time; with segments of `k` layers only every `k`-th, and the segment's other `k − 1`
/// inputs are recomputed onto the device for its backward), and one layer's set is live during its recomputation.
/// The loss comes first: the final norm's output, the rows picked for the loss and
/// their gradient (`3*2h` per token), and one chunk of logits at `2 + 4` bytes an entry (bf16
/// logits, fp32 log-probabilities): [`CE_CHUNK_LOGITS`] entries, 4× that when the head trains
/// (full fine-tuning), which also keeps the head's fp32 gradient and one bf16 + fp32 product
/// per chunk (`10` bytes per head entry). Without chunking, every token's logits. Up to
/// `train::step::mlp_tile_above` tokens (16,384, fewer for wide MLPs) the layer's set and the
/// loss's are added (the rules the measured rows were checked against); above it the MLP runs
/// in tiles and the attention's backward in head slices, and the layer's peak is the larger of
/// its phases, counted as [`long_layer_peak`] says, or the loss's, whichever is larger.
///
/// Checked against ftx's measured peaks before the fused projections (H200, 2026-11-29: the
/// rules with `4i` for the MLP and no stacked weights predicted every row of the README's
/// table within 5%); the MLP and stacked-weight rows are what the fused engine changed.
pub fn activation_bytes(req: &PlanRequest, batch: u64) -> u64 {
    let s = &req.shape;
    let (h, i) = (s.hidden, s.intermediate);
    let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let full = req.method == Method::Full;
    let (attention, mlp) = layer_token_bytes(req);
    let i = match s.layout {
        shapes::Layout::Moe(m) => m.top_k * m.expert_intermediate,
        _ => i,
    };
    let per_layer = if full { 2 * (q + 2 * kv + 2 * i) * h } else { 0 };

    let tokens = req.seq_len * batch;
    let logits = if req.chunked_ce {
        (CE_CHUNK_LOGITS * if full { 4 } else { 1 }).min(tokens * s.vocab)
    } else {
        tokens * s.vocab
    };
    let head_gradient = if full { s.vocab * h * 10 } else { 0 };
    let head = tokens * 3 * 2 * h + logits * (2 + 4) + head_gradient;
    if !(req.grad_checkpointing || req.offload) {
        return s.layers * (tokens * saved_per_token_and_layer(req) + per_layer) + head;
    }
    let k = req.segment.clamp(1, s.layers.max(1));
    // Offloaded, two inputs are still on the device at a time: in the forward pass the one
    // whose copy out is reading it, in the backward the next layer's coming back beside the
    // one in use (measured: the H100 row of 2026-12-05 peaked 0.7 GiB above a plan of none).
    let kept = if req.offload { OFFLOAD_IN_FLIGHT } else { s.layers.div_ceil(k) };
    let inputs = (kept + k - 1) * tokens * 2 * h;
    let above = crate::train::step::mlp_tile_above(i as i64) as u64;
    if tokens <= above {
        // The recomputed layer's set: selective recompute does not lower it, since its MLP's
        // backward holds the recomputed gate/up output anyway.
        return inputs + tokens * attention + tokens * mlp + per_layer + head;
    }
    inputs + per_layer + long_layer_peak(req, tokens, attention).max(head)
}

/// Bytes a layer keeps for backward per token without checkpointing: [`activation_bytes`]'s
/// table, less the gate/up output where selective recompute applies
/// ([`mlp_recompute_applies`]). What a test holds to the tensors the engine saves.
pub fn saved_per_token_and_layer(req: &PlanRequest) -> u64 {
    let (attention, mlp) = layer_token_bytes(req);
    attention + mlp - recompute::gate_up_bytes_dropped(req)
}

/// Per token and layer: the attention half's kept bytes (with the adapters' `x·Aᵀ` and DoRA's
/// outputs) and the MLP's, as [`activation_bytes`]'s table counts them.
fn layer_token_bytes(req: &PlanRequest) -> (u64, u64) {
    let s = &req.shape;
    let (h, i) = (s.hidden, s.intermediate);
    let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let full = req.method == Method::Full;
    let mut attention = 2 * (4 * h + 2 * q + 2 * kv) + 2 * 4 + 4 * s.heads;
    if s.qk_norm {
        attention += 2 * (q + kv) + 4 * (s.heads + s.kv_heads);
    }
    if matches!(s.layout, shapes::Layout::Gemma2 | shapes::Layout::Gemma3) {
        // Gemma's post-attention and pre/post-MLP norms: their inputs and statistics.
        attention += 3 * (2 * h + 4);
    }
    if s.layout == shapes::Layout::Gemma2 {
        // Soft-capped attention runs written out: per query, the scores over the sequence as
        // products, capped, fp32 softmax and its bf16 copy (2 + 2 + 4 + 2 bytes each).
        // Estimated from the ops, not yet measured.
        attention += 10 * s.heads * req.seq_len;
    }
    attention += match req.method {
        Method::Full => 0,
        Method::Lora | Method::Qlora => 2 * s.linears().len() as u64 * req.lora_rank,
        Method::Dora => 2 * s.linears().len() as u64 * req.lora_rank + dora_output_bytes(s),
    };
    // A MoE token's MLP activations are those of its top-k experts (plus the sorted copy of
    // its input each expert reads).
    let (i, moe_copy) = match s.layout {
        shapes::Layout::Moe(m) => (m.top_k * m.expert_intermediate, 2 * m.top_k * h),
        _ => (i, 0),
    };
    let mlp = 2 * if full { 3 * i } else { 2 * i } + moe_copy;
    (attention, mlp)
}

/// Sizes a run.
///
/// Per trainable parameter, as ftx keeps it: mixed precision (bf16 weight 2 + fp32 master 4
/// in `weights`, bf16 gradient 2), which with AdamW's fp32 m and v (4+4) is the
/// practitioner's 16 bytes/parameter (7B ≈ 112 GB before activations) — for full fine-tuning
/// and for adapters alike, the adapters next to the frozen base: bf16 (2 bytes/parameter) for
/// LoRA and DoRA, NF4 ([`qlora_base_bytes`]) for QLoRA.
///
/// Multi-GPU tiers assume ftx's FSDP / ZeRO-3: weights, gradients and optimizer state shard
/// evenly across the GPUs (QLoRA's NF4 projections excepted: each GPU keeps them whole), while activations are per GPU for its share of the batch,
/// `ceil(batch / gpus)` sequences (at least one each).
pub fn plan(req: &PlanRequest) -> Plan {
    let shape = &req.shape;
    let total_params = shape.params();
    let trainable = match req.method {
        Method::Full => total_params,
        Method::Lora | Method::Qlora => adapter_params(shape, req.lora_rank, false),
        Method::Dora => adapter_params(shape, req.lora_rank, true),
    };
    // The frozen base's bytes, then each trainable parameter's weight copies and gradient.
    let (frozen_bytes, weight_bytes, grad_bytes) = match req.method {
        Method::Full => (0, 2 + 4, 2),
        Method::Lora | Method::Dora if req.fp8_base => (fp8_base_bytes(shape), 2 + 4, 2),
        Method::Lora | Method::Dora => (2 * total_params, 2 + 4, 2),
        Method::Qlora => (qlora_base_bytes(shape), 2 + 4, 2),
    };
    let weights = frozen_bytes + weight_bytes * trainable;
    let gradients = grad_bytes * trainable;
    let optimizer = req.optimizer.state_bytes(trainable);
    let activations = activation_bytes(req, req.batch);

    let sharded = weights + gradients + optimizer;
    let per_gpu: Vec<u64> = TIERS
        .iter()
        .map(|t| sharded_state(sharded, t.gpus) + activation_bytes(req, req.batch.div_ceil(t.gpus)))
        .collect();
    let fits = TIERS
        .iter()
        .zip(&per_gpu)
        .map(|(t, &b)| (*t, b <= t.usable_bytes()))
        .collect();
    Plan {
        request: req.clone(),
        total_params,
        trainable_params: trainable,
        weights,
        gradients,
        optimizer,
        activations,
        total: sharded + activations,
        fits,
        per_gpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small shape for hand arithmetic: h=64, i=128, 2 layers, 4 heads of 16, 2 kv heads, V=100.
    fn tiny() -> ModelShape {
        ModelShape {
            name: "tiny".into(),
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            vocab: 100,
            tied_embeddings: true,
            qkv_bias: false,
            qk_norm: false,
            layout: Default::default(),
        }
    }

    fn named(name: &str, method: Method) -> PlanRequest {
        PlanRequest::new(ModelShape::named(name).unwrap(), method)
    }

    #[test]
    fn full_adamw_is_16_bytes_per_param() {
        // Exactly 7e9 parameters: h=1000, 10 MHA heads of 100, one layer, i=1e6, V=3_995_997 tied.
        // embed 3_995_997*1000 = 3_995_997_000
        // layer: attention 4*1000*1000 = 4_000_000, MLP 3*1000*1_000_000 = 3e9, norms 2000
        // final norm 1000 → 3_995_997_000 + 3_004_002_000 + 1000 = 7_000_000_000
        let shape = ModelShape {
            name: "7b".into(),
            hidden: 1000,
            intermediate: 1_000_000,
            layers: 1,
            heads: 10,
            kv_heads: 10,
            head_dim: 100,
            vocab: 3_995_997,
            tied_embeddings: true,
            qkv_bias: false,
            qk_norm: false,
            layout: Default::default(),
        };
        assert_eq!(shape.params(), 7_000_000_000);
        let p = plan(&PlanRequest::new(shape, Method::Full));
        assert_eq!(p.trainable_params, 7_000_000_000);
        assert_eq!(p.weights, 42_000_000_000); // bf16 2 + fp32 master 4
        assert_eq!(p.gradients, 14_000_000_000); // bf16
        assert_eq!(p.optimizer, 56_000_000_000); // m + v fp32
        assert_eq!(p.weights + p.gradients + p.optimizer, 112_000_000_000);
        assert_eq!(p.total, 112_000_000_000 + p.activations);
    }

    #[test]
    fn lora_and_dora_adapter_counts() {
        // llama-3.2-1b, r=16, per layer r*(in+out):
        //   q 16*(2048+2048) = 65_536     k 16*(2048+512) = 40_960   v 40_960
        //   o 16*(2048+2048) = 65_536     gate 16*(2048+8192) = 163_840
        //   up 163_840                    down 16*(8192+2048) = 163_840
        //   = 131_072 + 81_920 + 491_520 = 704_512; x16 layers = 11_272_192
        let shape = ModelShape::named("llama-3.2-1b").unwrap();
        assert_eq!(adapter_params(&shape, 16, false), 11_272_192);
        // DoRA magnitudes: outs 2048+512+512+2048+8192+8192+2048 = 23_552; x16 = 376_832
        assert_eq!(adapter_params(&shape, 16, true), 11_272_192 + 376_832);

        let p = plan(&named("llama-3.2-1b", Method::Lora));
        assert_eq!(p.trainable_params, 11_272_192);
        assert_eq!(p.weights, 2 * 1_235_814_400 + 6 * 11_272_192);
        assert_eq!(p.gradients, 2 * 11_272_192);
        assert_eq!(p.optimizer, 8 * 11_272_192);
    }

    #[test]
    fn qlora_base_bytes_by_hand() {
        // llama-3.2-1b, per linear n/2 + n/64 + 4*n/16384:
        //   q, o: n = 4_194_304 → 2_097_152 + 65_536 + 1024 = 2_163_712
        //   k, v: n = 1_048_576 → 524_288 + 16_384 + 256 = 540_928
        //   gate, up, down: n = 16_777_216 → 8_388_608 + 262_144 + 4096 = 8_654_848
        //   layer = 2*2_163_712 + 2*540_928 + 3*8_654_848 = 31_373_824; x16 = 501_981_184
        // bf16: tied embedding 262_668_288 + norms 16*4096 + 2048 = 262_735_872 → 525_471_744
        let shape = ModelShape::named("llama-3.2-1b").unwrap();
        assert_eq!(qlora_base_bytes(&shape), 501_981_184 + 525_471_744);
        let p = plan(&named("llama-3.2-1b", Method::Qlora));
        assert_eq!(p.weights, 1_027_452_928 + 6 * 11_272_192);
    }

    #[test]
    fn activations_by_hand() {
        // tiny, s=8, b=2 → 16 tokens. q = 64, kv = 32, i = 128, V = 100.
        // attention per token: 2*(4*64 + 2*64 + 2*32) = 896, + two 1/rms 8 + lse 4*4 = 920
        // full: MLP 2*3*128 = 768; stacked weights 2*(64 + 64 + 256)*64 = 49_152 per layer
        // layers 2*(16*(920 + 768) + 49_152) = 152_320
        // head: 16*3*2*64 = 6144, logits 16*100*6 = 9600 (fewer than a chunk), the trained
        // head's gradient 100*64*10 = 64_000 → 79_744
        let mut req = PlanRequest::new(tiny(), Method::Full);
        req.seq_len = 8;
        req.batch = 2;
        assert_eq!(activation_bytes(&req, 2), 152_320 + 79_744);
        // checkpointed: inputs 2 layers * 16 tokens * 64 * 2 bytes = 4096, plus one layer
        req.grad_checkpointing = true;
        assert_eq!(activation_bytes(&req, 2), 4096 + 16 * 1688 + 49_152 + 79_744);
        // offloaded: the inputs live in host memory, two of them on the device in flight
        // (2 * 16 tokens * 64 * 2 bytes: as many bytes as the two layers' inputs above)
        req.offload = true;
        assert_eq!(activation_bytes(&req, 2), OFFLOAD_IN_FLIGHT * 16 * 64 * 2 + 16 * 1688 + 49_152 + 79_744);
        // LoRA r=4: x@A per target 2*7*4 = 56 → attention 976; MLP 2*2*128 = 512
        // layers 2*16*(976 + 512) = 47_616; head 6144 + 9600 = 15_744
        req.grad_checkpointing = false;
        req.offload = false;
        req.method = Method::Lora;
        req.lora_rank = 4;
        assert_eq!(activation_bytes(&req, 2), 47_616 + 15_744);
        // DoRA's node also keeps the q/k/v output (64+32+32 = 128) and o's and down's outputs,
        // which go straight into the residual sums (64 each): 2*(128 + 128) = 512 (gate/up's
        // output is the SwiGLU node's saved tensor already)
        req.method = Method::Dora;
        assert_eq!(activation_bytes(&req, 2), 2 * 16 * (976 + 512 + 512) + 15_744);
        // QLoRA keeps what LoRA keeps: no dequantised weight
        req.method = Method::Qlora;
        assert_eq!(activation_bytes(&req, 2), 47_616 + 15_744);
        // Qwen3's q/k norms keep their inputs: 2*(64 + 32) + 4*(4 + 2) = 216 per token
        req.method = Method::Lora;
        req.shape.qk_norm = true;
        assert_eq!(activation_bytes(&req, 2), 2 * 16 * (976 + 216 + 512) + 15_744);
    }

    #[test]
    fn long_sequences_tile_the_mlp_and_slice_the_attention_backward_under_checkpointing() {
        // 32768 tokens, checkpointed LoRA r=4 (h = 64, q = 64, kv = 32, i = 128): the two
        // kept inputs 2 * 2 * 64 = 256 a token; the attention graph 976 less the MLP norm's
        // input and output (256) = 720.
        // MLP phase: 720 + h and the incoming gradient (which gathers h's) 2 * 128 = 976 a
        // token, one tile of 4096 tokens * 2 * 6 * 128 = 6_291_456.
        // Attention phase in one call: 720 + the residual's gradient 128 + the SDPA output's 128
        // + q/k/v gradients 2 * 128 = 256, flash's dq accumulator 4 * 64 = 256 and the k/v
        // gradients expanded to the 4 query heads 2 * 2 * 64 = 256 → 1744 a token.
        // The loss: 3 * 128 + 100 * 6 = 984 a token.
        let mut req = PlanRequest::new(tiny(), Method::Lora);
        req.lora_rank = 4;
        req.seq_len = 32_768;
        req.grad_checkpointing = true;
        let tokens = 32_768;
        let mlp = tokens * 976 + 6_291_456;
        let attention = tokens * 1744;
        assert!(attention > mlp && attention > tokens * 984);
        assert_eq!(activation_bytes(&req, 1), 2 * tokens * 128 + attention);
        // QLoRA adds the gate/up weights dequantised to the MLP phase: 2 * 2 * 128 * 64 = 32_768.
        req.method = Method::Qlora;
        assert_eq!(long_layer_peak(&req, tokens, 976), attention.max(mlp + 32_768));
        // Above 2^28 / 64 = 4,194,304 tokens the attention's backward runs in head slices: the
        // SDPA output gone (720 - 128), the gradients 512 as above, and a slice's transients:
        // 2 kv heads = 2 slices of (12 * 64 + 4 * 32) / 2 = 448 → 1552 a token.
        let long = 5_000_000;
        assert_eq!(long_layer_peak(&req, long, 976), long * 1552);
        // A wide MLP makes the tiles the peak: i = 16,384 tiles above 8,192 tokens; 10,000
        // tokens → MLP phase 10_000 * 976 + 4096 * 12 * 16_384 + 2 * 2 * 16_384 * 64.
        req.shape.intermediate = 16_384;
        assert_eq!(long_layer_peak(&req, 10_000, 976), 10_000 * 976 + 4096 * 12 * 16_384 + 4 * 16_384 * 64);
    }

    #[test]
    fn checkpointed_segments_keep_every_kth_input_and_recompute_the_rest_on_the_device() {
        // tiny (5 layers here), 16 tokens, LoRA r=4: one layer's set as in activations_by_hand.
        let mut shape = tiny();
        shape.layers = 5;
        let mut req = PlanRequest::new(shape, Method::Lora);
        req.lora_rank = 4;
        req.seq_len = 8;
        req.batch = 2;
        req.grad_checkpointing = true;
        let input = 16 * 2 * 64;
        let rest = 16 * (976 + 512) + 6144 + 9600;
        assert_eq!(activation_bytes(&req, 2), 5 * input + rest);
        // Segments of 2: inputs of layers 0, 2, 4 kept, one more recomputed at a time.
        req.segment = 2;
        assert_eq!(activation_bytes(&req, 2), (3 + 1) * input + rest);
        // Offloaded: the kept ones live in host memory, two in flight on the device; the
        // recomputed one on the device.
        req.offload = true;
        assert_eq!(activation_bytes(&req, 2), (2 + 1) * input + rest);
        assert_eq!(plan(&req).host_offload_bytes(), 3 * input);
        req.segment = 1;
        assert_eq!(activation_bytes(&req, 2), 2 * input + rest);
        assert_eq!(plan(&req).host_offload_bytes(), 5 * input);
        // llama-3.1-70b at 107k tokens: 80 inputs of 107_000 × 8192 × 2 bytes on the host, half with k = 2.
        let mut big = named("llama-3.1-70b", Method::Qlora);
        (big.seq_len, big.grad_checkpointing, big.offload, big.segment) = (107_000, true, true, 2);
        assert_eq!(plan(&big).host_offload_bytes(), 40 * 107_000 * 8192 * 2);
    }

    #[test]
    fn wide_mlps_tile_from_fewer_tokens() {
        // intermediate 16,384: tiled above 2^27 / 16,384 = 8,192 tokens, in tiles of
        // MLP_TILE_ROWS. 10,000 tokens, checkpointed LoRA r=4, h=64:
        // attention 976 per token as in activations_by_hand; MLP 2*2*16_384 = 65_536 per token.
        let mut shape = tiny();
        shape.intermediate = 16_384;
        let mut req = PlanRequest::new(shape, Method::Lora);
        req.lora_rank = 4;
        req.grad_checkpointing = true;
        let tokens = 10_000;
        req.seq_len = tokens;
        let want = 2 * tokens * 128 + long_layer_peak(&req, tokens, 976);
        assert_eq!(activation_bytes(&req, 1), want);
        // The tiles' phase, not the attention's: 10_000 * 976 + 4096 * 12 * 16_384.
        assert_eq!(long_layer_peak(&req, tokens, 976), tokens * 976 + 4096 * 12 * 16_384);
        // 8,000 tokens: untiled, the whole MLP at once and no tiled output and gradient.
        req.seq_len = 8_000;
        let head = 8_000 * 384 + 8_000 * 100 * 6;
        assert_eq!(activation_bytes(&req, 1), 2 * 8_000 * 128 + 8_000 * 976 + 8_000 * 65_536 + head);
    }

    #[test]
    fn chunked_ce_keeps_one_chunk_of_logits() {
        // 2048 tokens × 2^16 entries = 2^27 logits: twice ftx's chunk.
        let mut shape = tiny();
        shape.vocab = 1 << 16;
        let mut req = PlanRequest::new(shape, Method::Lora);
        assert!(req.chunked_ce, "ftx always chunks");
        let chunked = activation_bytes(&req, 1);
        req.chunked_ce = false;
        assert_eq!(activation_bytes(&req, 1) - chunked, ((1 << 27) - CE_CHUNK_LOGITS) * 6);
    }

    #[test]
    fn seven_b_lora_fits_24gb_with_checkpointing() {
        // mistral-7b: 14.5 GB bf16 base + 0.7 GB adapter state + ~1.4 GB activations.
        let mut req = named("mistral-7b", Method::Lora);
        req.grad_checkpointing = true;
        assert_eq!(plan(&req).smallest_tier(), Some(Tier { gpus: 1, gib: 24 }));
        // Without checkpointing the 32 layers' saved tensors (2048 × 110,952 bytes each, 7.3 GB; the
        // logits of 2048 tokens × 32,000 are less than one chunk)
        // still fit 24GB at batch 1 (22.9 GB of 23.2 usable); at batch 2 they need 40GB.
        req.grad_checkpointing = false;
        assert_eq!(activation_bytes(&req, 1) - 2048 * 3 * 2 * 4096 - 2048 * 32_000 * 6, 32 * 2048 * 110_952);
        assert_eq!(plan(&req).smallest_tier(), Some(Tier { gpus: 1, gib: 24 }));
        req.batch = 2;
        assert_eq!(plan(&req).smallest_tier(), Some(Tier { gpus: 1, gib: 40 }));
    }

    #[test]
    fn seventy_b_full_does_not_fit() {
        // 70.55e9 params * 16 bytes = 1.13e12 bytes, 141 GB per GPU even on 8 cards.
        let p = plan(&named("llama-3.1-70b", Method::Full));
        assert_eq!(p.smallest_tier(), None);
        assert!(p.fits.iter().all(|(_, ok)| !ok));
        assert!(p.to_string().contains("does not fit on 8x80GB"));
    }

    #[test]
    fn multi_gpu_shards_state_and_splits_batch() {
        let mut req = named("llama-3.1-8b", Method::Full);
        req.batch = 3;
        let p = plan(&req);
        let sharded = p.weights + p.gradients + p.optimizer;
        assert_eq!(p.per_gpu[0], p.total);
        // 2 GPUs: half the state each, ceil(3/2) = 2 sequences each.
        assert_eq!(
            p.per_gpu[5],
            sharded.div_ceil(2) + activation_bytes(&req, 2)
        );
        // 8 GPUs: at least one sequence each.
        assert_eq!(
            p.per_gpu[7],
            sharded.div_ceil(8) + activation_bytes(&req, 1)
        );
        assert_eq!(
            p.fits[7],
            (TIERS[7], p.per_gpu[7] <= TIERS[7].usable_bytes())
        );
    }
}
