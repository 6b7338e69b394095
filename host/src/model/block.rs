//! Decoder layers as types. A [`Block`] is one transformer layer: a residual attention
//! half and a residual MLP half, each read top to bottom in its own `impl`. The decoder
//! ([`super::decoder`]) composes whichever block its family builds: [`PreNormBlock`] for the
//! Llama-like families here, Gemma's sandwich-norm block in [`super::gemma2`]. A family whose
//! layer differs again (a mixture-of-experts MLP, attention sinks) brings its own block the
//! same way instead of adding switches to a shared forward.
//!
//! Also here: the gated [`Mlp`] every block has, and [`LayerLoader`], which reads a block's
//! parts from a checkpoint under their Hugging Face names.

use super::attention::{AttnInputs, Attention, LayerCache, Scores};
use super::fused::{fused_forward, low_rank_linear, make_adjacent};
use super::linear::Linear;
use super::nodes::swiglu;
pub use super::norm::RmsNorm;
use super::{Activation, AttnSpan, ModelConfig, ModelError};
use tch::Tensor;

/// Gated feed-forward: `down(act(gate(x)) * up(x))` (SwiGLU, or GeGLU for Gemma).
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub act: Activation,
    /// gate/up as one GEMM (and, for SwiGLU, the activation as one autograd node; see
    /// `model::fused`) where their bases and adapters allow.
    pub fused: bool,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let members = [&self.gate_proj, &self.up_proj];
        if let Some(gu) = self.fused.then(|| fused_forward(&members, x, train)).flatten() {
            return match self.act {
                Activation::Silu => self.down_of_swiglu(&gu, train),
                Activation::GeluTanh => {
                    let half = *gu.size().last().expect("gate/up output has a last dimension") / 2;
                    let h = gu.narrow(-1, 0, half).gelu("tanh") * gu.narrow(-1, half, half);
                    self.down_proj.forward_t(&h, train)
                }
            };
        }
        let g = self.gate_proj.forward_t(x, train);
        let g = match self.act {
            Activation::Silu => g.silu(),
            Activation::GeluTanh => g.gelu("tanh"),
        };
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

    /// The projections under their names within the layer (`mlp.gate_proj`, …).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![("mlp.gate_proj", &mut self.gate_proj), ("mlp.up_proj", &mut self.up_proj), ("mlp.down_proj", &mut self.down_proj)]
    }

    /// The projections under their names within the layer.
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        vec![("mlp.gate_proj", &self.gate_proj), ("mlp.up_proj", &self.up_proj), ("mlp.down_proj", &self.down_proj)]
    }
}

/// One transformer layer. Its output is `h + mlp_branch(h)` with `h = attention_block(x)`:
/// the split lets training run the MLP half tile by tile (`train::step`).
pub trait Block: Send {
    /// The first half of the layer: `x` plus its attention branch.
    fn attention_block(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor;

    /// The second half's branch, position by position (the layer's output is `h` plus this).
    fn mlp_branch(&self, h: &Tensor, train: bool) -> Tensor;

    /// The whole layer.
    fn forward(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        let h = self.attention_block(x, inp, cache, train);
        &h + self.mlp_branch(&h, train)
    }

    /// The layer's attention.
    fn attention(&self) -> &Attention;

    /// The layer's dense MLP (what the fused-projection checks look at).
    fn mlp(&self) -> &Mlp;

    /// Every projection under its HF name within the layer (`self_attn.q_proj`,
    /// `mlp.up_proj`; a mixture-of-experts block adds its router and `mlp.experts.N.…`):
    /// what adapters attach to and what is saved.
    fn linears(&self) -> Vec<(String, &Linear)>;

    /// [`Block::linears`], mutable.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;

    /// Every norm under its HF name within the layer (`input_layernorm`, `self_attn.q_norm`).
    fn norms(&self) -> Vec<(String, &RmsNorm)>;

    /// Runs q/k/v and gate/up as fused GEMMs, or each projection on its own.
    fn set_fused(&mut self, on: bool);

    /// A mixture-of-experts layer's router logits `[tokens, experts]` from its last training
    /// forward (for the load-balancing loss), taken out; `None` for other layers.
    fn take_router_logits(&self) -> Option<Tensor> {
        None
    }
}

/// The pre-norm layer of Llama, Mistral and Qwen:
/// `h = x + attn(norm(x))`, then `h + mlp(norm(h))`.
pub struct PreNormBlock {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl PreNormBlock {
    /// Layer `i` of a Llama-like checkpoint.
    pub fn load(l: &LayerLoader<'_>, i: usize) -> Result<PreNormBlock, ModelError> {
        let p = format!("model.layers.{i}");
        Ok(PreNormBlock {
            input_layernorm: l.norm(&format!("{p}.input_layernorm"), l.cfg.hidden)?,
            self_attn: l.attention(i)?,
            post_attention_layernorm: l.norm(&format!("{p}.post_attention_layernorm"), l.cfg.hidden)?,
            mlp: l.mlp(i)?,
        })
    }
}

impl Block for PreNormBlock {
    fn attention_block(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        x + self.self_attn.forward(&self.input_layernorm.forward(x), inp, cache, train)
    }

    fn mlp_branch(&self, h: &Tensor, train: bool) -> Tensor {
        self.mlp.forward(&self.post_attention_layernorm.forward(h), train)
    }

    fn attention(&self) -> &Attention {
        &self.self_attn
    }

    fn mlp(&self) -> &Mlp {
        &self.mlp
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        named(self.self_attn.linears().into_iter().chain(self.mlp.linears()))
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        named(self.self_attn.linears_mut().into_iter().chain(self.mlp.linears_mut()))
    }

    fn norms(&self) -> Vec<(String, &RmsNorm)> {
        let own = [("input_layernorm", &self.input_layernorm), ("post_attention_layernorm", &self.post_attention_layernorm)];
        named(own.into_iter().chain(self.self_attn.norms()))
    }

    fn set_fused(&mut self, on: bool) {
        self.self_attn.fused = on;
        self.mlp.fused = on;
    }
}

/// `(name, part)` pairs with owned names, as [`Block`]'s listings return them.
pub fn named<T>(parts: impl IntoIterator<Item = (&'static str, T)>) -> Vec<(String, T)> {
    parts.into_iter().map(|(name, part)| (name.to_owned(), part)).collect()
}

/// Reads a layer's parts from a checkpoint (or a random initialiser) under their HF names,
/// shaped as the configuration says.
pub struct LayerLoader<'a> {
    pub cfg: &'a ModelConfig,
    /// A tensor by HF name and expected shape.
    pub load: &'a dyn Fn(&str, &[i64]) -> Result<Tensor, ModelError>,
}

impl LayerLoader<'_> {
    /// `{name}.weight` (and `{name}.bias` when `bias`) as a linear layer.
    pub fn linear(&self, name: &str, out: i64, inp: i64, bias: bool) -> Result<Linear, ModelError> {
        let w = (self.load)(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias { Some((self.load)(&format!("{name}.bias"), &[out])?) } else { None };
        Ok(Linear::new(w, b))
    }

    /// `{name}.weight` as an RMSNorm of width `n`.
    pub fn norm(&self, name: &str, n: i64) -> Result<RmsNorm, ModelError> {
        Ok(RmsNorm { weight: (self.load)(&format!("{name}.weight"), &[n])?, eps: self.cfg.rms_eps, unit_offset: self.cfg.norm_unit_offset })
    }

    /// Layer `i`'s self-attention, its q/k/v weights placed one after the other in memory so
    /// the fused GEMM reads them without a copy.
    pub fn attention(&self, i: usize) -> Result<Attention, ModelError> {
        let c = self.cfg;
        let (h, hd) = (c.hidden, c.head_dim);
        let a = format!("model.layers.{i}.self_attn");
        let qk_norm = |which: &str| if c.qk_norm { self.norm(&format!("{a}.{which}"), hd).map(Some) } else { Ok(None) };
        let mut attn = Attention {
            q_proj: self.linear(&format!("{a}.q_proj"), c.heads * hd, h, c.qkv_bias)?,
            k_proj: self.linear(&format!("{a}.k_proj"), c.kv_heads * hd, h, c.qkv_bias)?,
            v_proj: self.linear(&format!("{a}.v_proj"), c.kv_heads * hd, h, c.qkv_bias)?,
            o_proj: self.linear(&format!("{a}.o_proj"), h, c.heads * hd, c.o_bias)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: hd,
            span: c.layer_spans.get(i).copied().unwrap_or(AttnSpan::Full),
            scores: Scores { scale: c.query_pre_attn_scalar.map(|s| 1.0 / s.sqrt()), softcap: c.attn_logit_softcap },
            fused: true,
        };
        make_adjacent(&mut [&mut attn.q_proj, &mut attn.k_proj, &mut attn.v_proj]);
        Ok(attn)
    }

    /// Layer `i`'s gated MLP, gate and up adjacent in memory.
    pub fn mlp(&self, i: usize) -> Result<Mlp, ModelError> {
        let c = self.cfg;
        let m = format!("model.layers.{i}.mlp");
        let mut mlp = Mlp {
            gate_proj: self.linear(&format!("{m}.gate_proj"), c.intermediate, c.hidden, c.mlp_bias)?,
            up_proj: self.linear(&format!("{m}.up_proj"), c.intermediate, c.hidden, c.mlp_bias)?,
            down_proj: self.linear(&format!("{m}.down_proj"), c.hidden, c.intermediate, c.mlp_bias)?,
            act: c.hidden_act,
            fused: true,
        };
        make_adjacent(&mut [&mut mlp.gate_proj, &mut mlp.up_proj]);
        Ok(mlp)
    }
}
