//! Phi-3, Phi-3.5 and Phi-4-mini (`Phi3ForCausalLM`, `model_type` "phi3").
//!
//! Llama's pre-norm decoder ([`super::block::PreNormBlock`]) with three differences, all read
//! from config.json here and applied where they live:
//! - q/k/v and gate/up are stored packed, one projection each (`self_attn.qkv_proj` →
//!   `[q | k | v]`, `mlp.gate_up_proj` → `[gate | up]`): the model runs them as the one GEMM
//!   they are, and adapters attach to them under those names, as PEFT does
//!   ([`super::attention::QkvProj::Packed`], [`super::block::GateUp::Packed`]);
//! - LongRoPE (`rope_type` "longrope", "su" in older configs): per-frequency short and long
//!   factors chosen per call by its largest position against
//!   `original_max_position_embeddings`, and cos/sin scaled by the attention factor
//!   ([`super::attention::Rope`]);
//! - a `partial_rotary_factor` (Phi-4-mini rotates 0.75 of each head).
//!
//! A `sliding_window` in the config makes every layer slide, as transformers masks Phi-3.

use super::{Family, Keys, ModelConfig, ModelError};
use serde_json::Value;
use std::path::Path;

/// Reads a Phi-3 / Phi-3.5 / Phi-4-mini config.json (transformers 5's `rope_parameters`, or
/// 4.x's top-level `rope_scaling` and `partial_rotary_factor`).
pub fn config(raw: &Value, path: &Path) -> Result<ModelConfig, ModelError> {
    let keys = Keys { raw, path };
    let mut cfg = keys.llama_like(Family::Phi3, 10_000.0)?;
    cfg.packed_projections = true;
    // Phi3Config's own default (llama_like assumes Llama's 1e-6).
    cfg.rms_eps = keys.float_or("rms_norm_eps", 1e-5)?;
    cfg.sliding_window = keys.opt_int("sliding_window")?;
    match raw.get("hidden_act").and_then(Value::as_str) {
        None | Some("silu") => {}
        Some(other) => {
            return Err(ModelError::file(path, format!("hidden_act '{other}' is not supported for Phi-3 (ftx supports silu)")));
        }
    }
    Ok(cfg)
}
