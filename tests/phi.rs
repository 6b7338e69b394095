//! Phi-3 / Phi-3.5 / Phi-4-mini (`Phi3ForCausalLM`), beyond the per-family parity tests they
//! share with the other families (models.rs: logits, two chunks through the cache, greedy,
//! chat templates; peft_parity.rs: one PEFT/AdamW step of LoRA, rsLoRA, DoRA and full
//! fine-tuning; fused.rs; cli.rs: `ftx generate`): LongRoPE switches its factors per call
//! exactly as transformers does (token by token through the cache), each Phi feature is
//! load-bearing in the fixtures, configs of both transformers layouts are read and bad ones
//! refused, adapters carry PEFT's packed names and shapes, chat masks cover assistant turns,
//! merged and GGUF export keep the packed layout, `ftx serve` answers, and the phi-4-mini
//! shape builds the model the planner counts.

use crate::common::{all_tensors, fixture, max_diff, tensor, torch_rng_lock};
use crate::common::families::{answered_chat, assert_merged_is_base_plus_adapter, chat_target_runs, fixture_tokenizer, logits_parity, train_on_chat, CHAT_ANSWERS};
use crate::gguf::{expect_file, merged_reference, run_check};
use ftx::export::gguf::{export_gguf, Quant};
use ftx::model::decoder::LoadOptions;
use ftx::model::weights::WeightFiles;
use ftx::model::{AttnSpan, CausalLm, Family, ModelConfig, RopeScaling};
use ftx::peft::{self, LoraSettings};
use serde_json::json;
use std::path::Path;
use tch::{Device, Kind};

const CPU32: LoadOptions = LoadOptions { device: Device::Cpu, kind: Kind::Float };

fn long_rope(c: &mut ModelConfig) -> (&mut Vec<f64>, &mut Vec<f64>, &mut i64, &mut f64) {
    match &mut c.rope_scaling {
        RopeScaling::LongRope { short_factor, long_factor, original_max_positions, attention_factor } => {
            (short_factor, long_factor, original_max_positions, attention_factor)
        }
        other => panic!("phi4mini has LongRoPE, not {other:?}"),
    }
}

#[test]
fn every_phi_feature_is_needed_to_match_transformers() {
    type Edit = fn(&mut ModelConfig);
    let phi3: [(&str, Edit); 2] = [
        ("no sliding window", |c| c.layer_spans = vec![AttnSpan::Full; c.layers]),
        ("sliding window one wider", |c| c.sliding_window = c.sliding_window.map(|w| w + 1)),
    ];
    let phi4mini: [(&str, Edit); 5] = [
        ("plain RoPE instead of LongRoPE", |c| c.rope_scaling = RopeScaling::None),
        ("attention factor 1", |c| *long_rope(c).3 = 1.0),
        ("the short factors everywhere", |c| *long_rope(c).2 = 1 << 40),
        ("the long factors everywhere", |c| *long_rope(c).2 = 0),
        ("every dimension rotated", |c| {
            c.partial_rotary_factor = 1.0;
            c.rope_scaling = RopeScaling::None;
        }),
    ];
    for (family, edits) in [("phi3", &phi3[..]), ("phi4mini", &phi4mini[..])] {
        let (whole, stepwise) = logits_parity(family, family, "logits_stepwise", |_| {});
        assert!(whole < 1e-4 && stepwise < 1e-4, "{family}: {whole} / token by token {stepwise}");
        for (what, edit) in edits {
            let (whole, stepwise) = logits_parity(family, family, "logits_stepwise", edit);
            assert!(whole.max(stepwise) > 1e-3, "{family}: with {what} the logits still match ({whole} / {stepwise}): the fixture does not exercise it");
        }
    }
    // The factor switch is per call, by its largest position: token by token, the first
    // positions take the short factors and so differ from the one-shot (all long) logits.
    let short = tensor("models/phi4mini/expected/logits.safetensors", "logits_stepwise");
    let long = tensor("models/phi4mini/expected/logits.safetensors", "logits");
    assert!(max_diff(&short.narrow(0, 0, 8), &long.narrow(0, 0, 8)) > 1e-2);
}

#[test]
fn phi_configs_read_both_layouts_and_refuse_bad_ones() {
    let cfg = ModelConfig::load(&fixture("models/phi4mini")).unwrap();
    assert_eq!((cfg.family, cfg.packed_projections, cfg.rotary_dim(), cfg.head_dim), (Family::Phi3, true, 12, 16));
    let RopeScaling::LongRope { short_factor, original_max_positions, attention_factor, .. } = &cfg.rope_scaling else { panic!("{:?}", cfg.rope_scaling) };
    // √(1 + ln(64/8) / ln 8) = √2.
    assert_eq!((short_factor.len(), *original_max_positions), (6, 8));
    assert!((attention_factor - 2f64.sqrt()).abs() < 1e-12, "{attention_factor}");
    let phi3 = ModelConfig::load(&fixture("models/phi3")).unwrap();
    assert_eq!((phi3.sliding_window, phi3.rope_scaling.clone(), phi3.rms_eps), (Some(6), RopeScaling::None, 1e-5));
    assert!(phi3.layer_spans.iter().all(|s| *s == AttnSpan::Sliding));

    // Phi-3-mini-128k as released (transformers 4.x): top-level rope_scaling of type "su",
    // original_max_position_embeddings and partial_rotary_factor at the top level.
    let factors: Vec<f64> = (0..8).map(|i| 1.0 + i as f64).collect();
    let raw = json!({"architectures": ["Phi3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 456, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "partial_rotary_factor": 1.0, "rope_theta": 10000.0,
        "rope_scaling": {"type": "su", "short_factor": factors, "long_factor": factors}, "sliding_window": 262144});
    let path = Path::new("config.json");
    let cfg = ModelConfig::from_json(raw.clone(), path).unwrap();
    let RopeScaling::LongRope { original_max_positions, attention_factor, .. } = cfg.rope_scaling else { panic!() };
    assert_eq!(original_max_positions, 4096);
    assert!((attention_factor - (1.0 + 32f64.ln() / 4096f64.ln()).sqrt()).abs() < 1e-12);
    // An explicit attention_factor wins.
    let mut explicit = raw.clone();
    explicit["rope_scaling"]["attention_factor"] = json!(1.25);
    let RopeScaling::LongRope { attention_factor, .. } = ModelConfig::from_json(explicit, path).unwrap().rope_scaling else { panic!() };
    assert_eq!(attention_factor, 1.25);

    let refused = |edit: &dyn Fn(&mut serde_json::Value), want: &str| {
        let mut bad = raw.clone();
        edit(&mut bad);
        let e = ModelConfig::from_json(bad, path).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains(want), "{want}: {e}");
    };
    refused(&|v| v["rope_scaling"]["long_factor"] = json!([1.0, 2.0]), "\"long_factor\" has 2 entries but the 16 rotary dimensions need 8");
    refused(&|v| v["rope_scaling"]["short_factor"] = json!("flat"), "needs \"short_factor\", a list of numbers");
    // 0.3 of 16 rotates 4 dimensions (int(4.8), as transformers), which need 2 factors each.
    refused(&|v| v["partial_rotary_factor"] = json!(0.3), "\"short_factor\" has 8 entries but the 4 rotary dimensions need 2");
    refused(&|v| v["partial_rotary_factor"] = json!(0.1), "partial_rotary_factor 0.1 gives 1 rotary dimensions of head_dim 16: they must be even");
    refused(&|v| v["hidden_act"] = json!("gelu"), "hidden_act 'gelu'");
}

#[test]
fn adapters_use_peft_packed_names_and_a_bad_target_lists_the_projections() {
    // Draws from libtorch's global generator: hold the lock, so tests comparing dropout
    // masks across runs in other threads see no draws of ours in between.
    let _rng = torch_rng_lock();
    let mut model = CausalLm::load(&fixture("models/phi3"), CPU32).unwrap();
    let s = LoraSettings { rank: 4, alpha: 8.0, dropout: 0.0, target_modules: vec!["all-linear".into()], rslora: false, dora: true, quantize_nf4: false, quantize_fp8: false };
    let ours: Vec<(String, Vec<i64>)> = peft::attach(&mut model, &s).unwrap().into_iter().map(|(n, t)| (n, t.size())).collect();
    // PEFT's own adapter tensors for this model, names and shapes (the dora_phi3 fixture).
    let mut want: Vec<(String, Vec<i64>)> = all_tensors("peft/dora_phi3_init.safetensors").into_iter().map(|(n, t)| (n, t.size())).collect();
    let mut ours = ours;
    ours.sort();
    want.sort();
    assert_eq!(ours, want);
    assert!(ours.iter().any(|(n, s)| n.ends_with("layers.1.self_attn.qkv_proj.lora_B.weight") && s == &vec![128, 4]));
    assert!(ours.iter().any(|(n, s)| n.ends_with("layers.0.mlp.gate_up_proj.lora_magnitude_vector") && s == &vec![256]));

    let mut model = CausalLm::load(&fixture("models/phi3"), CPU32).unwrap();
    let s = LoraSettings { target_modules: vec!["q_proj".into(), "v_proj".into()], dora: false, ..s };
    let e = peft::attach(&mut model, &s).unwrap_err();
    assert!(e.contains("down_proj, gate_up_proj, o_proj, qkv_proj"), "{e}");
}

#[test]
fn phi_chat_masks_cover_assistant_turns_and_their_end_token() {
    // Phi-3.5 ends each turn with <|end|> and a newline (the newline is not a target),
    // Phi-4-mini with <|end|> alone.
    for family in ["phi3", "phi4mini"] {
        let tok = fixture_tokenizer(family);
        let runs = chat_target_runs(&tok, answered_chat(true));
        let texts: Vec<&str> = runs.iter().map(|(text, _)| text.as_str()).collect();
        let want: Vec<String> = CHAT_ANSWERS.iter().map(|a| format!("{a}<|end|>")).collect();
        assert_eq!(texts, want, "{family}: exactly the assistant turns and their <|end|> are targets");
        let end = tok.token_id("<|end|>").unwrap();
        assert!(runs.iter().all(|(_, ids)| *ids.last().unwrap() == end), "{family}");
        // The prompt side (system, user turns, the <|assistant|> markers) is never a target.
        let assistant = tok.token_id("<|assistant|>").unwrap();
        assert!(runs.iter().all(|(_, ids)| !ids.contains(&assistant)), "{family}");
    }
}

#[test]
fn phi_gguf_writes_packed_tensors_and_long_rope_factors_that_gguf_py_reads_back() {
    // Trains an adapter in process (seeds and draws from the global generator).
    let _rng = torch_rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    // Phi-4-mini-like: LongRoPE factor tensors, partial rotary, tied head.
    let base = fixture("models/phi4mini");
    let reference = tmp.path().join("ref4");
    merged_reference(&base, None, &reference);
    let expect = expect_file(
        tmp.path(),
        json!({
            "general.architecture": "phi3", "phi3.block_count": 2, "phi3.embedding_length": 64,
            "phi3.feed_forward_length": 128, "phi3.attention.head_count": 4, "phi3.attention.head_count_kv": 2,
            "phi3.rope.dimension_count": 12, "phi3.context_length": 64, "phi3.rope.scaling.original_context_length": 8,
            "phi3.rope.scaling.attn_factor": 2f64.sqrt(), "phi3.attention.sliding_window": 0,
            "phi3.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.pre": "gpt-4o",
        }),
    );
    for quant in [Quant::F16, Quant::Q4KM] {
        let r = export_gguf(&base, None, &tmp.path().join(format!("p4-{quant:?}")), quant).unwrap();
        let report = run_check(&["check", r.path.to_str().unwrap(), reference.to_str().unwrap(), expect.to_str().unwrap()]);
        let t = &report["tensors"];
        for name in ["blk.0.attn_qkv.weight", "blk.1.ffn_up.weight", "rope_factors_long.weight", "rope_factors_short.weight"] {
            assert!(t.get(name).is_some(), "{quant:?}: {name} missing: {report}");
        }
        assert!(t.get("output.weight").is_none() && t.get("blk.0.attn_q.weight").is_none(), "{quant:?}: {report}");
        if quant == Quant::Q4KM {
            // llama-quantize (as llama-cpp-python 0.3.36 vendors it) ranks a packed q/k/v with
            // attn_v: q6_K on the layers use_more_bits picks (of 2: layer 1), else q4_K; rows
            // of 64 fall back (q4_K → q5_0, q6_K → q8_0).
            let types = json_file(&r.manifest)["tensor_types"].clone();
            assert_eq!(types["blk.0.ffn_up.weight"], json!("q5_0"), "{types}");
            assert_eq!(types["blk.0.attn_qkv.weight"], json!("q5_0"), "{types}");
            assert_eq!(types["blk.1.attn_qkv.weight"], json!("q8_0"), "{types}");
        }
    }
    // Phi-3.5-like with an adapter merged in: the window in the metadata, the adapter's
    // qkv_proj / gate_up_proj deltas in the packed tensors.
    let base = fixture("models/phi3");
    let d = tempfile::tempdir().unwrap();
    train_on_chat(&base, "lora", 2, d.path());
    let adapter = d.path().join("out/final");
    let reference = tmp.path().join("ref3");
    ftx::export::safetensors_out::export_merged_sharded(&base, Some(&adapter), &reference, Kind::Float, u64::MAX).unwrap();
    let expect = expect_file(tmp.path(), json!({"general.architecture": "phi3", "phi3.attention.sliding_window": 6, "phi3.rope.dimension_count": 16}));
    let r = export_gguf(&base, Some(&adapter), &tmp.path().join("p3"), Quant::F16).unwrap();
    let report = run_check(&["check", r.path.to_str().unwrap(), reference.to_str().unwrap(), expect.to_str().unwrap()]);
    assert!(report["tensors"].get("output.weight").is_some() && report["tensors"].get("rope_factors_long.weight").is_none(), "{report}");
}

fn json_file(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn qlora_trains_phi_and_a_merged_lora_gives_the_adapters_logits() {
    let _rng = torch_rng_lock();
    for family in ["phi3", "phi4mini"] {
        let base = fixture(&format!("models/{family}"));
        let d = tempfile::tempdir().unwrap();
        let r = train_on_chat(&base, "qlora", 8, d.path());
        let (first, last) = (r.first_loss.unwrap(), r.last_loss.unwrap());
        assert!(last < first * 0.8, "{family} QLoRA: loss {first} → {last}");
        // The saved adapter is PEFT's layout: packed target names.
        let cfg = json_file(&d.path().join("out/final/adapter_config.json"));
        let mut targets: Vec<String> = serde_json::from_value(cfg["target_modules"].clone()).unwrap();
        targets.sort();
        assert_eq!(targets, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], "{family}");

        // A LoRA merged into the base (ftx export --format merged) is the adapter's model,
        // its packed tensors under the checkpoint's own names.
        let d = tempfile::tempdir().unwrap();
        train_on_chat(&base, "lora", 3, d.path());
        let adapter = d.path().join("out/final");
        let merged = d.path().join("merged");
        ftx::export::safetensors_out::export_merged_sharded(&base, Some(&adapter), &merged, Kind::Float, u64::MAX).unwrap();
        let names: Vec<String> = WeightFiles::open(&merged).unwrap().shapes().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().any(|n| n == "model.layers.0.self_attn.qkv_proj.weight") && names.iter().any(|n| n == "model.layers.1.mlp.gate_up_proj.weight"), "{names:?}");
        assert_merged_is_base_plus_adapter(&base, &adapter, &merged, family);
    }
}

#[test]
fn serve_answers_phi_requests_as_generate_does() {
    // Phi-3.5-like: prompts of different lengths past the sliding window, batched together.
    let users: Vec<String> = (0..4).map(|i| format!("Call the weather function for city number {i}{}", " again".repeat(2 * i))).collect();
    crate::common::serve_matches_generate(&fixture("models/phi3"), &users, true, 10);
    // Phi-4-mini-like, one request at a time: a batch's LongRoPE factors follow its largest
    // position, as transformers' would, so only a lone request is comparable with `generate`.
    crate::common::serve_matches_generate(&fixture("models/phi4mini"), &["Call the weather function for Oslo".to_owned(), "Hi".to_owned()], false, 10);
}

#[test]
fn plan_shape_of_phi_4_mini_builds_the_same_model() {
    // `ftx plan` and `ftx bench train` take phi-4-mini from the shape table; bench builds
    // its random model from the shape's config.json: both must count alike (3,836,021,760,
    // by hand in plan::shapes), with Phi-4-mini's packed projections and partial rotary.
    let shape = ftx::plan::ModelShape::named("phi-4-mini").unwrap();
    let cfg = ModelConfig::from_json(shape.to_hf_config(), Path::new("phi-4-mini")).unwrap();
    assert_eq!((cfg.family, cfg.packed_projections, cfg.rotary_dim()), (Family::Phi3, true, 96));
    assert_eq!(cfg.num_params(), 3_836_021_760);
    assert_eq!(shape.params(), 3_836_021_760);
    // LoRA r=16 on the four packed projections: 16·(3072 + 5120 + 3072 + 3072 + 3072 + 16384
    // + 8192 + 3072) a layer.
    assert_eq!(ftx::plan::adapter_params(&shape, 16, false), 32 * 16 * (3072 + 5120 + 3072 + 3072 + 3072 + 16384 + 8192 + 3072));
}
