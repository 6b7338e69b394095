//! Memory planning behind `ftx plan`: how many bytes a fine-tuning run needs for weights,
//! gradients, optimizer state and activations, and the smallest GPU tier that holds them.
//!
//! The numbers are the practitioner's back-of-envelope made exact, not a profiler trace:
//! every rule is written next to the code that applies it. What is deliberately left out
//! (CUDA context, allocator fragmentation, transient backward buffers, FSDP's gathered
//! layer) is what [`USABLE_PERCENT`] leaves room for.

mod options;
mod report;
mod shapes;

pub use options::{Method, Optimizer};
pub use shapes::ModelShape;

use options::names;
use std::fmt;

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

/// A hardware tier: `gpus` cards of `gib` GiB each (an "80GB" card has 80 GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// Number of GPUs.
    pub gpus: u64,
    /// Memory per GPU in GiB.
    pub gib: u64,
}

/// The tiers `ftx plan` checks, smallest first. Past the last one a run "does not fit on 8x80GB".
pub const TIERS: [Tier; 8] = [
    Tier { gpus: 1, gib: 16 },
    Tier { gpus: 1, gib: 24 },
    Tier { gpus: 1, gib: 40 },
    Tier { gpus: 1, gib: 48 },
    Tier { gpus: 1, gib: 80 },
    Tier { gpus: 2, gib: 80 },
    Tier { gpus: 4, gib: 80 },
    Tier { gpus: 8, gib: 80 },
];

/// Percent of each card's memory a plan may fill; the rest covers the CUDA context,
/// allocator fragmentation and the transient buffers this model does not count.
pub const USABLE_PERCENT: u64 = 90;

/// Tokens per chunk when the cross-entropy is chunked (only one chunk's logits live at once).
pub const CE_CHUNK_TOKENS: u64 = 1024;

impl Tier {
    /// Bytes one GPU of this tier may fill.
    pub fn usable_bytes(self) -> u64 {
        (self.gib << 30) * USABLE_PERCENT / 100
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x {}GB", self.gpus, self.gib)
    }
}

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
    /// Optimizer for the trainable parameters.
    pub optimizer: Optimizer,
    /// LoRA rank `r` (ignored for full fine-tuning).
    pub lora_rank: u64,
    /// Fused/chunked cross-entropy: never materialize the full `b*s*V` logits.
    pub chunked_ce: bool,
}

impl PlanRequest {
    /// A request with common defaults: seq 2048, batch 1, no checkpointing, AdamW, r=16.
    pub fn new(shape: ModelShape, method: Method) -> PlanRequest {
        PlanRequest {
            shape,
            method,
            seq_len: 2048,
            batch: 1,
            grad_checkpointing: false,
            optimizer: Optimizer::Adamw,
            lora_rank: 16,
            chunked_ce: false,
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
    /// The first (smallest) tier that fits; `None` means it does not fit on 8x80GB.
    pub fn smallest_tier(&self) -> Option<Tier> {
        self.fits.iter().find(|(_, ok)| *ok).map(|(t, _)| *t)
    }
}

/// LoRA parameters for rank `r` on every "all-linear" target: `r*(in+out)` per linear
/// (A is `r x in`, B is `out x r`); DoRA adds a magnitude vector of `out` per linear.
pub fn adapter_params(shape: &ModelShape, r: u64, dora: bool) -> u64 {
    let per_layer: u64 = shape
        .linears()
        .iter()
        .map(|&(_, i, o)| r * (i + o) + if dora { o } else { 0 })
        .sum();
    shape.layers * per_layer
}

/// Bytes of the frozen QLoRA base. The linear weights are NF4 with bitsandbytes' defaults:
/// 4 bits per parameter, blocksize 64 with double-quantized absmax (an 8-bit absmax per
/// 64-block, and an fp32 scale per 256 of those, i.e. per 16384 parameters), so
/// 4 + 8/64 + 32/16384 = 4.127 bits per parameter. Embeddings, `lm_head`, norms and biases
/// are not quantized and stay bf16. Per-tensor codebooks and offsets (a few bytes) are ignored.
pub fn qlora_base_bytes(shape: &ModelShape) -> u64 {
    let nf4: u64 = shape
        .linears()
        .iter()
        .map(|&(_, i, o)| {
            let n = i * o;
            n.div_ceil(2) + n.div_ceil(64) + 4 * n.div_ceil(16384)
        })
        .sum();
    let bf16_params = shape.params() - shape.layers * shape.layer_linear_params();
    shape.layers * nf4 + 2 * bf16_params
}

/// Activation bytes for `batch` sequences, all saved tensors in bf16.
///
/// Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer Models")
/// estimate a GPT layer at `s*b*h*(34 + 5*a*s/h)` bytes; the `a*s^2` part is the attention
/// matrix, which flash attention / SDPA never stores, so ftx (which uses SDPA) drops it.
/// We recount the remaining tensors for a Llama layer (RMSNorm, GQA, SwiGLU, no dropout),
/// per token, with `q = heads*head_dim`, `kv = kv_heads*head_dim`, `i = intermediate`:
///
/// | saved for backward                               | elements   |
/// |--------------------------------------------------|------------|
/// | attention RMSNorm input and output               | `2h`       |
/// | q, k, v after RoPE (inputs to SDPA)              | `q + 2kv`  |
/// | SDPA output (input to o_proj)                    | `q`        |
/// | MLP RMSNorm input and output                     | `2h`       |
/// | gate, SiLU(gate), up, SiLU(gate)*up (down input) | `4i`       |
///
/// i.e. `2*(4h + 2q + 2kv + 4i)` bytes, plus SDPA's fp32 logsumexp (`4*heads` bytes).
/// A frozen linear needs no saved input, but its adapter does (the same tensor), so the
/// count holds for LoRA too; adapters add the `r`-wide `x@A` per target (`2*7r` bytes),
/// and DoRA's magnitude rescale also keeps the base and LoRA outputs (`2*2*out` per target).
///
/// With gradient checkpointing each layer keeps only its input (`2h` per token) and one
/// layer's full set is live during its recomputation. After the layers: the final norm's
/// input and output (`2*2h`), and the logits at `2 + 4` bytes per entry (bf16 logits and
/// their fp32 upcast for the loss) for every token, or for one [`CE_CHUNK_TOKENS`] chunk
/// when the cross-entropy is chunked.
pub fn activation_bytes(req: &PlanRequest, batch: u64) -> u64 {
    let s = &req.shape;
    let (h, i) = (s.hidden, s.intermediate);
    let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let x_a = 2 * s.linears().len() as u64 * req.lora_rank;
    let adapter = match req.method {
        Method::Full => 0,
        Method::Lora | Method::Qlora => x_a,
        Method::Dora => x_a + 4 * s.linears().iter().map(|l| l.2).sum::<u64>(),
    };
    let per_token_layer = 2 * (4 * h + 2 * q + 2 * kv + 4 * i) + 4 * s.heads + adapter;

    let tokens = req.seq_len * batch;
    let layer = tokens * per_token_layer;
    let layers = if req.grad_checkpointing {
        s.layers * tokens * 2 * h + layer
    } else {
        s.layers * layer
    };
    let final_norm = tokens * 2 * 2 * h;
    let logit_tokens = if req.chunked_ce {
        tokens.min(CE_CHUNK_TOKENS)
    } else {
        tokens
    };
    layers + final_norm + logit_tokens * s.vocab * (2 + 4)
}

/// Sizes a run.
///
/// Per trainable parameter: full fine-tuning is mixed precision (bf16 weight 2 + fp32
/// master 4 in `weights`, bf16 gradient 2), which with AdamW's fp32 m and v (4+4) is the
/// practitioner's 16 bytes/parameter (7B ≈ 112 GB before activations). Adapters are kept
/// entirely in fp32 (weight 4, gradient 4, so again 16 with AdamW) next to the frozen base:
/// bf16 (2 bytes/parameter) for LoRA and DoRA, NF4 ([`qlora_base_bytes`]) for QLoRA.
///
/// Multi-GPU tiers assume FSDP / ZeRO-3: weights, gradients and optimizer state shard evenly
/// across the GPUs, while activations are per GPU for its share of the batch,
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
        Method::Lora | Method::Dora => (2 * total_params, 4, 4),
        Method::Qlora => (qlora_base_bytes(shape), 4, 4),
    };
    let weights = frozen_bytes + weight_bytes * trainable;
    let gradients = grad_bytes * trainable;
    let optimizer = req.optimizer.state_bytes(trainable);
    let activations = activation_bytes(req, req.batch);

    let sharded = weights + gradients + optimizer;
    let per_gpu: Vec<u64> = TIERS
        .iter()
        .map(|t| sharded.div_ceil(t.gpus) + activation_bytes(req, req.batch.div_ceil(t.gpus)))
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
        assert_eq!(p.weights, 2 * 1_235_814_400 + 4 * 11_272_192);
        assert_eq!(p.gradients, 4 * 11_272_192);
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
        assert_eq!(p.weights, 1_027_452_928 + 4 * 11_272_192);
    }

    #[test]
    fn activations_by_hand() {
        // tiny, s=8, b=2 → 16 tokens. q = 64, kv = 32.
        // per token per layer: 2*(4*64 + 2*64 + 2*32 + 4*128) = 2*960 = 1920, + lse 4*4 = 1936
        // layer = 16*1936 = 30_976; final norm 16*2*2*64 = 4096; logits 16*100*6 = 9600
        let mut req = PlanRequest::new(tiny(), Method::Full);
        req.seq_len = 8;
        req.batch = 2;
        assert_eq!(activation_bytes(&req, 2), 2 * 30_976 + 4096 + 9600);
        // checkpointed: inputs 2 layers * 16 tokens * 64 * 2 bytes = 4096, plus one full layer
        req.grad_checkpointing = true;
        assert_eq!(activation_bytes(&req, 2), 4096 + 30_976 + 4096 + 9600);
        // LoRA r=4 adds x@A per target: 2*7*4 = 56 bytes per token per layer
        req.grad_checkpointing = false;
        req.method = Method::Lora;
        req.lora_rank = 4;
        assert_eq!(
            activation_bytes(&req, 2),
            2 * 16 * (1936 + 56) + 4096 + 9600
        );
        // DoRA also keeps 2 outputs per target: outs 64+32+32+64+128+128+64 = 512 → 4*512 = 2048
        req.method = Method::Dora;
        assert_eq!(
            activation_bytes(&req, 2),
            2 * 16 * (1936 + 56 + 2048) + 4096 + 9600
        );
    }

    #[test]
    fn chunked_ce_keeps_one_chunk_of_logits() {
        let mut req = PlanRequest::new(tiny(), Method::Full); // 2048 tokens
        let full = activation_bytes(&req, 1);
        req.chunked_ce = true;
        assert_eq!(
            full - activation_bytes(&req, 1),
            (2048 - CE_CHUNK_TOKENS) * 100 * 6
        );
    }

    #[test]
    fn seven_b_lora_fits_24gb_with_checkpointing() {
        // mistral-7b: 14.5 GB bf16 base + 0.7 GB adapter state + ~1.3 GB activations.
        let mut req = named("mistral-7b", Method::Lora);
        req.grad_checkpointing = true;
        assert_eq!(plan(&req).smallest_tier(), Some(Tier { gpus: 1, gib: 24 }));
        // Without checkpointing 32 layers of saved tensors (~11 GB) push it to 40GB.
        req.grad_checkpointing = false;
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

    #[test]
    fn tier_usable_bytes() {
        assert_eq!(TIERS[0].usable_bytes(), 16 * (1 << 30) * 9 / 10);
        assert_eq!(TIERS[7].to_string(), "8x 80GB");
    }
}
