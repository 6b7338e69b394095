//! RL from rewards (GRPO, PPO) and KTO on unpaired data: advantages against hand-computed
//! values, rewards that rise on a task the reward plugin can score, and KTO's loss on a fixed
//! batch against the formula computed here.

use crate::common::{fixture, torch_rng_lock};
use crate::plugins::wasm;
use ftx::align::advantage::{gae, group_advantages, token_rewards, KlController};
use ftx::recipes::train;
use ftx::train::TrainConfig;
use std::path::Path;

fn close(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
    }
}

#[test]
fn gae_matches_hand_computed_values() {
    // γ = 0.9, λ = 0.8: δ₂ = 2 − 0.2 = 1.8; δ₁ = 0 + 0.9·0.2 − 1 = −0.82; δ₀ = 1 + 0.9·1 − 0.5 = 1.4.
    // A₂ = 1.8; A₁ = −0.82 + 0.72·1.8 = 0.476; A₀ = 1.4 + 0.72·0.476 = 1.74272.
    let (adv, ret) = gae(&[1.0, 0.0, 2.0], &[0.5, 1.0, 0.2], 0.9, 0.8);
    close(&adv, &[1.74272, 0.476, 1.8]);
    close(&ret, &[2.24272, 1.476, 2.0]);
    // γ = λ = 1 with zero values: every advantage is the reward still to come.
    let (adv, _) = gae(&[0.0, 0.0, 1.0], &[0.0; 3], 1.0, 1.0);
    close(&adv, &[1.0, 1.0, 1.0]);
    // PPO's per-token rewards: −0.1·(log π − log π_ref), plus the score at the last token.
    close(&token_rewards(&[-1.0, -2.0], &[-1.5, -1.0], 3.0, 0.1), &[-0.05, 3.1]);
}

#[test]
fn group_advantages_match_hand_computed_values() {
    // Group 1: mean 0.5, unbiased std √(1/3) = 0.57735…; group 2: all equal → 0.
    let a = group_advantages(&[1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], 4, true);
    let s = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4);
    close(&a, &[s, -s, -s, s, 0.0, 0.0, 0.0, 0.0]);
    close(&group_advantages(&[3.0, 1.0], 2, false), &[1.0, -1.0]);
}

#[test]
fn adaptive_kl_controller_moves_towards_the_target() {
    // e = clip(12/6 − 1, ±0.2) = 0.2; value · (1 + 0.2 · 100 / 10000).
    let mut c = KlController { value: 0.1, target: Some(6.0), horizon: 10_000.0 };
    c.update(12.0, 100);
    assert!((c.value - 0.1002).abs() < 1e-12, "{}", c.value);
    c.update(3.0, 100); // e = −0.2
    assert!((c.value - 0.1002 * 0.998).abs() < 1e-12, "{}", c.value);
    let mut fixed = KlController { value: 0.1, target: None, horizon: 10_000.0 };
    fixed.update(100.0, 100);
    assert_eq!(fixed.value, 0.1);
}

/// The reward: regex-match of the completion against `PATTERN` (it contains an "e"). The
/// fixture model is random with a 453-token vocabulary, so 3 sampled tokens contain an "e"
/// about a third of the time at first; the policy can learn to raise that to ~1.
const PATTERN: &str = "(?s).*e.*";

fn rl_config(dir: &Path, algorithm: &str, lr: f64, extra: &str) -> TrainConfig {
    let mut data = String::new();
    for p in ["Say something.", "Write a word.", "Answer me.", "Go on."] {
        data.push_str(&serde_json::json!({"prompt": p, "reference": PATTERN}).to_string());
        data.push('\n');
    }
    std::fs::write(dir.join("prompts.jsonl"), data).unwrap();
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 8\nalpha = 16\n[train]\nlr = {lr}\nmax_steps = 32\nschedule = \"constant\"\nseed = 3\noutput_dir = \"{}\"\n[rl]\nalgorithm = \"{algorithm}\"\nprompts_per_step = 2\ngroup_size = 8\nmax_new_tokens = 3\n{extra}\n[[plugins]]\npath = \"{}\"\n[[plugins]]\npath = \"{}\"\n",
        fixture("models/llama3").display(),
        dir.join("prompts.jsonl").display(),
        dir.join("out").display(),
        wasm(algorithm).display(),
        wasm("regex-match").display(),
    );
    TrainConfig::parse(&text, &[]).unwrap()
}

fn series(dir: &Path, key: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().get(key).and_then(|v| v.as_f64())).collect()
}

fn quarter_means(v: &[f64]) -> (f64, f64) {
    let q = (v.len() / 4).max(1);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&v[..q]), mean(&v[v.len() - q..]))
}

#[test]
fn grpo_raises_the_reward_of_a_regex_task() {
    let _rng = torch_rng_lock();
    let d = tempfile::tempdir().unwrap();
    train(&rl_config(d.path(), "grpo", 2e-2, "")).unwrap();
    let reward = series(d.path(), "reward");
    assert_eq!(reward.len(), 32);
    let (first, last) = quarter_means(&reward);
    assert!(last > first + 0.3, "mean reward {first:.3} → {last:.3}: {reward:?}");
    for key in ["reward_std", "kl", "completion_length", "plugin/grpo/kl", "reward/regex_match"] {
        assert_eq!(series(d.path(), key).len(), 32, "{key}");
    }
    // The sampling phase's own speed, for before/after comparisons of the rollout engine.
    let rollout_speed = series(d.path(), "rollout_tokens_per_s");
    assert!(rollout_speed.len() == 32 && rollout_speed.iter().all(|v| v.is_finite() && *v > 0.0), "{rollout_speed:?}");
    assert!(d.path().join("out/final/adapter_model.safetensors").exists());
    assert!(d.path().join("out/reward.svg").exists());
}

#[test]
fn ppo_raises_the_reward_of_a_regex_task_and_saves_its_value_head() {
    let _rng = torch_rng_lock();
    let d = tempfile::tempdir().unwrap();
    train(&rl_config(d.path(), "ppo", 1e-2, "epochs = 2\nminibatches = 2\nkl_coef = 0.01\ntarget_kl = 1.0\n")).unwrap();
    let reward = series(d.path(), "reward");
    let (first, last) = quarter_means(&reward);
    assert!(last > first + 0.3, "mean reward {first:.3} → {last:.3}: {reward:?}");
    assert!(series(d.path(), "plugin/ppo/vf_loss").iter().all(|v| v.is_finite()));
    let kl_coef = series(d.path(), "kl_coef");
    assert!(kl_coef.first() != kl_coef.last(), "the adaptive controller moved: {kl_coef:?}");
    let head = tch::Tensor::read_safetensors(d.path().join("out/final/value_head.safetensors")).unwrap();
    let w = &head.iter().find(|(n, _)| n == "v_head.weight").unwrap().1;
    assert_eq!(w.size(), [1, 64]);
    assert!(w.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0, "the value head trained");
}

#[test]
fn an_interrupted_ppo_run_resumes_on_the_same_trajectory() {
    let _rng = torch_rng_lock();
    let d = tempfile::tempdir().unwrap();
    let mut cfg = rl_config(d.path(), "ppo", 1e-2, "epochs = 2\nminibatches = 2\nkl_coef = 0.01\ntarget_kl = 1.0\n");
    (cfg.train.max_steps, cfg.train.save_every, cfg.train.keep_last) = (6, Some(3), 3);
    let out = d.path().join("out");
    let whole = train(&cfg).unwrap();
    assert_eq!(whole.resumed_from, None);
    let read = |f: &str| {
        let mut t = tch::Tensor::read_safetensors(out.join("final").join(f)).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let (adapter, head) = (read("adapter_model.safetensors"), read("value_head.safetensors"));
    let (reward, kl_coef) = (series(d.path(), "reward"), series(d.path(), "kl_coef"));
    assert_eq!(reward.len(), 6);
    assert!(kl_coef[3] != kl_coef[0], "the adaptive coefficient moved by rollout 4, so resuming must restore it: {kl_coef:?}");

    // As if killed after rollout 3's checkpoint: the later checkpoint and final weights gone.
    std::fs::remove_dir_all(out.join("checkpoints/step-0000006")).unwrap();
    std::fs::remove_dir_all(out.join("final")).unwrap();
    let resumed = train(&cfg).unwrap();
    assert_eq!(resumed.resumed_from, Some(3));
    assert_eq!(series(d.path(), "reward"), reward, "the same rollouts after the resume");
    assert_eq!(series(d.path(), "kl_coef"), kl_coef);
    for (before, after) in [(&adapter, &read("adapter_model.safetensors")), (&head, &read("value_head.safetensors"))] {
        assert_eq!(before.len(), after.len());
        for ((n, a), (m, b)) in before.iter().zip(after) {
            assert_eq!(n, m);
            assert!(a.equal(b), "{n} differs after the resume");
        }
    }

    // Another configuration in the same folder is refused, not mixed in.
    cfg.train.lr = 2e-2;
    let err = train(&cfg).unwrap_err().to_string();
    assert!(err.contains("another configuration"), "{err}");
}

pub(crate) fn write_unpaired(dir: &Path) -> std::path::PathBuf {
    let cities = ["Paris", "Berlin", "Rome", "Oslo", "Lima", "Cairo", "Quito", "Accra"];
    let mut text = String::new();
    for (i, c) in cities.iter().enumerate() {
        let prompt = format!("What is the weather in {c}?");
        let good = format!("{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{c}\"}}}}");
        text.push_str(&serde_json::json!({"prompt": prompt, "completion": good, "label": true}).to_string());
        text.push('\n');
        // Fewer undesirable answers than desirable ones: the data are unpaired and unbalanced.
        if i % 2 == 0 {
            text.push_str(&serde_json::json!({"prompt": prompt, "completion": "I cannot help with that.", "label": false}).to_string());
            text.push('\n');
        }
    }
    let p = dir.join("unpaired.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

/// Summed log-prob of an example's target tokens, from the model's plain forward pass.
fn summed_logp(model: &ftx::model::CausalLm, ex: &ftx::data::TokenizedExample) -> f64 {
    let _g = tch::no_grad_guard();
    let ids = tch::Tensor::from_slice(&ex.ids).unsqueeze(0);
    let logp = model.forward(&ids, None).squeeze_dim(0).log_softmax(-1, tch::Kind::Double);
    (0..ex.ids.len() - 1)
        .filter(|&i| ex.labels[i + 1] != ftx::data::tokenize::IGNORE)
        .map(|i| logp.double_value(&[i as i64, ex.ids[i + 1]]))
        .sum()
}

#[test]
fn kto_trains_on_unpaired_data_and_its_loss_matches_the_formula() {
    use ftx::align::{PreferenceLoss, PreferenceObjective, Reference};
    use ftx::data::{Example, Tokenizing};
    use ftx::model::tokenizer::Message;
    let _rng = torch_rng_lock();
    let d = tempfile::tempdir().unwrap();
    let data = write_unpaired(d.path());
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n[train]\nlr = 5e-3\nmax_steps = 8\nbatch_size = 2\nschedule = \"constant\"\noutput_dir = \"{}\"\n[[plugins]]\npath = \"{}\"\n",
        fixture("models/llama3").display(),
        data.display(),
        d.path().join("out").display(),
        wasm("kto").display()
    );
    let r = train(&TrainConfig::parse(&text, &[]).unwrap()).unwrap();
    // LoRA starts at B = 0: every log-ratio is 0, z₀ = 0 and each example's loss is 1 − σ(0).
    assert!((r.first_loss.unwrap() - 0.5).abs() < 1e-6, "{:?}", r.first_loss);
    assert!(r.last_loss.unwrap() < r.first_loss.unwrap(), "{:?} → {:?}", r.first_loss, r.last_loss);

    // The trained adapter on a fixed batch of 2 desirable and 2 undesirable answers.
    let opts = ftx::model::decoder::LoadOptions { device: tch::Device::Cpu, kind: tch::Kind::Float };
    let mut model = ftx::model::CausalLm::load(&fixture("models/llama3"), opts).unwrap();
    ftx::peft::load_adapter(&mut model, &r.final_dir).unwrap();
    let tok = ftx::model::TextTokenizer::load(&fixture("models/llama3"), model.config.vocab).unwrap();
    let tz = Tokenizing { tok: &tok, max_len: 64, train_on_inputs: false };
    let chat = |p: &str, a: &str| tz.example(&Example::Chat { messages: vec![Message::new("user", p), Message::new("assistant", a)] }).unwrap();
    let batch = [
        chat("What is the weather in Rome?", "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}"),
        chat("What is the weather in Oslo?", "I cannot help with that."),
        chat("What is the weather in Lima?", "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\"}}"),
        chat("Weather in Rome, please.", "Sorry, no."),
    ];
    let plugin = ftx::plugins::loss::LossPlugin::load(&wasm("kto"), Default::default(), tch::Device::Cpu).unwrap();
    let mut obj = PreferenceObjective { loss: PreferenceLoss::Plugin(plugin), params: vec![], reference: Reference::AdaptersOff };
    let b = ftx::data::batch::pad(&batch.iter().collect::<Vec<_>>(), 0);
    let (loss, _) = obj.step(&mut model, &b, &[0, 1], 1.0, false).unwrap();

    // KTO (TRL's loss_type="kto", β = 0.1, λ_D = λ_U = 1) computed here: r = log π − log π_ref,
    // z₀ = max(0, mean r of the batch's undesirable answers), losses 1 − σ(β(r − z₀)) for
    // desirable and 1 − σ(β(z₀ − r)) for undesirable answers, averaged over the 4 answers.
    let policy: Vec<f64> = batch.iter().map(|e| summed_logp(&model, e)).collect();
    ftx::peft::set_adapters_enabled(&mut model, false);
    let reference: Vec<f64> = batch.iter().map(|e| summed_logp(&model, e)).collect();
    let r: Vec<f64> = policy.iter().zip(&reference).map(|(p, q)| p - q).collect();
    assert!(r.iter().any(|x| x.abs() > 1e-3), "the adapter moved the policy: {r:?}");
    let z0 = ((r[1] + r[3]) / 2.0).max(0.0);
    let sigma = |x: f64| 1.0 / (1.0 + (-x).exp());
    let beta = 0.1;
    let expected = ((1.0 - sigma(beta * (r[0] - z0))) + (1.0 - sigma(beta * (z0 - r[1]))) + (1.0 - sigma(beta * (r[2] - z0))) + (1.0 - sigma(beta * (z0 - r[3])))) / 4.0;
    assert!((loss - expected).abs() < 1e-5, "plugin {loss} vs formula {expected}");
}
