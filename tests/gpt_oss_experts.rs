//! gpt-oss's fused experts: LoRA on the 3-D `mlp.experts.gate_up_proj` / `down_proj` as PEFT's
//! `target_parameters` (`ParamWrapper`) does it — one step equal to PEFT + torch AdamW, trained
//! through the real recipe, saved under PEFT's keys and shapes, merged by both export paths,
//! refused where it cannot work — checkpoints whose experts are MXFP4 (the published layout),
//! read as transformers dequantises them, and QLoRA's NF4 experts.

use crate::common::{all_tensors, assert_same_layout, fixture, json, max_diff, tensor, torch_rng_lock};
use crate::engine::write_chat_data;
use crate::gpt_oss::check_lora_step;
use crate::peft_parity::fixture_batch;
use ftx::model::decoder::LoadOptions;
use ftx::model::weights::WeightFiles;
use ftx::model::{CausalLm, ModelConfig};
use ftx::model::nf4::Nf4Weight;
use ftx::peft::LoraSettings;
use ftx::train::step::{forward_backward, Checkpointing, StepPos};
use serde_json::json;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const CPU32: LoadOptions = LoadOptions { device: Device::Cpu, kind: Kind::Float };

#[test]
fn gpt_oss_lora_on_fused_experts_one_step_matches_peft() {
    // q_proj, the router and both expert tensors (lora_A [r·E, in], lora_B [out, r·E]).
    check_lora_step("lora_gpt_oss_experts", Checkpointing::Off);
    check_lora_step("lora_gpt_oss_experts", Checkpointing::Layers);
}

/// Trains `steps` steps of `kind` (lora, qlora) on the gpt-oss fixture with `targets` (TOML list
/// items) through the recipe, into `dir/out`.
fn train(dir: &Path, kind: &str, targets: &str, steps: u32) -> ftx::recipes::TrainReport {
    let data = write_chat_data(dir, 48);
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 256\n[method]\nkind = \"{kind}\"\nrank = 4\nalpha = 8\n\
         target_modules = [{targets}]\n[train]\nlr = 5e-3\nschedule = \"constant\"\nmax_steps = {steps}\noutput_dir = \"{}\"\n",
        fixture("models/gpt_oss").display(),
        data.display(),
        dir.join("out").display()
    );
    ftx::recipes::train(&ftx::train::TrainConfig::parse(&text, &[]).unwrap()).unwrap()
}

#[test]
fn expert_lora_trains_saves_peft_keys_and_both_merges_equal_the_adapter() {
    let _rng = crate::common::torch_rng_lock();
    let base = fixture("models/gpt_oss");
    let d = tempfile::tempdir().unwrap();
    let r = train(d.path(), "lora", "\"q_proj\", \"router\", \"experts.gate_up_proj\", \"experts.down_proj\"", 6);
    let (first, last) = (r.first_loss.unwrap(), r.last_loss.unwrap());
    assert!(last < first, "loss {first} → {last}");
    let adapter = d.path().join("out/final");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["target_parameters"], json!(["router.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), "{config}");
    assert_eq!(config["target_modules"], json!(["q_proj"]), "{config}");
    // The same keys and shapes as PEFT's own adapter of this configuration.
    let shapes = |path: &Path| {
        let mut v: Vec<(String, Vec<i64>)> = all_tensors(path.to_str().unwrap()).into_iter().map(|(n, t)| (n, t.size())).collect();
        v.sort();
        v
    };
    let ours = shapes(&adapter.join("adapter_model.safetensors"));
    let peft = shapes(&fixture("peft/lora_gpt_oss_experts_init.safetensors"));
    assert_eq!(ours, peft, "adapter keys and shapes: PEFT's");

    let _g = tch::no_grad_guard();
    let x = Tensor::arange_start(5, 45, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mut with_adapter = CausalLm::load(&base, CPU32).unwrap();
    let settings = ftx::peft::load_adapter(&mut with_adapter, &adapter).unwrap();
    assert!(settings.targets_expert_parameters());
    let a = with_adapter.forward(&x, None);
    // The experts' adapters alone move the logits (q_proj and the router aside).
    let mut experts_off = CausalLm::load(&base, CPU32).unwrap();
    ftx::peft::load_adapter(&mut experts_off, &adapter).unwrap();
    for p in ftx::peft::expert_params_mut(&mut experts_off) {
        p.lora.as_mut().unwrap().enabled = false;
    }
    assert!(max_diff(&a, &experts_off.forward(&x, None)) > 1e-3, "the expert adapters changed nothing");
    // Streaming merge (export --format merged): transformers' layout, base + adapter's logits.
    let merged = d.path().join("merged");
    ftx::export::safetensors_out::export_merged_sharded(&base, Some(&adapter), &merged, Kind::Float, u64::MAX).unwrap();
    assert_same_layout(&base, &merged, "gpt-oss expert adapter");
    let diff = max_diff(&a, &CausalLm::load(&merged, CPU32).unwrap().forward(&x, None));
    assert!(diff < 1e-4, "merged export differs from base + adapter by {diff}");
    // In-memory merge (W ← W + ΔW, adapters detached).
    let merged_count = ftx::export::merge_adapters(&mut with_adapter);
    assert_eq!(merged_count, 3 * 4, "q_proj, router, gate_up_proj and down_proj in each of 3 layers");
    assert!(ftx::peft::expert_params_mut(&mut with_adapter).iter().all(|p| p.lora.is_none()));
    let diff = max_diff(&a, &with_adapter.forward(&x, None));
    assert!(diff < 1e-4, "in-memory merge differs from base + adapter by {diff}");
}

#[test]
fn expert_lora_is_refused_where_peft_or_ftx_cannot_run_it() {
    let settings = |targets: &[&str], dropout: f64| LoraSettings {
        rank: 4,
        alpha: 8.0,
        dropout,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
        rslora: false,
        dora: false,
        quantize_nf4: false,
        quantize_fp8: false,
    };
    // Dropout cannot be factored out of x (W + ΔW): PEFT's ParamWrapper refuses it too.
    let mut m = CausalLm::load(&fixture("models/gpt_oss"), CPU32).unwrap();
    let e = ftx::peft::attach(&mut m, &settings(&["experts.down_proj"], 0.1)).unwrap_err();
    assert!(e.contains("dropout") && e.contains("experts.down_proj"), "{e}");
    // all-linear leaves the experts alone, as PEFT's does.
    let named = ftx::peft::attach(&mut m, &settings(&["all-linear"], 0.0)).unwrap();
    assert!(!named.iter().any(|(n, _)| n.contains(".experts.")), "{:?}", named.iter().map(|(n, _)| n).collect::<Vec<_>>());
    // A family whose experts are nn.Linear projections has no stacked parameters.
    let mut mixtral = CausalLm::load(&fixture("models/mixtral"), CPU32).unwrap();
    let e = ftx::peft::attach(&mut mixtral, &settings(&["experts.gate_up_proj"], 0.0)).unwrap_err();
    assert!(e.contains("only gpt-oss"), "{e}");
    // ftx merge would mix the experts' rank blocks.
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("a");
    let mut m = CausalLm::load(&fixture("models/gpt_oss"), CPU32).unwrap();
    let s = settings(&["experts.gate_up_proj"], 0.0);
    ftx::peft::attach(&mut m, &s).unwrap();
    ftx::peft::save_adapter(&mut m, &s, "base", &dir).unwrap();
    let e = ftx::peft::merge::read_adapter(&dir).err().expect("refused").to_string();
    assert!(e.contains("stacked parameters") && e.contains("--format merged"), "{e}");
    // A saved adapter of gate_up_proj alone sits at the outer wrapper, `experts.lora_A`.
    let keys: Vec<String> = all_tensors(dir.join("adapter_model.safetensors").to_str().unwrap()).into_iter().map(|(n, _)| n).collect();
    assert!(keys.contains(&"base_model.model.model.layers.0.mlp.experts.lora_A.weight".to_owned()), "{keys:?}");
    // serve routes adapters per request through projections only.
    let mut store = ftx::serve::lora_rows::AdapterStore::new();
    let e = store.load(&mut m, "x", &dir).unwrap_err();
    assert!(e.contains("stacked parameters") && e.contains("merged"), "{e}");
}

#[test]
fn mxfp4_experts_load_as_transformers_dequantises_them() {
    let dir = fixture("models/gpt_oss_mxfp4");
    let exp = "models/gpt_oss_mxfp4/expected/expected.safetensors";
    let files = WeightFiles::open(&dir).unwrap();
    // Read under transformers' bf16 names and shapes; the packed tensors are not listed.
    let shapes: std::collections::HashMap<String, Vec<i64>> = files.shapes().into_iter().collect();
    assert_eq!(shapes["model.layers.0.mlp.experts.gate_up_proj"], vec![4, 64, 64]);
    assert_eq!(shapes["model.layers.2.mlp.experts.down_proj"], vec![4, 32, 64]);
    assert!(!shapes.keys().any(|n| n.ends_with("_blocks") || n.ends_with("_scales")), "{:?}", shapes.keys());
    let mut want = WeightFiles::open(&fixture("models/gpt_oss")).unwrap().shapes();
    let mut got = files.shapes();
    want.sort();
    got.sort();
    assert_eq!(got, want, "the bf16 checkpoint's tensors");
    // Exactly transformers' values (every FP4 value times a power of two is exact).
    for name in ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"] {
        let d = max_diff(&files.load_any(name, Kind::Float).unwrap(), &tensor(exp, name));
        assert_eq!(d, 0.0, "{name}");
    }
    // The model: transformers' logits (its own MXFP4 load, dequantised), and not the bf16
    // fixture's (the experts differ).
    let ids: Vec<i64> = json("models/gpt_oss_mxfp4/expected/expected.json")["input_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let x = Tensor::from_slice(&ids).unsqueeze(0);
    let _g = tch::no_grad_guard();
    let logits = CausalLm::load(&dir, CPU32).unwrap().forward(&x, None).squeeze_dim(0);
    let d = max_diff(&logits, &tensor(exp, "logits"));
    assert!(d < 1e-4, "logits differ from transformers' by {d}");
    let bf16 = CausalLm::load(&fixture("models/gpt_oss"), CPU32).unwrap().forward(&x, None).squeeze_dim(0);
    assert!(max_diff(&logits, &bf16) > 1e-2);
    // A merged export is the bf16 layout, without the quantisation config.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("merged");
    ftx::export::safetensors_out::export_merged_sharded(&dir, None, &out, Kind::BFloat16, u64::MAX).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none(), "{cfg}");
    assert_eq!(WeightFiles::open(&out).unwrap().shapes(), files.shapes());
    assert_eq!(ModelConfig::load(&out).unwrap().family, ftx::model::Family::GptOss);
    // `ftx plan` counts what ftx holds: the experts dequantised, as for the bf16 checkpoint.
    let raw = |d: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(fixture(d).join("config.json")).unwrap()).unwrap() };
    let shape = |d: &str| ftx::plan::ModelShape::from_hf_config(&raw(d)).unwrap();
    assert_eq!(shape("models/gpt_oss_mxfp4").params(), shape("models/gpt_oss").params());
}

#[test]
fn mxfp4_tensors_that_do_not_pair_are_refused_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("model.safetensors");
    let blocks = Tensor::zeros([2, 4, 1, 8], (Kind::Uint8, Device::Cpu));
    let scales = Tensor::zeros([2, 4, 1], (Kind::Uint8, Device::Cpu));
    ftx::model::weights::write_safetensors(&path, &[("w_blocks".into(), blocks), ("w_scales".into(), scales)]).unwrap();
    let e = WeightFiles::open(d.path()).err().expect("refused").to_string();
    assert!(e.contains("model.safetensors") && e.contains("MXFP4") && e.contains("[2, 4, 1, 8]"), "{e}");
}

/// A fused expert tensor `[E, in, out]` through NF4 and back as the test does it on its own:
/// each expert's matrix transposed to `[out, in]`, quantised and dequantised by `Nf4Weight`
/// (checked against bitsandbytes in tests/nf4.rs).
fn nf4_round_trip(w: &Tensor) -> Tensor {
    let experts: Vec<Tensor> = (0..w.size()[0]).map(|e| Nf4Weight::quantize(&w.get(e).transpose(0, 1), Kind::Float).dequantize().transpose(0, 1)).collect();
    Tensor::stack(&experts, 0)
}

#[test]
fn nf4_experts_equal_the_fp32_layer_on_their_dequantised_weights_and_qlora_trains_them() {
    let _rng = torch_rng_lock();
    let dir = fixture("models/gpt_oss");
    const FUSED: [&str; 2] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"];
    // The reference: the fp32 model with each fused expert tensor replaced by its NF4 round trip.
    let reference = || {
        let m = CausalLm::load(&dir, CPU32).unwrap();
        for l in &m.layers {
            for (name, mut t) in l.other_tensors() {
                if FUSED.contains(&name.as_str()) {
                    let q = nf4_round_trip(&t);
                    let _ = t.copy_(&q);
                }
            }
        }
        m
    };
    // ftx's: the experts stored as NF4 (what QLoRA's attach does), run through the grouped NF4 node.
    let nf4 = || {
        let mut m = CausalLm::load(&dir, CPU32).unwrap();
        for l in m.layers.iter_mut() {
            l.parts_mut().mlp.quantize_experts_nf4(Kind::Float);
            // The dense tensors are released: neither saved nor trained.
            assert!(l.other_tensors().iter().all(|(n, _)| !FUSED.contains(&n.as_str())));
        }
        m
    };
    {
        let _g = tch::no_grad_guard();
        let x = Tensor::arange_start(5, 45, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let got = nf4().forward(&x, None);
        let diff = max_diff(&got, &reference().forward(&x, None));
        assert!(diff < 1e-5, "NF4 experts differ from the fp32 layer on their dequantised weights by {diff}");
        let moved = max_diff(&got, &CausalLm::load(&dir, CPU32).unwrap().forward(&x, None));
        assert!(moved > 1e-3, "NF4 left the experts' output as it was ({moved})");
    }
    // One backward of each adapter (attention + router: through the NF4 node's backward; with the
    // experts adapted: through W + s·ΔW on the dequantised experts): loss and every gradient.
    for stem in ["lora_gpt_oss", "lora_gpt_oss_experts"] {
        let meta = json(&format!("peft/{stem}.json"));
        let s = LoraSettings {
            rank: meta["r"].as_i64().unwrap(),
            alpha: meta["alpha"].as_f64().unwrap(),
            dropout: 0.0,
            target_modules: meta["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect(),
            rslora: false,
            dora: false,
            quantize_nf4: false,
            quantize_fp8: false,
        };
        let init = all_tensors(&format!("peft/{stem}_init.safetensors"));
        let step = |mut m: CausalLm| {
            let named = ftx::peft::attach_unfilled(&mut m, &s).unwrap();
            ftx::peft::load_adapter_tensors(&mut m, &init).unwrap();
            let b = fixture_batch();
            let loss = forward_backward(&m, &b, b.n_targets as f64, StepPos { seed: 0, step: 0, micro: 0 }, Checkpointing::Off);
            (loss, named.into_iter().map(|(n, t)| (n, t.grad())).collect::<Vec<_>>(), m)
        };
        let ((loss, grads, mut q), (want_loss, want_grads, mut r)) = (step(nf4()), step(reference()));
        assert!((loss - want_loss).abs() < 1e-5 * want_loss.abs(), "{stem}: loss {loss} vs {want_loss}");
        for ((n, g), (_, w)) in grads.iter().zip(&want_grads) {
            let diff = max_diff(g, w);
            assert!(diff < 1e-5, "{stem}: grad of {n} differs by {diff}");
        }
        // In-memory merge: NF4 experts are dequantised before W + s·ΔW, as NF4 linears are.
        let _g = tch::no_grad_guard();
        assert_eq!(ftx::export::merge_adapters(&mut q), ftx::export::merge_adapters(&mut r));
        let x = Tensor::arange_start(5, 45, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let diff = max_diff(&q.forward(&x, None), &r.forward(&x, None));
        assert!(diff < 1e-5, "{stem}: merged NF4 model differs from the merged reference by {diff}");
    }
    // QLoRA through the recipe: attention as NF4 linears, the experts as NF4, LoRA on both.
    let d = tempfile::tempdir().unwrap();
    let r = train(d.path(), "qlora", "\"q_proj\", \"v_proj\", \"experts.gate_up_proj\", \"experts.down_proj\"", 8);
    let (first, last) = (r.first_loss.unwrap(), r.last_loss.unwrap());
    assert!(last < first * 0.8, "QLoRA with expert adapters: loss {first} → {last}");
}
