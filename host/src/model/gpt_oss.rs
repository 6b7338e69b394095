//! gpt-oss (`GptOssForCausalLM`, model_type `gpt_oss`): a pre-norm decoder whose layers differ
//! from the Llama-like ones in two places, so it brings its own block, [`GptOssBlock`]:
//!
//! - **attention sinks**: each head has a learned logit that joins the softmax over the keys as
//!   one more column and is then dropped, so a head may attend to "nothing"
//!   ([`sink_attention`]); q/k/v/o carry biases; layers alternate sliding-window and full
//!   attention (`layer_types`, `sliding_window`); RoPE is YaRN-scaled.
//! - **the experts** ([`GptOssMoe`]): a router Linear *with bias*, top-k over its logits, then a
//!   softmax over the k chosen; experts stored as fused 3-D tensors, `gate_up_proj [E, H, 2I]`
//!   (gate and up columns interleaved: gate even, up odd) and `down_proj [E, I, H]`, each with
//!   a bias; the activation clamps gate (above) and up (both sides) at `swiglu_limit` and
//!   computes `(up + 1) · gate · σ(alpha · gate)`.
//!
//! ftx reads the bf16 layout transformers saves (the fused tensors above) and the published
//! checkpoints, whose experts are MXFP4 (`*_blocks` / `*_scales`, `quant_method: "mxfp4"`):
//! those are dequantised to the load dtype as they are read (`model::mxfp4`), so in memory
//! (and in `ftx plan`'s estimate) the experts are bf16. Full fine-tuning trains every tensor
//! (sinks and fused experts too); adapters attach to attention, the router (PEFT's
//! `target_parameters = ["router.weight"]`) and the fused experts
//! (`target_parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`, PEFT's
//! `ParamWrapper`: per-expert rank blocks, `W + s·ΔW` formed each forward; `model::expert_lora`).
//! Under QLoRA the fused experts are NF4 too ([`GptOssMoe::quantize_experts_nf4`]): each expert's
//! matrix stored as an `[out, in]` NF4 weight and run through the grouped NF4 node
//! (`model::nodes::nf4_grouped_linear`); an expert LoRA then forms `W + s·ΔW` from the layer's
//! dequantised experts each forward.

use super::attention::{AttnInputs, AttnMask, LayerCache};
use super::block::{AttnMlp, Block, FeedForward, LayerLoader, Mlp, RmsNorm};
use super::grouped_experts::{ExpertRows, SortedAssignments};
use super::grouped_mm::grouped_mm;
use super::expert_lora::{effective, ExpertLora, ExpertParam};
use super::linear::Linear;
use super::moe::{expert_ablation, ExpertNaming, MoeConfig};
use super::nf4::Nf4Weight;
use super::nodes::{dequantize_stacked, nf4_grouped_linear};
use super::{AttnSpan, Family, Keys, ModelConfig, ModelError, RopeScaling};
use serde_json::Value;
use std::path::Path;
use std::sync::Mutex;
use tch::{Kind, Tensor};

/// The gate's sigmoid gain and the clamp of the experts' activation when config.json leaves
/// them out (transformers' defaults, those of the released checkpoints).
const DEFAULT_SWIGLU_ALPHA: f64 = 1.702;
const DEFAULT_SWIGLU_LIMIT: f64 = 7.0;

/// Reads a gpt-oss config.json.
pub fn config(raw: &Value, path: &Path) -> Result<ModelConfig, ModelError> {
    let keys = Keys { raw, path };
    // The published checkpoints' experts are MXFP4; weights.rs reads them dequantised to the
    // load dtype (model::mxfp4), so only other quantisations are refused.
    if let Some(method) = raw.get("quantization_config").and_then(|q| q.get("quant_method")).and_then(Value::as_str) {
        if method != "mxfp4" {
            return Err(ModelError::file(
                path,
                format!(
                    "is quantised with {method}; ftx reads gpt-oss in bf16 or with MXFP4 experts (the published checkpoints): \
                     use one of those, or dequantise it with transformers first"
                ),
            ));
        }
    }
    let mut cfg = keys.llama_like(Family::GptOss, 150_000.0)?;
    cfg.rms_eps = keys.float_or("rms_norm_eps", 1e-5)?;
    let bias = keys.bool_or("attention_bias", true)?;
    cfg.qkv_bias = bias;
    cfg.o_bias = bias;
    cfg.sliding_window = match raw.get("sliding_window") {
        None => Some(128),
        Some(_) => keys.opt_int("sliding_window")?,
    };
    // Without layer_types transformers alternates: even layers slide, odd ones see everything.
    cfg.layer_spans = match keys.layer_types()? {
        Some(spans) => spans,
        None => (0..cfg.layers).map(|i| if i % 2 == 0 { AttnSpan::Sliding } else { AttnSpan::Full }).collect(),
    };
    // A config without RoPE settings takes transformers' gpt-oss default: YaRN, factor 32 over
    // 4096 original positions, untruncated.
    if cfg.rope_scaling == RopeScaling::None && raw.get("rope_parameters").is_none() && raw.get("rope_scaling").is_none() {
        cfg.rope_scaling = RopeScaling::Yarn {
            factor: 32.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            original_max_positions: 4096.0,
            truncate: false,
            attention_factor: 0.1 * 32f64.ln() + 1.0,
        };
    }
    if keys.float_or("router_jitter_noise", 0.0)? != 0.0 {
        return Err(ModelError::file(path, "router_jitter_noise is not 0: ftx does not jitter router inputs; set \"router_jitter_noise\": 0.0"));
    }
    let (alpha, limit) = swiglu(&cfg.raw, path)?;
    if !(alpha.is_finite() && limit.is_finite() && limit > 0.0) {
        return Err(ModelError::file(path, format!("\"swiglu_alpha\" ({alpha}) must be finite and \"swiglu_limit\" ({limit}) positive")));
    }
    let experts = match keys.opt_int("num_local_experts")? {
        Some(n) => n,
        None => keys.int("num_experts")?,
    };
    let layers = cfg.layers;
    cfg.moe = Some(MoeConfig {
        experts,
        top_k: keys.int_or("num_experts_per_tok", 4)?,
        expert_intermediate: cfg.intermediate,
        // A softmax over the top-k logits: the same weights as renormalised top-k probabilities.
        norm_topk_prob: true,
        fp32_routing_weights: false,
        sparse_layers: vec![true; layers],
        aux_loss: keys.bool_or("output_router_logits", false)?,
        router_aux_loss_coef: keys.float_or("router_aux_loss_coef", 0.001)?,
        naming: ExpertNaming::GptOss,
    });
    Ok(cfg)
}

/// `(swiglu_alpha, swiglu_limit)` of a gpt-oss config.json.
fn swiglu(raw: &Value, path: &Path) -> Result<(f64, f64), ModelError> {
    let keys = Keys { raw, path };
    Ok((keys.float_or("swiglu_alpha", DEFAULT_SWIGLU_ALPHA)?, keys.float_or("swiglu_limit", DEFAULT_SWIGLU_LIMIT)?))
}

/// gpt-oss's layer: `h = x + o(sink_attention(norm(x)))`, then `h + moe(norm(h))`.
pub struct GptOssBlock {
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    /// One learned logit per head (`self_attn.sinks`, `[heads]`).
    pub sinks: Tensor,
    /// The attention (q/k/v/o with biases) and the [`GptOssMoe`].
    pub parts: AttnMlp,
}

impl GptOssBlock {
    /// Layer `i` of a gpt-oss checkpoint.
    pub fn load(l: &LayerLoader<'_>, i: usize) -> Result<GptOssBlock, ModelError> {
        let p = format!("model.layers.{i}");
        let h = l.cfg.hidden;
        Ok(GptOssBlock {
            input_layernorm: l.norm(&format!("{p}.input_layernorm"), h)?,
            post_attention_layernorm: l.norm(&format!("{p}.post_attention_layernorm"), h)?,
            sinks: (l.load)(&format!("{p}.self_attn.sinks"), &[l.cfg.heads])?,
            parts: AttnMlp { self_attn: l.attention(i)?, mlp: Box::new(GptOssMoe::load(l, i)?) },
        })
    }
}

impl Block for GptOssBlock {
    fn attention_block(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        let attn = &self.parts.self_attn;
        let span = inp.span(attn.span);
        let (q, k, v) = attn.project(&self.input_layernorm.forward(x), span, cache, train);
        let scale = attn.scores.scale.unwrap_or(1.0 / (attn.head_dim as f64).sqrt());
        let out = sink_attention(&q, &k, &v, &span.mask, &self.sinks, scale);
        x + attn.output(&out, train)
    }

    fn mlp_branch(&self, h: &Tensor, train: bool) -> Tensor {
        self.parts.mlp.forward(&self.post_attention_layernorm.forward(h), train)
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

    fn other_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("self_attn.sinks".to_owned(), self.sinks.shallow_clone())];
        out.extend(self.parts.mlp.other_tensors());
        out
    }
}

/// Attention whose softmax has one more column per head, the sink logit `sinks [heads]`,
/// dropped after the softmax: `softmax([s · q·kᵀ + mask, sink])[..., :S] · v`, the softmax in
/// fp32. q `[B, heads, T, D]`, k and v `[B, kv_heads, S, D]`. Written out (as transformers'
/// eager attention): libtorch's fused attention has no extra column.
pub fn sink_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, sinks: &Tensor, scale: f64) -> Tensor {
    let (b, heads, t) = (q.size()[0], q.size()[1], q.size()[2]);
    let groups = heads / k.size()[1];
    let (k, v) = if groups > 1 {
        (k.repeat_interleave_self_int(groups, 1, None), v.repeat_interleave_self_int(groups, 1, None))
    } else {
        (k.shallow_clone(), v.shallow_clone())
    };
    let s = k.size()[2];
    let scores = q.matmul(&k.transpose(2, 3)).to_kind(Kind::Float) * scale;
    let allowed = mask.explicit(t, s, q.device());
    let scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
    let sink = sinks.to_kind(Kind::Float).view([1, heads, 1, 1]).expand([b, heads, t, 1], false);
    // Every row keeps its sink column, so a row whose keys are all masked (padding) stays finite.
    let weights = Tensor::cat(&[scores, sink], -1).softmax(-1, Kind::Float).narrow(-1, 0, s);
    weights.to_kind(v.kind()).matmul(&v)
}

/// gpt-oss's mixture of experts: the biased router and the fused, biased expert tensors.
pub struct GptOssMoe {
    /// `mlp.router`, `[experts, hidden]` with a bias.
    pub router: Linear,
    /// `mlp.experts.gate_up_proj [E, H, 2I]`: `x @ gate_up_proj[e]` gives gate (even columns)
    /// and up (odd columns) interleaved. Once [`GptOssMoe::nf4`] holds the experts, only a
    /// placeholder of this shape, dtype and device (one element, stride 0), which the experts'
    /// LoRA takes its shape from; its values are never read.
    pub gate_up_proj: Tensor,
    /// `mlp.experts.gate_up_proj_bias [E, 2I]`.
    pub gate_up_proj_bias: Tensor,
    /// `mlp.experts.down_proj [E, I, H]` (a placeholder under NF4, as `gate_up_proj`).
    pub down_proj: Tensor,
    /// `mlp.experts.down_proj_bias [E, H]`.
    pub down_proj_bias: Tensor,
    /// The experts in NF4 (QLoRA), in place of the dense `gate_up_proj` and `down_proj`.
    pub nf4: Option<Nf4Experts>,
    /// LoRA on `gate_up_proj` (PEFT's `target_parameters` `mlp.experts.gate_up_proj`).
    pub gate_up_lora: Option<ExpertLora>,
    /// LoRA on `down_proj` (`mlp.experts.down_proj`).
    pub down_lora: Option<ExpertLora>,
    pub top_k: i64,
    /// The gate's sigmoid gain (`swiglu_alpha`).
    pub alpha: f64,
    /// The clamp of gate (above) and up (both sides) (`swiglu_limit`).
    pub limit: f64,
    /// Keep the router logits of training forwards (when the loss adds the balance term).
    pub record_router_logits: bool,
    /// The router logits of the last training forward (`[N, experts]`), for the
    /// load-balancing loss; taken by [`FeedForward::take_router_logits`].
    pub router_logits: Mutex<Option<Tensor>>,
}

impl GptOssMoe {
    /// Layer `i`'s router and experts.
    pub fn load(l: &LayerLoader<'_>, i: usize) -> Result<GptOssMoe, ModelError> {
        let c = l.cfg;
        let moe = c.moe.as_ref().ok_or_else(|| ModelError::file(Path::new("config.json"), "gpt-oss needs its experts' settings"))?;
        let (h, inter, e) = (c.hidden, moe.expert_intermediate, moe.experts);
        let p = format!("model.layers.{i}.mlp");
        let (alpha, limit) = swiglu(&c.raw, Path::new("config.json"))?;
        Ok(GptOssMoe {
            router: l.linear(&format!("{p}.router"), e, h, true)?,
            gate_up_proj: (l.load)(&format!("{p}.experts.gate_up_proj"), &[e, h, 2 * inter])?,
            gate_up_proj_bias: (l.load)(&format!("{p}.experts.gate_up_proj_bias"), &[e, 2 * inter])?,
            down_proj: (l.load)(&format!("{p}.experts.down_proj"), &[e, inter, h])?,
            down_proj_bias: (l.load)(&format!("{p}.experts.down_proj_bias"), &[e, h])?,
            nf4: None,
            gate_up_lora: None,
            down_lora: None,
            top_k: moe.top_k,
            alpha,
            limit,
            record_router_logits: moe.aux_loss,
            router_logits: Mutex::new(None),
        })
    }

    /// The expert weights every GEMM of a forward uses, `(gate_up [E, H, 2I], down [E, I, H])`:
    /// the checkpoint's (dequantised when NF4), plus `s · ΔW` where a LoRA is attached (formed
    /// once per forward, as PEFT's `ParamWrapper` does; [`ExpertLora`]).
    pub fn expert_weights(&self) -> (Tensor, Tensor) {
        let nf4 = self.nf4.as_ref();
        (
            expert_weight(&self.gate_up_proj, nf4.map(|q| q.gate_up.as_slice()), self.gate_up_lora.as_ref()),
            expert_weight(&self.down_proj, nf4.map(|q| q.down.as_slice()), self.down_lora.as_ref()),
        )
    }

    /// Stores the experts in NF4 (QLoRA): each expert's `gate_up_proj[e]` and `down_proj[e]`
    /// transposed to `[out, in]`, quantised as a linear weight is, computing in `kind`; the
    /// dense tensors are released (see [`GptOssMoe::gate_up_proj`]). Again: nothing.
    pub fn quantize_experts_nf4(&mut self, kind: Kind) {
        if self.nf4.is_some() {
            return;
        }
        let _g = tch::no_grad_guard();
        let per_expert = |w: &Tensor| (0..w.size()[0]).map(|e| Nf4Weight::quantize(&w.get(e).transpose(0, 1), kind)).collect::<Vec<_>>();
        self.nf4 = Some(Nf4Experts { gate_up: per_expert(&self.gate_up_proj), down: per_expert(&self.down_proj) });
        let placeholder = |w: &Tensor| Tensor::zeros([1], (w.kind(), w.device())).expand(w.size(), false);
        self.gate_up_proj = placeholder(&self.gate_up_proj);
        self.down_proj = placeholder(&self.down_proj);
    }

    /// Every expert on its rows of `sorted` (sorted by expert, `rows` saying where each
    /// expert's are) as two grouped GEMMs: `down(act(x @ gate_up + b)) + b`, each row through
    /// its own expert's weights (those of [`GptOssMoe::expert_weights`]) and biases.
    fn experts(&self, sorted: &Tensor, rows: &ExpertRows) -> Tensor {
        let nf4 = self.nf4.as_ref();
        let gate_up = expert_product(sorted, &self.gate_up_proj, nf4.map(|q| q.gate_up.as_slice()), self.gate_up_lora.as_ref(), &rows.offs)
            + rows.per_row(&self.gate_up_proj_bias);
        let two_i = gate_up.size()[1];
        let gate = gate_up.slice(1, 0, two_i, 2).clamp_max(self.limit);
        let up = gate_up.slice(1, 1, two_i, 2).clamp(-self.limit, self.limit);
        let glu = &gate * (&gate * self.alpha).sigmoid();
        expert_product(&((up + 1.0) * glu), &self.down_proj, nf4.map(|q| q.down.as_slice()), self.down_lora.as_ref(), &rows.offs)
            + rows.per_row(&self.down_proj_bias)
    }
}

/// gpt-oss's fused experts in NF4: per expert, `gate_up_proj[e]ᵀ` (`[2I, H]`) and
/// `down_proj[e]ᵀ` (`[H, I]`), the `[out, in]` layout [`nf4_grouped_linear`] stacks.
pub struct Nf4Experts {
    /// Each expert's `gate_up_proj[e]ᵀ`.
    pub gate_up: Vec<Nf4Weight>,
    /// Each expert's `down_proj[e]ᵀ`.
    pub down: Vec<Nf4Weight>,
}

/// One fused expert parameter as its GEMMs use it, `[E, in, out]`: the dense tensor, or the NF4
/// experts dequantised, plus `s · ΔW` where a LoRA is attached.
fn expert_weight(dense: &Tensor, nf4: Option<&[Nf4Weight]>, lora: Option<&ExpertLora>) -> Tensor {
    effective(&nf4.map_or_else(|| dense.shallow_clone(), dequantize_experts), lora)
}

/// `x @ W[e]` for each sorted row's expert e (`offs` the experts' row ends): through the grouped
/// NF4 node when the weights are NF4 and carry no LoRA (it keeps only the NF4 bytes for
/// backward), else one grouped GEMM over [`expert_weight`].
fn expert_product(x: &Tensor, dense: &Tensor, nf4: Option<&[Nf4Weight]>, lora: Option<&ExpertLora>, offs: &Tensor) -> Tensor {
    match (nf4, lora) {
        (Some(qs), None) => {
            let refs: Vec<&Nf4Weight> = qs.iter().collect();
            nf4_grouped_linear(x, &refs, qs.len() as i64, offs)
        }
        _ => grouped_mm(x, &expert_weight(dense, nf4, lora), offs),
    }
}

/// NF4 experts back as the dense `[E, in, out]` tensor of transformers' layout (a transposed
/// view of one stacked dequantisation), in their compute dtype.
pub fn dequantize_experts(qs: &[Nf4Weight]) -> Tensor {
    let refs: Vec<&Nf4Weight> = qs.iter().collect();
    let (out, inp) = qs[0].shape();
    dequantize_stacked(&refs).view([qs.len() as i64, out, inp]).transpose(1, 2)
}

impl FeedForward for GptOssMoe {
    /// Router logits (with bias) → top-k → softmax over the k logits → the assignments sorted
    /// by expert, the experts as two grouped GEMMs over the sorted buffer → outputs weighted
    /// and added back to their tokens.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let shape = x.size();
        let hidden = *shape.last().expect("hidden states have a last dimension");
        let flat = x.reshape([-1, hidden]);
        let n = flat.size()[0];
        let logits = self.router.forward_t(&flat, train);
        if train && self.record_router_logits {
            *self.router_logits.lock().expect("router logits lock") = Some(logits.shallow_clone());
        }
        let (top, idx) = logits.topk(self.top_k, -1, true, true);
        let weights = top.softmax(-1, top.kind());
        let by = SortedAssignments::new(&idx, self.gate_up_proj_bias.size()[0]);
        let sorted = flat.index_select(0, &by.token);
        // `ftx bench train`'s expert share: the steps again with every expert the identity.
        let y = if expert_ablation::on() { sorted } else { self.experts(&sorted, &by.rows) };
        let w = weights.reshape([-1]).index_select(0, &by.order).unsqueeze(1);
        let weighted = (y * w).to_kind(flat.kind());
        Tensor::zeros([n, hidden], (flat.kind(), flat.device())).index_add(0, &by.token, &weighted).view(shape.as_slice())
    }

    /// The router (the expert tensors are no [`Linear`]s).
    fn linears(&self) -> Vec<(String, &Linear)> {
        vec![("mlp.router".to_owned(), &self.router)]
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        vec![("mlp.router".to_owned(), &mut self.router)]
    }

    fn set_fused(&mut self, _on: bool) {}

    fn dense(&self) -> Option<&Mlp> {
        None
    }

    fn take_router_logits(&self) -> Option<Tensor> {
        self.router_logits.lock().expect("router logits lock").take()
    }

    fn expert_params_mut(&mut self) -> Vec<ExpertParam<'_>> {
        vec![
            ExpertParam { name: "mlp.experts.gate_up_proj".into(), base: &mut self.gate_up_proj, lora: &mut self.gate_up_lora },
            ExpertParam { name: "mlp.experts.down_proj".into(), base: &mut self.down_proj, lora: &mut self.down_lora },
        ]
    }

    /// The fused experts and their biases; NF4 experts are left out, as NF4 linears are.
    fn other_tensors(&self) -> Vec<(String, Tensor)> {
        let dense = self.nf4.is_none();
        [
            ("gate_up_proj", &self.gate_up_proj, dense),
            ("gate_up_proj_bias", &self.gate_up_proj_bias, true),
            ("down_proj", &self.down_proj, dense),
            ("down_proj_bias", &self.down_proj_bias, true),
        ]
        .into_iter()
        .filter(|(_, _, keep)| *keep)
        .map(|(name, t, _)| (format!("mlp.experts.{name}"), t.shallow_clone()))
        .collect()
    }

    fn quantize_experts_nf4(&mut self, kind: Kind) {
        GptOssMoe::quantize_experts_nf4(self, kind)
    }

    fn dequantize_experts_nf4(&mut self) {
        if let Some(q) = self.nf4.take() {
            self.gate_up_proj = dequantize_experts(&q.gate_up).contiguous();
            self.down_proj = dequantize_experts(&q.down).contiguous();
        }
    }
}
