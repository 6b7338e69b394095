//! Preference training through loss plugins: DPO with the reference from disabled adapters
//! (LoRA) or precomputed (full), ORPO without a reference.

use crate::common::{fixture, metric_at, torch_rng_lock};
use crate::plugins::wasm;
use ftx::recipes::train;
use ftx::train::TrainConfig;
use std::path::Path;

pub fn write_pairs(dir: &Path, n: usize) -> std::path::PathBuf {
    let cities = ["Paris", "Berlin", "Rome", "Oslo", "Lima", "Cairo"];
    let mut text = String::new();
    for i in 0..n {
        let c = cities[i % cities.len()];
        let rec = serde_json::json!({
            "prompt": format!("What is the weather in {c}?"),
            "chosen": format!("{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{c}\"}}}}"),
            "rejected": "I cannot help with that.",
        });
        text.push_str(&rec.to_string());
        text.push('\n');
    }
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

fn config(dir: &Path, method: &str, plugin: &str, extra: &[&str]) -> TrainConfig {
    let data = write_pairs(dir, 24);
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nvalidation_split = 0.25\nmax_seq_len = 64\n[method]\nkind = \"{method}\"\nrank = 4\nalpha = 8\n[train]\nlr = 5e-3\nmax_steps = 10\nbatch_size = 3\nschedule = \"constant\"\noutput_dir = \"{}\"\n[[plugins]]\npath = \"{}\"\n",
        fixture("models/llama3").display(),
        data.display(),
        dir.join("out").display(),
        wasm(plugin).display()
    );
    TrainConfig::parse(&text, &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

#[test]
fn dpo_with_lora_uses_the_adapter_free_model_as_reference_and_learns_the_preference() {
    let _rng = torch_rng_lock();
    let d = tempfile::tempdir().unwrap();
    let r = train(&config(d.path(), "lora", "dpo", &[])).unwrap();
    // LoRA starts with B = 0, so policy = reference and every margin is 0: loss = ln 2.
    assert!((r.first_loss.unwrap() - std::f64::consts::LN_2).abs() < 1e-5, "{:?}", r.first_loss);
    assert!(r.last_loss.unwrap() < 0.5 * std::f64::consts::LN_2, "{:?}", r.last_loss);
    assert!((metric_at(&d.path().join("out"), 1, "plugin/dpo/rewards/margin")).abs() < 1e-6);
    assert!(metric_at(&d.path().join("out"), 10, "eval_loss") < std::f64::consts::LN_2, "held-out pairs too");
    assert!(metric_at(&d.path().join("out"), 10, "plugin/dpo/rewards/accuracy") > 0.9);
    assert!(d.path().join("out/final/adapter_model.safetensors").exists());
}

#[test]
fn dpo_with_full_fine_tuning_precomputes_the_reference() {
    let _rng = torch_rng_lock();
    let d = tempfile::tempdir().unwrap();
    let r = train(&config(d.path(), "full", "dpo", &["train.lr=1e-3"])).unwrap();
    assert!((r.first_loss.unwrap() - std::f64::consts::LN_2).abs() < 1e-5, "{:?}", r.first_loss);
    assert!(r.last_loss.unwrap() < r.first_loss.unwrap());
}

#[test]
fn orpo_through_the_plugin_trains_without_a_reference() {
    let _rng = torch_rng_lock();
    let d = tempfile::tempdir().unwrap();
    let r = train(&config(d.path(), "lora", "orpo", &[])).unwrap();
    assert!(r.last_loss.unwrap() < 0.7 * r.first_loss.unwrap(), "{:?} → {:?}", r.first_loss, r.last_loss);
    assert!(metric_at(&d.path().join("out"), 10, "plugin/orpo/log_odds_ratio").is_finite());
}

#[test]
fn preference_data_without_a_loss_plugin_is_a_clear_error() {
    let _rng = torch_rng_lock(); // train() seeds libtorch's global generator before it refuses
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path(), "lora", "dpo", &[]);
    cfg.plugins.clear();
    let e = train(&cfg).unwrap_err().to_string();
    assert!(e.contains("preference pairs") && e.contains("--plugin"), "{e}");
}
