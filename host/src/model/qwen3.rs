//! Qwen3 (`Qwen3ForCausalLM`): the Llama decoder with a per-head RMSNorm on queries and keys
//! before RoPE, and an explicit `head_dim` that need not equal hidden / heads.

use super::{Family, Keys, ModelConfig, ModelError};
use serde_json::Value;
use std::path::Path;

/// Reads a Qwen3 config.json.
pub fn config(raw: &Value, path: &Path) -> Result<ModelConfig, ModelError> {
    config_as(raw, path, Family::Qwen3)
}

/// Reads Qwen3's keys (the decoder and its attention) as `family`: Qwen3-MoE's config has the
/// same ones, and reads its experts' on top.
pub(super) fn config_as(raw: &Value, path: &Path, family: Family) -> Result<ModelConfig, ModelError> {
    let keys = Keys { raw, path };
    let mut cfg = keys.llama_like(family, 1_000_000.0)?;
    cfg.qk_norm = true;
    let attention_bias = keys.bool_or("attention_bias", false)?;
    cfg.qkv_bias = attention_bias;
    cfg.o_bias = attention_bias;
    if keys.bool_or("use_sliding_window", false)? {
        cfg.sliding_window = keys.opt_int("sliding_window")?;
    }
    Ok(cfg)
}
