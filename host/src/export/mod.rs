//! `ftx export`: a fine-tuned model in the formats users deploy with: a merged Hugging Face
//! checkpoint (adapters folded into the base weights, sharded when large) and GGUF for
//! llama.cpp / Ollama (with a Modelfile). Both stream tensor by tensor from a memory-mapped
//! base ([`source::MergedSource`]), so models larger than RAM export.

pub mod gguf;
pub mod modelfile;
pub mod safetensors_out;
pub mod source;

use crate::model::linear::Weight;
use crate::model::CausalLm;
use anyhow::Result;
use std::path::{Path, PathBuf};
use tch::Kind;

/// Hugging Face's default shard size for `save_pretrained` (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

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
    // Stacked-experts parameters (gpt-oss): W ← W + ΔW the same way, NF4 experts dequantised
    // first (their dense tensors are only placeholders).
    for l in model.layers.iter_mut() {
        let mlp = &mut l.parts_mut().mlp;
        if mlp.expert_params_mut().iter().any(|p| p.lora.is_some()) {
            mlp.dequantize_experts_nf4();
        }
    }
    for p in crate::peft::expert_params_mut(model) {
        let Some(lora) = p.lora.take() else { continue };
        let kind = p.base.kind();
        *p.base = (p.base.to_kind(Kind::Float) + lora.delta().to_kind(Kind::Float)).to_kind(kind);
        merged += 1;
    }
    merged
}

/// Writes `base` + the PEFT adapter in `adapter` as a standalone checkpoint in `out`, its
/// weights in `kind`, in shards of at most 5 GB; config, tokenizer and generation files are
/// copied from `base`.
pub fn export_merged(base: &Path, adapter: &Path, out: &Path, kind: Kind) -> Result<PathBuf> {
    safetensors_out::export_merged_sharded(base, Some(adapter), out, kind, DEFAULT_MAX_SHARD_BYTES)?;
    Ok(out.to_owned())
}

/// Parses a size such as `5GB`, `500MB`, `2GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size (e.g. 5GB, 500MB)"))?;
    let mult: f64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit '{other}' in '{s}': use B, KB, MB, GB, KiB, MiB or GiB")),
    };
    if n <= 0.0 {
        return Err(format!("size '{s}' must be positive"));
    }
    Ok((n * mult) as u64)
}
