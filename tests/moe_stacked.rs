//! MoE experts' LoRA / DoRA factors stored stacked (`ftx::peft::stacked`: one leaf per layer
//! and projection, `[E, r, in]` / `[E, out, r]`), against the per-expert layout they replace
//! (each expert's factors their own leaves, stacked on every forward), whose one step equals
//! PEFT's (tests/moe.rs): the same initial values from the same seed, the same adapters after
//! several steps of AdamW with clipping, PEFT's per-expert files, and a resume — from a
//! checkpoint of either layout — equal to the uninterrupted run.

use crate::common::{fixture, max_diff, torch_rng_lock};
use crate::peft_parity::fixture_batch;
use ftx::model::decoder::LoadOptions;
use ftx::model::CausalLm;
use ftx::peft::{self, LoraSettings};
use ftx::train::optim::{clip_coef, AdamW, AdamWConfig};
use ftx::train::step::{forward_backward, Checkpointing, StepPos};
use std::path::Path;
use tch::{Device, Kind, Tensor};

const CPU32: LoadOptions = LoadOptions { device: Device::Cpu, kind: Kind::Float };

/// Experts of each fixture's MoE layers.
const EXPERTS: i64 = 4;

fn settings(dora: bool, dropout: f64) -> LoraSettings {
    LoraSettings { rank: 4, alpha: 8.0, dropout, target_modules: vec!["all-linear".into()], rslora: false, dora, quantize_nf4: false, quantize_fp8: false }
}

/// The fixture model of `family` with adapters attached after seeding libtorch's generator:
/// stored stacked (`peft::attach`) or per expert (`peft::attach_per_expert`), and the tensors an
/// optimizer trains. The caller holds the generator's lock.
fn attached(family: &str, s: &LoraSettings, stacked: bool) -> (CausalLm, Vec<(String, Tensor)>) {
    let mut model = CausalLm::load(&fixture(&format!("models/{family}")), CPU32).unwrap();
    tch::manual_seed(7);
    let named = if stacked { peft::attach(&mut model, s) } else { peft::attach_per_expert(&mut model, s) }.unwrap();
    (model, named)
}

/// `steps` steps on the fixture batch: AdamW with weight decay, gradients clipped to a norm
/// of 0.05 (below theirs: the clipping acts). Returns the clipping coefficients.
fn train(model: &CausalLm, opt: &mut AdamW, steps: usize, checkpointing: Checkpointing) -> Vec<f64> {
    let b = fixture_batch();
    (0..steps)
        .map(|step| {
            forward_backward(model, &b, b.n_targets as f64, StepPos { seed: 3, step, micro: 0 }, checkpointing);
            let coef = clip_coef(opt.grad_norm(), 0.05);
            opt.step(1e-2, coef);
            opt.zero_grad();
            coef
        })
        .collect()
}

fn adamw() -> AdamWConfig {
    AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 }
}

/// Largest difference between two sets of named tensors, which must have the same names.
fn largest_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    let sorted = |v: &[(String, Tensor)]| {
        let mut v: Vec<(String, Tensor)> = v.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let (a, b) = (sorted(a), sorted(b));
    assert_eq!(a.iter().map(|(n, _)| n).collect::<Vec<_>>(), b.iter().map(|(n, _)| n).collect::<Vec<_>>());
    a.iter().zip(&b).map(|((_, x), (_, y))| max_diff(x, y)).fold(0.0, f64::max)
}

fn logits(model: &CausalLm) -> Tensor {
    let _g = tch::no_grad_guard();
    model.forward(&Tensor::arange_start(5, 45, (Kind::Int64, Device::Cpu)).unsqueeze(0), None)
}

#[test]
fn stacked_expert_adapters_start_train_save_and_load_as_the_per_expert_ones() {
    let _rng = torch_rng_lock();
    // Mixtral: LoRA with dropout; Qwen3-MoE: DoRA under layer checkpointing.
    let cases = [("mixtral", "block_sparse_moe", "w1", settings(false, 0.1), Checkpointing::Off), ("qwen3_moe", "mlp", "gate_proj", settings(true, 0.0), Checkpointing::Layers)];
    for (family, moe, gate, s, checkpointing) in cases {
        let (stacked, stacked_named) = attached(family, &s, true);
        let (per_expert, per_expert_named) = attached(family, &s, false);
        let moe_layers = per_expert_named.iter().filter(|(n, _)| n.contains(&format!(".experts.0.{gate}.lora_A"))).count() as i64;
        assert!(moe_layers > 0, "{family}: the per-expert layout has expert adapters");

        // The trainer sees one leaf per layer and projection, under the experts' names with `*`.
        let a = stacked_named.iter().find(|(n, _)| *n == format!("base_model.model.model.layers.0.{moe}.experts.*.{gate}.lora_A.weight"));
        let (_, a) = a.unwrap_or_else(|| panic!("{family}: no stacked leaf for layer 0's {gate}"));
        let expert0 = per_expert_named.iter().find(|(n, _)| *n == format!("base_model.model.model.layers.0.{moe}.experts.0.{gate}.lora_A.weight")).unwrap();
        assert_eq!(a.size(), [vec![EXPERTS], expert0.1.size()].concat(), "{family}: A stacked [E, r, in]");
        assert!(a.is_leaf() && a.requires_grad());
        assert!(!stacked_named.iter().any(|(n, _)| n.contains(".experts.0.")), "{family}: no per-expert tensor is trained");
        let per_projection = if s.dora { 3 } else { 2 };
        assert_eq!(per_expert_named.len() as i64 - stacked_named.len() as i64, moe_layers * 3 * (EXPERTS - 1) * per_projection, "{family}: E tensors become one");
        let numel = |named: &[(String, Tensor)]| named.iter().map(|(_, t)| t.numel()).sum::<usize>();
        assert_eq!(numel(&stacked_named), numel(&per_expert_named), "{family}: the same trainable parameters");

        // The same draws in the same order: the same initial adapters, under PEFT's names.
        let (mut stacked, mut per_expert) = (stacked, per_expert);
        assert_eq!(largest_diff(&peft::adapter_tensors(&mut stacked), &peft::adapter_tensors(&mut per_expert)), 0.0, "{family}: initial adapters");

        // One backward: the gradient lands on the stacked leaves; the experts' adapters under
        // their PEFT names are slices of them, no leaves of their own.
        let b = fixture_batch();
        forward_backward(&stacked, &b, b.n_targets as f64, StepPos { seed: 3, step: 0, micro: 0 }, checkpointing);
        for (name, t) in stacked_named.iter().filter(|(n, _)| n.contains(".experts.*.")) {
            let g = t.grad();
            assert!(g.defined() && g.size() == t.size(), "{family}: {name} has its own gradient");
        }
        for (name, t) in peft::adapter_tensors(&mut stacked).iter().filter(|(n, _)| n.contains(".experts.1.")) {
            assert!(!t.is_leaf(), "{family}: {name} is a slice of its leaf");
        }
        for (_, t) in &stacked_named {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }

        // The grouped GEMMs take the leaves as they are; per-expert adapters are stacked per call.
        for projection in if family == "mixtral" { ["w1", "w3", "w2"] } else { ["gate_proj", "up_proj", "down_proj"] } {
            let runs_stacked = |model: &mut CausalLm| {
                let experts: Vec<(String, &mut ftx::model::linear::Linear)> =
                    model.linears_mut().into_iter().filter(|(n, _)| n.starts_with(&format!("model.layers.0.{moe}.experts.")) && n.ends_with(&format!(".{projection}"))).collect();
                assert_eq!(experts.len() as i64, EXPERTS);
                ftx::model::grouped_experts::adapters_run_stacked(&experts.iter().map(|(_, l)| &**l).collect::<Vec<_>>())
            };
            assert!(runs_stacked(&mut stacked), "{family}: {projection}'s experts run on the stacked leaves");
            assert!(!runs_stacked(&mut per_expert), "{family}: per-expert {projection} adapters are no stacked leaves");
        }

        // Several steps of AdamW with clipping: the same adapters either way.
        let mut opt_stacked = AdamW::new(stacked_named, adamw());
        let mut opt_per_expert = AdamW::new(per_expert_named, adamw());
        // (The backward above only accumulated zeroed gradients.)
        let clipped = train(&stacked, &mut opt_stacked, 4, checkpointing);
        train(&per_expert, &mut opt_per_expert, 4, checkpointing);
        assert!(clipped.iter().all(|&c| c < 1.0), "{family}: clipping acts at every step: {clipped:?}");
        let (after_stacked, after_per_expert) = (peft::adapter_tensors(&mut stacked), peft::adapter_tensors(&mut per_expert));
        let moved = largest_diff(&after_stacked, &peft::adapter_tensors(&mut attached(family, &s, false).0));
        assert!(moved > 1e-3, "{family}: training moved the adapters ({moved})");
        let d = largest_diff(&after_stacked, &after_per_expert);
        assert!(d < 1e-6, "{family}: after 4 steps the stacked adapters differ from the per-expert ones by {d}");

        // Saved: PEFT's per-expert keys and values, as the per-expert layout saves them.
        let dir = tempfile::tempdir().unwrap();
        let (dir_stacked, dir_per_expert) = (dir.path().join("stacked"), dir.path().join("per_expert"));
        peft::save_adapter(&mut stacked, &s, "base", &dir_stacked).unwrap();
        peft::save_adapter(&mut per_expert, &s, "base", &dir_per_expert).unwrap();
        let read = |d: &Path| ftx::model::weights::read_safetensors(&d.join("adapter_model.safetensors")).unwrap();
        let (saved, want) = (read(&dir_stacked), read(&dir_per_expert));
        let mut names: Vec<&String> = saved.iter().map(|(n, _)| n).collect();
        let mut want_names: Vec<&String> = want.iter().map(|(n, _)| n).collect();
        names.sort();
        want_names.sort();
        assert_eq!(names, want_names, "{family}: PEFT's keys");
        assert!(names.iter().any(|n| n.ends_with(&format!("layers.0.{moe}.experts.3.{gate}.lora_B.weight"))), "{family}: per-expert keys");
        for (n, t) in &saved {
            let (_, w) = want.iter().find(|(m, _)| m == n).unwrap();
            assert!(max_diff(t, w) < 1e-6, "{family}: saved {n}");
        }
        let config = |d: &Path| std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
        assert_eq!(config(&dir_stacked), config(&dir_per_expert), "{family}: adapter_config.json");

        // Loaded (per expert, as serve and merge load it; or stacked again, as a run that
        // continues it trains): the trained model's logits.
        let want_logits = logits(&stacked);
        let mut loaded = CausalLm::load(&fixture(&format!("models/{family}")), CPU32).unwrap();
        peft::load_adapter(&mut loaded, &dir_stacked).unwrap();
        assert!(max_diff(&logits(&loaded), &want_logits) < 1e-5, "{family}: save → load → the same logits");
        assert_eq!(peft::stacked::stack_expert_adapters(&mut loaded) as i64, moe_layers * 3, "{family}: every expert projection stacks");
        assert!(max_diff(&logits(&loaded), &want_logits) < 1e-5, "{family}: loaded, then stacked → the same logits");
        assert_eq!(largest_diff(&peft::adapter_tensors(&mut loaded), &after_stacked), 0.0, "{family}: stacking copies the values");
    }
}

/// Trains `family`'s fixture with LoRA on every projection (dropout, weight decay, clipping)
/// for `steps` steps in `dir/out`, through `ftx::recipes::train`.
fn train_run(family: &str, dir: &Path, steps: usize) -> ftx::recipes::TrainReport {
    let data = crate::engine::write_chat_data(dir, 24);
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\ndropout = 0.1\n\
         [train]\nlr = 5e-3\nschedule = \"constant\"\nweight_decay = 0.1\nmax_grad_norm = 0.1\nmax_steps = {steps}\noutput_dir = \"{}\"\n",
        fixture(&format!("models/{family}")).display(),
        data.display(),
        dir.join("out").display()
    );
    ftx::recipes::train(&ftx::train::TrainConfig::parse(&text, &[]).unwrap()).unwrap()
}

/// The optimizer state of a stacked run's newest checkpoint rewritten as a run with per-expert
/// leaves wrote it: each `….experts.*.…` tensor split into `….experts.<e>.…` ones.
fn rewrite_as_per_expert(out: &Path) -> usize {
    let (_, ckpt) = ftx::train::checkpoint::list(out).pop().unwrap();
    let file = ckpt.join("optimizer.safetensors");
    let mut split = 0;
    let mut tensors = Vec::new();
    for (name, t) in ftx::model::weights::read_safetensors(&file).unwrap() {
        match name.split_once(".experts.*.") {
            Some((head, tail)) => {
                split += 1;
                tensors.extend((0..t.size()[0]).map(|e| (format!("{head}.experts.{e}.{tail}"), t.get(e).copy())));
            }
            None => tensors.push((name, t)),
        }
    }
    ftx::model::weights::write_safetensors(&file, &tensors).unwrap();
    split
}

#[test]
fn a_resumed_moe_lora_run_ends_as_the_uninterrupted_one_from_either_checkpoint_layout() {
    let _rng = torch_rng_lock();
    let family = "mixtral";
    let whole = tempfile::tempdir().unwrap();
    let uninterrupted = train_run(family, whole.path(), 4);
    let adapter = |r: &ftx::recipes::TrainReport| ftx::model::weights::read_safetensors(&r.final_dir.join("adapter_model.safetensors")).unwrap();
    let want = adapter(&uninterrupted);
    assert!(want.iter().any(|(n, _)| n.contains(".experts.3.w2.lora_B.weight")), "the final adapter keeps PEFT's per-expert keys");
    let state = ftx::model::weights::read_safetensors(&ftx::train::checkpoint::list(&whole.path().join("out")).pop().unwrap().1.join("optimizer.safetensors")).unwrap();
    assert!(state.iter().any(|(n, _)| n == "base_model.model.model.layers.0.block_sparse_moe.experts.*.w2.lora_B.weight.exp_avg"), "optimizer state by stacked leaf");

    for old_layout in [false, true] {
        let d = tempfile::tempdir().unwrap();
        train_run(family, d.path(), 2);
        if old_layout {
            // 2 MoE layers × 3 projections × A and B × exp_avg, exp_avg_sq, master.
            assert_eq!(rewrite_as_per_expert(&d.path().join("out")), 2 * 3 * 2 * 3);
        }
        let resumed = train_run(family, d.path(), 4);
        assert_eq!(resumed.resumed_from, Some(2));
        let got = adapter(&resumed);
        let diff = largest_diff(&got, &want);
        assert!(diff < 1e-6, "resumed from a {} checkpoint: adapters off by {diff}", if old_layout { "per-expert" } else { "stacked" });
    }
}

#[test]
fn stacked_expert_adapters_one_step_matches_peft() {
    let _rng = torch_rng_lock();
    for family in ["mixtral", "qwen3_moe"] {
        let meta = crate::common::json(&format!("peft/lora_{family}.json"));
        let targets = meta["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
        let s = LoraSettings { rank: meta["r"].as_i64().unwrap(), alpha: meta["alpha"].as_f64().unwrap(), dropout: 0.0, target_modules: targets, rslora: false, dora: false, quantize_nf4: false, quantize_fp8: false };
        let mut model = CausalLm::load(&fixture(&format!("models/{family}")), CPU32).unwrap();
        peft::attach_unfilled(&mut model, &s).unwrap();
        // The fixture's dense Qwen3-MoE layer carries no adapter (as in tests/moe.rs).
        for (name, lin) in model.linears_mut() {
            if family == "qwen3_moe" && name.starts_with("model.layers.1.mlp.") {
                lin.adapter = None;
            }
        }
        peft::load_adapter_tensors(&mut model, &crate::common::all_tensors(&format!("peft/lora_{family}_init.safetensors"))).unwrap();
        assert!(peft::stacked::stack_expert_adapters(&mut model) > 0, "{family}: the experts' adapters stack");
        let mut opt = AdamW::new(peft::trainable_tensors(&mut model), crate::peft_parity::adamw(&meta));
        let b = fixture_batch();
        let loss0 = forward_backward(&model, &b, b.n_targets as f64, StepPos { seed: 0, step: 0, micro: 0 }, Checkpointing::Off) / b.n_targets as f64;
        assert!((loss0 - meta["loss0"].as_f64().unwrap()).abs() < 1e-4, "{family}: loss0 {loss0} vs {}", meta["loss0"]);
        // Each stacked leaf's gradient, slice by slice, is PEFT's gradient of that expert's tensor.
        let grads = crate::common::all_tensors(&format!("peft/lora_{family}_grad.safetensors"));
        let peft_grad = |name: &str| grads.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{family}: no PEFT gradient for {name}")).1.shallow_clone();
        let mut stacked_leaves = 0;
        for p in &opt.params {
            let g = p.tensor.grad();
            match p.name.split_once(".experts.*.") {
                Some((head, tail)) => {
                    stacked_leaves += 1;
                    for e in 0..EXPERTS {
                        let d = max_diff(&g.get(e), &peft_grad(&format!("{head}.experts.{e}.{tail}")));
                        assert!(d < 1e-4, "{family}: gradient of expert {e} of {} differs by {d}", p.name);
                    }
                }
                None => assert!(max_diff(&g, &peft_grad(&p.name)) < 1e-4, "{family}: gradient of {}", p.name),
            }
        }
        assert!(stacked_leaves > 0);
        opt.step(meta["lr"].as_f64().unwrap(), 1.0);
        let after = crate::common::all_tensors(&format!("peft/lora_{family}_step1.safetensors"));
        for (name, t) in peft::adapter_tensors(&mut model) {
            let (_, w) = after.iter().find(|(n, _)| *n == name).unwrap();
            let d = max_diff(&t, w);
            assert!(d < 1e-4, "{family}: {name} after one step differs from PEFT's by {d}");
        }
    }
}
