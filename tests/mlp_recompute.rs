//! Selective MLP recompute (`train.recompute = "mlp"`: the LoRA MLP node keeps only its input
//! and `x·Aᵀ` products and runs gate/up again in backward), and the saved-tensor count the
//! planner is held to (`train::saved_tensors`): the same loss and gradients as keeping gate/up's
//! output (SwiGLU and GeGLU, dense and NF4 bases, padded and packed batches), exactly the
//! gate/up output fewer bytes kept per layer, the planner's per-token rule equal to what the
//! engine saves, the same loss curve through `ftx train`, and clear refusals where the node
//! does not run.

use crate::common::lora::{attach_with_random_b, lora_r4};
use crate::common::{fixture, max_diff, metric_series, torch_rng_lock};
use crate::engine::write_chat_data;
use crate::fused::batch as padded_batch;
use ftx::data::{batch, Batch, TokenizedExample};
use ftx::model::decoder::LoadOptions;
use ftx::model::CausalLm;
use ftx::plan::{plan, saved_per_token_and_layer, Method, ModelShape, PlanRequest};
use ftx::train::saved_tensors::{bytes_of, saved_by_layer, SavedTensor};
use ftx::train::step::{forward_backward, Checkpointing, StepPos};
use ftx::train::TrainConfig;
use tch::{Device, Kind, Tensor};

/// Three sequences (9, 6 and 11 tokens) packed into rows of 16, whose attention must not cross.
fn packed_batch() -> Batch {
    let exs: Vec<TokenizedExample> = [9usize, 6, 11]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let ids: Vec<i64> = (0..n).map(|i| ((i * 41 + k * 97) % 440) as i64).collect();
            TokenizedExample { labels: ids.clone(), ids }
        })
        .collect();
    batch::pack(&exs.iter().collect::<Vec<_>>(), 16, 0)
}

/// `rows` random sequences of `t` tokens, unpadded.
fn random_batch(rows: usize, t: i64) -> Batch {
    let ids = Tensor::randint(440, [rows as i64, t], (Kind::Int64, Device::Cpu));
    let exs: Vec<TokenizedExample> = (0..rows as i64)
        .map(|r| {
            let v = Vec::<i64>::try_from(ids.get(r)).unwrap();
            TokenizedExample { labels: v.clone(), ids: v }
        })
        .collect();
    batch::pad(&exs.iter().collect::<Vec<_>>(), 0)
}

fn load(family: &str, method: &str, kind: Kind) -> (CausalLm, Vec<(String, Tensor)>) {
    let mut model = CausalLm::load(&fixture(&format!("models/{family}")), LoadOptions { device: Device::Cpu, kind }).unwrap();
    let named = attach_with_random_b(&mut model, &lora_r4(method), 5);
    (model, named)
}

fn loss_and_grads(model: &CausalLm, named: &[(String, Tensor)], b: &Batch, checkpointing: Checkpointing) -> (f64, Vec<Tensor>) {
    for (_, t) in named {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let loss = forward_backward(model, b, b.n_targets as f64, StepPos { seed: 3, step: 1, micro: 0 }, checkpointing);
    (loss, named.iter().map(|(_, t)| t.grad().copy()).collect())
}

#[test]
fn mlp_recompute_gives_the_loss_and_every_lora_gradient_of_keeping_gate_up() {
    let _rng = torch_rng_lock();
    // SwiGLU (llama3), GeGLU (gemma2), dense and NF4 bases; padded and packed batches; and
    // inside the recomputed layers of gradient checkpointing.
    for family in ["llama3", "gemma2"] {
        for method in ["lora", "qlora"] {
            let (mut model, named) = load(family, method, Kind::Float);
            for (batch_name, b, ckpt) in [
                ("padded", padded_batch(), Checkpointing::Off),
                ("packed", packed_batch(), Checkpointing::Off),
                ("packed, checkpointed", packed_batch(), Checkpointing::Layers),
            ] {
                let what = format!("{family}/{method}/{batch_name}");
                ftx::train::recompute::apply(&mut model, ftx::train::recompute::Recompute::Mlp, method, 0.0).unwrap();
                assert!(ftx::train::recompute::runs(&model), "{what}: the MLP node runs with recompute");
                let (l_on, g_on) = loss_and_grads(&model, &named, &b, ckpt);
                model.set_mlp_recompute(false);
                assert!(!ftx::train::recompute::runs(&model));
                let (l_off, g_off) = loss_and_grads(&model, &named, &b, ckpt);
                assert!((l_on - l_off).abs() <= 1e-6 * l_off.abs(), "{what}: loss {l_on} with recompute, {l_off} without");
                let mut compared = 0;
                for (((n, _), on), off) in named.iter().zip(&g_on).zip(&g_off) {
                    let scale = off.abs().max().double_value(&[]);
                    assert!(scale > 0.0, "{what}: {n} has a gradient worth comparing");
                    let d = max_diff(on, off);
                    assert!(d <= 1e-6 * scale.max(1e-3), "{what}: gradient of {n} differs by {d} (max {scale})");
                    compared += n.contains(".mlp.") as usize;
                }
                assert!(compared >= 2 * 6, "{what}: every MLP adapter of both layers compared ({compared})");
            }
        }
    }
}

/// Bytes each layer saves for the forward pass over `b`, with and without recompute.
fn saved(model: &mut CausalLm, named: &[(String, Tensor)], b: &Batch, recompute: bool) -> Vec<SavedTensor> {
    model.set_mlp_recompute(recompute);
    let trainable: Vec<Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
    let out = saved_by_layer(model, b, &trainable).unwrap();
    model.set_mlp_recompute(false);
    out
}

fn describe(s: &[SavedTensor], tag: i64) -> String {
    s.iter().filter(|t| t.tag == tag).map(|t| format!("{:?} {:?} {} B", t.shape, t.kind, t.bytes)).collect::<Vec<_>>().join("; ")
}

#[test]
fn mlp_recompute_keeps_exactly_the_gate_up_output_fewer_bytes_per_layer() {
    let _rng = torch_rng_lock();
    for (family, method, kind) in [("llama3", "lora", Kind::BFloat16), ("gemma2", "lora", Kind::Float), ("llama3", "qlora", Kind::Float)] {
        let (mut model, named) = load(family, method, kind);
        let b = random_batch(2, 24);
        let tokens = 2 * 24;
        let i = model.config.intermediate;
        let gate_up = (2 * i * tokens) as u64 * kind.elt_size_in_bytes() as u64;
        let (off, on) = (saved(&mut model, &named, &b, false), saved(&mut model, &named, &b, true));
        for l in 0..model.layers.len() as i64 {
            let what = format!("{family}/{method}/{kind:?} layer {l}");
            let (b_off, b_on) = (bytes_of(&off, l), bytes_of(&on, l));
            assert_eq!(b_off - b_on, gate_up, "{what}: kept without recompute: {}\nwith: {}", describe(&off, l), describe(&on, l));
            // The difference is the node's gate/up output itself.
            let is_gu = |t: &&SavedTensor| t.tag == l && t.shape == [tokens, 2 * i];
            assert_eq!(off.iter().filter(is_gu).count(), 1, "{what}: gate/up output kept without recompute: {}", describe(&off, l));
            assert_eq!(on.iter().filter(is_gu).count(), 0, "{what}: no gate/up output kept with recompute: {}", describe(&on, l));
        }
    }
}

#[test]
fn the_planner_counts_per_token_what_the_engine_saves_with_and_without_recompute() {
    // Per token and layer, from two batch lengths (what does not grow with tokens — the
    // stacked adapter factors each layer's nodes save — cancels). In fp32: the planner counts
    // bf16 activations (2 bytes) and fp32 statistics (each RMSNorm's 1/rms, SDPA's
    // logsumexp per head: 4 bytes), so the fp32 engine keeps 2 × planned − 4 × (2 + heads).
    // (In bf16 on the CPU libtorch's composite rms_norm keeps an fp32 copy of its input where
    // the GPU's fused norm keeps the bf16 input: a CPU-only difference, hence fp32 here.)
    let _rng = torch_rng_lock();
    let (mut model, named) = load("llama3", "lora", Kind::Float);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("models/llama3/config.json")).unwrap()).unwrap();
    let mut req = PlanRequest::new(ModelShape::from_hf_config(&cfg).unwrap(), Method::Lora);
    req.lora_rank = 4;
    let (h, heads) = (model.config.hidden as u64, model.config.heads as u64);
    let (short, long) = (random_batch(2, 16), random_batch(2, 40));
    let extra_tokens = 2 * (40 - 16) as u64;
    for recompute in [false, true] {
        req.recompute_mlp = recompute;
        let planned_fp32 = 2 * saved_per_token_and_layer(&req) - 4 * (2 + heads);
        let (s, l) = (saved(&mut model, &named, &short, recompute), saved(&mut model, &named, &long, recompute));
        for layer in 0..model.layers.len() as i64 {
            let grown = bytes_of(&l, layer) - bytes_of(&s, layer);
            assert_eq!(grown % extra_tokens, 0, "layer {layer}: a whole number of bytes a token ({})", describe(&l, layer));
            let engine = grown / extra_tokens;
            // Layer 0's input is the embedding output, which needs no gradient: its norm keeps
            // neither it nor its 1/rms.
            let want = if layer == 0 { planned_fp32 - 4 * (h + 1) } else { planned_fp32 };
            assert_eq!(engine, want, "recompute {recompute}, layer {layer}: the engine keeps {engine} bytes a token, the planner counts {want}\n{}", describe(&l, layer));
        }
    }
}

#[test]
fn the_8b_batch_2_plan_drops_the_gate_up_outputs_with_recompute() {
    let mut req = PlanRequest::new(ModelShape::named("llama-3.1-8b").unwrap(), Method::Lora);
    req.batch = 2;
    let without = plan(&req);
    req.recompute_mlp = true;
    let with = plan(&req);
    // 32 layers × 4,096 tokens × 2 × 14,336 bf16 values.
    assert_eq!(without.activations - with.activations, 32 * 4096 * 2 * 14_336 * 2);
    let text = with.to_string();
    assert!(text.contains("recompute mlp") && text.contains("selective MLP recompute"), "{text}");
    assert!(without.to_string().contains("with --recompute mlp"), "{without}");
    // Where the node does not run the plan is unchanged.
    req.method = Method::Dora;
    let dora_on = plan(&req).activations;
    req.recompute_mlp = false;
    assert_eq!(plan(&req).activations, dora_on);
}

/// A 4-step LoRA run of the tiny Llama on 16 chat examples in `dir`, with `extra` overrides.
pub(crate) fn train_config(dir: &std::path::Path, extra: &str) -> TrainConfig {
    let data = write_chat_data(dir, 16);
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n[train]\nlr = 1e-3\nschedule = \"constant\"\nmax_steps = 4\nbatch_size = 2\noutput_dir = \"{}\"\n",
        fixture("models/llama3").display(),
        data.display(),
        dir.join("out").display()
    );
    let overrides: Vec<String> = extra.split_whitespace().map(str::to_owned).collect();
    TrainConfig::parse(&text, &overrides).unwrap()
}

#[test]
fn ftx_train_with_recompute_mlp_gives_the_same_loss_curve() {
    let _rng = torch_rng_lock();
    let run = |recompute: bool| {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("ftx.toml");
        std::fs::write(&cfg_path, train_config(dir.path(), "").to_toml()).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ftx"));
        cmd.args(["train", "--config"]).arg(&cfg_path);
        if recompute {
            cmd.args(["--recompute", "mlp"]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "ftx train (recompute {recompute}) failed: {}", String::from_utf8_lossy(&out.stderr));
        let written = std::fs::read_to_string(dir.path().join("out/config.toml")).unwrap();
        assert_eq!(written.contains("recompute = \"mlp\""), recompute, "the resolved config records the option:\n{written}");
        metric_series(&dir.path().join("out"), "loss")
    };
    let (on, off) = (run(true), run(false));
    assert_eq!(on.len(), 4);
    assert_eq!(on.len(), off.len());
    for ((step, a), (_, b)) in on.iter().zip(&off) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "step {step}: loss {a} with recompute, {b} without");
    }
}

#[test]
fn recompute_mlp_is_refused_where_the_lora_mlp_node_does_not_run() {
    let _rng = torch_rng_lock();
    for (extra, says) in [
        ("method.dropout=0.1", "method.dropout = 0.1"),
        ("method.kind=\"dora\"", "DoRA"),
        ("method.kind=\"full\"", "grad_checkpointing = true"),
        ("method.target_modules=[\"q_proj\",\"v_proj\"]", "target_modules"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = train_config(dir.path(), &format!("train.recompute=\"mlp\" {extra}"));
        let err = ftx::recipes::train(&cfg).err().unwrap_or_else(|| panic!("{extra}: trained with recompute = mlp"));
        let msg = format!("{err:#}");
        assert!(msg.contains("train.recompute = \"mlp\"") && msg.contains(says), "{extra}: {msg}");
    }
}

fn ftx_out(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ftx")).args(args).env_remove("FTX_BLOCK_NODE").output().unwrap()
}

#[test]
fn bench_train_and_plan_take_recompute_mlp() {
    // ftx bench train: the option runs (reported) and the losses are those without it.
    let bench = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["bench", "train", "--shape", "tiny", "--seq", "32", "--batch", "2", "--steps", "3", "--warmup", "1", "--device", "cpu"];
        args.extend_from_slice(extra);
        let o = ftx_out(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap()
    };
    let (on, off) = (bench(&["--recompute", "mlp", "--saved-tensors"]), bench(&["--saved-tensors"]));
    assert_eq!(on["recompute"], "mlp", "{on}");
    assert_eq!(off["recompute"], "none", "{off}");
    // --saved-tensors: each of the 4 layers keeps the gate/up output (64 tokens × 2 × 1,024,
    // fp32 on the CPU) fewer bytes; the planner (bf16) drops half as many.
    let layers = |r: &serde_json::Value| -> Vec<u64> { r["saved_bytes_per_layer"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect() };
    let (l_on, l_off) = (layers(&on), layers(&off));
    assert_eq!(l_on.len(), 4, "{on}");
    for (a, b) in l_on.iter().zip(&l_off) {
        assert_eq!(b - a, 64 * 2 * 1024 * 4, "{on}\n{off}");
    }
    let planned = |r: &serde_json::Value| r["planned_bytes_per_layer"].as_u64().unwrap();
    assert_eq!(planned(&off) - planned(&on), 64 * 2 * 1024 * 2);
    for key in ["first_loss", "last_loss"] {
        let (a, b) = (on[key].as_f64().unwrap(), off[key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{key}: {a} with recompute, {b} without");
    }
    // ftx bench train refuses it where the node does not run.
    let o = ftx_out(&["bench", "train", "--shape", "tiny", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--device", "cpu", "--method", "full", "--recompute", "mlp"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("train.recompute = \"mlp\""), "{}", String::from_utf8_lossy(&o.stderr));
    // ftx plan: the row and its cost; refused for DoRA.
    let o = ftx_out(&["plan", "--model", "llama-3.1-8b", "--batch", "2", "--recompute", "mlp"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("recompute mlp") && text.contains("one more gate/up GEMM per layer"), "{text}");
    let o = ftx_out(&["plan", "--model", "llama-3.1-8b", "--method", "dora", "--recompute", "mlp"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--recompute mlp"), "{}", String::from_utf8_lossy(&o.stderr));
}
