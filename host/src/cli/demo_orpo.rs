//! The demo's preference stage: ORPO, through the orpo loss plugin, on the SFT model's own
//! mistakes. The SFT adapter is merged into the base; the merged model answers every training
//! and held-out request greedily; each wrong answer becomes a (right call, its own wrong call)
//! pair — on-policy preference data, the kind a labeller produces by marking a model's outputs
//! (a request it already answers right gets a plausible wrong call instead). ORPO trains a fresh
//! LoRA adapter on the merged model. The measures, on held-out requests: the preferred-answer
//! win rate (the share of the SFT model's held-out mistakes for which the model now gives the
//! right call the higher log-probability — 0% or close before, by construction) and the
//! greedy answers' exact-match and argument accuracy before and after.

use crate::data::function_calls::{wrong_call, CallExample, SYSTEM};
use crate::data::{batch, Example, Tokenizing};
use crate::model::decoder::LoadOptions;
use crate::model::tokenizer::Message;
use crate::model::{CausalLm, ModelConfig, TextTokenizer};
use crate::recipes::train;
use crate::train::TrainConfig;
use anyhow::{Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tch::{Device, Kind};

/// What the preference stage measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PreferenceReport {
    /// Held-out win rate of the SFT model (before ORPO) on its own held-out mistakes, by
    /// summed answer log-prob.
    pub win_rate_before: f64,
    /// The same after ORPO.
    pub win_rate_after: f64,
    /// The same by mean (per-token) answer log-prob, the quantity ORPO's odds ratio compares.
    pub mean_win_rate_before: f64,
    pub mean_win_rate_after: f64,
    /// Greedy held-out answers before (the SFT model) and after ORPO.
    pub calls_before: AnswerScores,
    pub calls_after: AnswerScores,
    pub heldout_pairs: usize,
    pub train_pairs: usize,
    /// Training pairs whose rejected answer is the SFT model's own mistake.
    pub on_policy_pairs: usize,
    pub train: crate::recipes::TrainReport,
}

/// Greedy answers scored as function calls.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct AnswerScores {
    pub exact_match: f64,
    /// Mean share of the expected arguments given with the expected value.
    pub arguments: f64,
    pub name_accuracy: f64,
}

/// Held-out win rates: by summed and by mean answer log-prob.
#[derive(Debug, Clone, Copy)]
pub struct WinRates {
    pub summed: f64,
    pub mean: f64,
}

/// The model's greedy answer to each example, and their scores.
fn answers(model: &CausalLm, tok: &TextTokenizer, examples: &[CallExample]) -> Result<(Vec<String>, AnswerScores)> {
    let cases: Vec<_> = examples.iter().map(|e| (e.prompt(), e.call.clone())).collect();
    let (_, outputs) = crate::eval::function_calls(model, tok, &cases, 48)?;
    let mut s = AnswerScores::default();
    for (out, e) in outputs.iter().zip(examples) {
        let c = crate::eval::score::score_function_call(out, &e.call).map_err(anyhow::Error::msg)?;
        s.exact_match += f64::from(u8::from(c.exact));
        s.arguments += c.arguments;
        s.name_accuracy += f64::from(u8::from(c.name));
    }
    let n = examples.len().max(1) as f64;
    Ok((outputs, AnswerScores { exact_match: s.exact_match / n, arguments: s.arguments / n, name_accuracy: s.name_accuracy / n }))
}

/// (example, rejected answer) pairs: the model's own answer where it is wrong (and renders as
/// an assistant turn verbatim — a half-trained model can emit chat markup); otherwise, when
/// `fill` is set, a plausible wrong call drawn with `seed`.
fn pairs(tok: &TextTokenizer, examples: &[CallExample], outputs: &[String], fill: bool, seed: u64) -> Vec<(CallExample, String)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let usable = |e: &CallExample, out: &str| !crate::eval::score_call(out, &e.call).0 && render(tok, e, out).is_ok();
    examples
        .iter()
        .zip(outputs)
        .filter_map(|(e, out)| match usable(e, out.trim()) {
            true => Some((e.clone(), out.trim().to_owned())),
            false => fill.then(|| (e.clone(), wrong_call(e, &mut rng).to_string())),
        })
        .collect()
}

/// `answer` to `e` as the SFT stage's chats render it: system instruction, request, answer.
fn render(tok: &TextTokenizer, e: &CallExample, answer: &str) -> Result<crate::data::TokenizedExample> {
    let mut messages = e.prompt();
    messages.push(Message::new("assistant", answer));
    Tokenizing { tok, max_len: 96, train_on_inputs: false }.example(&Example::Chat { messages }).map_err(anyhow::Error::msg)
}

/// The orpo loss plugin by name, as `method.objective = "orpo"` finds it: an installed `orpo`
/// (`ftx plugin install`), else the first-party one embedded in ftx, so the demo needs no
/// plugin build. Checked before the stage's work, so a binary without its first-party plugins
/// says so at once.
pub fn find_orpo_plugin() -> Result<&'static str> {
    crate::plugins::manifest::locate(Path::new(ORPO_PLUGIN))
        .map_err(|e| anyhow::anyhow!("the demo's preference stage needs the orpo plugin: {e} (or pass --orpo-steps 0 to skip the stage)"))?;
    Ok(ORPO_PLUGIN)
}

/// The plugin the preference stage's config names.
const ORPO_PLUGIN: &str = "orpo";

/// Shares of pairs whose right call `model` gives the higher summed / mean log-prob. Each
/// answer follows the prompt the SFT stage trained on (system instruction + request).
pub fn win_rate(model: &CausalLm, tok: &TextTokenizer, pairs: &[(CallExample, String)]) -> Result<WinRates> {
    let _g = tch::no_grad_guard();
    let pad = tok.pad_token.as_deref().and_then(|p| tok.token_id(p)).unwrap_or(0) as i64;
    let (mut wins, mut mean_wins) = (0usize, 0usize);
    for chunk in pairs.chunks(16) {
        let mut exs = Vec::with_capacity(2 * chunk.len());
        for (e, r) in chunk {
            exs.push(render(tok, e, &e.call.to_string())?);
            exs.push(render(tok, e, r)?);
        }
        let b = batch::pad(&exs.iter().collect::<Vec<_>>(), pad).to(model.device);
        let (sum, count) = crate::align::sequence_logps(model, &b, false);
        let mean = &sum / &count;
        let to_vec = |t: &tch::Tensor| Vec::<f64>::try_from(&t.to_kind(Kind::Double).to_device(Device::Cpu));
        wins += to_vec(&sum)?.chunks(2).filter(|cr| cr[0] > cr[1]).count();
        mean_wins += to_vec(&mean)?.chunks(2).filter(|cr| cr[0] > cr[1]).count();
    }
    let n = pairs.len().max(1) as f64;
    Ok(WinRates { summed: wins as f64 / n, mean: mean_wins as f64 / n })
}

/// Runs the stage under `out/orpo`: merges `adapter` into `base`, trains ORPO for `steps`.
pub fn preference_stage(out: &Path, base: &Path, adapter: &Path, train_set: &[CallExample], heldout: &[CallExample], steps: usize, lr: f64) -> Result<PreferenceReport> {
    let plugin = find_orpo_plugin()?;
    let merged = out.join("sft-merged");
    crate::export::export_merged(base, adapter, &merged, Kind::Float).context("merging the SFT adapter for the preference stage")?;
    let cfg = ModelConfig::load(&merged)?;
    let model = CausalLm::load(&merged, LoadOptions { device: Device::Cpu, kind: Kind::Float })?;
    let tok = TextTokenizer::load(&merged, cfg.vocab)?;
    // No more requests than the run's steps can visit (8 pairs a step).
    let train_set = &train_set[..train_set.len().min(8 * steps)];
    let (train_outputs, _) = answers(&model, &tok, train_set)?;
    let train_pairs = pairs(&tok, train_set, &train_outputs, true, 11);
    let on_policy_pairs = train_pairs.iter().zip(&train_outputs).filter(|((_, r), o)| r == o.trim()).count();
    let (held_outputs, calls_before) = answers(&model, &tok, heldout)?;
    let held = pairs(&tok, heldout, &held_outputs, false, 12);
    let before = win_rate(&model, &tok, &held)?;
    drop(model);
    let data = out.join("data/preference.jsonl");
    let text: String = train_pairs.iter().map(|(e, r)| serde_json::json!({"prompt": e.request, "chosen": e.call.to_string(), "rejected": r}).to_string() + "\n").collect();
    crate::util::write_atomic(&data, text.as_bytes())?;

    let config_text = format!(
        "[model]\npath = \"{merged}\"\n[data]\ntrain = \"{data}\"\nsystem = {system}\nmax_seq_len = 96\n[method]\nkind = \"lora\"\nrank = 8\nalpha = 16\ntarget_modules = [\"all-linear\"]\n[train]\nlr = {lr:e}\nmax_steps = {steps}\nbatch_size = 8\nschedule = \"cosine\"\nwarmup_steps = {warmup}\nweight_decay = 0.0\noutput_dir = \"{run}\"\n[[plugins]]\npath = \"{plugin}\"\nparams = {{ beta = 0.5 }}\n",
        merged = merged.display(),
        data = data.display(),
        run = out.join("orpo").display(),
        plugin = plugin,
        // The SFT chats' system turn, so the pairs render exactly as the SFT data did.
        system = serde_json::Value::from(SYSTEM),
        warmup = (steps / 10).max(1),
    );
    crate::util::write_atomic(&out.join("orpo.toml"), config_text.as_bytes())?;
    let report = train(&TrainConfig::parse(&config_text, &[]).map_err(anyhow::Error::msg)?)?;

    let mut model = CausalLm::load(&merged, LoadOptions { device: Device::Cpu, kind: Kind::Float })?;
    crate::peft::load_adapter(&mut model, &report.final_dir).map_err(anyhow::Error::msg)?;
    let after = win_rate(&model, &tok, &held)?;
    let (_, calls_after) = answers(&model, &tok, heldout)?;
    Ok(PreferenceReport {
        win_rate_before: before.summed,
        win_rate_after: after.summed,
        mean_win_rate_before: before.mean,
        mean_win_rate_after: after.mean,
        calls_before,
        calls_after,
        heldout_pairs: held.len(),
        train_pairs: train_pairs.len(),
        on_policy_pairs,
        train: report,
    })
}
