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
            super::recompute::apply(&mut model, cfg.train.recompute, m.kind.as_str(), 0.0)?;
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
                quantize_fp8: m.fp8,
            };
            let named = match &cfg.model.adapter {
                None => peft::attach(&mut model, &s).map_err(anyhow::Error::msg)?,
                Some(dir) => {
                    let s = settings_from_adapter(cfg, dir, s)?;
                    peft::load_adapter_with(&mut model, dir, &s).map_err(|e| anyhow::anyhow!("model.adapter = {}: {e}", dir.display()))?;
                    super::recompute::apply(&mut model, cfg.train.recompute, kind, s.dropout)?;
                    peft::stacked::stack_expert_adapters(&mut model);
                    let named = peft::trainable_tensors(&mut model);
                    return Ok((model, named, Some(s)));
                }
            };
            super::recompute::apply(&mut model, cfg.train.recompute, kind, s.dropout)?;
            Ok((model, named, Some(s)))
        }
    }
}

/// The LoRA settings of a run that continues the adapter in `dir`: the adapter's r, alpha,
/// targets, rsLoRA and DoRA, checked against `[method]` (a value set there that differs from
/// both its default and the adapter's is refused, naming both), with the run's own dropout and
/// QLoRA choice.
fn settings_from_adapter(cfg: &TrainConfig, dir: &std::path::Path, s: LoraSettings) -> Result<LoraSettings> {
    let a = peft::read_adapter_config(dir).map_err(|e| anyhow::anyhow!("model.adapter: {e}"))?;
    let defaults = crate::train::config::MethodSection::default();
    let m = &cfg.method;
    let expand = |t: &[String]| -> std::collections::BTreeSet<String> {
        t.iter().flat_map(|t| if t == "all-linear" { peft::ALL_LINEAR.iter().map(|l| l.to_string()).collect() } else { vec![t.rsplit('.').next().unwrap_or(t).to_owned()] }).collect()
    };
    let mut conflicts = Vec::new();
    if m.rank != defaults.rank && m.rank != a.rank {
        conflicts.push(format!("method.rank = {} but the adapter's r = {}", m.rank, a.rank));
    }
    if m.alpha != defaults.alpha && m.alpha != a.alpha {
        conflicts.push(format!("method.alpha = {} but the adapter's lora_alpha = {}", m.alpha, a.alpha));
    }
    if m.target_modules != defaults.target_modules && expand(&m.target_modules) != expand(&a.target_modules) {
        conflicts.push(format!("method.target_modules = {:?} but the adapter's are {:?}", m.target_modules, a.target_modules));
    }
    if m.rslora && !a.rslora {
        conflicts.push("method.rslora = true but the adapter was trained without rsLoRA".to_owned());
    }
    if s.dora != a.dora {
        conflicts.push(format!("method.kind = \"{}\" but the adapter is {}", m.kind, if a.dora { "a DoRA adapter (use kind = \"dora\")" } else { "a LoRA adapter (use lora or qlora)" }));
    }
    if !conflicts.is_empty() {
        anyhow::bail!("model.adapter = {}: {}; leave those keys out to take the adapter's values", dir.display(), conflicts.join("; "));
    }
    Ok(LoraSettings { dropout: s.dropout, quantize_nf4: s.quantize_nf4, quantize_fp8: s.quantize_fp8, ..a })
}

/// The checkpoint's tokenizer with the run's chat template and end-of-turn token
/// (`data.chat_template`, `data.eot_token`) put on it.
pub fn load_tokenizer(cfg: &TrainConfig, vocab: i64) -> Result<crate::model::TextTokenizer> {
    let mut tok = crate::model::TextTokenizer::load(&cfg.model.path, vocab)?;
    crate::data::chat_templates::apply(&mut tok, cfg.data.chat_template.as_deref(), cfg.data.eot_token.as_deref()).map_err(anyhow::Error::msg)?;
    Ok(tok)
}

/// Creates the run's output folder and writes the resolved config into it, after checking
/// that a checkpoint already there may be resumed under it (else the error names the keys that
/// differ, and the folder is left as it was); returns the folder and the resolved config.
pub fn start_output(cfg: &TrainConfig) -> Result<(PathBuf, ResolvedConfig)> {
    let out = cfg.train.output_dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let toml = cfg.to_toml();
    super::checkpoint::check_config(&out, &toml)?;
    crate::util::write_atomic(&out.join("config.toml"), toml.as_bytes())?;
    let sha256 = crate::util::sha256_hex(toml.as_bytes());
    Ok((out, ResolvedConfig { toml, sha256 }))
}

/// A run's resolved config, as checkpoints record it.
#[derive(Debug, Clone)]
pub struct ResolvedConfig {
    /// The config as TOML, every default filled in.
    pub toml: String,
    /// Its SHA-256 (hex).
    pub sha256: String,
}
