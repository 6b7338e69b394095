//! The `ftx` binary as a user runs it.

use crate::common::{fixture, ids, json};
use std::process::Command;

fn ftx(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ftx")).args(args).output().unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    assert!(o.status.success(), "ftx failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn generate_prints_the_same_text_as_transformers() {
    for family in ["llama3", "llama2", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi4mini"] {
        let exp = json(&format!("models/{family}/expected/expected.json"));
        let g = &exp["greedy"];
        assert_eq!(ids(&g["prompt_ids"]), ids(&exp["input_ids"]), "{family}: the greedy prompt is the fixture text");
        let dir = fixture(&format!("models/{family}"));
        let args = ["generate", "--model", dir.to_str().unwrap(), "--prompt", exp["text"].as_str().unwrap(), "--max-new-tokens", "12", "--device", "cpu"];
        let text = stdout(&ftx(&args));
        assert_eq!(text.strip_suffix('\n').unwrap(), g["text"].as_str().unwrap(), "{family}");
        let mut with_ids = args.to_vec();
        with_ids.push("--ids");
        let got: Vec<u32> = stdout(&ftx(&with_ids)).split_whitespace().map(|t| t.parse().unwrap()).collect();
        assert_eq!(got, ids(&g["output_ids"]), "{family}");
    }
}

#[test]
fn generate_chat_and_sampling_run_and_a_seed_repeats() {
    let dir = fixture("models/qwen2");
    let args = ["generate", "--model", dir.to_str().unwrap(), "--chat", "Hello", "--system", "Be brief.", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "3", "--max-new-tokens", "8", "--ids"];
    let a = stdout(&ftx(&args));
    assert_eq!(a, stdout(&ftx(&args)));
    assert!(!a.trim().is_empty());
}

#[test]
fn errors_are_messages_not_panics() {
    let o = ftx(&["generate", "--model", "/nonexistent", "--prompt", "x", "--device", "cpu"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/nonexistent/config.json: missing") && !err.contains("panicked"), "{err}");
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("ftx.toml");
    std::fs::write(&cfg, "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n[train]\nlearnig_rate = 1\n").unwrap();
    let o = ftx(&["train", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("ftx.toml") && err.contains("unknown field `learnig_rate`"), "{err}");
    let o = ftx(&["generate", "--model", "x", "--prompt", "y", "--device", "tpu"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("use auto, cpu, cuda or cuda:N"));
}

#[test]
fn plan_reports_the_guides_16_bytes_per_parameter() {
    let out = stdout(&ftx(&["plan", "--model", "llama-3.1-8b", "--method", "full"]));
    // 8,030,261,248 params × 16 bytes = 128.5 GB (119.7 GiB) before activations.
    assert!(out.contains("8.03B total"), "{out}");
    assert!(out.contains("recommendation"), "{out}");
    let out = stdout(&ftx(&["plan", "--model", fixture("models/qwen3").to_str().unwrap(), "--method", "qlora"]));
    assert!(out.contains("qlora"), "{out}");
    // Gemma shapes: four norms a layer (gemma-2-2b is 2,614,341,888 parameters).
    let out = stdout(&ftx(&["plan", "--model", "gemma-2-2b", "--method", "lora"]));
    assert!(out.contains("2.61B total"), "{out}");
    let out = stdout(&ftx(&["plan", "--model", fixture("models/gemma3").to_str().unwrap(), "--method", "qlora"]));
    assert!(out.contains("qlora"), "{out}");
    // Phi-4-mini: packed q/k/v and gate/up, one LoRA pair each (by hand: 32 layers ×
    // 16·(3072 + 5120 + 3072 + 3072 + 3072 + 16384 + 8192 + 3072) = 23,068,672 trainable).
    let out = stdout(&ftx(&["plan", "--model", "phi-4-mini", "--method", "lora", "--rank", "16"]));
    assert!(out.contains("3.84B total, 23.1M trainable"), "{out}");
}

#[test]
fn doctor_reports_libtorch_and_why_cuda_is_off() {
    let out = stdout(&ftx(&["doctor"]));
    assert!(out.contains("libtorch     2.11.0"), "{out}");
    assert!(out.contains("cuda "), "{out}");
}

#[test]
fn bench_train_runs_on_cpu_and_the_loss_falls() {
    let out = stdout(&ftx(&["bench", "train", "--shape", "tiny", "--seq", "32", "--batch", "2", "--steps", "4", "--warmup", "1", "--device", "cpu"]));
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["system"], "ftx");
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["last_loss"].as_f64().unwrap() < r["first_loss"].as_f64().unwrap());
    // ln(32000) ≈ 10.37: a random model starts near uniform.
    assert!((r["first_loss"].as_f64().unwrap() - 32000f64.ln()).abs() < 0.5, "{r}");
}

#[test]
fn bench_train_checks_the_fused_path_and_runs_the_separate_one() {
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["bench", "train", "--shape", "tiny", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--device", "cpu"];
        args.extend_from_slice(extra);
        serde_json::from_str(stdout(&ftx(&args)).trim()).unwrap()
    };
    let fused = run(&["--check-fused"]);
    let diff = fused["fused_grad_rel_diff"].as_f64().expect("reported");
    assert!(diff < 1e-5, "fp32 fused and separate gradients differ by {diff}");
    let separate = run(&["--unfused"]);
    assert_eq!(separate["system"], "ftx (unfused)");
    assert!(separate.get("fused_grad_rel_diff").is_none());
    let (a, b) = (fused["first_loss"].as_f64().unwrap(), separate["first_loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-5 * a, "same weights, same first loss: {a} vs {b}");
}

#[test]
fn plan_offload_and_full_logits_change_the_activations() {
    let activations = |extra: &[&str]| -> f64 {
        let mut args = vec!["plan", "--model", "llama-3.2-1b", "--method", "lora", "--batch", "8"];
        args.extend_from_slice(extra);
        let out = stdout(&ftx(&args));
        let line = out.lines().find(|l| l.trim_start().starts_with("activations")).unwrap_or_else(|| panic!("{out}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (on, offloaded) = (activations(&["--grad-checkpointing"]), activations(&["--grad-checkpointing", "--offload"]));
    // Offloading moves 16 layers × 16,384 tokens × 4 KiB of layer inputs (1.0 GiB) to the host,
    // two of them (0.125 GiB) on the device at a time in flight.
    assert!((on - offloaded - 0.875).abs() < 0.05, "{on} vs {offloaded}");
    // Every token's logits at 6 bytes an entry (16,384 × 128,256) instead of one chunk: +11.4 GiB.
    let (chunked, full) = (activations(&[]), activations(&["--full-logits"]));
    assert!((full - chunked - 11.37).abs() < 0.11, "{chunked} vs {full}");
}

#[test]
fn demo_runs_end_to_end_in_a_short_form() {
    let _rng = crate::common::torch_rng_lock();
    let d = tempfile::tempdir().unwrap();
    let out = stdout(&ftx(&["demo", "--out", d.path().to_str().unwrap(), "--steps", "4", "--pretrain-steps", "4", "--heldout", "8", "--orpo-steps", "3"]));
    assert!(out.contains("[5/5]") && out.contains("exact match"), "{out}");
    // The preference stage: 3 steps visit 24 pairs, each rejected answer the model's own
    // mistake or a plausible wrong call.
    assert!(out.contains("24 training pairs") && out.contains("held-out greedy answers"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["preference"]["train_pairs"], 24, "{report}");
    assert_eq!(report["preference"]["train"]["steps"], 3, "{report}");
    for f in ["eval.svg", "report.json", "eval/report.html", "eval/samples.jsonl", "lora/loss.svg", "lora/final/adapter_model.safetensors", "pretrain/final/model.safetensors"] {
        assert!(d.path().join(f).exists(), "{f}");
    }
}
