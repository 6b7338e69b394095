//! Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): the Llama decoder with biases on q, k and v (not
//! on o), and a sliding window used only where `use_sliding_window` is set.

use super::{Family, Keys, ModelConfig, ModelError};
use serde_json::Value;
use std::path::Path;

/// Reads a Qwen2 config.json.
pub fn config(raw: &Value, path: &Path) -> Result<ModelConfig, ModelError> {
    let keys = Keys { raw, path };
    let mut cfg = keys.llama_like(Family::Qwen2, 1_000_000.0)?;
    cfg.qkv_bias = true;
    if keys.bool_or("use_sliding_window", false)? {
        cfg.sliding_window = keys.opt_int("sliding_window")?;
    }
    Ok(cfg)
}
