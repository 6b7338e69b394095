//! gpt-oss (`GptOssForCausalLM`), beyond the per-family parity tests it shares with the others
//! (models.rs: logits whole and through the KV cache in two chunks, greedy ids, the harmony chat
//! template): token-by-token logits past the sliding window, each gpt-oss feature load-bearing;
//! its config keys and refusals (quantisations other than MXFP4); one step of LoRA (attention +
//! router, PEFT's `target_parameters`) and of full fine-tuning (sinks and fused experts too)
//! equal PEFT + transformers + torch AdamW, the router's balance loss included, and so does one of
//! DoRA on attention (PEFT refuses it on the router and experts, and so does ftx); QLoRA trains and
//! its adapter reloads; merged exports keep transformers' layout; serve answers as generate
//! does; the gpt-oss-20b plan shape builds the family's own config. LoRA on the fused experts
//! and MXFP4 checkpoints: tests/gpt_oss_experts.rs.

use crate::common::{all_tensors, assert_same_layout, fixture, json, max_diff, tensor, torch_rng_lock};
use crate::engine::{target_runs, write_chat_data};
use crate::peft_parity::{fixture_batch, loss_of};
use ftx::data::{Example, Tokenizing};
use ftx::model::decoder::LoadOptions;
use ftx::model::tokenizer::Message;
use ftx::model::weights::WeightFiles;
use ftx::model::{AttnSpan, CausalLm, Family, KvCache, ModelConfig, RopeScaling, TextTokenizer};
use ftx::peft::{self, LoraSettings};
use ftx::train::optim::{AdamW, AdamWConfig};
use ftx::train::step::{forward_backward, Checkpointing, StepPos};
use serde_json::json;
use tch::{Device, Kind, Tensor};

const CPU32: LoadOptions = LoadOptions { device: Device::Cpu, kind: Kind::Float };

/// Max |logit − transformers'| over the fixture prompt, whole and token by token through the
/// KV cache (transformers' own token-by-token logits), of the fixture with its config edited
/// and then the built model edited.
fn parity(edit_config: impl Fn(&mut ModelConfig), edit_model: impl Fn(&CausalLm)) -> (f64, f64) {
    let _g = tch::no_grad_guard();
    let dir = fixture("models/gpt_oss");
    let mut cfg = ModelConfig::load(&dir).unwrap();
    edit_config(&mut cfg);
    let model = CausalLm::from_weights(cfg, &WeightFiles::open(&dir).unwrap(), CPU32).unwrap();
    edit_model(&model);
    let exp = json("models/gpt_oss/expected/expected.json");
    let ids: Vec<i64> = exp["input_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let x = Tensor::from_slice(&ids).unsqueeze(0);
    let logits = "models/gpt_oss/expected/logits.safetensors";
    let whole = max_diff(&model.forward(&x, None).squeeze_dim(0), &tensor(logits, "logits"));
    let mut cache = KvCache::new(&model.config);
    let steps: Vec<Tensor> = (0..ids.len() as i64).map(|i| model.forward(&x.narrow(1, i, 1), Some(&mut cache))).collect();
    (whole, max_diff(&Tensor::cat(&steps, 1).squeeze_dim(0), &tensor(logits, "logits_stepwise")))
}

#[test]
fn gpt_oss_matches_transformers_token_by_token_and_every_feature_is_load_bearing() {
    let (whole, stepwise) = parity(|_| {}, |_| {});
    assert!(whole < 1e-4 && stepwise < 1e-4, "{whole} / token by token past the window {stepwise}");
    type EditConfig = fn(&mut ModelConfig);
    let cases: [(&str, EditConfig); 5] = [
        ("no sliding window", |c| c.layer_spans = vec![AttnSpan::Full; c.layers]),
        ("plain RoPE instead of YaRN", |c| c.rope_scaling = RopeScaling::None),
        ("the default clamp (7) instead of the config's (2)", |c| c.raw["swiglu_limit"] = json!(7.0)),
        ("a plain sigmoid gate (alpha 1)", |c| c.raw["swiglu_alpha"] = json!(1.0)),
        ("top-1 routing", |c| c.moe.as_mut().unwrap().top_k = 1),
    ];
    for (what, edit) in cases {
        let (whole, _) = parity(edit, |_| {});
        assert!(whole > 1e-3, "with {what} the logits still match ({whole}): the fixture does not exercise it");
    }
    // Sinks of -inf: a plain softmax over the keys.
    let (whole, _) = parity(
        |_| {},
        |m| {
            for l in &m.layers {
                for (name, mut t) in l.other_tensors() {
                    if name == "self_attn.sinks" {
                        let _ = t.fill_(-1e9);
                    }
                }
            }
        },
    );
    assert!(whole > 1e-3, "without attention sinks the logits still match ({whole})");
}

#[test]
fn gpt_oss_configs_read_the_family_keys_and_refuse_other_quantisations() {
    let cfg = ModelConfig::load(&fixture("models/gpt_oss")).unwrap();
    let m = cfg.moe.as_ref().unwrap();
    assert_eq!((cfg.family, m.experts, m.top_k, m.expert_intermediate), (Family::GptOss, 4, 2, 32));
    assert!(m.aux_loss && (m.router_aux_loss_coef - 0.05).abs() < 1e-12);
    assert!(cfg.qkv_bias && cfg.o_bias && cfg.sliding_window == Some(6));
    assert_eq!(cfg.layer_spans, vec![AttnSpan::Sliding, AttnSpan::Full, AttnSpan::Sliding]);
    match cfg.rope_scaling {
        RopeScaling::Yarn { factor, original_max_positions, truncate, attention_factor, .. } => {
            assert_eq!((factor, original_max_positions, truncate), (4.0, 64.0, false));
            assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12, "{attention_factor}");
        }
        ref other => panic!("{other:?}"),
    }
    // A config with only the required keys takes transformers' gpt-oss defaults: alternating
    // sliding (128) / full layers, YaRN factor 32 over 4096 positions, RMSNorm eps 1e-5.
    let raw = json!({"architectures": ["GptOssForCausalLM"], "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 448, "num_local_experts": 4});
    let path = std::path::Path::new("config.json");
    let cfg = ModelConfig::from_json(raw.clone(), path).unwrap();
    assert_eq!(cfg.layer_spans, [AttnSpan::Sliding, AttnSpan::Full].repeat(2));
    assert_eq!((cfg.sliding_window, cfg.rms_eps, cfg.moe.as_ref().unwrap().top_k), (Some(128), 1e-5, 4));
    assert!(matches!(cfg.rope_scaling, RopeScaling::Yarn { factor: 32.0, original_max_positions: 4096.0, truncate: false, .. }));
    // The Hub's MXFP4 checkpoints load (tests/gpt_oss_experts.rs); other quantisations are
    // refused, naming the file and what to do.
    let mut mxfp4 = raw.clone();
    mxfp4["quantization_config"] = json!({"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]});
    ModelConfig::from_json(mxfp4, path).unwrap();
    let mut bad = raw.clone();
    bad["quantization_config"] = json!({"quant_method": "fp8"});
    let e = ModelConfig::from_json(bad, path).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("fp8") && e.contains("MXFP4") && e.contains("bf16"), "{e}");
    let mut bad = raw.clone();
    bad["swiglu_limit"] = json!(-1.0);
    let e = ModelConfig::from_json(bad, path).unwrap_err().to_string();
    assert!(e.contains("swiglu_limit"), "{e}");
    let mut bad = raw;
    bad["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0});
    let e = ModelConfig::from_json(bad, path).unwrap_err().to_string();
    assert!(e.contains("original_max_position_embeddings"), "{e}");
}

fn adamw(meta: &serde_json::Value) -> AdamWConfig {
    AdamWConfig {
        beta1: meta["betas"][0].as_f64().unwrap(),
        beta2: meta["betas"][1].as_f64().unwrap(),
        eps: meta["eps"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
    }
}

/// One step from the fixture `peft/<stem>`'s adapter with ftx's loss (balance term included)
/// and AdamW, against PEFT's: loss, every gradient, every updated tensor, the cross-entropy
/// after it.
pub(crate) fn check_lora_step(stem: &str, checkpointing: Checkpointing) {
    let _rng = torch_rng_lock();
    let meta = json(&format!("peft/{stem}.json"));
    let mut model = CausalLm::load(&fixture("models/gpt_oss"), CPU32).unwrap();
    let targets: Vec<String> = meta["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    let s = LoraSettings {
        rank: meta["r"].as_i64().unwrap(),
        alpha: meta["alpha"].as_f64().unwrap(),
        dropout: 0.0,
        target_modules: targets,
        rslora: false,
        dora: meta["use_dora"].as_bool().unwrap(),
        quantize_nf4: false,
        quantize_fp8: false,
    };
    let named = peft::attach(&mut model, &s).unwrap();
    let init = all_tensors(&format!("peft/{stem}_init.safetensors"));
    let mut names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    let mut want: Vec<&str> = init.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    want.sort();
    assert_eq!(names, want, "adapter tensor names (PEFT's, the router's and experts' through target_parameters)");
    for (n, t) in &named {
        let (_, w) = init.iter().find(|(m, _)| m == n).unwrap();
        assert_eq!(t.size(), w.size(), "{n}: PEFT's shape");
    }
    peft::load_adapter_tensors(&mut model, &init).unwrap();
    let b = fixture_batch();
    let mut opt = AdamW::new(named, adamw(&meta));
    let loss0 = forward_backward(&model, &b, b.n_targets as f64, StepPos { seed: 0, step: 0, micro: 0 }, checkpointing) / b.n_targets as f64;
    assert!((loss0 - meta["loss0"].as_f64().unwrap()).abs() < 1e-4, "loss (CE + balance) {loss0} vs {}", meta["loss0"]);
    let grads = all_tensors(&format!("peft/{stem}_grad.safetensors"));
    for p in &opt.params {
        let (_, g) = grads.iter().find(|(n, _)| *n == p.name).unwrap_or_else(|| panic!("no grad for {}", p.name));
        let d = max_diff(&p.tensor.grad(), g);
        assert!(d < 1e-4, "grad of {} differs by {d}", p.name);
    }
    opt.step(meta["lr"].as_f64().unwrap(), 1.0);
    opt.zero_grad();
    let after = all_tensors(&format!("peft/{stem}_step1.safetensors"));
    for p in &opt.params {
        let (_, w) = after.iter().find(|(n, _)| *n == p.name).unwrap();
        let d = max_diff(&p.tensor, w);
        assert!(d < 1e-4, "{} after one step differs by {d}", p.name);
    }
    let ce1 = loss_of(&model, &b);
    assert!((ce1 - meta["ce1"].as_f64().unwrap()).abs() < 1e-4, "CE after the step {ce1} vs {}", meta["ce1"]);
}

#[test]
fn gpt_oss_lora_on_attention_and_router_one_step_matches_peft() {
    check_lora_step("lora_gpt_oss", Checkpointing::Off);
    // Under checkpointing the balance term joins each layer's recomputed backward.
    check_lora_step("lora_gpt_oss", Checkpointing::Layers);
}

#[test]
fn gpt_oss_dora_on_attention_one_step_matches_peft() {
    // Magnitudes loaded from PEFT's init (the base rows' norms), one step of every A, B and m.
    check_lora_step("dora_gpt_oss", Checkpointing::Off);
    check_lora_step("dora_gpt_oss", Checkpointing::Layers);
    // PEFT refuses DoRA on target_parameters (its ParamWrapper): the router and the experts.
    for target in ["router", "experts.gate_up_proj"] {
        let s = LoraSettings { rank: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["q_proj".into(), target.into()], rslora: false, dora: true, quantize_nf4: false, quantize_fp8: false };
        let mut model = CausalLm::load(&fixture("models/gpt_oss"), CPU32).unwrap();
        let e = peft::attach(&mut model, &s).unwrap_err();
        assert!(e.contains("DoRA") && e.contains(target.split('.').next_back().unwrap()), "{e}");
    }
}

#[test]
fn gpt_oss_full_fine_tuning_one_step_matches_torch() {
    let _rng = torch_rng_lock();
    let meta = json("peft/full_gpt_oss.json");
    let model = CausalLm::load(&fixture("models/gpt_oss"), CPU32).unwrap();
    let named: Vec<(String, Tensor)> = model.named_tensors().into_iter().map(|(n, t)| (n, t.set_requires_grad(true))).collect();
    // Every tensor of the checkpoint is trained, under its own name (sinks, fused experts too).
    let mut names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let mut want: Vec<String> = WeightFiles::open(&fixture("models/gpt_oss")).unwrap().shapes().into_iter().map(|(n, _)| n).collect();
    names.sort();
    want.sort();
    assert_eq!(names, want);
    let b = fixture_batch();
    let mut opt = AdamW::new(named, adamw(&meta));
    let loss0 = forward_backward(&model, &b, b.n_targets as f64, StepPos { seed: 0, step: 0, micro: 0 }, Checkpointing::Off) / b.n_targets as f64;
    assert!((loss0 - meta["loss0"].as_f64().unwrap()).abs() < 1e-4, "loss {loss0} vs {}", meta["loss0"]);
    opt.step(meta["lr"].as_f64().unwrap(), 1.0);
    for (name, want) in all_tensors("peft/full_gpt_oss_step1.safetensors") {
        let p = opt.params.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no parameter {name}"));
        let diff = max_diff(&p.tensor, &want);
        assert!(diff < 1e-4, "{name} differs by {diff}");
    }
    let ce1 = loss_of(&model, &b);
    assert!((ce1 - meta["ce1"].as_f64().unwrap()).abs() < 1e-4, "CE after the step {ce1} vs {}", meta["ce1"]);
}

#[test]
fn qlora_trains_gpt_oss_and_adapters_and_merged_exports_keep_peft_and_transformers_layouts() {
    let _rng = torch_rng_lock();
    let base = fixture("models/gpt_oss");
    let run = |kind: &str, steps: u32, dir: &std::path::Path| {
        let data = write_chat_data(dir, 48);
        let text = format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 256\n[method]\nkind = \"{kind}\"\nrank = 4\nalpha = 8\n\
             target_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"router\"]\n\
             [train]\nlr = 5e-3\nschedule = \"constant\"\nmax_steps = {steps}\noutput_dir = \"{}\"\n",
            base.display(),
            data.display(),
            dir.join("out").display()
        );
        ftx::recipes::train(&ftx::train::TrainConfig::parse(&text, &[]).unwrap()).unwrap()
    };
    let d = tempfile::tempdir().unwrap();
    let r = run("qlora", 8, d.path());
    let (first, last) = (r.first_loss.unwrap(), r.last_loss.unwrap());
    assert!(last < first * 0.8, "QLoRA: loss {first} → {last}");

    let d = tempfile::tempdir().unwrap();
    run("lora", 3, d.path());
    let adapter = d.path().join("out/final");
    // The router is no nn.Linear: PEFT adapts it through target_parameters.
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["target_parameters"], json!(["router.weight"]), "{config}");
    assert!(!config["target_modules"].as_array().unwrap().contains(&json!("router")), "{config}");
    let merged = d.path().join("merged");
    ftx::export::safetensors_out::export_merged_sharded(&base, Some(&adapter), &merged, Kind::Float, u64::MAX).unwrap();
    assert_same_layout(&base, &merged, "gpt-oss");
    let _g = tch::no_grad_guard();
    let mut with_adapter = CausalLm::load(&base, CPU32).unwrap();
    ftx::peft::load_adapter(&mut with_adapter, &adapter).unwrap();
    let merged = CausalLm::load(&merged, CPU32).unwrap();
    let x = Tensor::arange_start(5, 45, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let (a, b) = (with_adapter.forward(&x, None), merged.forward(&x, None));
    let diff = max_diff(&a, &b);
    assert!(diff < 1e-4, "merged logits differ from base + adapter by {diff}");
    assert!(max_diff(&a, &CausalLm::load(&base, CPU32).unwrap().forward(&x, None)) > 1e-3, "the adapter changed the model");
}

#[test]
fn gpt_oss_chat_masks_cover_the_final_answer_and_its_return_token() {
    let dir = fixture("models/gpt_oss");
    let tok = TextTokenizer::load(&dir, ModelConfig::load(&dir).unwrap().vocab).unwrap();
    let answer = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}";
    let messages = vec![Message::new("system", "You answer in json."), Message::new("user", "What is the weather in Paris?"), Message::new("assistant", answer)];
    let t = Tokenizing { tok: &tok, max_len: 4096, train_on_inputs: false }.example(&Example::Chat { messages }).unwrap();
    let runs = target_runs(&tok, &t);
    let texts: Vec<&str> = runs.iter().map(|(text, _)| text.as_str()).collect();
    assert_eq!(texts, vec![format!("{answer}<|return|>")], "exactly the answer and <|return|> are targets");
}

#[test]
fn serve_answers_gpt_oss_requests_as_generate_does() {
    let users: Vec<String> = (0..3).map(|i| format!("Call the weather function for city number {i}{}", " again".repeat(2 * i))).collect();
    crate::common::serve_matches_generate(&fixture("models/gpt_oss"), &users, true, 8);
}

#[test]
fn gpt_oss_20b_plan_shape_builds_the_family_and_gguf_refuses_other_swiglu_constants() {
    let shape = ftx::plan::ModelShape::named("gpt-oss-20b").unwrap();
    let cfg = ModelConfig::from_json(shape.to_hf_config(), std::path::Path::new("gpt-oss-20b")).unwrap();
    assert_eq!(cfg.family, Family::GptOss);
    assert_eq!(cfg.layer_spans.iter().filter(|s| **s == AttnSpan::Sliding).count(), 12);
    assert_eq!((shape.params() as i64, shape.active_params() as i64), (cfg.num_params(), cfg.active_params()));
    // `ftx plan --method qlora` counts the fused experts as NF4 (4 bits + an 8-bit absmax per 64 +
    // an fp32 scale per 16384), as QLoRA stores them: 24 layers of 32 experts × (gate, up, down),
    // each 2880 × 2880; the rest (attention partly NF4 too) is less than all of it in bf16.
    let n = 2880u64 * 2880;
    let (matrices, expert_params) = (24 * 32 * 3, 24 * 32 * 3 * n);
    let experts_nf4 = matrices * (n / 2 + n / 64 + 4 * n.div_ceil(16384));
    let base = ftx::plan::qlora_base_bytes(&shape);
    let rest_bf16 = 2 * (shape.params() - expert_params);
    assert!(base > experts_nf4 && base < experts_nf4 + rest_bf16, "QLoRA base {base} B: experts in NF4 are {experts_nf4} B, the rest at most {rest_bf16} B");
    // A scaled-down copy of the shape builds and runs through the real layers.
    let mut small = shape.to_hf_config();
    for (k, v) in [("hidden_size", 32), ("intermediate_size", 16), ("num_hidden_layers", 2), ("num_attention_heads", 4), ("num_key_value_heads", 2), ("head_dim", 8), ("vocab_size", 64)] {
        small[k] = json!(v);
    }
    let cfg = ModelConfig::from_json(small, std::path::Path::new("small")).unwrap();
    let model = CausalLm::random(cfg, CPU32, 0).unwrap();
    let _g = tch::no_grad_guard();
    let logits = model.forward(&Tensor::arange(10, (Kind::Int64, Device::Cpu)).unsqueeze(0), None);
    assert_eq!(logits.size(), vec![1, 10, 64]);
    assert!(logits.isfinite().all().int64_value(&[]) == 1);

    // The fixture's swiglu_limit (2) is not the one llama.cpp's gpt-oss hard-codes (7): refused
    // (tests/gguf_llama_cpp.rs runs the exports it writes).
    let tmp = tempfile::tempdir().unwrap();
    let e = ftx::export::gguf::export_gguf(&fixture("models/gpt_oss"), None, &tmp.path().join("m"), ftx::export::gguf::Quant::F16)
        .err()
        .expect("llama.cpp cannot run a swiglu_limit of 2");
    let e = format!("{e:#}");
    assert!(e.contains("swiglu_limit 2") && e.contains("7.0") && e.contains("--format merged"), "{e}");
}

#[test]
fn ftx_generate_continues_the_prompt_as_transformers() {
    let exp = json("models/gpt_oss/expected/expected.json");
    let dir = fixture("models/gpt_oss");
    let args = ["generate", "--model", dir.to_str().unwrap(), "--prompt", exp["text"].as_str().unwrap(), "--max-new-tokens", "12", "--device", "cpu", "--ids"];
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ftx")).args(args).output().unwrap();
    assert!(o.status.success(), "ftx generate failed: {}", String::from_utf8_lossy(&o.stderr));
    let got: Vec<u32> = String::from_utf8(o.stdout).unwrap().split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(got, crate::common::ids(&exp["greedy"]["output_ids"]));
}
