//! Gemma 3, text only (`Gemma3ForCausalLM`, `model_type` "gemma3_text"): Gemma 2's sandwich
//! block ([`super::gemma2::SandwichBlock`]) with per-head q/k RMSNorm (1 + w) and two RoPE
//! bases — sliding layers use `rope_local_base_freq` (plain RoPE), global layers
//! `rope_theta` with the configured scaling — and, by default, no soft-capping. Five sliding
//! layers to one global in the released checkpoints.

use super::{Family, Keys, ModelConfig, ModelError};
use serde_json::Value;
use std::path::Path;

/// Reads a Gemma 3 text config.json (transformers 5's per-layer-kind `rope_parameters`, or
/// 4.x's `rope_theta` / `rope_local_base_freq` / `rope_scaling`).
pub fn config(raw: &Value, path: &Path) -> Result<ModelConfig, ModelError> {
    let keys = Keys { raw, path };
    let mut cfg = super::gemma2::gemma_like(&keys, Family::Gemma3, 1_000_000.0, 6)?;
    cfg.qk_norm = true;
    cfg.local_rope_theta = Some(match keys.rope_section_float("sliding_attention", "rope_theta") {
        Some(theta) => theta,
        None => keys.float_or("rope_local_base_freq", 10_000.0)?,
    });
    cfg.attn_logit_softcap = keys.opt_float("attn_logit_softcapping")?;
    cfg.final_logit_softcap = keys.opt_float("final_logit_softcapping")?;
    Ok(cfg)
}
