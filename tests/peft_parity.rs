//! One optimizer step of LoRA, rsLoRA, DoRA and full fine-tuning from the same weights and
//! batch as HF PEFT + torch AdamW: loss, gradients and updated weights agree within 1e-4.
//! And NF4 quantisation agrees with bitsandbytes.

use crate::common::{all_tensors, fixture, json, max_diff, raw_tensor, tensor, torch_rng_lock};
use ftx::data::batch;
use ftx::data::TokenizedExample;
use ftx::model::decoder::LoadOptions;
use ftx::model::nf4::Nf4Weight;
use ftx::model::CausalLm;
use ftx::peft::{self, LoraSettings};
use ftx::train::optim::{AdamW, AdamWConfig};
use ftx::train::step::{forward_backward, Checkpointing, StepPos};
use tch::{Device, Kind, Tensor};

pub fn fixture_batch() -> ftx::data::Batch {
    let b = json("peft/batch.json");
    let rows = |k: &str| -> Vec<Vec<i64>> {
        b[k].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()).collect()
    };
    let exs: Vec<TokenizedExample> =
        rows("input_ids").into_iter().zip(rows("labels")).map(|(ids, labels)| TokenizedExample { ids, labels }).collect();
    batch::pad(&exs.iter().collect::<Vec<_>>(), 0)
}

pub fn loss_of(model: &CausalLm, b: &ftx::data::Batch) -> f64 {
    let (sum, n) = ftx::train::step::eval_loss(model, std::iter::once(ftx::data::Batch {
        input_ids: b.input_ids.shallow_clone(),
        targets: b.targets.shallow_clone(),
        positions: b.positions.shallow_clone(),
        segments: None,
        n_targets: b.n_targets,
        n_tokens: b.n_tokens,
    }));
    sum / n as f64
}

pub(crate) fn adamw(meta: &serde_json::Value) -> AdamWConfig {
    AdamWConfig {
        beta1: meta["betas"][0].as_f64().unwrap(),
        beta2: meta["betas"][1].as_f64().unwrap(),
        eps: meta["eps"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
    }
}

/// One step from the fixture adapter `{variant}_{family}` (its r, alpha, rsLoRA and DoRA, on
/// `targets`) with ftx's loss and AdamW, against PEFT's: the adapter tensors' names, the step's
/// loss (`loss0`: for MoE with the router's balance term), every gradient, every updated tensor,
/// and the cross-entropy after the step (`loss1`, or `ce1` where `loss0` has a balance term).
/// `unadapted(name)`: projections PEFT put no adapter on although the targets name them.
pub(crate) fn check_adapter_step(variant: &str, family: &str, targets: Vec<String>, checkpointing: Checkpointing, unadapted: impl Fn(&str) -> bool) {
    let _rng = torch_rng_lock();
    let meta = json(&format!("peft/{variant}_{family}.json"));
    let mut model = CausalLm::load(&fixture(&format!("models/{family}")), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let s = LoraSettings {
        rank: meta["r"].as_i64().unwrap(),
        alpha: meta["alpha"].as_f64().unwrap(),
        dropout: 0.0,
        target_modules: targets,
        rslora: meta["use_rslora"].as_bool().unwrap(),
        dora: meta["use_dora"].as_bool().unwrap(),
        quantize_nf4: false,
        quantize_fp8: false,
    };
    assert!((s.scaling() - meta["scaling"].as_f64().unwrap()).abs() < 1e-12);
    peft::attach_unfilled(&mut model, &s).unwrap();
    for (name, lin) in model.linears_mut() {
        if unadapted(&name) {
            lin.adapter = None;
        }
    }
    let init = all_tensors(&format!("peft/{variant}_{family}_init.safetensors"));
    let named = peft::adapter_tensors(&mut model);
    let mut names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    let mut want: Vec<&str> = init.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    want.sort();
    assert_eq!(names, want, "{variant}/{family}: PEFT's adapter tensor names");
    peft::load_adapter_tensors(&mut model, &init).unwrap();

    let b = fixture_batch();
    let mut opt = AdamW::new(named, adamw(&meta));
    let loss0 = forward_backward(&model, &b, b.n_targets as f64, StepPos { seed: 0, step: 0, micro: 0 }, checkpointing) / b.n_targets as f64;
    assert!((loss0 - meta["loss0"].as_f64().unwrap()).abs() < 1e-4, "{variant}/{family}: loss0 {loss0} vs {}", meta["loss0"]);
    let grads = all_tensors(&format!("peft/{variant}_{family}_grad.safetensors"));
    for p in &opt.params {
        let (_, g) = grads.iter().find(|(n, _)| *n == p.name).unwrap_or_else(|| panic!("no grad for {}", p.name));
        let d = max_diff(&p.tensor.grad(), g);
        assert!(d < 1e-4, "{variant}/{family}: grad of {} differs by {d}", p.name);
    }
    opt.step(meta["lr"].as_f64().unwrap(), 1.0);
    opt.zero_grad();
    let after = all_tensors(&format!("peft/{variant}_{family}_step1.safetensors"));
    for p in &opt.params {
        let (_, w) = after.iter().find(|(n, _)| *n == p.name).unwrap();
        let d = max_diff(&p.tensor, w);
        assert!(d < 1e-4, "{variant}/{family}: {} after one step differs by {d}", p.name);
    }
    let key = if meta.get("ce1").is_some() { "ce1" } else { "loss1" };
    let ce1 = loss_of(&model, &b);
    assert!((ce1 - meta[key].as_f64().unwrap()).abs() < 1e-4, "{variant}/{family}: cross-entropy after the step {ce1} vs {key} {}", meta[key]);
}

fn check_variant(variant: &str, family: &str) {
    check_adapter_step(variant, family, vec!["all-linear".into()], Checkpointing::Off, |_| false);
}

#[test]
fn lora_one_step_matches_peft() {
    check_variant("lora", "llama3");
    check_variant("lora", "qwen3");
    check_variant("lora", "gemma2");
    check_variant("lora", "gemma3");
    check_variant("lora", "phi3");
    check_variant("lora", "phi4mini");
}

#[test]
fn rslora_one_step_matches_peft() {
    check_variant("rslora", "llama3");
    check_variant("rslora", "qwen3");
    check_variant("rslora", "gemma2");
    check_variant("rslora", "gemma3");
    check_variant("rslora", "phi3");
    check_variant("rslora", "phi4mini");
}

#[test]
fn dora_one_step_matches_peft() {
    check_variant("dora", "llama3");
    check_variant("dora", "qwen3");
    check_variant("dora", "gemma2");
    check_variant("dora", "gemma3");
    check_variant("dora", "phi3");
    check_variant("dora", "phi4mini");
}

#[test]
fn full_fine_tuning_one_step_matches_torch() {
    // The step seeds the global generator per layer (dropout masks).
    let _rng = torch_rng_lock();
    for family in ["llama3", "gemma2", "gemma3", "phi3", "phi4mini"] {
        check_full(family);
    }
}

fn check_full(family: &str) {
    let meta = json(&format!("peft/full_{family}.json"));
    let model = CausalLm::load(&fixture(&format!("models/{family}")), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let named: Vec<(String, Tensor)> =
        model.named_tensors().into_iter().map(|(n, t)| (n, t.set_requires_grad(true))).collect();
    let b = fixture_batch();
    let loss0 = loss_of(&model, &b);
    assert!((loss0 - meta["loss0"].as_f64().unwrap()).abs() < 1e-4, "{family}: loss0 {loss0} vs {}", meta["loss0"]);
    let mut opt = AdamW::new(named, adamw(&meta));
    forward_backward(&model, &b, b.n_targets as f64, StepPos { seed: 0, step: 0, micro: 0 }, Checkpointing::Off);
    opt.step(meta["lr"].as_f64().unwrap(), 1.0);
    for (name, want) in all_tensors(&format!("peft/full_{family}_step1.safetensors")) {
        let p = opt.params.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("{family}: no parameter {name}"));
        let d = max_diff(&p.tensor, &want);
        assert!(d < 1e-4, "{family}: {name} differs by {d}");
    }
    let loss1 = loss_of(&model, &b);
    assert!((loss1 - meta["loss1"].as_f64().unwrap()).abs() < 1e-4, "{family}: loss1 {loss1} vs {}", meta["loss1"]);
}

#[test]
fn nf4_matches_bitsandbytes_bit_for_bit() {
    for (case, kind) in [("nf4", Kind::Float), ("nf4_ragged", Kind::Float), ("nf4_bf16", Kind::BFloat16)] {
        let f = format!("nf4/{case}.safetensors");
        let input = raw_tensor(&f, "input");
        let q = Nf4Weight::quantize(&input, kind);
        let packed = raw_tensor(&f, "quant").flatten(0, -1);
        assert_eq!(q.packed.size(), packed.size(), "{case}");
        let mismatched = q.packed.ne_tensor(&packed).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(mismatched, 0, "{case}: packed NF4 codes differ");
        let codes = raw_tensor(&f, "absmax");
        assert_eq!(q.absmax_codes.ne_tensor(&codes).sum(Kind::Int64).int64_value(&[]), 0, "{case}: absmax codes differ");
        assert!(max_diff(&q.absmax_scales, &tensor(&f, "state2_absmax")) < 1e-7, "{case}: state2 absmax");
        assert!((q.offset - tensor(&f, "offset").double_value(&[0])).abs() < 1e-6, "{case}: offset");
        assert!(max_diff(&q.absmax(), &tensor(&f, "absmax_dequant")) < 1e-6, "{case}: recovered absmax");
        let d = max_diff(&q.dequantize(), &tensor(&f, "dequant"));
        assert!(d < if kind == Kind::Float { 1e-6 } else { 1e-2 }, "{case}: dequantised values differ by {d}");
        assert_eq!(q.dequantize().kind(), kind);
    }
    let map = ftx_kernels::nf4::dynamic_map_signed();
    let want = tensor("nf4/nf4.safetensors", "state2_code");
    assert!(max_diff(&Tensor::from_slice(&map), &want) == 0.0, "dynamic map differs from bitsandbytes'");
    let code = tensor("nf4/nf4.safetensors", "code");
    assert!(max_diff(&Tensor::from_slice(&ftx_kernels::nf4::NF4_CODE), &code) == 0.0);
}
