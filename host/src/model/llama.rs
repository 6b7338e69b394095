//! Llama 2, 3, 3.1 and 3.2 (`LlamaForCausalLM`).
//!
//! The reference decoder: RMSNorm, rotary attention with grouped-query heads (Llama 3's
//! frequency-dependent RoPE scaling where `rope_scaling.rope_type == "llama3"`), SwiGLU MLP.
//! Optional `attention_bias` and `mlp_bias` as transformers reads them.

use super::{Family, Keys, ModelConfig, ModelError};
use serde_json::Value;
use std::path::Path;

/// Reads a Llama config.json.
pub fn config(raw: &Value, path: &Path) -> Result<ModelConfig, ModelError> {
    let keys = Keys { raw, path };
    let mut cfg = keys.llama_like(Family::Llama, 10_000.0)?;
    let attention_bias = keys.bool_or("attention_bias", false)?;
    cfg.qkv_bias = attention_bias;
    cfg.o_bias = attention_bias;
    cfg.mlp_bias = keys.bool_or("mlp_bias", false)?;
    Ok(cfg)
}
