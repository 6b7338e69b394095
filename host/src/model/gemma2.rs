//! Gemma 2 (`Gemma2ForCausalLM`) and the sandwich-norm block Gemma 2 and 3 share.
//!
//! Against the Llama decoder: every RMSNorm scales by `1 + w`; the embeddings are multiplied
//! by √hidden; attention and MLP outputs are normed again before joining the residual (four
//! norms a layer); the MLP is GeGLU (tanh GELU); scores are scaled by
//! `query_pre_attn_scalar^-½`; layers alternate sliding-window and global attention
//! (`layer_types`); attention scores and the final logits are soft-capped, `c · tanh(z / c)`.
//! The per-layer part is [`SandwichBlock`]; the embedding scale and final soft-cap live in
//! the decoder ([`super::decoder::CausalLm`]), switched on by the config read here.

use super::attention::{AttnInputs, LayerCache};
use super::block::{AttnMlp, Block, LayerLoader, RmsNorm};
use super::{Activation, AttnSpan, Family, Keys, ModelConfig, ModelError};
use serde_json::Value;
use std::path::Path;
use tch::Tensor;

/// Reads a Gemma 2 config.json.
pub fn config(raw: &Value, path: &Path) -> Result<ModelConfig, ModelError> {
    let keys = Keys { raw, path };
    let mut cfg = gemma_like(&keys, Family::Gemma2, 10_000.0, 2)?;
    // Gemma 2's defaults: capping on unless the config says null.
    cfg.attn_logit_softcap = match raw.get("attn_logit_softcapping") {
        None => Some(50.0),
        Some(_) => keys.opt_float("attn_logit_softcapping")?,
    };
    cfg.final_logit_softcap = match raw.get("final_logit_softcapping") {
        None => Some(30.0),
        Some(_) => keys.opt_float("final_logit_softcapping")?,
    };
    Ok(cfg)
}

/// What Gemma 2 and 3 configs share. Without `layer_types`, every `pattern`-th layer is global
/// and the others slide (transformers' default for configs written before `layer_types`).
pub(crate) fn gemma_like(keys: &Keys<'_>, family: Family, default_theta: f64, pattern: usize) -> Result<ModelConfig, ModelError> {
    let mut cfg = keys.llama_like(family, default_theta)?;
    // Gemma ties its head unless the config says otherwise.
    cfg.tie_embeddings = keys.bool_or("tie_word_embeddings", true)?;
    let head_dim = keys.int_or("head_dim", 256)?;
    cfg.head_dim = head_dim;
    let bias = keys.bool_or("attention_bias", false)?;
    cfg.qkv_bias = bias;
    cfg.o_bias = bias;
    cfg.hidden_act = match keys.raw.get("hidden_activation").or_else(|| keys.raw.get("hidden_act")).and_then(Value::as_str) {
        None | Some("gelu_pytorch_tanh") | Some("gelu_tanh") => Activation::GeluTanh,
        Some(other) => {
            return Err(ModelError::file(
                keys.path,
                format!("hidden_activation '{other}' is not supported for Gemma (ftx supports gelu_pytorch_tanh)"),
            ))
        }
    };
    cfg.norm_unit_offset = true;
    cfg.scale_embeddings = true;
    cfg.query_pre_attn_scalar = Some(keys.float_or("query_pre_attn_scalar", head_dim as f64)?);
    cfg.sliding_window = keys.opt_int("sliding_window")?;
    let pattern = keys.int_or("sliding_window_pattern", keys.int_or("_sliding_window_pattern", pattern as i64)?)?.max(1) as usize;
    cfg.layer_spans = match keys.layer_types()? {
        Some(spans) => spans,
        None => (0..cfg.layers).map(|i| if (i + 1) % pattern == 0 { AttnSpan::Full } else { AttnSpan::Sliding }).collect(),
    };
    Ok(cfg)
}

/// Gemma's layer: each branch is normed on the way in and again on the way out.
/// `h = x + post_attention_norm(attn(input_norm(x)))`, then
/// `h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))`.
pub struct SandwichBlock {
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    pub pre_feedforward_layernorm: RmsNorm,
    pub post_feedforward_layernorm: RmsNorm,
    pub parts: AttnMlp,
}

impl SandwichBlock {
    /// Layer `i` of a Gemma 2 or 3 checkpoint.
    pub fn load(l: &LayerLoader<'_>, i: usize) -> Result<SandwichBlock, ModelError> {
        let p = format!("model.layers.{i}");
        let h = l.cfg.hidden;
        Ok(SandwichBlock {
            input_layernorm: l.norm(&format!("{p}.input_layernorm"), h)?,
            post_attention_layernorm: l.norm(&format!("{p}.post_attention_layernorm"), h)?,
            pre_feedforward_layernorm: l.norm(&format!("{p}.pre_feedforward_layernorm"), h)?,
            post_feedforward_layernorm: l.norm(&format!("{p}.post_feedforward_layernorm"), h)?,
            parts: AttnMlp { self_attn: l.attention(i)?, mlp: Box::new(l.mlp(i)?) },
        })
    }
}

impl Block for SandwichBlock {
    fn attention_block(&self, x: &Tensor, inp: &AttnInputs, cache: Option<&mut LayerCache>, train: bool) -> Tensor {
        let attn = self.parts.self_attn.forward(&self.input_layernorm.forward(x), inp, cache, train);
        x + self.post_attention_layernorm.forward(&attn)
    }

    fn mlp_branch(&self, h: &Tensor, train: bool) -> Tensor {
        let y = self.parts.mlp.forward(&self.pre_feedforward_layernorm.forward(h), train);
        self.post_feedforward_layernorm.forward(&y)
    }

    fn parts(&self) -> &AttnMlp {
        &self.parts
    }

    fn parts_mut(&mut self) -> &mut AttnMlp {
        &mut self.parts
    }

    fn own_norms(&self) -> Vec<(&'static str, &RmsNorm)> {
        vec![
            ("input_layernorm", &self.input_layernorm),
            ("post_attention_layernorm", &self.post_attention_layernorm),
            ("pre_feedforward_layernorm", &self.pre_feedforward_layernorm),
            ("post_feedforward_layernorm", &self.post_feedforward_layernorm),
        ]
    }
}
