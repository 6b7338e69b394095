//! Mixtral (`MixtralForCausalLM`): Mistral's decoder whose MLP is a mixture of experts
//! ([`super::moe::SparseMoe`]): `num_local_experts` SwiGLU experts, each token routed to
//! `num_experts_per_tok` of them with weights softmax-ed over its top-k router logits.

use super::moe::{ExpertNaming, MoeConfig};
use super::{Family, Keys, ModelConfig, ModelError};
use serde_json::Value;
use std::path::Path;

/// Reads a Mixtral config.json.
pub fn config(raw: &Value, path: &Path) -> Result<ModelConfig, ModelError> {
    let keys = Keys { raw, path };
    let mut cfg = keys.llama_like(Family::Mixtral, 1_000_000.0)?;
    cfg.sliding_window = keys.opt_int("sliding_window")?;
    if keys.float_or("router_jitter_noise", 0.0)? != 0.0 {
        return Err(ModelError::file(
            path,
            "router_jitter_noise is not 0: ftx does not jitter router inputs; set \"router_jitter_noise\": 0.0",
        ));
    }
    let layers = cfg.layers;
    cfg.moe = Some(MoeConfig {
        experts: keys.int("num_local_experts")?,
        top_k: keys.int_or("num_experts_per_tok", 2)?,
        expert_intermediate: cfg.intermediate,
        norm_topk_prob: true,
        fp32_routing_weights: true,
        sparse_layers: vec![true; layers],
        aux_loss: keys.bool_or("output_router_logits", false)?,
        router_aux_loss_coef: keys.float_or("router_aux_loss_coef", 0.001)?,
        naming: ExpertNaming::Mixtral,
    });
    Ok(cfg)
}
