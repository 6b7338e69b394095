//! Preference objectives (DPO, ORPO, KTO through their loss plugins) under DDP and FSDP, and
//! GRPO and PPO under DDP, on Gloo: the loss series, validation or rewards, and every trained
//! tensor equal the single-process run with the same global batch. Each micro-batch's pairs
//! (each rollout's prompts) are split across the ranks, and the loss plugin sees the whole
//! micro-batch (minibatch), so losses that are not a mean over pairs (KTO's batch reference
//! point) and whole-rollout statistics (PPO's whitening) come out as one process computes them.

use crate::common::{fixture, metric_series, torch_rng_lock};
use crate::dist::{assert_same_run, ddp_command, stderr};
use crate::plugins::wasm;
use ftx::recipes::train;
use ftx::train::TrainConfig;
use std::path::Path;

/// A tiny-llama preference run on `data` with the loss plugin `plugin`; `extra` are `--set`
/// style overrides.
fn config(dir: &Path, data: &Path, plugin: &str, extra: &str) -> TrainConfig {
    let text = format!(
        "[model]\npath = \"{}\"\ndtype = \"fp32\"\ndevice = \"cpu\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n\
         [method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n[train]\nlr = 5e-3\nschedule = \"constant\"\noutput_dir = \"{}\"\n\
         [distributed]\ntimeout_s = 60\n[[plugins]]\npath = \"{}\"\n",
        fixture("models/llama3").display(),
        data.display(),
        dir.join("out").display(),
        wasm(plugin).display()
    );
    let overrides: Vec<String> = extra.split_whitespace().map(str::to_owned).collect();
    TrainConfig::parse(&text, &overrides).unwrap()
}

/// Trains `ranks` × batch `b` under torchrun's variables and one process with batch `ranks·b`
/// on the same data, and compares them (losses, validation, trained tensors).
fn same_as_one_process(plugin: &str, write: fn(&Path) -> std::path::PathBuf, ranks: usize, b: usize, settings: &str, full: bool) {
    let single = tempfile::tempdir().unwrap();
    {
        let _rng = torch_rng_lock();
        let data = write(single.path());
        train(&config(single.path(), &data, plugin, &format!("{settings} train.batch_size={}", ranks * b))).unwrap();
    }
    let multi = tempfile::tempdir().unwrap();
    let data = write(multi.path());
    let cfg = config(multi.path(), &data, plugin, &format!("{settings} train.batch_size={b}"));
    let o = ddp_command(multi.path(), &cfg, ranks, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let key = format!("plugin/{plugin}/rewards/margin");
    if plugin == "dpo" {
        // The plugin's metrics are the whole micro-batch's too.
        let (a, m) = (metric_series(&single.path().join("out"), &key), metric_series(&multi.path().join("out"), &key));
        assert!(!a.is_empty() && a.len() == m.len(), "{a:?} vs {m:?}");
        for ((s, x), (_, y)) in a.iter().zip(&m) {
            assert!((x - y).abs() <= 1e-5, "step {s}: {key} {x} vs {y}");
        }
    }
    if settings.contains("validation_split") {
        assert!(metric_series(&single.path().join("out"), "eval_loss").len() >= 2, "the runs were validated");
    }
    assert_same_run(single.path(), multi.path(), full);
}

fn pairs(dir: &Path) -> std::path::PathBuf {
    crate::align::write_pairs(dir, 20)
}

#[test]
fn dpo_lora_under_ddp_on_2_ranks_with_accumulation_and_validation_equals_one_process() {
    // The reference: the same model with its adapters off, on each rank's own pairs.
    same_as_one_process("dpo", pairs, 2, 2, "train.max_steps=3 train.grad_accum=2 data.validation_split=0.2 train.eval_every=1", false);
}

#[test]
fn orpo_under_ddp_on_3_ranks_with_a_rank_short_of_pairs_equals_one_process() {
    // 20 pairs in global batches of 3: the 7th micro-batch holds 2, so the third rank has none.
    same_as_one_process("orpo", pairs, 3, 1, "train.max_steps=7", false);
}

#[test]
fn kto_under_fsdp_on_3_ranks_equals_one_process() {
    // KTO's reference point z₀ is the mean over the micro-batch's undesirable answers: computed
    // per rank it would differ. 8 (desirable, undesirable) units in global batches of 3.
    same_as_one_process("kto", crate::rl::write_unpaired, 3, 1, "distributed.strategy=fsdp train.max_steps=4", false);
}

#[test]
fn dpo_full_fine_tuning_under_fsdp_on_2_ranks_equals_one_process() {
    // Full fine-tuning: the reference log-probs are computed from the whole initial model,
    // before it is sharded.
    same_as_one_process("dpo", pairs, 2, 2, "distributed.strategy=fsdp method.kind=full train.lr=1e-3 train.max_steps=2 data.validation_split=0.2", true);
}

#[test]
fn fsdp_one_layer_at_a_time_refuses_preference_pairs_clearly() {
    let d = tempfile::tempdir().unwrap();
    let data = pairs(d.path());
    let cfg = config(d.path(), &data, "dpo", "distributed.strategy=fsdp train.grad_checkpointing=true train.max_steps=1 train.batch_size=1");
    let o = ddp_command(d.path(), &cfg, 2, &[]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("train.grad_checkpointing = false"), "{}", stderr(&o));
}

// ---- GRPO and PPO ----

/// A GRPO or PPO run on 4 prompts (regex-match scores completions containing an "e").
fn rl_config(dir: &Path, algorithm: &str, rl: &str) -> TrainConfig {
    let mut data = String::new();
    for p in ["Say something.", "Write a word.", "Answer me.", "Go on."] {
        data.push_str(&serde_json::json!({"prompt": p, "reference": "(?s).*e.*"}).to_string());
        data.push('\n');
    }
    std::fs::write(dir.join("prompts.jsonl"), data).unwrap();
    let text = format!(
        "[model]\npath = \"{}\"\ndtype = \"fp32\"\ndevice = \"cpu\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n\
         [method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n[train]\nlr = 1e-2\nmax_steps = 3\nschedule = \"constant\"\nseed = 3\noutput_dir = \"{}\"\n\
         [distributed]\ntimeout_s = 60\n[rl]\nalgorithm = \"{algorithm}\"\nmax_new_tokens = 3\n{}\n\
         [[plugins]]\npath = \"{}\"\n[[plugins]]\npath = \"{}\"\n",
        fixture("models/llama3").display(),
        dir.join("prompts.jsonl").display(),
        dir.join("out").display(),
        rl.replace(' ', "\n"),
        wasm(algorithm).display(),
        wasm("regex-match").display(),
    );
    TrainConfig::parse(&text, &[]).unwrap()
}

/// One process and `ranks` ranks on the same rollouts: the same losses, rewards, KL and
/// trained adapter.
fn rl_same_as_one_process(algorithm: &str, ranks: usize, rl: &str) {
    let single = tempfile::tempdir().unwrap();
    {
        let _rng = torch_rng_lock();
        train(&rl_config(single.path(), algorithm, rl)).unwrap();
    }
    let multi = tempfile::tempdir().unwrap();
    let cfg = rl_config(multi.path(), algorithm, rl);
    let o = ddp_command(multi.path(), &cfg, ranks, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // Every number a rollout logs (rewards, each reward plugin's, KL, lengths, the loss
    // plugin's), except its speed.
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(single.path().join("out/metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    let keys: Vec<&String> = first.as_object().unwrap().keys().filter(|k| !["step", "tokens_per_s", "rollout_tokens_per_s", "time"].contains(&k.as_str())).collect();
    assert!(keys.iter().any(|k| k.starts_with("reward/")) && keys.iter().any(|k| *k == "kl"), "{keys:?}");
    for key in keys {
        let (a, b) = (metric_series(&single.path().join("out"), key), metric_series(&multi.path().join("out"), key));
        assert!(a.len() == 3 && a.len() == b.len(), "{key}: {a:?} vs {b:?}");
        for ((s, x), (_, y)) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5, "rollout {s}: {key} {x} vs {y}");
        }
    }
    // The runs learned something (LoRA's B starts at zero).
    let trained = tch::Tensor::read_safetensors(multi.path().join("out/final/adapter_model.safetensors")).unwrap();
    assert!(trained.iter().any(|(n, t)| n.contains("lora_B") && t.abs().max().double_value(&[]) > 0.0), "the adapter did not move");
    assert_same_run(single.path(), multi.path(), false);
}

#[test]
fn grpo_on_2_ranks_with_uneven_shares_equals_one_process() {
    // 3 prompts a rollout: rank 0 samples 2 groups, rank 1 one; 2 minibatches split unevenly.
    rl_same_as_one_process("grpo", 2, "prompts_per_step=3 group_size=4 minibatches=2");
}

#[test]
fn ppo_on_3_ranks_with_whitening_across_them_equals_one_process() {
    // 2 prompts a rollout on 3 ranks: the third samples none, yet joins every collective;
    // the advantages are whitened over the whole rollout.
    rl_same_as_one_process("ppo", 3, "prompts_per_step=2 group_size=3 minibatches=2 epochs=2 whiten_advantages=true");
}
