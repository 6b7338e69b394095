//! Decoder layers as types. A [`Block`] is one transformer layer: a residual attention
//! half and a residual MLP half, each read top to bottom in its own `impl`. The decoder
//! ([`super::decoder`]) composes whichever block its family builds: [`PreNormBlock`] for the
//! Llama-like families here (Phi-3's too: its packed projections are [`QkvProj::Packed`] and
//! [`GateUp::Packed`]; Mixtral's and Qwen3-MoE's, whose MLP is a [`super::moe::SparseMoe`]),
//! Gemma's sandwich-norm block in [`super::gemma2`], gpt-oss's block with attention sinks in
//! [`super::gpt_oss`]. A family whose layer differs again brings its own block the same way
//! instead of adding switches to a shared forward.
//!
//! Also here: the gated [`Mlp`] every block has, the [`FeedForward`] trait it and a
//! mixture-of-experts MLP share, the attention + MLP pair ([`AttnMlp`]) that [`Block`]'s
//! default listings read, and [`LayerLoader`], which reads a block's parts from a checkpoint
//! under their Hugging Face names.

use super::attention::{AttnInputs, Attention, LayerCache, QkvProj, Scores};
use super::fused::{fused_forward, low_rank_linear, make_adjacent};
use super::linear::Linear;
use super::{dora_block, lora_block};
use super::nodes::swiglu;
pub use super::norm::RmsNorm;
use super::{Activation, AttnSpan, ModelConfig, ModelError};
use tch::Tensor;

/// The projections that make the MLP's gate and up halves.
pub enum GateUp {
    /// Two projections (Llama, Mistral, Qwen, Gemma), run as one GEMM when the MLP is
    /// `fused`; each keeps its own adapter under its own name.
    Split { gate_proj: Linear, up_proj: Linear },
    /// One projection whose output is `[gate | up]`, as Phi-3 checkpoints store it
    /// (`mlp.gate_up_proj`, which is also the name PEFT adapts).
    Packed(Linear),
}

/// Gated feed-forward: `down(act(gate(x)) * up(x))` (SwiGLU, or GeGLU for Gemma).
pub struct Mlp {
    pub gate_up: GateUp,
    pub down_proj: Linear,
    pub act: Activation,
    /// gate/up as one GEMM (and, for SwiGLU, the activation as one autograd node; see
    /// `model::fused`) where their bases and adapters allow.
    pub fused: bool,
    /// The whole MLP as one LoRA node with a hand-derived backward where it applies
    /// (`model::lora_block`; with `fused`).
    pub block_node: bool,
    /// Selective recompute (`train.recompute = "mlp"`): the node keeps only its input and the
    /// `x·Aᵀ` products and runs gate/up again in backward instead of keeping their output.
    pub recompute: bool,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let node = |(gate_up, down): (Vec<&Linear>, &Linear)| {
            lora_block::gated_mlp(&gate_up, down, self.act, x, train, self.recompute).or_else(|| dora_block::gated_mlp(&gate_up, down, self.act, x, train))
        };
        if let Some(y) = self.node_members().and_then(node) {
            return y;
        }
        let gu = match &self.gate_up {
            GateUp::Packed(gate_up_proj) => gate_up_proj.forward_t(x, train),
            GateUp::Split { gate_proj, up_proj } => {
                match self.fused.then(|| fused_forward(&[gate_proj, up_proj], x, train)).flatten() {
                    Some(gu) => gu,
                    None => {
                        let h = self.activate(&gate_proj.forward_t(x, train)) * up_proj.forward_t(x, train);
                        return self.down_proj.forward_t(&h, train);
                    }
                }
            }
        };
        if self.fused && self.act == Activation::Silu {
            return self.down_of_swiglu(&gu, train);
        }
        let half = *gu.size().last().expect("gate/up output has a last dimension") / 2;
        let h = self.activate(&gu.narrow(-1, 0, half)) * gu.narrow(-1, half, half);
        self.down_proj.forward_t(&h, train)
    }

    /// The gate/up projections and the down projection, when the MLP may run as one LoRA node
    /// (`block_node`, `fused`): whether their adapters allow is `model::lora_block`'s.
    fn node_members(&self) -> Option<(Vec<&Linear>, &Linear)> {
        if !(self.block_node && self.fused) {
            return None;
        }
        let gate_up = match &self.gate_up {
            GateUp::Split { gate_proj, up_proj } => vec![gate_proj, up_proj],
            GateUp::Packed(gate_up_proj) => vec![gate_up_proj],
        };
        Some((gate_up, &self.down_proj))
    }

    /// True when [`Mlp::forward`] runs as one LoRA or DoRA node (`model::lora_block`,
    /// `model::dora_block`) for inputs of dtype `kind`: what the node's tests check before
    /// comparing it with autograd.
    pub fn runs_block_node(&self, kind: tch::Kind, train: bool) -> bool {
        self.runs_lora_node(kind, train) || self.node_members().is_some_and(|(gate_up, down)| dora_block::mlp_node_applies(&gate_up, down, kind, train))
    }

    /// True when [`Mlp::forward`] runs as the LoRA MLP node (not DoRA's), the one that honours
    /// `recompute`.
    pub fn runs_lora_node(&self, kind: tch::Kind, train: bool) -> bool {
        self.node_members().is_some_and(|(gate_up, down)| lora_block::mlp_node_applies(&gate_up, down, kind, train))
    }

    fn activate(&self, gate: &Tensor) -> Tensor {
        match self.act {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
        }
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

    /// gate and up as two projections, when the checkpoint has them split.
    pub fn split_gate_up(&self) -> Option<[&Linear; 2]> {
        match &self.gate_up {
            GateUp::Split { gate_proj, up_proj } => Some([gate_proj, up_proj]),
            GateUp::Packed(_) => None,
        }
    }

    /// The projections under their names within the layer (`mlp.gate_proj`, …, or
    /// `mlp.gate_up_proj` when packed).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut out = match &mut self.gate_up {
            GateUp::Split { gate_proj, up_proj } => vec![("mlp.gate_proj", gate_proj), ("mlp.up_proj", up_proj)],
            GateUp::Packed(gate_up_proj) => vec![("mlp.gate_up_proj", gate_up_proj)],
        };
        out.push(("mlp.down_proj", &mut self.down_proj));
        out
    }

    /// The projections under their names within the layer.
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        let mut out = match &self.gate_up {
            GateUp::Split { gate_proj, up_proj } => vec![("mlp.gate_proj", gate_proj), ("mlp.up_proj", up_proj)],
            GateUp::Packed(gate_up_proj) => vec![("mlp.gate_up_proj", gate_up_proj)],
        };
        out.push(("mlp.down_proj", &self.down_proj));
        out
    }
}

/// A layer's feed-forward half: the dense gated [`Mlp`], or a mixture of such MLPs behind a
/// router ([`super::moe::SparseMoe`]). What [`Block`]'s default methods ask of it.
pub trait FeedForward: Send {
    /// The branch of `x [.., hidden]`, position by position.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor;

    /// Every projection under its HF name within the layer (`mlp.up_proj`, or a router and
    /// `block_sparse_moe.experts.N.w1`, …).
    fn linears(&self) -> Vec<(String, &Linear)>;

    /// [`FeedForward::linears`], mutable.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)>;

    /// Runs gate/up as one GEMM where it can, or each projection on its own.
    fn set_fused(&mut self, on: bool);

    /// A dense MLP of the kind this one runs (itself, or a mixture's first expert): what the
    /// fused-projection checks look at; `None` for experts that are not [`Mlp`]s (gpt-oss's).
    fn dense(&self) -> Option<&Mlp>;

    /// Runs a dense MLP as one LoRA node where it applies (`model::lora_block`), or as before;
    /// mixtures keep their experts' path.
    fn set_block_node(&mut self, _on: bool) {}

    /// Selective recompute of a dense MLP's LoRA node ([`Mlp::recompute`]); mixtures keep
    /// their experts' path (`train::recompute` refuses them).
    fn set_recompute(&mut self, _on: bool) {}

    /// Trainable tensors besides the projections, under their HF names within the layer
    /// (gpt-oss's fused expert tensors): trained by full fine-tuning and saved.
    fn other_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// A mixture's router logits `[tokens, experts]` from its last training forward (for the
    /// load-balancing loss), taken out; `None` for a dense MLP.
    fn take_router_logits(&self) -> Option<Tensor> {
        None
    }

    /// Stacked 3-D expert parameters that take a LoRA through PEFT's `target_parameters`
    /// (gpt-oss's `mlp.experts.gate_up_proj` / `down_proj`), named within the layer, in the
    /// order their module registers them; none for other MLPs.
    fn expert_params_mut(&mut self) -> Vec<super::expert_lora::ExpertParam<'_>> {
        Vec::new()
    }

    /// Stores expert tensors that are no [`Linear`]s (gpt-oss's fused experts) in NF4, computing
    /// in `kind` (QLoRA; the projections are quantised through [`FeedForward::linears_mut`]).
    fn quantize_experts_nf4(&mut self, _kind: tch::Kind) {}

    /// Undoes [`FeedForward::quantize_experts_nf4`]: the dense expert tensors back, dequantised
    /// (before an expert LoRA is merged into them).
    fn dequantize_experts_nf4(&mut self) {}
}

impl FeedForward for Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        Mlp::forward(self, x, train)
    }

    fn linears(&self) -> Vec<(String, &Linear)> {
        named(Mlp::linears(self))
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        named(Mlp::linears_mut(self))
    }

    fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    fn set_block_node(&mut self, on: bool) {
        self.block_node = on;
    }

    fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    fn dense(&self) -> Option<&Mlp> {
        Some(self)
    }
}

/// A layer's attention and MLP: what [`Block`]'s listings, the fused-projection switch and
/// the fused-projection checks read, through [`Block::parts`], whatever norms the block
/// wraps around them.
pub struct AttnMlp {
    pub self_attn: Attention,
    pub mlp: Box<dyn FeedForward>,
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

    /// The layer's attention and MLP.
    fn parts(&self) -> &AttnMlp;

    /// [`Block::parts`], mutable.
    fn parts_mut(&mut self) -> &mut AttnMlp;

    /// The block's own norms under their HF names within the layer (`input_layernorm`, …);
    /// the attention's q/k norms are added by [`Block::norms`].
    fn own_norms(&self) -> Vec<(&'static str, &RmsNorm)>;

    /// The layer's attention.
    fn attention(&self) -> &Attention {
        &self.parts().self_attn
    }

    /// The layer's dense MLP, or a mixture-of-experts layer's first expert (what the
    /// fused-projection checks look at); `None` where the experts are no [`Mlp`]s (gpt-oss).
    fn mlp(&self) -> Option<&Mlp> {
        self.parts().mlp.dense()
    }

    /// Trainable tensors besides projections and norms, under their HF names within the layer
    /// (gpt-oss's attention sinks and fused experts): trained by full fine-tuning and saved.
    fn other_tensors(&self) -> Vec<(String, Tensor)> {
        self.parts().mlp.other_tensors()
    }

    /// Every projection under its HF name within the layer (`self_attn.q_proj`,
    /// `mlp.up_proj`; a mixture-of-experts block adds its router and `mlp.experts.N.…`):
    /// what adapters attach to and what is saved.
    fn linears(&self) -> Vec<(String, &Linear)> {
        let p = self.parts();
        let mut out = named(p.self_attn.linears());
        out.extend(p.mlp.linears());
        out
    }

    /// [`Block::linears`], mutable.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let p = self.parts_mut();
        let mut out = named(p.self_attn.linears_mut());
        out.extend(p.mlp.linears_mut());
        out
    }

    /// Every norm under its HF name within the layer (`input_layernorm`, `self_attn.q_norm`).
    fn norms(&self) -> Vec<(String, &RmsNorm)> {
        named(self.own_norms().into_iter().chain(self.parts().self_attn.norms()))
    }

    /// Runs q/k/v and gate/up as fused GEMMs, or each projection on its own (packed
    /// projections stay one GEMM; only their activation node switches).
    fn set_fused(&mut self, on: bool) {
        let p = self.parts_mut();
        p.self_attn.fused = on;
        p.mlp.set_fused(on);
    }

    /// Runs the LoRA q/k/v projections and the MLP as the nodes of `model::lora_block` where
    /// they apply (the default), or through autograd's composition (their tests' reference).
    fn set_block_nodes(&mut self, on: bool) {
        let p = self.parts_mut();
        p.self_attn.block_node = on;
        p.mlp.set_block_node(on);
    }

    /// A mixture-of-experts layer's router logits `[tokens, experts]` from its last training
    /// forward (for the load-balancing loss), taken out; `None` for other layers.
    fn take_router_logits(&self) -> Option<Tensor> {
        self.parts().mlp.take_router_logits()
    }
}

/// The pre-norm layer of Llama, Mistral, Qwen, Phi-3, and (with a mixture-of-experts MLP)
/// Mixtral and Qwen3-MoE: `h = x + attn(norm(x))`, then `h + mlp(norm(h))`.
pub struct PreNormBlock {
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    pub parts: AttnMlp,
}

impl PreNormBlock {
    /// Layer `i` of a Llama-like checkpoint.
    pub fn load(l: &LayerLoader<'_>, i: usize) -> Result<PreNormBlock, ModelError> {
        PreNormBlock::with_mlp(l, i, || Ok(Box::new(l.mlp(i)?)))
    }

    /// Layer `i`'s norms and attention around the MLP `mlp` loads (after them, so that a
    /// random initialiser draws every family's tensors in the same order).
    pub fn with_mlp(
        l: &LayerLoader<'_>,
        i: usize,
        mlp: impl FnOnce() -> Result<Box<dyn FeedForward>, ModelError>,
    ) -> Result<PreNormBlock, ModelError> {
        let p = format!("model.layers.{i}");
        Ok(PreNormBlock {
            input_layernorm: l.norm(&format!("{p}.input_layernorm"), l.cfg.hidden)?,
            post_attention_layernorm: l.norm(&format!("{p}.post_attention_layernorm"), l.cfg.hidden)?,
            parts: AttnMlp { self_attn: l.attention(i)?, mlp: mlp()? },
        })
    }
}

impl Block for PreNormBlock {
    fn attention_block(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        x + self.parts.self_attn.forward(&self.input_layernorm.forward(x), inp, cache, train)
    }

    fn mlp_branch(&self, h: &Tensor, train: bool) -> Tensor {
        self.parts.mlp.forward(&self.post_attention_layernorm.forward(h), train)
    }

    /// As the two halves, with the attention half's residual add and the second norm as one
    /// fused kernel where the kernels are active ([`RmsNorm::forward_add`]).
    fn forward(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        // x's two gradients (the residual's and the norm's) summed in the norm's backward kernel.
        let (x, n) = self.input_layernorm.forward_passing(x);
        let a = self.parts.self_attn.forward(&n, inp, cache, train);
        let (h, y) = self.post_attention_layernorm.forward_add(&x, &a);
        h + self.parts.mlp.forward(&y, train)
    }

    fn parts(&self) -> &AttnMlp {
        &self.parts
    }

    fn parts_mut(&mut self) -> &mut AttnMlp {
        &mut self.parts
    }

    fn own_norms(&self) -> Vec<(&'static str, &RmsNorm)> {
        vec![("input_layernorm", &self.input_layernorm), ("post_attention_layernorm", &self.post_attention_layernorm)]
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

    /// Layer `i`'s self-attention: a packed `qkv_proj` where the checkpoint has one (Phi-3),
    /// else q/k/v with their weights placed one after the other in memory so the fused GEMM
    /// reads them without a copy.
    pub fn attention(&self, i: usize) -> Result<Attention, ModelError> {
        let c = self.cfg;
        let (h, hd) = (c.hidden, c.head_dim);
        let a = format!("model.layers.{i}.self_attn");
        let qk_norm = |which: &str| if c.qk_norm { self.norm(&format!("{a}.{which}"), hd).map(Some) } else { Ok(None) };
        let mut qkv = if c.packed_projections {
            QkvProj::Packed(self.linear(&format!("{a}.qkv_proj"), (c.heads + 2 * c.kv_heads) * hd, h, c.qkv_bias)?)
        } else {
            QkvProj::Split {
                q_proj: self.linear(&format!("{a}.q_proj"), c.heads * hd, h, c.qkv_bias)?,
                k_proj: self.linear(&format!("{a}.k_proj"), c.kv_heads * hd, h, c.qkv_bias)?,
                v_proj: self.linear(&format!("{a}.v_proj"), c.kv_heads * hd, h, c.qkv_bias)?,
            }
        };
        if let QkvProj::Split { q_proj, k_proj, v_proj } = &mut qkv {
            make_adjacent(&mut [q_proj, k_proj, v_proj]);
        }
        Ok(Attention {
            qkv,
            o_proj: self.linear(&format!("{a}.o_proj"), h, c.heads * hd, c.o_bias)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: hd,
            span: c.layer_spans.get(i).copied().unwrap_or(AttnSpan::Full),
            scores: Scores { scale: c.query_pre_attn_scalar.map(|s| 1.0 / s.sqrt()), softcap: c.attn_logit_softcap },
            fused: true,
            block_node: lora_block::enabled_by_default(),
        })
    }

    /// Layer `i`'s gated MLP: a packed `gate_up_proj` where the checkpoint has one (Phi-3),
    /// else gate and up adjacent in memory.
    pub fn mlp(&self, i: usize) -> Result<Mlp, ModelError> {
        let c = self.cfg;
        let m = format!("model.layers.{i}.mlp");
        let gate_up = if c.packed_projections {
            GateUp::Packed(self.linear(&format!("{m}.gate_up_proj"), 2 * c.intermediate, c.hidden, c.mlp_bias)?)
        } else {
            let mut gate_proj = self.linear(&format!("{m}.gate_proj"), c.intermediate, c.hidden, c.mlp_bias)?;
            let mut up_proj = self.linear(&format!("{m}.up_proj"), c.intermediate, c.hidden, c.mlp_bias)?;
            make_adjacent(&mut [&mut gate_proj, &mut up_proj]);
            GateUp::Split { gate_proj, up_proj }
        };
        Ok(Mlp {
            gate_up,
            down_proj: self.linear(&format!("{m}.down_proj"), c.hidden, c.intermediate, c.mlp_bias)?,
            act: c.hidden_act,
            fused: true,
            block_node: lora_block::enabled_by_default(),
            recompute: false,
        })
    }
}
