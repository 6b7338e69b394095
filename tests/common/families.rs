//! Set-ups the per-family tests (engine, gemma, phi, moe) share: the chat whose training masks
//! they check, logits against transformers', a short in-process run on chat data, and the check
//! that a merged export is the base model with its adapter.

use super::{fixture, max_diff};
use crate::engine::{target_runs, write_chat_data};
use ftx::data::{Example, Tokenizing};
use ftx::model::decoder::LoadOptions;
use ftx::model::tokenizer::Message;
use ftx::model::weights::WeightFiles;
use ftx::model::{CausalLm, KvCache, ModelConfig, TextTokenizer};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The assistant's two answers in [`answered_chat`]: a function call, then prose.
pub const CHAT_ANSWERS: [&str; 2] = ["{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", "Berlin is sunny."];

/// A system message (when `system`), then two user turns, each answered ([`CHAT_ANSWERS`]).
pub fn answered_chat(system: bool) -> Vec<Message> {
    let mut messages = vec![
        Message::new("user", "What is the weather in Paris?"),
        Message::new("assistant", CHAT_ANSWERS[0]),
        Message::new("user", "And Berlin?"),
        Message::new("assistant", CHAT_ANSWERS[1]),
    ];
    if system {
        messages.insert(0, Message::new("system", "You answer in json."));
    }
    messages
}

/// The tokenizer of the fixture model `models/<family>`.
pub fn fixture_tokenizer(family: &str) -> TextTokenizer {
    let dir = fixture(&format!("models/{family}"));
    TextTokenizer::load(&dir, ModelConfig::load(&dir).unwrap().vocab).unwrap()
}

/// The runs of target tokens (decoded, with their ids) of `messages` as training tokenizes
/// them with `tok` (inputs not trained on).
pub fn chat_target_runs(tok: &TextTokenizer, messages: Vec<Message>) -> Vec<(String, Vec<u32>)> {
    let t = Tokenizing { tok, max_len: 4096, train_on_inputs: false }.example(&Example::Chat { messages }).unwrap();
    target_runs(tok, &t)
}

/// `ftx train` in process: `kind` (lora, qlora…) of rank 4 on `base` for `steps` steps over 48
/// chat records written into `dir`, the run's output in `dir/out`.
pub fn train_on_chat(base: &Path, kind: &str, steps: u32, dir: &Path) -> ftx::recipes::TrainReport {
    let data = write_chat_data(dir, 48);
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n[method]\nkind = \"{kind}\"\nrank = 4\nalpha = 8\n\
         [train]\nlr = 5e-3\nschedule = \"constant\"\nmax_steps = {steps}\noutput_dir = \"{}\"\n",
        base.display(),
        data.display(),
        dir.join("out").display()
    );
    ftx::recipes::train(&ftx::train::TrainConfig::parse(&text, &[]).unwrap()).unwrap()
}

/// The merged checkpoint `merged` gives the logits of `base` with `adapter` loaded (fp32, within
/// 1e-4), and those differ from the base's alone (the adapter changed something).
pub fn assert_merged_is_base_plus_adapter(base: &Path, adapter: &Path, merged: &Path, family: &str) {
    let cpu32 = LoadOptions { device: Device::Cpu, kind: Kind::Float };
    let _g = tch::no_grad_guard();
    let mut with_adapter = CausalLm::load(base, cpu32).unwrap();
    ftx::peft::load_adapter(&mut with_adapter, adapter).unwrap();
    let merged = CausalLm::load(merged, cpu32).unwrap();
    let x = Tensor::arange_start(5, 45, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let (a, b) = (with_adapter.forward(&x, None), merged.forward(&x, None));
    let d = max_diff(&a, &b);
    assert!(d < 1e-4, "{family}: merged logits differ from base + adapter by {d}");
    assert!(max_diff(&a, &CausalLm::load(base, cpu32).unwrap().forward(&x, None)) > 1e-3, "{family}: the adapter changed the model");
}

/// Max |logit − transformers'| over the fixture prompt, for the weights of `models/<weights>`
/// with `edit` applied to their config: in one pass against `models/<family>/expected`'s
/// `logits`, and token by token through the KV cache against its `stepwise` tensor (`logits`,
/// or transformers' own token-by-token `logits_stepwise` where the fixture has them).
pub fn logits_parity(weights: &str, family: &str, stepwise: &str, edit: impl Fn(&mut ModelConfig)) -> (f64, f64) {
    let _g = tch::no_grad_guard();
    let dir = fixture(&format!("models/{weights}"));
    let mut cfg = ModelConfig::load(&dir).unwrap();
    edit(&mut cfg);
    let model = CausalLm::from_weights(cfg, &WeightFiles::open(&dir).unwrap(), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let exp = super::json(&format!("models/{family}/expected/expected.json"));
    let ids: Vec<i64> = exp["input_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let x = Tensor::from_slice(&ids).unsqueeze(0);
    let logits = format!("models/{family}/expected/logits.safetensors");
    let whole = max_diff(&model.forward(&x, None).squeeze_dim(0), &super::tensor(&logits, "logits"));
    let mut cache = KvCache::new(&model.config);
    let steps: Vec<Tensor> = (0..ids.len() as i64).map(|i| model.forward(&x.narrow(1, i, 1), Some(&mut cache))).collect();
    (whole, max_diff(&Tensor::cat(&steps, 1).squeeze_dim(0), &super::tensor(&logits, stepwise)))
}
