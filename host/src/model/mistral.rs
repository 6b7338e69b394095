//! Mistral (`MistralForCausalLM`): the Llama decoder with sliding-window attention.

use super::{Family, Keys, ModelConfig, ModelError};
use serde_json::Value;
use std::path::Path;

/// Reads a Mistral config.json.
pub fn config(raw: &Value, path: &Path) -> Result<ModelConfig, ModelError> {
    let keys = Keys { raw, path };
    let mut cfg = keys.llama_like(Family::Mistral, 10_000.0)?;
    cfg.sliding_window = keys.opt_int("sliding_window")?;
    Ok(cfg)
}
