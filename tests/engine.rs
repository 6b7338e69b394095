//! The training engine: masks per template, packing without contamination, gradient
//! accumulation, checkpointing, exact resume after SIGKILL, NaN handling, HFT, QLoRA.

use crate::common::families::{answered_chat, chat_target_runs, fixture_tokenizer, CHAT_ANSWERS};
use crate::common::lora::{attach_with_random_b, grads, lora_r4, zero_grads};
use crate::common::{fixture, max_diff, metric_series, torch_rng_lock};
use ftx::data::batch;
use ftx::data::tokenize::IGNORE;
use ftx::data::{Example, TokenizedExample, Tokenizing};
use ftx::model::decoder::LoadOptions;
use ftx::model::tokenizer::Message;
use ftx::model::{CausalLm, TextTokenizer};
use ftx::peft::{self, LoraSettings};
use ftx::train::step::{forward_backward, forward_backward_tiled, Checkpointing, StepPos};
use ftx::recipes::train;
use ftx::train::TrainConfig;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const FAMILIES: &[&str] = &["llama3", "llama2", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"];

/// Contiguous runs of target tokens, decoded (with their ids).
pub(crate) fn target_runs(tok: &TextTokenizer, t: &TokenizedExample) -> Vec<(String, Vec<u32>)> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for (&id, &l) in t.ids.iter().zip(&t.labels) {
        let on = l != IGNORE;
        if on {
            assert_eq!(l, id, "a label must equal its token");
            if !prev {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(id as u32);
        }
        prev = on;
    }
    runs.into_iter().map(|r| (tok.decode(&r, false), r)).collect()
}

#[test]
fn chat_masks_cover_assistant_turns_and_their_end_token_for_every_family() {
    let end_token = |f: &str| match f {
        "llama3" => "<|eot_id|>",
        "qwen2" | "qwen3" | "qwen3_moe" => "<|im_end|>",
        _ => "</s>",
    };
    for family in FAMILIES {
        let tok = fixture_tokenizer(family);
        let runs = chat_target_runs(&tok, answered_chat(true));
        assert_eq!(runs.len(), 2, "{family}: one target run per assistant turn, got {runs:?}");
        for (k, (text, ids)) in runs.iter().enumerate() {
            let end = end_token(family);
            assert_eq!(*ids.last().unwrap(), tok.token_id(end).unwrap(), "{family}: turn {k} must end with {end}");
            assert_eq!(text.trim_start(), format!("{}{}", CHAT_ANSWERS[k], if family.starts_with("llama2") { " " } else { "" }).trim_end().to_owned() + if family.starts_with("llama2") { " </s>" } else { end }, "{family}: turn {k}");
        }
        // Nothing outside the assistant turns is a target: the user and system text are not.
        let all_targets: String = runs.iter().map(|r| r.0.clone()).collect();
        assert!(!all_targets.contains("Paris?") && !all_targets.contains("json."), "{family}: {all_targets}");
    }
}

#[test]
fn alpaca_learns_only_the_output_and_text_learns_everything_with_eos() {
    let tok = fixture_tokenizer("llama3");
    let tz = Tokenizing { tok: &tok, max_len: 4096, train_on_inputs: false };
    let eos = tok.token_id("<|eot_id|>").unwrap() as i64;
    let t = tz.example(&Example::Alpaca { instruction: "Say hi".into(), input: String::new(), output: "hi there".into() }).unwrap();
    let runs = target_runs(&tok, &t);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].0, "hi there<|eot_id|>");
    assert_eq!(*t.ids.last().unwrap(), eos);
    let t = tz.example(&Example::Text { text: "plain words".into() }).unwrap();
    assert!(t.labels.iter().zip(&t.ids).all(|(l, i)| l == i), "every token is a target");
    assert_eq!(t.ids[0], 448, "BOS from the tokenizer");
    assert_eq!(*t.ids.last().unwrap(), eos);
}

fn lora_model(dropout: f64) -> (CausalLm, Vec<(String, Tensor)>) {
    let mut model = CausalLm::load(&fixture("models/llama3"), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let named = attach_with_random_b(&mut model, &LoraSettings { dropout, ..lora_r4("lora") }, 3);
    (model, named)
}

fn examples() -> Vec<TokenizedExample> {
    let lens = [7usize, 12, 5, 9];
    lens.iter()
        .enumerate()
        .map(|(k, &n)| {
            let ids: Vec<i64> = (0..n).map(|i| ((i * 37 + k * 101) % 440) as i64).collect();
            let labels = ids.iter().enumerate().map(|(i, &x)| if i < 2 { IGNORE } else { x }).collect();
            TokenizedExample { ids, labels }
        })
        .collect()
}

#[test]
fn packed_loss_and_gradients_equal_unpacked() {
    let _rng = torch_rng_lock();
    let (model, named) = lora_model(0.0);
    let exs = examples();
    let refs: Vec<&TokenizedExample> = exs.iter().collect();
    let padded = batch::pad(&refs, 0);
    let packed = batch::pack(&refs, 40, 0);
    assert_eq!(packed.input_ids.size(), [1, 40], "all four examples share one row");
    assert_eq!(padded.n_targets, packed.n_targets);
    let pos = StepPos { seed: 1, step: 0, micro: 0 };
    let l1 = forward_backward(&model, &padded, padded.n_targets as f64, pos, Checkpointing::Off);
    let g1 = grads(&named);
    zero_grads(&named);
    let l2 = forward_backward(&model, &packed, packed.n_targets as f64, pos, Checkpointing::Off);
    let g2 = grads(&named);
    assert!((l1 - l2).abs() < 1e-4 * l1.abs(), "loss padded {l1} vs packed {l2}");
    for ((n, _), (a, b)) in named.iter().zip(g1.iter().zip(&g2)) {
        let d = max_diff(a, b);
        assert!(d < 1e-5, "{n}: gradient differs by {d}");
    }
    // Without the block-diagonal mask the packed examples would see each other.
    zero_grads(&named);
    let contaminated = ftx::data::Batch { segments: None, ..batch::pack(&refs, 40, 0) };
    let positions_restart = contaminated.positions.shallow_clone();
    let l3 = forward_backward(&model, &ftx::data::Batch { positions: positions_restart, ..contaminated }, packed.n_targets as f64, pos, Checkpointing::Off);
    assert!((l3 - l1).abs() > 1e-3, "the test must be able to see contamination ({l3} vs {l1})");
}

#[test]
fn gradient_checkpointing_gives_identical_gradients_even_with_dropout() {
    let _rng = torch_rng_lock();
    let (model, named) = lora_model(0.2);
    let exs = examples();
    let b = batch::pad(&exs.iter().collect::<Vec<_>>(), 0);
    let pos = StepPos { seed: 9, step: 3, micro: 1 };
    let l1 = forward_backward(&model, &b, b.n_targets as f64, pos, Checkpointing::Off);
    let g1 = grads(&named);
    zero_grads(&named);
    let l2 = forward_backward(&model, &b, b.n_targets as f64, pos, Checkpointing::Layers);
    let g2 = grads(&named);
    assert!((l1 - l2).abs() < 1e-6 * l1.abs(), "{l1} vs {l2}");
    for ((n, _), (a, c)) in named.iter().zip(g1.iter().zip(&g2)) {
        assert!(max_diff(a, c) < 1e-6, "{n}");
    }
}

#[test]
fn offloaded_checkpointing_with_mlp_tiles_gives_identical_gradients() {
    let _rng = torch_rng_lock();
    let (model, named) = lora_model(0.0);
    let exs = examples();
    let b = batch::pad(&exs.iter().collect::<Vec<_>>(), 0);
    let pos = StepPos { seed: 9, step: 3, micro: 1 };
    let l1 = forward_backward(&model, &b, b.n_targets as f64, pos, Checkpointing::Off);
    let g1 = grads(&named);
    let tokens = b.input_ids.numel() as i64;
    // Tiles of 5 tokens: several tiles, the last one short.
    assert!(tokens > 10 && tokens % 5 != 0, "{tokens} tokens");
    for mode in [Checkpointing::Layers, Checkpointing::Offload] {
        zero_grads(&named);
        let l2 = forward_backward_tiled(&model, &b, b.n_targets as f64, pos, mode, 5);
        let g2 = grads(&named);
        assert!((l1 - l2).abs() < 1e-6 * l1.abs(), "{mode:?}: {l1} vs {l2}");
        for ((n, _), (a, c)) in named.iter().zip(g1.iter().zip(&g2)) {
            assert!(max_diff(a, c) < 1e-5, "{mode:?} {n}: {}", max_diff(a, c));
        }
    }
}

#[test]
fn chunked_head_loss_equals_full_logits_in_value_and_every_gradient() {
    // Full fine-tuning, so the head weight trains too: tied (llama3) and untied (mistral).
    for family in ["llama3", "mistral"] {
        let model = CausalLm::load(&fixture(&format!("models/{family}")), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
        let named: Vec<(String, Tensor)> = model.named_tensors().into_iter().map(|(n, t)| (n, t.set_requires_grad(true))).collect();
        let b = batch::pad(&examples().iter().collect::<Vec<_>>(), 0);
        let inp = model.attn_inputs(&b.positions, |w| b.mask(w));
        let denom = 7.0;
        // Reference: the whole [B, T, V] logits through autograd.
        let h = model.hidden(&b.input_ids, &inp, None, true);
        let v = model.config.vocab;
        let full = model.head(&h).view([-1, v]).cross_entropy_loss::<Tensor>(&b.targets.view([-1]), None, tch::Reduction::Sum, -100, 0.0);
        (&full / denom).backward();
        let reference = grads(&named);
        zero_grads(&named);
        // Chunks of 4 rows (the head trains: 4 × one row of logits).
        let h = model.hidden(&b.input_ids, &inp, None, true);
        let loss = ftx::train::head_loss::head_ce_chunked(&model, &h, &b.targets, denom, true, v);
        let chunked = grads(&named);
        assert!((loss - full.double_value(&[])).abs() < 1e-4, "{family}: {loss} vs {}", full.double_value(&[]));
        for ((n, _), (a, c)) in named.iter().zip(reference.iter().zip(&chunked)) {
            assert!(max_diff(a, c) < 1e-5, "{family} {n}: {}", max_diff(a, c));
        }
    }
}

// ---- whole runs through `train` ----

pub(crate) fn write_chat_data(dir: &Path, n: usize) -> std::path::PathBuf {
    let cities = ["Paris", "Berlin", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Quito"];
    let mut lines = String::new();
    for i in 0..n {
        let c = cities[(i * 7 + i / 3) % cities.len()];
        let extra = " please".repeat(i % 4);
        let rec = serde_json::json!({"messages": [
            {"role": "user", "content": format!("What is the weather in {c}{extra}?")},
            {"role": "assistant", "content": format!("{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{c}\"}}}}")},
        ]});
        lines.push_str(&rec.to_string());
        lines.push('\n');
    }
    let p = dir.join("train.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

fn config(dir: &Path, extra: &str) -> TrainConfig {
    let data = write_chat_data(dir, 48);
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n[train]\nlr = 1e-3\nschedule = \"constant\"\noutput_dir = \"{}\"\n",
        fixture("models/llama3").display(),
        data.display(),
        dir.join("out").display()
    );
    let overrides: Vec<String> = extra.split_whitespace().map(str::to_owned).collect();
    TrainConfig::parse(&text, &overrides).unwrap()
}

fn final_tensors(dir: &Path, file: &str) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(dir.join("out/final").join(file)).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn batch_1_times_accumulation_8_equals_batch_8() {
    let _rng = torch_rng_lock();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    train(&config(a.path(), "train.max_steps=1 train.batch_size=8 train.grad_accum=1")).unwrap();
    train(&config(b.path(), "train.max_steps=1 train.batch_size=1 train.grad_accum=8")).unwrap();
    let (ta, tb) = (final_tensors(a.path(), "adapter_model.safetensors"), final_tensors(b.path(), "adapter_model.safetensors"));
    assert_eq!(ta.len(), tb.len());
    for ((n, x), (_, y)) in ta.iter().zip(&tb) {
        let d = max_diff(x, y);
        assert!(d < 1e-6, "{n}: {d}");
    }
}

fn write_config_file(dir: &Path, cfg: &TrainConfig) -> std::path::PathBuf {
    let p = dir.join("ftx.toml");
    std::fs::write(&p, cfg.to_toml()).unwrap();
    p
}

#[test]
fn a_run_killed_with_sigkill_resumes_exactly() {
    let _rng = torch_rng_lock();
    let settings = "train.max_steps=12 train.save_every=4 train.batch_size=2 method.dropout=0.1 train.schedule=cosine train.warmup_steps=2";
    let whole = tempfile::tempdir().unwrap();
    train(&config(whole.path(), settings)).unwrap();
    let reference = metric_series(&whole.path().join("out"), "loss");
    assert_eq!(reference.len(), 12);

    let cut = tempfile::tempdir().unwrap();
    let cfg_path = write_config_file(cut.path(), &config(cut.path(), settings));
    let exe = env!("CARGO_BIN_EXE_ftx");
    let mut child = std::process::Command::new(exe)
        .args(["train", "--config"])
        .arg(&cfg_path)
        .env("FTX_STEP_DELAY_MS", "150")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = cut.path().join("out/checkpoints/step-0000004/state.json");
    let t0 = std::time::Instant::now();
    while !ckpt.exists() {
        assert!(t0.elapsed().as_secs() < 60, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = metric_series(&cut.path().join("out"), "loss");
    assert!(partial.len() < 12, "the run was killed before it finished");
    let out = std::process::Command::new(exe).args(["train", "--config"]).arg(&cfg_path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from the checkpoint at step"));
    let resumed = metric_series(&cut.path().join("out"), "loss");
    assert_eq!(resumed.len(), 12);
    for ((s1, l1), (s2, l2)) in reference.iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert_eq!(l1, l2, "step {s1}: resumed loss {l2} differs from the uninterrupted {l1}");
    }
    let (ta, tb) = (final_tensors(whole.path(), "adapter_model.safetensors"), final_tensors(cut.path(), "adapter_model.safetensors"));
    for ((n, x), (_, y)) in ta.iter().zip(&tb) {
        assert_eq!(max_diff(x, y), 0.0, "{n}");
    }
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let _rng = torch_rng_lock();
    let d = tempfile::tempdir().unwrap();
    let err = train(&config(d.path(), "train.max_steps=6 train.save_every=1 train.lr=1e30 train.max_grad_norm=0"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("the loss became") && err.contains("Last good checkpoint"), "{err}");
    let ckpts = ftx::train::checkpoint::list(&d.path().join("out"));
    assert!(!ckpts.is_empty(), "the checkpoints before the failure are kept");
    let newest = &ckpts.last().unwrap().1;
    let state: ftx::train::checkpoint::RunState = serde_json::from_str(&std::fs::read_to_string(newest.join("state.json")).unwrap()).unwrap();
    assert!(state.step >= 1, "the newest checkpoint is readable: {state:?}");
}

#[test]
fn hft_trains_half_of_each_layer_per_round() {
    let _rng = torch_rng_lock();
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "method.kind=hft train.max_steps=1 method.hft_round_steps=1");
    train(&cfg).unwrap();
    let before = Tensor::read_safetensors(fixture("models/llama3/model.safetensors")).unwrap();
    let after = final_tensors(d.path(), "model.safetensors");
    let changed = |name: &str| {
        let a = &before.iter().find(|(n, _)| n == name).unwrap().1;
        let b = &after.iter().find(|(n, _)| n == name).unwrap().1;
        max_diff(a, b) > 0.0
    };
    for layer in 0..2 {
        // The seven projections of a Llama layer (ALL_LINEAR's first seven; Phi's packed two follow).
        let n = peft::ALL_LINEAR[..7].iter().filter(|p| {
            let kind = if ["gate_proj", "up_proj", "down_proj"].contains(p) { "mlp" } else { "self_attn" };
            changed(&format!("model.layers.{layer}.{kind}.{p}.weight"))
        });
        assert_eq!(n.count(), 4, "layer {layer}: four of seven projections train in round 0");
    }
    assert!(!changed("model.embed_tokens.weight"), "embeddings rest in round 0");
}

#[test]
fn qlora_and_dora_train_end_to_end_and_lower_the_loss() {
    let _rng = torch_rng_lock();
    for kind in ["qlora", "dora"] {
        let d = tempfile::tempdir().unwrap();
        let r = train(&config(d.path(), &format!("method.kind={kind} train.max_steps=8 train.lr=5e-3"))).unwrap();
        let (first, last) = (r.first_loss.unwrap(), r.last_loss.unwrap());
        assert!(last < first * 0.8, "{kind}: loss {first} → {last}");
        assert!(d.path().join("out/final/adapter_model.safetensors").exists());
        assert!(d.path().join("out/loss.svg").exists());
    }
}

#[test]
fn every_example_config_in_the_repo_parses() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        // Data-preparation configs (a [prep] section) are checked by their own parser.
        if std::fs::read_to_string(&p).unwrap().lines().any(|l| l.trim() == "[prep]") {
            ftx::data::prep::PrepConfig::load(&p).unwrap_or_else(|err| panic!("{}: {err}", p.display()));
            continue;
        }
        TrainConfig::load(&p, &[]).unwrap_or_else(|err| panic!("{}: {err}", p.display()));
        n += 1;
    }
    assert!(n >= 5, "one example config per recipe");
}

#[test]
fn an_answer_that_repeats_its_question_is_masked_at_the_answer() {
    for family in FAMILIES {
        let tok = fixture_tokenizer(family);
        let runs = chat_target_runs(&tok, vec![Message::new("user", "Say yes."), Message::new("assistant", "yes")]);
        assert_eq!(runs.len(), 1, "{family}: {runs:?}");
        assert!(runs[0].0.trim_start().starts_with("yes"), "{family}: {runs:?}");
        assert!(!runs[0].0.contains("Say"), "{family}: {runs:?}");
    }
}
