//! Mixture-of-experts families (Mixtral, Qwen3-MoE), beyond the per-family parity tests they
//! share with the others (models.rs: logits through the KV cache, greedy ids, chat templates):
//! both checkpoint layouts load; routing as each family defines it is load-bearing; one step
//! of LoRA (experts, router, attention), DoRA (attention) and full fine-tuning — the router's
//! load-balancing loss included — equals PEFT + transformers + torch AdamW; QLoRA of experts
//! trains; merged exports keep the Hub layout; plan shapes count experts. GGUF export of MoE:
//! tests/gguf_moe.rs.

use crate::common::{all_tensors, assert_same_layout, fixture, json, max_diff, torch_rng_lock};
use crate::common::families::{assert_merged_is_base_plus_adapter, logits_parity, train_on_chat};
use crate::peft_parity::{adamw, check_adapter_step, fixture_batch, loss_of};
use ftx::model::decoder::LoadOptions;
use ftx::model::weights::WeightFiles;
use ftx::model::{CausalLm, Family, ModelConfig};
use ftx::train::optim::AdamW;
use ftx::train::step::{forward_backward, Checkpointing, StepPos};
use serde_json::json;
use tch::{Device, Kind, Tensor};

const CPU32: LoadOptions = LoadOptions { device: Device::Cpu, kind: Kind::Float };

#[test]
fn moe_routing_as_each_family_defines_it_matches_transformers() {
    type Edit = fn(&mut ModelConfig);
    let cases: [(&str, &str, &str, Edit); 5] = [
        ("mixtral", "mixtral", "top-k weights not renormalised", |c| c.moe.as_mut().unwrap().norm_topk_prob = false),
        ("mixtral", "mixtral", "top-1 routing", |c| c.moe.as_mut().unwrap().top_k = 1),
        ("qwen3_moe", "qwen3_moe", "top-k weights renormalised", |c| c.moe.as_mut().unwrap().norm_topk_prob = true),
        ("qwen3_moe", "qwen3_moe", "top-3 routing", |c| c.moe.as_mut().unwrap().top_k = 3),
        ("qwen3_moe", "qwen3_moe", "no q/k norms", |c| c.qk_norm = false),
    ];
    // transformers 5's fused layout (mlp.experts.gate_up_proj / down_proj) loads to the same model.
    for (dir, family) in [("mixtral", "mixtral"), ("mixtral_fused", "mixtral"), ("qwen3_moe", "qwen3_moe")] {
        let (whole, stepwise) = logits_parity(dir, family, "logits", |_| {});
        assert!(whole < 1e-4 && stepwise < 1e-4, "{dir}: {whole} / token by token {stepwise}");
    }
    for (dir, family, what, edit) in cases {
        let (whole, _) = logits_parity(dir, family, "logits", edit);
        assert!(whole > 1e-3, "{dir}: with {what} the logits still match ({whole}): the fixture does not exercise it");
    }
}

#[test]
fn moe_configs_read_the_family_keys_and_refuse_bad_ones() {
    let cfg = ModelConfig::load(&fixture("models/qwen3_moe")).unwrap();
    let m = cfg.moe.as_ref().unwrap();
    assert_eq!((cfg.family, m.experts, m.top_k, m.expert_intermediate, m.norm_topk_prob), (Family::Qwen3Moe, 4, 2, 32, false));
    assert_eq!(m.sparse_layers, vec![true, false, true], "mlp_only_layers = [1]");
    assert!(m.aux_loss && (m.router_aux_loss_coef - 0.05).abs() < 1e-12);
    let cfg = ModelConfig::load(&fixture("models/mixtral")).unwrap();
    assert_eq!(cfg.family, Family::Mixtral);
    assert!(cfg.moe.as_ref().unwrap().norm_topk_prob);
    let raw = json!({"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 448, "num_local_experts": 4, "num_experts_per_tok": 2});
    let path = std::path::Path::new("config.json");
    let mut bad = raw.clone();
    bad["router_jitter_noise"] = json!(0.1);
    let e = ModelConfig::from_json(bad, path).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("router_jitter_noise"), "{e}");
    let mut bad = raw.clone();
    bad["num_experts_per_tok"] = json!(5);
    let e = ModelConfig::from_json(bad, path).unwrap_err().to_string();
    assert!(e.contains("num_experts_per_tok (5)"), "{e}");
    let mut bad = raw;
    bad.as_object_mut().unwrap().remove("num_local_experts");
    let e = ModelConfig::from_json(bad, path).unwrap_err().to_string();
    assert!(e.contains("num_local_experts"), "{e}");
}

/// One step from the fixture's adapter (`variant` lora or dora) on its target modules, against
/// PEFT's ([`check_adapter_step`], the router's balance term in the loss).
fn check_moe_adapter_step(variant: &str, family: &str, checkpointing: Checkpointing) {
    let meta = json(&format!("peft/{variant}_{family}.json"));
    let targets: Vec<String> = meta["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    // The fixture's dense Qwen3-MoE layer (mlp_only_layers) carries no adapter (PEFT cannot
    // load one there on transformers 5).
    check_adapter_step(variant, family, targets, checkpointing, |name| family == "qwen3_moe" && name.starts_with("model.layers.1.mlp."));
}

#[test]
fn moe_lora_on_experts_router_and_attention_one_step_matches_peft() {
    for family in ["mixtral", "qwen3_moe"] {
        check_moe_adapter_step("lora", family, Checkpointing::Off);
    }
    // Under checkpointing the balance term joins each layer's recomputed backward.
    check_moe_adapter_step("lora", "qwen3_moe", Checkpointing::Layers);
}

#[test]
fn moe_dora_on_attention_one_step_matches_peft() {
    for family in ["mixtral", "qwen3_moe"] {
        check_moe_adapter_step("dora", family, Checkpointing::Off);
    }
}

#[test]
fn moe_full_fine_tuning_one_step_matches_torch() {
    // The step seeds the global generator per layer (dropout masks).
    let _rng = torch_rng_lock();
    for family in ["mixtral", "qwen3_moe"] {
        let meta = json(&format!("peft/full_{family}.json"));
        let model = CausalLm::load(&fixture(&format!("models/{family}")), CPU32).unwrap();
        let named: Vec<(String, Tensor)> = model.named_tensors().into_iter().map(|(n, t)| (n, t.set_requires_grad(true))).collect();
        let b = fixture_batch();
        let mut opt = AdamW::new(named, adamw(&meta));
        let loss0 = forward_backward(&model, &b, b.n_targets as f64, StepPos { seed: 0, step: 0, micro: 0 }, Checkpointing::Off) / b.n_targets as f64;
        assert!((loss0 - meta["loss0"].as_f64().unwrap()).abs() < 1e-4, "{family}: loss {loss0} vs {}", meta["loss0"]);
        opt.step(meta["lr"].as_f64().unwrap(), 1.0);
        let param = |name: &str| opt.params.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("{family}: no parameter {name}")).tensor.shallow_clone();
        let (moe, [g, u, d]) = if family == "mixtral" { ("block_sparse_moe", ["w1", "w3", "w2"]) } else { ("mlp", ["gate_proj", "up_proj", "down_proj"]) };
        for (name, want) in all_tensors(&format!("peft/full_{family}_step1.safetensors")) {
            // transformers 5's fused expert tensors, against ftx's per-expert ones stacked.
            let got = if name.ends_with("experts.gate_up_proj") {
                Tensor::stack(&(0..4).map(|e| Tensor::cat(&[param(&format!("model.layers.0.{moe}.experts.{e}.{g}.weight")), param(&format!("model.layers.0.{moe}.experts.{e}.{u}.weight"))], 0)).collect::<Vec<_>>(), 0)
            } else if name.ends_with("experts.down_proj") {
                Tensor::stack(&(0..4).map(|e| param(&format!("model.layers.0.{moe}.experts.{e}.{d}.weight"))).collect::<Vec<_>>(), 0)
            } else {
                param(&name.replace(".mlp.gate.", &format!(".{moe}.gate.")))
            };
            let diff = max_diff(&got, &want);
            assert!(diff < 1e-4, "{family}: {name} differs by {diff}");
        }
        let ce1 = loss_of(&model, &b);
        assert!((ce1 - meta["ce1"].as_f64().unwrap()).abs() < 1e-4, "{family}: CE after the step {ce1} vs {}", meta["ce1"]);
    }
}

#[test]
fn the_balance_loss_follows_output_router_logits_and_changes_the_gradient() {
    // Without output_router_logits transformers' loss is the cross-entropy alone, and so is ftx's.
    let _rng = torch_rng_lock();
    let dir = fixture("models/mixtral");
    let mut cfg = ModelConfig::load(&dir).unwrap();
    cfg.moe.as_mut().unwrap().aux_loss = false;
    let model = CausalLm::from_weights(cfg, &WeightFiles::open(&dir).unwrap(), CPU32).unwrap();
    let b = fixture_batch();
    let ce = loss_of(&model, &b);
    let plain = forward_backward(&model, &b, b.n_targets as f64, StepPos { seed: 0, step: 0, micro: 0 }, Checkpointing::Off) / b.n_targets as f64;
    assert!((plain - ce).abs() < 1e-6, "{plain} vs CE {ce}");
    let meta = json("peft/full_mixtral.json");
    let with_aux = meta["loss0"].as_f64().unwrap();
    let coef = 0.05;
    assert!((with_aux - ce - coef * meta["aux_loss0"].as_f64().unwrap()).abs() < 1e-4, "the fixture's loss is CE + coef·aux");
}

#[test]
fn qlora_trains_moe_experts_and_merged_exports_keep_the_hub_layout() {
    let _rng = torch_rng_lock();
    for family in ["mixtral", "qwen3_moe"] {
        let base = fixture(&format!("models/{family}"));
        let d = tempfile::tempdir().unwrap();
        let r = train_on_chat(&base, "qlora", 8, d.path());
        let (first, last) = (r.first_loss.unwrap(), r.last_loss.unwrap());
        assert!(last < first * 0.8, "{family} QLoRA: loss {first} → {last}");

        // LoRA on every expert, saved under PEFT's per-expert names, merged into the base.
        let d = tempfile::tempdir().unwrap();
        train_on_chat(&base, "lora", 3, d.path());
        let adapter = d.path().join("out/final");
        let saved = ftx::model::weights::read_safetensors(&adapter.join("adapter_model.safetensors")).unwrap();
        let expert = if family == "mixtral" { "block_sparse_moe.experts.3.w2.lora_B.weight" } else { "mlp.experts.3.down_proj.lora_B.weight" };
        assert!(saved.iter().any(|(n, _)| n == &format!("base_model.model.model.layers.0.{expert}")), "{family}: expert adapters saved per expert");
        let merged = d.path().join("merged");
        ftx::export::safetensors_out::export_merged_sharded(&base, Some(&adapter), &merged, Kind::Float, u64::MAX).unwrap();
        assert_same_layout(&base, &merged, family);
        assert_merged_is_base_plus_adapter(&base, &adapter, &merged, family);
    }
}

#[test]
fn plan_shapes_of_moe_count_every_expert_and_active_ones_for_flops() {
    // By hand, mixtral-8x7b: 32000·4096·2 + 32·(4096·4096·2 + 4096·1024·2 + 8·3·4096·14336
    // + 8·4096 + 2·4096) + 4096 = 46_702_792_704 (Mixtral's model card: 46.7B); active with
    // 2 of 8 experts: 12_879_925_248 (12.9B).
    let shape = ftx::plan::ModelShape::named("mixtral-8x7b").unwrap();
    assert_eq!(shape.params(), 46_702_792_704);
    assert_eq!(shape.active_params(), 12_879_925_248);
    let cfg = ModelConfig::from_json(shape.to_hf_config(), std::path::Path::new("mixtral-8x7b")).unwrap();
    assert_eq!(cfg.num_params(), 46_702_792_704);
    assert_eq!(cfg.active_params(), 12_879_925_248);
    // qwen3-30b-a3b: 30.5B total, 3.3B active (its model card).
    let shape = ftx::plan::ModelShape::named("qwen3-30b-a3b").unwrap();
    let cfg = ModelConfig::from_json(shape.to_hf_config(), std::path::Path::new("qwen3-30b-a3b")).unwrap();
    assert_eq!(cfg.family, Family::Qwen3Moe);
    assert_eq!(shape.params() as i64, cfg.num_params());
    assert_eq!(shape.active_params() as i64, cfg.active_params());
    assert!((30.4e9..30.6e9).contains(&(shape.params() as f64)), "{}", shape.params());
    assert!((3.2e9..3.4e9).contains(&(shape.active_params() as f64)), "{}", shape.active_params());
    // gpt-oss-20b: 20.9B total, 3.6B active (its model card, which leaves the embedding table
    // out of the active count: + 201088·2880 = 4.19B); its layers: tests/gpt_oss.rs.
    let shape = ftx::plan::ModelShape::named("gpt-oss-20b").unwrap();
    assert!((20.8e9..21.0e9).contains(&(shape.params() as f64)), "{}", shape.params());
    let active_without_embeddings = shape.active_params() - 201_088 * 2880;
    assert!((3.55e9..3.65e9).contains(&(active_without_embeddings as f64)), "{}", shape.active_params());
    // `ftx plan --model DIR` reads the same shapes from their config.json.
    for name in ["mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b"] {
        let shape = ftx::plan::ModelShape::named(name).unwrap();
        let back = ftx::plan::ModelShape::from_hf_config(&shape.to_hf_config()).unwrap();
        assert_eq!((back.params(), back.active_params(), back.layout), (shape.params(), shape.active_params(), shape.layout), "{name}");
    }
}

#[test]
fn serve_batches_moe_requests_to_generates_answers() {
    // Prompts of different lengths: batched decoding pads them, and the experts see padded rows.
    let users: Vec<String> = (0..3).map(|i| format!("Call the weather function for city number {i}{}", " again".repeat(2 * i))).collect();
    crate::common::serve_matches_generate(&fixture("models/qwen3_moe"), &users, true, 8);
}

#[test]
fn bench_train_on_a_moe_shape_reports_the_expert_share_and_trains_the_targets_asked() {
    // Through the CLI (its own process: the expert ablation is process-wide). tiny-moe: hidden
    // 64, 4 heads and 2 KV heads of 16, 8 experts of width 32, 2 layers. Adapter parameters at
    // rank r, by hand: q r·(64+64), k and v r·(64+32) each, o r·(64+64) = 448r; router
    // r·(64+8) = 72r; each expert's gate, up and down r·(64+32) = 96r, 8·3·96r = 2304r.
    let run = |extra: &[&str]| -> std::process::Output {
        let mut args = vec!["bench", "train", "--shape", "tiny-moe", "--seq", "16", "--batch", "2", "--steps", "3", "--warmup", "1", "--rank", "4", "--device", "cpu"];
        args.extend_from_slice(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_ftx")).args(&args).output().unwrap()
    };
    let json_of = |o: std::process::Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap()
    };
    let r = 4;
    let all = json_of(run(&[]));
    assert_eq!((all["layers"].as_u64(), all["trainable_params"].as_i64()), (Some(2), Some(2 * (448 + 72 + 2304) * r)), "{all}");
    let share = all["expert_gemm_share"].as_f64().unwrap_or_else(|| panic!("a MoE shape reports the expert share: {all}"));
    // 1 − t_without / t_with: below 1 whatever the timings; its size is the GPU table's business.
    assert!(share.is_finite() && share < 1.0, "{share}");
    assert!((all["first_loss"].as_f64().unwrap() - 1000f64.ln()).abs() < 0.5, "a random model starts near uniform: {all}");
    let attention = json_of(run(&["--target-modules", "q_proj,k_proj,v_proj,o_proj", "--layers", "1"]));
    assert_eq!((attention["layers"].as_u64(), attention["trainable_params"].as_i64()), (Some(1), Some(448 * r)), "{attention}");
    assert!(attention.get("planned_gib").is_none(), "the planner counts all-linear adapters only");
    let too_many = run(&["--layers", "3"]);
    assert!(!too_many.status.success());
    let err = String::from_utf8_lossy(&too_many.stderr);
    assert!(err.contains("--layers 3") && err.contains("tiny-moe has 2 decoder layers"), "{err}");
}

/// Deterministic values (no draw from libtorch's global generator, which other tests share).
fn wave(shape: &[i64], phase: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.37 + phase).sin().reshape(shape).to_kind(Kind::Float)
}

/// Each token through each of its experts' own [`ftx::model::block::Mlp`] (the dense MLP's
/// path), one token at a time, weighted as the router says: the reference for the grouped GEMMs.
fn moe_per_token(moe: &ftx::model::moe::SparseMoe, x: &Tensor) -> Tensor {
    let (_, idx, w) = moe.route(x, false);
    let rows: Vec<Tensor> = (0..x.size()[0])
        .map(|t| {
            let xt = x.narrow(0, t, 1);
            let mut y = xt.zeros_like();
            for j in 0..moe.top_k {
                let e = idx.int64_value(&[t, j]) as usize;
                y = y + moe.experts[e].forward(&xt, false) * w.get(t).get(j);
            }
            y
        })
        .collect();
    Tensor::cat(&rows, 0)
}

#[test]
fn moe_experts_as_grouped_gemms_equal_each_experts_own_mlp_in_values_and_gradients() {
    use ftx::model::linear::{BaseLinear, Linear, Weight};
    use ftx::model::moe::{experts_of, ExpertNaming, SparseMoe};
    use ftx::peft::lora::LoraAdapter;
    let (h, inter, e, r) = (64, 32, 4, 4);
    // A LoRA (or DoRA) adapter with deterministic, non-zero factors.
    let adapter = |lin: &Linear, phase: f64, dora: bool| -> LoraAdapter {
        let (out, inp) = lin.base.shape();
        let w = lin.base.dense_weight();
        let sq = ftx::model::fused::row_sq(&w);
        let mut a = LoraAdapter {
            a: wave(&[r, inp], phase) * 0.2,
            b: wave(&[out, r], phase + 0.5) * 0.2,
            magnitude: dora.then(|| sq.sqrt() * (wave(&[out], phase) * 0.1 + 1.0)),
            base_row_sq: dora.then_some(sq),
            scaling: 2.0,
            dropout: 0.0,
        };
        a.set_trainable();
        a
    };
    type Edit = fn(&mut Linear, usize, &str, &dyn Fn(&Linear, f64, bool) -> LoraAdapter);
    let cases: [(&str, Edit); 7] = [
        ("no adapters", |_, _, _, _| {}),
        ("LoRA on every expert projection", |l, x, p, ad| l.adapter = Some(Box::new(ad(l, x as f64 + p.len() as f64, false)))),
        ("DoRA on every expert projection", |l, x, p, ad| l.adapter = Some(Box::new(ad(l, x as f64 + p.len() as f64, true)))),
        // Some experts adapted and others not: those projections run expert by expert.
        ("LoRA on experts 0 and 2's down", |l, x, p, ad| {
            if p == "down" && x % 2 == 0 {
                l.adapter = Some(Box::new(ad(l, x as f64, false)));
            }
        }),
        ("LoRA over NF4 bases", |l, x, p, ad| {
            let _g = tch::no_grad_guard();
            let q = ftx::model::nf4::Nf4Weight::quantize(&l.base.dense_weight(), Kind::Float);
            l.base = BaseLinear { weight: Weight::Nf4(q), bias: None };
            l.adapter = Some(Box::new(ad(l, x as f64 + p.len() as f64, false)));
        }),
        ("DoRA over NF4 bases", |l, x, p, ad| {
            let _g = tch::no_grad_guard();
            let q = ftx::model::nf4::Nf4Weight::quantize(&l.base.dense_weight(), Kind::Float);
            l.base = BaseLinear { weight: Weight::Nf4(q), bias: None };
            l.adapter = Some(Box::new(ad(l, x as f64 + p.len() as f64, true)));
        }),
        ("trainable bases (full fine-tuning)", |l, _, _, _| {
            if let Weight::Dense(w) = &l.base.weight {
                l.base.weight = Weight::Dense(w.shallow_clone().set_requires_grad(true));
            }
        }),
    ];
    for (what, edit) in cases {
        // The router never picks expert 3 (its logit is biased far down): an empty group.
        let mut bias = vec![0f32; e as usize];
        bias[3] = -1e4;
        let mut moe = SparseMoe {
            gate: Linear::new(wave(&[e, h], 0.0), Some(Tensor::from_slice(&bias))),
            experts: experts_of(&(wave(&[e, 2 * inter, h], 0.1) * 0.2), &(wave(&[e, h, inter], 0.3) * 0.2)),
            top_k: 2,
            norm_topk_prob: false,
            fp32_routing_weights: false,
            naming: ExpertNaming::Qwen,
            record_router_logits: false,
            router_logits: std::sync::Mutex::new(None),
        };
        for (x, m) in moe.experts.iter_mut().enumerate() {
            for (p, lin) in ["gate", "up", "down"].into_iter().zip(m.linears_mut()) {
                edit(lin.1, x, p, &adapter);
            }
        }
        let mut trainable: Vec<Tensor> = Vec::new();
        for m in &moe.experts {
            for (_, lin) in m.linears() {
                if let Some(a) = &lin.adapter {
                    trainable.extend(a.named_tensors().into_iter().map(|(_, t)| t));
                }
                if let Weight::Dense(w) = &lin.base.weight {
                    if w.requires_grad() {
                        trainable.push(w.shallow_clone());
                    }
                }
            }
        }
        let x = (wave(&[10, h], 2.0) * 2.0).set_requires_grad(true);
        let c = wave(&[10, h], 0.7);
        // Values and the gradients of x and of every trainable tensor (never reached: zero).
        let run = |f: &dyn Fn(&Tensor) -> Tensor| -> Vec<Tensor> {
            let y = f(&x);
            (&y * &c).sum(Kind::Float).backward();
            let mut out = vec![y.detach()];
            for t in std::iter::once(&x).chain(&trainable) {
                let g = t.grad();
                out.push(if g.defined() { g.copy() } else { t.zeros_like() });
                if g.defined() {
                    let _ = g.detach().zero_();
                }
            }
            out
        };
        let grouped = run(&|x| moe.forward(x, true));
        let reference = run(&|x| moe_per_token(&moe, x));
        for (i, (a, b)) in grouped.iter().zip(&reference).enumerate() {
            // fp32 sums in another order: off by at most 1e-5 of the largest entry.
            let (d, scale) = (max_diff(a, b), b.abs().max().double_value(&[]).max(1.0));
            let which = ["values", "x's gradient"].get(i).copied().unwrap_or("a trainable tensor's gradient");
            assert!(d <= 1e-5 * scale, "{what}: {which} ({i}) off by {d} (largest entry {scale})");
        }
        assert!(max_diff(&grouped[0], &x.detach()) > 1e-2, "{what}: the experts do something");
    }
}
