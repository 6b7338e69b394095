//! The demo's preference stage: ORPO, through the orpo loss plugin, on generated
//! (request, right call, plausible wrong call) pairs, after the LoRA SFT stage. The SFT adapter
//! is merged into the base first; ORPO trains a fresh LoRA adapter on the merged model. The
//! measure is the preferred-answer win rate on held-out requests: the share of pairs whose
//! right call the model gives a higher log-probability than the wrong one.

use crate::data::function_calls::{wrong_call, CallExample};
use crate::data::{batch, Example, Tokenizing};
use crate::model::decoder::LoadOptions;
use crate::model::tokenizer::Message;
use crate::model::{CausalLm, ModelConfig, TextTokenizer};
use crate::train::{train, TrainConfig};
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// What the preference stage measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PreferenceReport {
    /// Held-out win rate of the SFT model (before ORPO).
    pub win_rate_before: f64,
    /// Held-out win rate after ORPO.
    pub win_rate_after: f64,
    pub heldout_pairs: usize,
    pub train_pairs: usize,
    pub train: crate::train::TrainReport,
}

/// `orpo.wasm`: beside the working directory's `plugins/` build, or the source tree's; built
/// with cargo from the source tree when it is missing there.
pub fn find_orpo_plugin() -> Result<PathBuf> {
    let rel = Path::new("plugins/target/wasm32-wasip2/release/orpo.wasm");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for p in [rel.to_path_buf(), root.join(rel)] {
        if p.exists() {
            return Ok(p);
        }
    }
    let manifest = root.join("plugins/Cargo.toml");
    if manifest.exists() {
        eprintln!("ftx demo: building the orpo plugin ({})", manifest.display());
        let status = std::process::Command::new("cargo")
            .args(["build", "--release", "--target", "wasm32-wasip2", "-p", "orpo", "--manifest-path"])
            .arg(&manifest)
            .status();
        if matches!(status, Ok(s) if s.success()) && root.join(rel).exists() {
            return Ok(root.join(rel));
        }
    }
    bail!(
        "the demo's preference stage needs the orpo plugin ({}): build it with `cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml` (tests/demo.sh does), or pass --orpo-steps 0 to skip the stage",
        rel.display()
    )
}

/// (prompt, chosen, rejected) for each example, the rejected call drawn with `seed`.
fn pairs(examples: &[CallExample], seed: u64) -> Vec<(String, String, String)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    examples.iter().map(|e| (e.request.clone(), e.call.to_string(), wrong_call(e, &mut rng).to_string())).collect()
}

/// Share of pairs whose chosen answer has the higher summed log-prob under `model`.
pub fn win_rate(model: &CausalLm, tok: &TextTokenizer, pairs: &[(String, String, String)]) -> Result<f64> {
    let _g = tch::no_grad_guard();
    let tz = Tokenizing { tok, max_len: 96 };
    let chat = |p: &str, a: &str| tz.example(&Example::Chat { messages: vec![Message::new("user", p), Message::new("assistant", a)] });
    let pad = tok.pad_token.as_deref().and_then(|p| tok.token_id(p)).unwrap_or(0) as i64;
    let mut wins = 0usize;
    for chunk in pairs.chunks(16) {
        let mut exs = Vec::with_capacity(2 * chunk.len());
        for (p, c, r) in chunk {
            exs.push(chat(p, c).map_err(anyhow::Error::msg)?);
            exs.push(chat(p, r).map_err(anyhow::Error::msg)?);
        }
        let b = batch::pad(&exs.iter().collect::<Vec<_>>(), pad).to(model.device);
        let (sum, _) = crate::align::sequence_logps(model, &b, false);
        let v: Vec<f64> = Vec::<f64>::try_from(&sum.to_kind(Kind::Double).to_device(Device::Cpu))?;
        wins += v.chunks(2).filter(|cr| cr[0] > cr[1]).count();
    }
    Ok(wins as f64 / pairs.len().max(1) as f64)
}

/// Runs the stage under `out/orpo`: merges `adapter` into `base`, trains ORPO for `steps`.
pub fn preference_stage(out: &Path, base: &Path, adapter: &Path, train_set: &[CallExample], heldout: &[CallExample], steps: usize) -> Result<PreferenceReport> {
    let plugin = find_orpo_plugin()?;
    let merged = out.join("sft-merged");
    crate::export::export_merged(base, adapter, &merged, Kind::Float).context("merging the SFT adapter for the preference stage")?;
    let train_pairs = pairs(&train_set[..train_set.len().min(1200)], 11);
    let held = pairs(heldout, 12);
    let data = out.join("data/preference.jsonl");
    let text: String = train_pairs.iter().map(|(p, c, r)| serde_json::json!({"prompt": p, "chosen": c, "rejected": r}).to_string() + "\n").collect();
    crate::util::write_atomic(&data, text.as_bytes())?;

    let cfg = ModelConfig::load(&merged)?;
    let model = CausalLm::load(&merged, LoadOptions { device: Device::Cpu, kind: Kind::Float })?;
    let tok = TextTokenizer::load(&merged, cfg.vocab)?;
    let before = win_rate(&model, &tok, &held)?;
    drop(model);

    let config_text = format!(
        "[model]\npath = \"{merged}\"\n[data]\ntrain = \"{data}\"\nmax_seq_len = 96\n[method]\nkind = \"lora\"\nrank = 8\nalpha = 16\n[train]\nlr = 2e-3\nmax_steps = {steps}\nbatch_size = 8\nschedule = \"cosine\"\nwarmup_steps = 5\noutput_dir = \"{run}\"\n[[plugins]]\npath = \"{plugin}\"\nparams = {{ beta = 0.5 }}\n",
        merged = merged.display(),
        data = data.display(),
        run = out.join("orpo").display(),
        plugin = plugin.display(),
    );
    crate::util::write_atomic(&out.join("orpo.toml"), config_text.as_bytes())?;
    let report = train(&TrainConfig::parse(&config_text, &[]).map_err(anyhow::Error::msg)?)?;

    let mut model = CausalLm::load(&merged, LoadOptions { device: Device::Cpu, kind: Kind::Float })?;
    crate::peft::load_adapter(&mut model, &report.final_dir).map_err(anyhow::Error::msg)?;
    let after = win_rate(&model, &tok, &held)?;
    Ok(PreferenceReport { win_rate_before: before, win_rate_after: after, heldout_pairs: held.len(), train_pairs: train_pairs.len(), train: report })
}
