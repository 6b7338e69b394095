//! `ftx export`: a fine-tuned model in the formats users deploy with. Today: a merged Hugging
//! Face checkpoint (adapters folded into the base weights) and the PEFT adapter folder.

use crate::model::decoder::LoadOptions;
use crate::model::linear::Weight;
use crate::model::CausalLm;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// Folds every attached adapter into its layer's base weight (W ← W + ΔW, computed in fp32)
/// and detaches the adapters. NF4 bases are dequantised first. Returns how many were merged.
pub fn merge_adapters(model: &mut CausalLm) -> usize {
    let _g = tch::no_grad_guard();
    let mut merged = 0;
    for (_, lin) in model.linears_mut() {
        let Some(adapter) = lin.adapter.take() else { continue };
        let delta = adapter.delta_weight(&lin.base);
        let base = lin.base.dense_weight();
        let kind = base.kind();
        lin.base.weight = Weight::Dense((base.to_kind(Kind::Float) + delta).to_kind(kind));
        merged += 1;
    }
    merged
}

/// Writes `base` + the PEFT adapter in `adapter` as a standalone checkpoint in `out`, its
/// weights in `kind`; config, tokenizer and generation files are copied from `base`.
pub fn export_merged(base: &Path, adapter: &Path, out: &Path, kind: Kind) -> Result<PathBuf> {
    let mut model = CausalLm::load(base, LoadOptions { device: Device::Cpu, kind: Kind::Float })
        .with_context(|| format!("loading the base model from {}", base.display()))?;
    crate::peft::load_adapter(&mut model, adapter).map_err(anyhow::Error::msg)?;
    let n = merge_adapters(&mut model);
    tracing::info!(merged = n, "adapters merged");
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tensors: Vec<(String, tch::Tensor)> = model.named_tensors().into_iter().map(|(name, t)| (name, t.to_kind(kind))).collect();
    crate::train::checkpoint::write_safetensors(&out.join("model.safetensors"), &tensors)?;
    let mut config = model.config.raw.clone();
    let dtype = match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    };
    for key in ["torch_dtype", "dtype"] {
        config[key] = serde_json::Value::String(dtype.into());
    }
    crate::util::write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja"] {
        let src = base.join(f);
        if src.exists() {
            crate::util::write_atomic(&out.join(f), &std::fs::read(&src)?)?;
        }
    }
    Ok(out.to_owned())
}
