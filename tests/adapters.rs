//! Adapters everywhere, through the CLI: continue training from an adapter (`--adapter`,
//! `model.adapter`), DPO on top of an SFT adapter with base + adapter as the frozen reference,
//! `ftx generate --adapter`, and `ftx eval --adapter NAME=PATH` with distinct labels.

use crate::align::write_pairs;
use crate::by_name::{ftx_at, ok};
use crate::common::{fixture, metric_at};
use std::path::Path;

/// Alpaca records that teach one function call per city.
fn write_sft(dir: &Path) {
    let cities = ["Paris", "Berlin", "Rome", "Oslo", "Lima", "Cairo"];
    let text: String = (0..16)
        .map(|i| {
            let c = cities[i % cities.len()];
            let call = format!("{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{c}\"}}}}");
            serde_json::json!({"instruction": format!("Weather call for {c}"), "input": "", "output": call}).to_string() + "\n"
        })
        .collect();
    std::fs::write(dir.join("sft.jsonl"), text).unwrap();
}

fn config(dir: &Path, name: &str, data: &str, lr: f64, seq: usize) {
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{data}\"\nvalidation_split = 0.25\nmax_seq_len = {seq}\n[method]\nkind = \"lora\"\n[train]\nlr = {lr}\nmax_steps = 3\nbatch_size = 4\nschedule = \"constant\"\noutput_dir = \"out/{name}\"\n",
        fixture("models/llama3").display()
    );
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

/// `key` at `step` in the metrics of run `run`.
fn metric(dir: &Path, run: &str, step: u64, key: &str) -> f64 {
    metric_at(&dir.join("out").join(run), step, key)
}

fn generate(dir: &Path, model: &Path, adapter: Option<&str>) -> String {
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "Weather call for Rome", "--max-new-tokens", "8", "--device", "cpu", "--ids"];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    ok(ftx_at(dir, &dir.join("home"), &args))
}

#[test]
fn adapters_continue_training_underlie_dpo_and_serve_generate_and_eval() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let home = dir.join("home");
    let ftx = |args: &[&str]| ftx_at(dir, &home, args);
    write_sft(dir);
    write_pairs(dir, 12);
    config(dir, "sft", "sft.jsonl", 3e-2, 256);
    config(dir, "dpo", "pairs.jsonl", 5e-3, 64);
    ok(ftx(&["train", "--config", "sft.toml", "--set", "method.rank=4", "--set", "method.alpha=8"]));

    // Continue: r and alpha come from the adapter (the config leaves them out); the starting
    // weights are the saved adapter's, so the held-out loss starts where the first run ended.
    ok(ftx(&["train", "--config", "sft.toml", "--adapter", "out/sft/final", "--set", "train.output_dir=\"out/cont\""]));
    let (ended, started) = (metric(dir, "sft", 3, "eval_loss"), metric(dir, "cont", 0, "eval_loss"));
    assert!((ended - started).abs() < 1e-6, "validation loss: first run ended at {ended}, the continued run started at {started}");
    assert!(metric(dir, "cont", 3, "eval_loss") < started, "and it goes on falling");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("out/cont/final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_i64(), cfg["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    // A [method] that contradicts the adapter is refused, naming both values.
    let bad = ftx(&["train", "--config", "sft.toml", "--adapter", "out/sft/final", "--set", "method.rank=8", "--set", "train.output_dir=\"out/x\""]);
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && e.contains("method.rank = 8 but the adapter's r = 4"), "{e}");

    // DPO on top of the SFT adapter: the reference is base + that adapter (frozen), so the policy
    // starts equal to it: ln 2 on training and held-out pairs. (With the adapter-free base as
    // reference, as a fresh LoRA uses, the margins would not be 0.)
    ok(ftx(&["--plugin", "dpo", "train", "--config", "dpo.toml", "--set", "model.adapter=\"out/sft/final\""]));
    assert!((metric(dir, "dpo", 1, "loss") - std::f64::consts::LN_2).abs() < 1e-5);
    assert!((metric(dir, "dpo", 0, "eval_loss") - std::f64::consts::LN_2).abs() < 1e-5);
    assert!(metric(dir, "dpo", 1, "plugin/dpo/rewards/margin").abs() < 1e-6);
    assert!(metric(dir, "dpo", 3, "loss") < std::f64::consts::LN_2);

    // GRPO on top of it (loss by name): the reference is a frozen base + adapter, so the first
    // rollout's KL to it is 0 (with the adapters switched off instead, it would not be).
    let prompts: String = ["Paris", "Rome", "Oslo", "Lima"].iter().map(|c| serde_json::json!({"prompt": format!("Weather call for {c}"), "reference": c}).to_string() + "\n").collect();
    std::fs::write(dir.join("prompts.jsonl"), prompts).unwrap();
    let grpo = format!(
        "[model]\npath = \"{}\"\nadapter = \"out/sft/final\"\n[data]\ntrain = \"prompts.jsonl\"\nmax_seq_len = 128\n[method]\nobjective = \"grpo\"\n[train]\nmax_steps = 1\noutput_dir = \"out/grpo\"\n[rl]\nalgorithm = \"grpo\"\nmax_new_tokens = 6\n[[plugins]]\npath = \"exact-match\"\n",
        fixture("models/llama3").display()
    );
    std::fs::write(dir.join("grpo.toml"), grpo).unwrap();
    ok(ftx(&["train", "--config", "grpo.toml"]));
    assert!(metric(dir, "grpo", 1, "kl").abs() < 1e-9);

    // generate --adapter: differs from the base, equals the merged checkpoint.
    let base = fixture("models/llama3");
    let plain = generate(dir, &base, None);
    let adapted = generate(dir, &base, Some("out/sft/final"));
    assert_ne!(plain, adapted, "the adapter changes the greedy continuation");
    ok(ftx(&["export", "--model", base.to_str().unwrap(), "--adapter", "out/sft/final", "--format", "merged", "--out", "merged"]));
    assert_eq!(generate(dir, &dir.join("merged"), None), adapted);

    // eval: every run's adapter folder is `final`; labels come from NAME= or from the run.
    let out = ok(ftx(&["eval", "--model", base.to_str().unwrap(), "--adapter", "first=out/sft/final", "--adapter", "out/cont/final", "--perplexity", "sft.jsonl", "--device", "cpu", "--out", "ev"]));
    let rows: Vec<&str> = out.lines().map(|l| l.split("  ").next().unwrap().trim()).collect();
    assert_eq!(&rows[1..4], ["llama3", "first", "llama3 + cont"], "{out}");
    let out = ok(ftx(&["eval", "--model", base.to_str().unwrap(), "--adapter", "out/sft/final", "--adapter", "out/cont/final", "--perplexity", "sft.jsonl", "--device", "cpu", "--out", "ev2"]));
    assert!(out.contains("llama3 + sft ") && out.contains("llama3 + cont "), "{out}");
}
