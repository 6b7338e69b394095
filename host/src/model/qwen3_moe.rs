//! Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen3's attention (per-head q/k RMSNorm) with a mixture
//! of experts MLP ([`super::moe::SparseMoe`]): `num_experts` SwiGLU experts of
//! `moe_intermediate_size`, softmax over all router logits then top-k, renormalised only with
//! `norm_topk_prob`. Layers in `mlp_only_layers`, or off the `decoder_sparse_step` pattern,
//! keep a dense MLP of `intermediate_size`.

use super::moe::{ExpertNaming, MoeConfig};
use super::{Family, Keys, ModelConfig, ModelError};
use serde_json::Value;
use std::path::Path;

/// Reads a Qwen3-MoE config.json.
pub fn config(raw: &Value, path: &Path) -> Result<ModelConfig, ModelError> {
    let mut cfg = super::qwen3::config_as(raw, path, Family::Qwen3Moe)?;
    let keys = Keys { raw, path };
    // The Hub's configs say num_experts; transformers 5 saves it as num_local_experts.
    let experts = match keys.opt_int("num_experts")? {
        Some(n) => n,
        None => keys.int("num_local_experts")?,
    };
    let step = keys.int_or("decoder_sparse_step", 1)?;
    if step <= 0 {
        return Err(ModelError::file(path, "\"decoder_sparse_step\" must be a positive integer"));
    }
    let dense_only: Vec<i64> = match raw.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_i64().ok_or_else(|| ModelError::file(path, "\"mlp_only_layers\" must be a list of layer numbers")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ModelError::file(path, "\"mlp_only_layers\" must be a list of layer numbers")),
    };
    let sparse_layers =
        (0..cfg.layers as i64).map(|i| !dense_only.contains(&i) && experts > 0 && (i + 1) % step == 0).collect();
    cfg.moe = Some(MoeConfig {
        experts,
        top_k: keys.int("num_experts_per_tok")?,
        expert_intermediate: keys.int("moe_intermediate_size")?,
        norm_topk_prob: keys.bool_or("norm_topk_prob", false)?,
        fp32_routing_weights: false,
        sparse_layers,
        aux_loss: keys.bool_or("output_router_logits", false)?,
        router_aux_loss_coef: keys.float_or("router_aux_loss_coef", 0.001)?,
        naming: ExpertNaming::Qwen,
    });
    Ok(cfg)
}
