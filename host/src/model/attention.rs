//! Self-attention and what it needs besides its input: rotary tables (plain, Llama 3, linear,
//! LongRoPE, YaRN; full or partial rotary), masks and the KV cache.
//!
//! Attention runs through libtorch's fused scaled-dot-product attention (flash or
//! memory-efficient kernels on GPU). Masks: plain causal when nothing else is needed, or an
//! explicit boolean mask for KV-cache offsets, sliding windows and packed sequences. Scores
//! that are soft-capped (Gemma 2) need the scores themselves, so they take the eager path.

use super::norm::RmsNorm;
use super::fused::fused_forward;
use super::nodes;
use super::linear::Linear;
use super::{dora_block, lora_block};
use super::{AttnSpan, RopeScaling};
use crate::gpu::kernels;
use tch::{Device, Kind, Tensor};

/// Rotary position embedding frequencies (with Llama 3, linear or LongRoPE scaling applied),
/// over the first `rotary_dim` dimensions of each head (all of them unless the config has a
/// `partial_rotary_factor`, as Phi-4-mini does).
pub struct Rope {
    inv_freq: Tensor,
    /// LongRoPE: the long factors' frequencies and `original_max_position_embeddings`. A call
    /// whose largest position reaches past it takes these for every position, as
    /// transformers decides per forward call (its `dynamic_rope_update`).
    long: Option<(Tensor, i64)>,
    /// Multiplier of cos and sin (LongRoPE's attention factor; 1 otherwise).
    attention_factor: f64,
}

impl Rope {
    /// Frequencies for `rotary_dim` rotated dimensions with base `theta`, scaled as `scaling`
    /// says.
    pub fn new(rotary_dim: i64, theta: f64, scaling: &RopeScaling, device: Device) -> Rope {
        let dim = rotary_dim;
        // As transformers: theta^(-2i/d) in fp32, from an int64 arange.
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / dim as f64;
        let base = Tensor::from(theta as f32).pow(&exponents);
        let mut inv_freq = base.reciprocal();
        let (mut long, mut attention_factor) = (None, 1.0);
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq = inv_freq / *factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => {
                let low_wavelen = original_max_positions / low_freq_factor;
                let high_wavelen = original_max_positions / high_freq_factor;
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                // Long wavelengths are slowed by `factor`, short ones kept, the middle blended.
                let scaled = inv_freq.where_self(&wavelen.le(low_wavelen), &(&inv_freq / *factor));
                let smooth = (wavelen.reciprocal() * *original_max_positions - *low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed = (-&smooth + 1.0) * &scaled / *factor + &smooth * &scaled;
                let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
                inv_freq = smoothed.where_self(&medium, &scaled);
            }
            RopeScaling::LongRope { short_factor, long_factor, original_max_positions, attention_factor: af } => {
                // transformers: 1 / (factor_i · theta^(2i/d)), the factors as fp32.
                let scaled = |f: &[f64]| (Tensor::from_slice(f).to_kind(Kind::Float) * &base).reciprocal();
                inv_freq = scaled(short_factor);
                long = Some((scaled(long_factor).to_device(device), *original_max_positions));
                attention_factor = *af;
            }
            RopeScaling::Yarn { factor, beta_fast, beta_slow, original_max_positions, truncate, attention_factor: af } => {
                // transformers' _compute_yarn_parameters: the dimension where a frequency turns
                // `rotations` times over the original context, for both betas.
                let d = dim as f64;
                let correction = |rotations: f64| {
                    d * (original_max_positions / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let ramp = ((Tensor::arange(dim / 2, (Kind::Float, Device::Cpu)) - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation = -ramp + 1.0;
                let interpolation = (&base * *factor).reciprocal();
                inv_freq = interpolation * (-&extrapolation + 1.0) + &inv_freq * &extrapolation;
                attention_factor = *af;
            }
        }
        Rope { inv_freq: inv_freq.to_device(device), long, attention_factor }
    }

    /// cos and sin, `[B, 1, T, rotary_dim]`, for integer positions `[B, T]`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let inv_freq = match &self.long {
            Some((long, original)) if positions.numel() > 0 && positions.max().int64_value(&[]) + 1 > *original => long,
            _ => &self.inv_freq,
        };
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        let (cos, sin) = (emb.cos(), emb.sin());
        if self.attention_factor == 1.0 {
            return (cos.to_kind(kind), sin.to_kind(kind));
        }
        ((cos * self.attention_factor).to_kind(kind), (sin * self.attention_factor).to_kind(kind))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3)
}

/// Rotary embedding as transformers writes it, `x·cos + rotate_half(x)·sin` (libtorch's ops),
/// over the first `cos.size(-1)` dimensions of each head; the rest pass through (partial
/// rotary, as transformers splits them). The composite the fused rope kernel replaces.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (rotary, head_dim) = (cos.size()[3], x.size()[3]);
    if rotary == head_dim {
        return x * cos + rotate_half(x) * sin;
    }
    let rot = x.narrow(3, 0, rotary);
    Tensor::cat(&[&rot * cos + rotate_half(&rot) * sin, x.narrow(3, rotary, head_dim - rotary)], 3)
}

/// q and k (`[B, T, heads, head_dim]`) rotated by the tables (`[B, 1, T, head_dim]`), returned
/// as `[B, heads, T, head_dim]`: one fused kernel each way for both where the kernels are active
/// (`gpu::kernels`), else the composite `x·cos + rotate_half(x)·sin`.
fn rotary(q: Tensor, k: Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor) {
    if kernels::active_for(&q) && cos.dim() == 4 {
        let (c, s) = (cos.squeeze_dim(1), sin.squeeze_dim(1));
        if kernels::rope_fits(&q, &k, &c) && c.size()[1] == q.size()[1] {
            let (q, k) = kernels::rope(&q, &k, &c, &s);
            return (q.transpose(1, 2), k.transpose(1, 2));
        }
    }
    (apply_rope(&q.transpose(1, 2), cos, sin), apply_rope(&k.transpose(1, 2), cos, sin))
}

/// Scaled-dot-product attention of `q [B, H, T, D]` over grouped `k`, `v` `[B, KVH, S, D]`
/// under a boolean `mask [B or 1, 1, T, S]`, as SDPA's `enable_gqa` computes it — but without that
/// flag, which libtorch's fused CUDA kernels refuse together with a mask (SDPA then falls back to
/// its math path: K and V repeated per group, every head's fp32 scores written out). The
/// `G = H / KVH` query heads sharing a key/value head are folded into the query length instead
/// (`[B, KVH, G·T, D]`, the mask repeated per folded head: a view while `T = 1`, as in decoding),
/// so one fused call runs with as many query heads as key/value heads.
pub fn masked_gqa_sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: Option<f64>) -> Tensor {
    let (b, h, t, d) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let kv_heads = k.size()[1];
    let m = mask.size();
    if h % kv_heads != 0 || m.len() != 4 || m[1] != 1 || m[2] != t {
        return Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, scale, true);
    }
    let g = h / kv_heads;
    let folded = q.reshape([b, kv_heads, g * t, d]);
    let mask = mask.unsqueeze(2).expand([m[0], 1, g, t, m[3]], false).reshape([m[0], 1, g * t, m[3]]);
    let out = Tensor::scaled_dot_product_attention(&folded, k, v, Some(&mask), 0.0, false, scale, false);
    out.reshape([b, h, t, d])
}

/// Which keys each query may see.
pub enum AttnMask {
    /// Causal over the current tokens only (no cache, no padding).
    Causal,
    /// Boolean `[B or 1, 1, T, S]`, true = may attend.
    Explicit(Tensor),
}

impl AttnMask {
    /// Causal mask for `t` new queries after `past` cached keys, with an optional window.
    pub fn causal_with_offset(t: i64, past: i64, window: Option<i64>, device: Device) -> AttnMask {
        let s = past + t;
        if past == 0 && window.is_none_or(|w| w >= s) {
            return AttnMask::Causal;
        }
        let q = Tensor::arange_start(past, s, (Kind::Int64, device)).view([t, 1]);
        let k = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
        let mut m = k.le_tensor(&q);
        if let Some(w) = window {
            m = m.logical_and(&(&q - &k).lt(w));
        }
        AttnMask::Explicit(m.view([1, 1, t, s]))
    }

    /// Packed rows: `segments [B, T]` numbers the example each token belongs to. A token
    /// attends to earlier tokens of its own example only, so examples never see each other.
    pub fn packed(segments: &Tensor, window: Option<i64>) -> AttnMask {
        let t = segments.size()[1];
        let device = segments.device();
        let same = segments.unsqueeze(2).eq_tensor(&segments.unsqueeze(1));
        let pos = Tensor::arange(t, (Kind::Int64, device));
        let mut causal = pos.view([1, t]).le_tensor(&pos.view([t, 1]));
        if let Some(w) = window {
            causal = causal.logical_and(&(pos.view([t, 1]) - pos.view([1, t])).lt(w));
        }
        AttnMask::Explicit(same.logical_and(&causal.unsqueeze(0)).unsqueeze(1))
    }

    /// The mask as booleans `[.., T, S]` (true = may attend), for `t` queries and `s` keys.
    pub fn explicit(&self, t: i64, s: i64, device: Device) -> Tensor {
        match self {
            AttnMask::Explicit(m) => m.shallow_clone(),
            AttnMask::Causal => Tensor::ones([t, s], (Kind::Bool, device)).tril(s - t),
        }
    }
}

/// What the layers of one attention span need besides their input: rotary tables and mask.
pub struct SpanInputs {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: AttnMask,
}

/// What every layer needs besides its input, per attention span (a model builds only the
/// spans its layers use).
pub struct AttnInputs {
    pub full: Option<SpanInputs>,
    pub sliding: Option<SpanInputs>,
    /// Causal attention (no mask, no soft-capping) that trains runs its backward over slices of
    /// the key/value heads ([`ATTN_BACKWARD_SLICES`] of them;
    /// [`nodes::causal_sdpa_sliced_backward`]): less memory for one more attention forward pass.
    /// Set by the checkpointed training step on long micro-batches (`train::step`).
    pub sliced_backward: bool,
}

/// Slices of key/value heads a sliced attention backward runs in (fewer where there are fewer
/// key/value heads): each holds an eighth of the full backward's transient buffers.
pub const ATTN_BACKWARD_SLICES: i64 = 8;

impl AttnInputs {
    /// The inputs of layers attending over `span`.
    pub fn span(&self, span: AttnSpan) -> &SpanInputs {
        let inputs = match span {
            AttnSpan::Full => self.full.as_ref(),
            AttnSpan::Sliding => self.sliding.as_ref(),
        };
        inputs.expect("attention inputs are built for every span the model's layers use")
    }
}

/// Cached keys and values of one layer, `[B, kv_heads, S, head_dim]`, or (`paged`) the
/// serving engine's pool to write them into and read them from.
#[derive(Default)]
pub struct LayerCache {
    pub kv: Option<(Tensor, Tensor)>,
    /// When set, attention goes through this pool and `kv` is left alone.
    pub paged: Option<PagedKv>,
}

/// One layer's keys and values in a paged pool (the serving engine's, `serve::paged`):
/// attention writes the new keys and values into their slots, then reads each row's keys and
/// values back through its slots, new ones included — one gather, no concatenation.
pub struct PagedKv {
    /// The pool's keys and values, `[slots, kv_heads, head_dim]`.
    pub k: Tensor,
    pub v: Tensor,
    /// Slots of the new positions, `[B·T]`, row after row.
    pub write: Tensor,
    /// Slots each row attends over, `[B·S]` row after row, the new positions included (`None`:
    /// nothing is cached, so the new keys and values are all there is).
    pub read: Option<Tensor>,
}

impl PagedKv {
    /// Writes `k`, `v` (`[B, kv_heads, T, head_dim]`) into their slots; returns the keys and
    /// values to attend over, `[B, kv_heads, S, head_dim]`.
    fn write_read(&self, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let (b, heads, t, dim) = (k.size()[0], k.size()[1], k.size()[2], k.size()[3]);
        let rows = |x: &Tensor| x.transpose(1, 2).reshape([b * t, heads, dim]);
        // In place on the pool's storage (a shallow handle of it).
        let _ = self.k.shallow_clone().index_copy_(0, &self.write, &rows(&k));
        let _ = self.v.shallow_clone().index_copy_(0, &self.write, &rows(&v));
        let Some(read) = &self.read else { return (k, v) };
        let s = read.size()[0] / b;
        let gather = |pool: &Tensor| pool.index_select(0, read).view([b, s, heads, dim]).transpose(1, 2);
        (gather(&self.k), gather(&self.v))
    }
}

/// Keys and values of every layer, for incremental decoding.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache for `cfg`'s layers.
    pub fn new(cfg: &super::ModelConfig) -> KvCache {
        KvCache { layers: (0..cfg.layers).map(|_| LayerCache::default()).collect() }
    }
    /// How many positions are cached.
    pub fn len(&self) -> i64 {
        self.layers.first().and_then(|l| l.kv.as_ref()).map_or(0, |(k, _)| k.size()[2])
    }
    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How attention scores are turned into weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Multiplier of `q·k` (`None`: `head_dim^-½`).
    pub scale: Option<f64>,
    /// `c · tanh(s / c)` on the scaled scores before the mask (Gemma 2).
    pub softcap: Option<f64>,
}

/// The projections that make q, k and v.
pub enum QkvProj {
    /// Three projections (Llama, Mistral, Qwen, Gemma), run as one GEMM when the attention is
    /// `fused`; each keeps its own adapter under its own name.
    Split { q_proj: Linear, k_proj: Linear, v_proj: Linear },
    /// One projection whose output is `[q | k | v]`, as Phi-3 checkpoints store it
    /// (`self_attn.qkv_proj`, which is also the name PEFT adapts).
    Packed(Linear),
}

/// Grouped-query self-attention.
pub struct Attention {
    pub qkv: QkvProj,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    /// Which keys this layer sees (and so which mask and rotary tables it takes).
    pub span: AttnSpan,
    pub scores: Scores,
    /// q/k/v as one GEMM (`model::fused`) where their bases and adapters allow.
    pub fused: bool,
    /// LoRA q/k/v as one node with a hand-derived backward where it applies
    /// (`model::lora_block`; with `fused`).
    pub block_node: bool,
}

impl Attention {
    /// The q, k and v projections of `x`, `[B, T, heads × head_dim]` each.
    fn qkv(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        let node = |members: &[&Linear]| (self.block_node && self.fused).then(|| lora_block::projections(members, x, train).or_else(|| dora_block::projections(members, x, train))).flatten();
        let y = match &self.qkv {
            QkvProj::Packed(qkv_proj) => node(&[qkv_proj]).unwrap_or_else(|| qkv_proj.forward_t(x, train)),
            QkvProj::Split { q_proj, k_proj, v_proj } => {
                let members = [q_proj, k_proj, v_proj];
                match node(&members).or_else(|| self.fused.then(|| fused_forward(&members, x, train)).flatten()) {
                    Some(y) => y,
                    None => return (q_proj.forward_t(x, train), k_proj.forward_t(x, train), v_proj.forward_t(x, train)),
                }
            }
        };
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        // One autograd node for the split: its backward writes the three gradients into
        // one buffer, where three narrows would each add a full-width zero-padded copy.
        let mut parts = y.split_with_sizes([q, kv, kv], -1).into_iter();
        let mut next = || parts.next().expect("three parts");
        // v goes to SDPA as it is and is kept for backward: a view would keep all of y (q
        // and k too, 6× v's bytes for llama-3.2-1b) alive; its own copy keeps only v.
        (next(), next(), next().contiguous())
    }

    /// True when q/k/v run as one LoRA or DoRA node (`model::lora_block`, `model::dora_block`)
    /// for inputs of dtype `kind`: what the node's tests check before comparing it with autograd.
    pub fn runs_block_node(&self, kind: Kind, train: bool) -> bool {
        let node_applies = |members: &[&Linear]| lora_block::projection_node_applies(members, kind, train) || dora_block::projection_node_applies(members, kind, train);
        self.block_node
            && self.fused
            && match &self.qkv {
                QkvProj::Packed(qkv_proj) => node_applies(&[qkv_proj]),
                QkvProj::Split { q_proj, k_proj, v_proj } => node_applies(&[q_proj, k_proj, v_proj]),
            }
    }

    /// q, k and v as three projections, when the checkpoint has them split.
    pub fn split_qkv(&self) -> Option<[&Linear; 3]> {
        match &self.qkv {
            QkvProj::Split { q_proj, k_proj, v_proj } => Some([q_proj, k_proj, v_proj]),
            QkvProj::Packed(_) => None,
        }
    }

    pub fn forward(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        let sliced = inp.sliced_backward;
        let inp = inp.span(self.span);
        let (q, k, v) = self.project(x, inp, cache, train);
        let out = match self.scores.softcap {
            Some(cap) => self.soft_capped(&q, &k, &v, &inp.mask, cap),
            None => {
                let gqa = self.heads != self.kv_heads;
                let scale = self.scores.scale;
                match &inp.mask {
                    AttnMask::Causal if sliced && q.requires_grad() => {
                        nodes::causal_sdpa_sliced_backward(&q, &k, &v, scale, (self.kv_heads + ATTN_BACKWARD_SLICES - 1) / ATTN_BACKWARD_SLICES)
                    }
                    AttnMask::Causal => Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, scale, gqa),
                    // A mask with `enable_gqa` sends CUDA's SDPA to its math path: fold instead.
                    AttnMask::Explicit(m) if gqa && q.device().is_cuda() => masked_gqa_sdpa(&q, &k, &v, m, scale),
                    AttnMask::Explicit(m) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, scale, gqa),
                }
            }
        };
        self.output(&out, train)
    }

    /// The rotated queries `[B, heads, T, head_dim]` of `x [B, T, hidden]`, and the keys and
    /// values `[B, kv_heads, S, head_dim]` it attends over: the cache's, then its own (which
    /// join the cache). What a block that scores attention its own way (gpt-oss's sinks) starts from.
    pub fn project(&self, x: &Tensor, inp: &SpanInputs, cache: Option<&mut LayerCache>, train: bool) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (q, k, v) = self.qkv(x, train);
        let heads = |p: Tensor, n: i64, norm: &Option<RmsNorm>| {
            let h = p.view([b, t, n, self.head_dim]);
            match norm {
                Some(norm) => norm.forward(&h),
                None => h,
            }
        };
        let (q, mut k) = rotary(heads(q, self.heads, &self.q_norm), heads(k, self.kv_heads, &self.k_norm), &inp.cos, &inp.sin);
        let mut v = heads(v, self.kv_heads, &None).transpose(1, 2);
        if let Some(cache) = cache {
            match &cache.paged {
                Some(paged) => (k, v) = paged.write_read(k, v),
                None => {
                    if let Some((pk, pv)) = &cache.kv {
                        k = Tensor::cat(&[pk, &k], 2);
                        v = Tensor::cat(&[pv, &v], 2);
                    }
                    cache.kv = Some((k.shallow_clone(), v.shallow_clone()));
                }
            }
        }
        (q, k, v)
    }

    /// `o_proj` of the attention output `[B, heads, T, head_dim]`: `[B, T, hidden]`; a LoRA or
    /// DoRA o_proj through the LoRA linear node or the DoRA projections node where it applies
    /// (as q/k/v).
    pub fn output(&self, out: &Tensor, train: bool) -> Tensor {
        let (b, t) = (out.size()[0], out.size()[2]);
        let x = out.transpose(1, 2).reshape([b, t, self.heads * self.head_dim]);
        let o = [&self.o_proj];
        let node = (self.block_node && self.fused).then(|| lora_block::projections(&o, &x, train).or_else(|| dora_block::projections(&o, &x, train))).flatten();
        node.unwrap_or_else(|| self.o_proj.forward_t(&x, train))
    }

    /// True when o_proj runs as the LoRA linear node or the DoRA projections node for inputs of
    /// dtype `kind`.
    pub fn runs_output_node(&self, kind: Kind, train: bool) -> bool {
        let o = [&self.o_proj];
        self.block_node && self.fused && (lora_block::projection_node_applies(&o, kind, train) || dora_block::projection_node_applies(&o, kind, train))
    }

    /// Attention with soft-capped scores, written out (as transformers' eager attention):
    /// `softmax(mask(c · tanh(s · q·kᵀ / c))) · v`, the softmax in fp32.
    fn soft_capped(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, cap: f64) -> Tensor {
        let groups = self.heads / self.kv_heads;
        let (k, v) = if groups > 1 {
            (k.repeat_interleave_self_int(groups, 1, None), v.repeat_interleave_self_int(groups, 1, None))
        } else {
            (k.shallow_clone(), v.shallow_clone())
        };
        let scale = self.scores.scale.unwrap_or(1.0 / (self.head_dim as f64).sqrt());
        let scores = q.matmul(&k.transpose(2, 3)) * scale;
        let scores = (scores / cap).tanh() * cap;
        let (t, s) = (q.size()[2], k.size()[2]);
        let allowed = mask.explicit(t, s, q.device());
        let weights = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY).softmax(-1, Kind::Float);
        weights.to_kind(q.kind()).matmul(&v)
    }

    /// The projections under their names within the layer (`self_attn.q_proj`, …, or
    /// `self_attn.qkv_proj` when packed).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut out = match &mut self.qkv {
            QkvProj::Split { q_proj, k_proj, v_proj } => {
                vec![("self_attn.q_proj", q_proj), ("self_attn.k_proj", k_proj), ("self_attn.v_proj", v_proj)]
            }
            QkvProj::Packed(qkv_proj) => vec![("self_attn.qkv_proj", qkv_proj)],
        };
        out.push(("self_attn.o_proj", &mut self.o_proj));
        out
    }

    /// The projections under their names within the layer.
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        let mut out = match &self.qkv {
            QkvProj::Split { q_proj, k_proj, v_proj } => {
                vec![("self_attn.q_proj", q_proj), ("self_attn.k_proj", k_proj), ("self_attn.v_proj", v_proj)]
            }
            QkvProj::Packed(qkv_proj) => vec![("self_attn.qkv_proj", qkv_proj)],
        };
        out.push(("self_attn.o_proj", &self.o_proj));
        out
    }

    /// The q/k norms (when the family has them) under their names within the layer.
    pub fn norms(&self) -> Vec<(&'static str, &RmsNorm)> {
        let mut out = Vec::new();
        if let Some(n) = &self.q_norm {
            out.push(("self_attn.q_norm", n));
        }
        if let Some(n) = &self.k_norm {
            out.push(("self_attn.k_norm", n));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Folding query groups into the query length gives grouped-query attention under a mask:
    /// equal to the attention written out (K/V repeated per group, masked softmax, fp64),
    /// for decoding (T = 1) and chunks (T > 1), with a per-row or a shared mask.
    #[test]
    fn folded_masked_gqa_equals_attention_written_out() {
        let _g = tch::no_grad_guard();
        let opts = (Kind::Float, Device::Cpu);
        let (b, heads, kv_heads, s, d) = (2, 6, 2, 7, 8);
        let scale = 0.3;
        let draw = |shape: &[i64], seed: i64| {
            tch::manual_seed(seed);
            Tensor::randn(shape, opts)
        };
        for (t, mask_rows) in [(1, b), (3, b), (3, 1)] {
            let q = draw(&[b, heads, t, d], 1);
            let (k, v) = (draw(&[b, kv_heads, s, d], 2), draw(&[b, kv_heads, s, d], 3));
            // Random visibility; every query sees key 0, so no row is fully masked.
            let mask = draw(&[mask_rows, 1, t, s], 4).gt(0.0);
            let _ = mask.narrow(3, 0, 1).fill_(1);
            let got = masked_gqa_sdpa(&q, &k, &v, &mask, Some(scale));
            let g = heads / kv_heads;
            let (k64, v64) = (k.to_kind(Kind::Double).repeat_interleave_self_int(g, 1, None), v.to_kind(Kind::Double).repeat_interleave_self_int(g, 1, None));
            let scores = q.to_kind(Kind::Double).matmul(&k64.transpose(2, 3)) * scale;
            let want = scores.masked_fill(&mask.logical_not(), f64::NEG_INFINITY).softmax(-1, Kind::Double).matmul(&v64);
            assert_eq!(got.size(), vec![b, heads, t, d]);
            let diff = (got.to_kind(Kind::Double) - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "t {t}, mask rows {mask_rows}: {diff}");
            // The mask matters here: attending to every key gives something else.
            let open = (scores.softmax(-1, Kind::Double).matmul(&v64) - &want).abs().max().double_value(&[]);
            assert!(open > 1e-2, "t {t}: the mask changed nothing ({open})");
        }
    }
}
