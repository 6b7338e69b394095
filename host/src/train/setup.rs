//! What every training run sets up before its first step: the device and dtype, the model
//! with its trainable tensors (adapters attached for the LoRA family), and the output folder
//! holding the resolved config.

use super::TrainConfig;
use crate::gpu::DeviceArg;
use crate::model::decoder::LoadOptions;
use crate::model::CausalLm;
use crate::peft::{self, LoraSettings};
use anyhow::{Context, Result};
use std::path::PathBuf;
use tch::{Device, Kind};

/// Resolves `auto` device and dtype.
pub fn resolve_device(device: &str, dtype: &str) -> Result<(Device, Kind)> {
    let device = device.parse::<DeviceArg>().map_err(anyhow::Error::msg)?.resolve().map_err(anyhow::Error::msg)?;
    let kind = match dtype {
        "auto" if device.is_cuda() => Kind::BFloat16,
        "auto" => Kind::Float,
        d => crate::model::parse_dtype(d)?,
    };
    Ok((device, kind))
}

/// The model with its trainable tensors marked, and the LoRA settings when adapters are used.
pub fn build_model(cfg: &TrainConfig, device: Device, kind: Kind) -> Result<(CausalLm, Vec<(String, tch::Tensor)>, Option<LoraSettings>)> {
    let mut model = CausalLm::load(&cfg.model.path, LoadOptions { device, kind })
        .with_context(|| format!("model.path: {}", cfg.model.path.display()))?;
    let m = &cfg.method;
    tch::manual_seed(cfg.train.seed as i64);
    match m.kind.as_str() {
        "full" | "hft" => {
            let named: Vec<(String, tch::Tensor)> = model
                .named_tensors()
                .into_iter()
                .map(|(n, t)| {
                    let t = t.set_requires_grad(true);
                    (n, t)
                })
                .collect();
            Ok((model, named, None))
        }
        kind => {
            let s = LoraSettings {
                rank: m.rank,
                alpha: m.alpha,
                dropout: m.dropout,
                target_modules: m.target_modules.clone(),
                rslora: m.rslora,
                dora: kind == "dora",
                quantize_nf4: kind == "qlora",
            };
            let named = peft::attach(&mut model, &s).map_err(anyhow::Error::msg)?;
            Ok((model, named, Some(s)))
        }
    }
}

/// Creates the run's output folder and writes the resolved config into it; returns the folder
/// and the config's SHA-256 (which a resume must match).
pub fn start_output(cfg: &TrainConfig) -> Result<(PathBuf, String)> {
    let out = cfg.train.output_dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let resolved = cfg.to_toml();
    crate::util::write_atomic(&out.join("config.toml"), resolved.as_bytes())?;
    Ok((out, crate::util::sha256_hex(resolved.as_bytes())))
}
