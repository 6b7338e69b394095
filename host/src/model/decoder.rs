//! The decoder-only transformer all supported families share, read top to bottom:
//! embeddings → N × (RMSNorm → attention → residual → RMSNorm → SwiGLU MLP → residual)
//! → RMSNorm → LM head. Family differences are switches in [`ModelConfig`].
//!
//! Attention runs through libtorch's fused scaled-dot-product attention (flash or
//! memory-efficient kernels on GPU). Masks: plain causal when nothing else is needed, or an
//! explicit boolean mask for KV-cache offsets, sliding windows and packed sequences.

use super::fused::{fused_forward, low_rank_linear, make_adjacent};
use super::nodes::swiglu;
use super::linear::Linear;
use super::weights::WeightFiles;
use super::{ModelConfig, ModelError, RopeScaling};
use memmap2::MmapMut;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Root-mean-square layer norm over the last dimension.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// libtorch's `rms_norm` (one fused kernel each way on GPU, statistics in fp32 as
    /// transformers computes them) instead of the seven elementwise passes, and their saved
    /// fp32 copies, that the formula written out costs.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let width = *x.size().last().expect("a norm's input has a last dimension");
        x.rms_norm([width].as_slice(), Some(&self.weight), self.eps)
    }
}

/// Rotary position embedding frequencies (with Llama 3 or linear scaling applied).
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    fn new(cfg: &ModelConfig, device: Device) -> Rope {
        let dim = cfg.head_dim;
        // As transformers: theta^(-2i/d) in fp32, from an int64 arange.
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / dim as f64;
        let mut inv_freq = Tensor::from(cfg.rope_theta as f32).pow(&exponents).reciprocal();
        match &cfg.rope_scaling {
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
        }
        Rope { inv_freq: inv_freq.to_device(device) }
    }

    /// cos and sin, `[B, 1, T, head_dim]`, for integer positions `[B, T]`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3)
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
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
}

/// What every layer needs besides its input: rotary tables and the mask.
pub struct AttnInputs {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: AttnMask,
}

/// Cached keys and values of one layer, `[B, kv_heads, S, head_dim]`.
#[derive(Default)]
pub struct LayerCache {
    pub kv: Option<(Tensor, Tensor)>,
}

/// Keys and values of every layer, for incremental decoding.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    /// An empty cache for `cfg`'s layers.
    pub fn new(cfg: &ModelConfig) -> KvCache {
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

/// Grouped-query self-attention.
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    /// q/k/v as one GEMM (`model::fused`) where their bases and adapters allow.
    pub fused: bool,
}

impl Attention {
    /// The q, k and v projections of `x`, `[B, T, heads × head_dim]` each.
    fn qkv(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        let members = [&self.q_proj, &self.k_proj, &self.v_proj];
        if let Some(y) = self.fused.then(|| fused_forward(&members, x, train)).flatten() {
            let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
            // One autograd node for the split: its backward writes the three gradients into
            // one buffer, where three narrows would each add a full-width zero-padded copy.
            let mut parts = y.split_with_sizes([q, kv, kv], -1).into_iter();
            let mut next = || parts.next().expect("three parts");
            // v goes to SDPA as it is and is kept for backward: a view would keep all of y (q
            // and k too, 6× v's bytes for llama-3.2-1b) alive; its own copy keeps only v.
            return (next(), next(), next().contiguous());
        }
        (self.q_proj.forward_t(x, train), self.k_proj.forward_t(x, train), self.v_proj.forward_t(x, train))
    }

    pub fn forward(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (q, k, v) = self.qkv(x, train);
        let heads = |p: Tensor, n: i64, norm: &Option<RmsNorm>| {
            let h = p.view([b, t, n, self.head_dim]);
            let h = match norm {
                Some(norm) => norm.forward(&h),
                None => h,
            };
            h.transpose(1, 2)
        };
        let q = apply_rope(&heads(q, self.heads, &self.q_norm), &inp.cos, &inp.sin);
        let mut k = apply_rope(&heads(k, self.kv_heads, &self.k_norm), &inp.cos, &inp.sin);
        let mut v = heads(v, self.kv_heads, &None);
        if let Some(cache) = cache {
            if let Some((pk, pv)) = &cache.kv {
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            cache.kv = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let gqa = self.heads != self.kv_heads;
        let out = match &inp.mask {
            AttnMask::Causal => Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, gqa),
            AttnMask::Explicit(m) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, gqa),
        };
        self.o_proj.forward_t(&out.transpose(1, 2).reshape([b, t, self.heads * self.head_dim]), train)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// gate/up as one GEMM and the SwiGLU as one autograd node (`model::fused`) where their
    /// bases and adapters allow.
    pub fused: bool,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let members = [&self.gate_proj, &self.up_proj];
        if let Some(gu) = self.fused.then(|| fused_forward(&members, x, train)).flatten() {
            return self.down_of_swiglu(&gu, train);
        }
        let g = self.gate_proj.forward_t(x, train).silu();
        self.down_proj.forward_t(&(g * self.up_proj.forward_t(x, train)), train)
    }

    /// `down(silu(g) · u)` from the fused `gu = [g | u]`. A LoRA/DoRA down projection without
    /// active dropout takes its A product from the SwiGLU node, which then keeps neither the
    /// product nor its input for backward.
    fn down_of_swiglu(&self, gu: &Tensor, train: bool) -> Tensor {
        let down = &self.down_proj;
        let low_rank = down.adapter.as_ref().filter(|_| down.adapter_enabled).and_then(|a| a.low_rank());
        match low_rank {
            Some(p) if !(train && p.dropout > 0.0) && p.magnitude.is_some() == p.base_row_sq.is_some() => {
                let (h, xa) = swiglu(gu, Some(p.a));
                let xa = xa.expect("swiglu returns x Aᵀ when given A");
                let dora = p.magnitude.zip(p.base_row_sq);
                low_rank_linear(&h, &down.base.base_weight(), down.base.bias.as_ref(), &xa, p.a, p.b, dora, p.scaling)
            }
            _ => down.forward_t(&swiglu(gu, None).0, train),
        }
    }
}

/// One transformer block.
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn forward(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        let h = self.attention_block(x, inp, cache, train);
        &h + self.mlp_branch(&h, train)
    }

    /// The first half of the layer: `x` plus attention over its normed self.
    pub fn attention_block(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        x + self.self_attn.forward(&self.input_layernorm.forward(x), inp, cache, train)
    }

    /// The second half's branch, position by position: the MLP of normed `h` (the layer's
    /// output is `h` plus this).
    pub fn mlp_branch(&self, h: &Tensor, train: bool) -> Tensor {
        self.mlp.forward(&self.post_attention_layernorm.forward(h), train)
    }
}

/// How to load a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of the weights: Float, BFloat16 or Half.
    pub kind: Kind,
}

/// A causal language model: the whole decoder plus its head.
pub struct CausalLm {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<Linear>,
    pub rope: Rope,
    pub device: Device,
    pub kind: Kind,
    /// Weight files that CPU tensors may alias.
    _maps: Vec<Arc<MmapMut>>,
}

impl CausalLm {
    /// Loads `dir` (config.json + safetensors) onto `opts.device` in `opts.kind`.
    pub fn load(dir: &Path, opts: LoadOptions) -> Result<CausalLm, ModelError> {
        let config = ModelConfig::load(dir)?;
        let files = WeightFiles::open(dir)?;
        Self::from_weights(config, &files, opts)
    }

    /// Builds the model from already-opened weight files.
    pub fn from_weights(config: ModelConfig, files: &WeightFiles, opts: LoadOptions) -> Result<CausalLm, ModelError> {
        let load = |name: &str, shape: &[i64]| files.load(name, shape, opts.kind, opts.device);
        Self::build(config, opts, &load, files.keep_alive())
    }

    /// A randomly initialised model (weights ~ N(0, 0.02²), norms 1, biases 0), as
    /// transformers initialises one: for benchmarks and the demo's base model.
    pub fn random(config: ModelConfig, opts: LoadOptions, seed: i64) -> Result<CausalLm, ModelError> {
        tch::manual_seed(seed);
        let init = |name: &str, shape: &[i64]| -> Result<Tensor, ModelError> {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape, (opts.kind, opts.device))
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, (opts.kind, opts.device))
            } else {
                (Tensor::randn(shape, (Kind::Float, opts.device)) * 0.02).to_kind(opts.kind)
            };
            Ok(t)
        };
        Self::build(config, opts, &init, Vec::new())
    }

    /// Builds the model, taking each tensor (by HF name and expected shape) from `load`.
    fn build(
        config: ModelConfig,
        opts: LoadOptions,
        load: &dyn Fn(&str, &[i64]) -> Result<Tensor, ModelError>,
        maps: Vec<Arc<MmapMut>>,
    ) -> Result<CausalLm, ModelError> {
        let c = &config;
        let (h, hd) = (c.hidden, c.head_dim);
        let linear = |name: &str, out: i64, inp: i64, bias: bool| -> Result<Linear, ModelError> {
            let w = load(&format!("{name}.weight"), &[out, inp])?;
            let b = if bias { Some(load(&format!("{name}.bias"), &[out])?) } else { None };
            Ok(Linear::new(w, b))
        };
        let norm = |name: &str, n: i64| -> Result<RmsNorm, ModelError> {
            Ok(RmsNorm { weight: load(&format!("{name}.weight"), &[n])?, eps: c.rms_eps })
        };
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            layers.push(DecoderLayer {
                input_layernorm: norm(&format!("{p}.input_layernorm"), h)?,
                self_attn: Attention {
                    q_proj: linear(&format!("{a}.q_proj"), c.heads * hd, h, c.qkv_bias)?,
                    k_proj: linear(&format!("{a}.k_proj"), c.kv_heads * hd, h, c.qkv_bias)?,
                    v_proj: linear(&format!("{a}.v_proj"), c.kv_heads * hd, h, c.qkv_bias)?,
                    o_proj: linear(&format!("{a}.o_proj"), h, c.heads * hd, c.o_bias)?,
                    q_norm: if c.qk_norm { Some(norm(&format!("{a}.q_norm"), hd)?) } else { None },
                    k_norm: if c.qk_norm { Some(norm(&format!("{a}.k_norm"), hd)?) } else { None },
                    heads: c.heads,
                    kv_heads: c.kv_heads,
                    head_dim: hd,
                    fused: true,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm"), h)?,
                mlp: Mlp {
                    gate_proj: linear(&format!("{m}.gate_proj"), c.intermediate, h, c.mlp_bias)?,
                    up_proj: linear(&format!("{m}.up_proj"), c.intermediate, h, c.mlp_bias)?,
                    down_proj: linear(&format!("{m}.down_proj"), h, c.intermediate, c.mlp_bias)?,
                    fused: true,
                },
            });
        }
        for l in &mut layers {
            // Fused projections read q/k/v (and gate/up) as one weight without copying it.
            let a = &mut l.self_attn;
            make_adjacent(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj]);
            make_adjacent(&mut [&mut l.mlp.gate_proj, &mut l.mlp.up_proj]);
        }
        // Some tied checkpoints still ship lm_head.weight; the tie decides, as in transformers.
        let lm_head = if c.tie_embeddings { None } else { Some(linear("lm_head", c.vocab, h, false)?) };
        Ok(CausalLm {
            embed_tokens: load("model.embed_tokens.weight", &[c.vocab, h])?,
            layers,
            norm: norm("model.norm", h)?,
            lm_head,
            rope: Rope::new(c, opts.device),
            device: opts.device,
            kind: opts.kind,
            _maps: maps,
            config,
        })
    }

    /// Token embeddings `[B, T, hidden]` for ids `[B, T]`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, ids, -1, false, false)
    }

    /// Rotary tables for `positions [B, T]` together with `mask`.
    pub fn attn_inputs(&self, positions: &Tensor, mask: AttnMask) -> AttnInputs {
        let (cos, sin) = self.rope.cos_sin(positions, self.kind);
        AttnInputs { cos, sin, mask }
    }

    /// Final norm then vocabulary projection: logits `[B, T, vocab]`.
    pub fn head(&self, hidden: &Tensor) -> Tensor {
        let h = self.norm.forward(hidden);
        match &self.lm_head {
            Some(head) => head.forward(&h),
            None => h.linear::<Tensor>(&self.embed_tokens, None),
        }
    }

    /// The last hidden state (before the final norm) for ids `[B, T]`.
    pub fn hidden(&self, ids: &Tensor, inp: &AttnInputs, mut cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let mut h = self.embed(ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = layer.forward(&h, inp, layer_cache, train);
        }
        h
    }

    /// Logits `[B, T, vocab]` for `ids [B, T]` continuing the cache (if any), causally.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let past = cache.as_ref().map_or(0, |c| c.len());
        let positions = Tensor::arange_start(past, past + t, (Kind::Int64, self.device)).unsqueeze(0).expand([b, t], false);
        let mask = AttnMask::causal_with_offset(t, past, self.config.sliding_window, self.device);
        let inp = self.attn_inputs(&positions, mask);
        self.head(&self.hidden(ids, &inp, cache, false))
    }

    /// Runs q/k/v and gate/up as fused GEMMs (the default) or each projection on its own
    /// (the reference the fused path is tested against).
    pub fn set_fused_projections(&mut self, on: bool) {
        for l in &mut self.layers {
            l.self_attn.fused = on;
            l.mlp.fused = on;
        }
    }

    /// Every projection with its HF module name (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            let m = &mut l.mlp;
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out
    }

    /// Every dense tensor of the base model under its HF name (NF4 weights are skipped).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        use super::linear::Weight;
        let mut out = vec![("model.embed_tokens.weight".to_owned(), self.embed_tokens.shallow_clone())];
        let mut lin = |name: String, l: &Linear| {
            if let Weight::Dense(w) = &l.base.weight {
                out.push((format!("{name}.weight"), w.shallow_clone()));
            }
            if let Some(b) = &l.base.bias {
                out.push((format!("{name}.bias"), b.shallow_clone()));
            }
        };
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            lin(format!("{p}.self_attn.q_proj"), &a.q_proj);
            lin(format!("{p}.self_attn.k_proj"), &a.k_proj);
            lin(format!("{p}.self_attn.v_proj"), &a.v_proj);
            lin(format!("{p}.self_attn.o_proj"), &a.o_proj);
            lin(format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj);
            lin(format!("{p}.mlp.up_proj"), &l.mlp.up_proj);
            lin(format!("{p}.mlp.down_proj"), &l.mlp.down_proj);
        }
        if let Some(head) = &self.lm_head {
            lin("lm_head".to_owned(), head);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), l.input_layernorm.weight.shallow_clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), l.post_attention_layernorm.weight.shallow_clone()));
            if let Some(n) = &l.self_attn.q_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), n.weight.shallow_clone()));
            }
            if let Some(n) = &l.self_attn.k_norm {
                out.push((format!("{p}.self_attn.k_norm.weight"), n.weight.shallow_clone()));
            }
        }
        out.push(("model.norm.weight".to_owned(), self.norm.weight.shallow_clone()));
        out
    }
}
