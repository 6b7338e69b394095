//! Gemma 2 and Gemma 3 (text), beyond the per-family parity tests they share with the other
//! families (models.rs: logits, greedy, chat templates; peft_parity.rs: one PEFT/AdamW step;
//! fused.rs; cli.rs): each Gemma feature is load-bearing in the fixtures (switching it off
//! breaks parity with transformers), Gemma's chat template masks model turns, GGUF export
//! uses llama.cpp's names, and `ftx serve` batches Gemma's windowed, soft-capped attention.

use crate::common::{fixture, torch_rng_lock};
use crate::common::families::{answered_chat, assert_merged_is_base_plus_adapter, chat_target_runs, fixture_tokenizer, logits_parity, train_on_chat, CHAT_ANSWERS};
use crate::gguf::{expect_file, merged_reference, run_check};
use ftx::data::{Example, Tokenizing};
use ftx::export::gguf::{export_gguf, Quant};
use ftx::model::{Activation, AttnSpan, Family, ModelConfig, RopeScaling};
use serde_json::json;
use tch::Kind;

#[test]
fn every_gemma_feature_is_needed_to_match_transformers() {
    type Edit = fn(&mut ModelConfig);
    let common: [(&str, Edit); 5] = [
        ("norms scaled by w, not 1 + w", |c| c.norm_unit_offset = false),
        ("embeddings not scaled by √hidden", |c| c.scale_embeddings = false),
        ("every layer global", |c| c.layer_spans = vec![AttnSpan::Full; c.layers]),
        ("scores scaled by head_dim^-½", |c| c.query_pre_attn_scalar = None),
        ("SwiGLU instead of GeGLU", |c| c.hidden_act = Activation::Silu),
    ];
    let gemma2: [(&str, Edit); 2] = [
        ("no attention soft-cap", |c| c.attn_logit_softcap = None),
        ("no final soft-cap", |c| c.final_logit_softcap = None),
    ];
    let gemma3: [(&str, Edit); 3] = [
        ("one RoPE base for every layer", |c| c.local_rope_theta = None),
        ("global RoPE unscaled", |c| c.rope_scaling = RopeScaling::None),
        ("sliding window one wider", |c| c.sliding_window = c.sliding_window.map(|w| w + 1)),
    ];
    for (family, own) in [("gemma2", &gemma2[..]), ("gemma3", &gemma3[..])] {
        let (whole, stepwise) = logits_parity(family, family, "logits", |_| {});
        assert!(whole < 1e-4 && stepwise < 1e-4, "{family}: {whole} / token by token {stepwise}");
        for (what, edit) in common.iter().chain(own) {
            let (whole, _) = logits_parity(family, family, "logits", edit);
            assert!(whole > 1e-3, "{family}: with {what} the logits still match ({whole}): the fixture does not exercise it");
        }
    }
}

#[test]
fn gemma_configs_read_both_layouts_and_refuse_bad_ones() {
    let dir = fixture("models/gemma3");
    let cfg = ModelConfig::load(&dir).unwrap();
    assert_eq!(cfg.layer_spans, vec![AttnSpan::Sliding, AttnSpan::Full, AttnSpan::Sliding]);
    assert_eq!((cfg.rope_theta, cfg.local_rope_theta, cfg.rope_scaling.clone()), (1e6, Some(1e4), RopeScaling::Linear { factor: 2.0 }));
    // The transformers-4.x layout of the released checkpoints: top-level rope keys, the local
    // base as rope_local_base_freq, and the 5:1 pattern when layer_types is absent.
    let raw = json!({"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 456,
        "rope_theta": 1e6, "rope_local_base_freq": 5e3, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 32});
    let cfg = ModelConfig::from_json(raw, std::path::Path::new("config.json")).unwrap();
    let full: Vec<usize> = cfg.layer_spans.iter().enumerate().filter(|(_, s)| **s == AttnSpan::Full).map(|(i, _)| i).collect();
    assert_eq!(full, vec![5]);
    assert_eq!((cfg.local_rope_theta, cfg.rope_scaling), (Some(5e3), RopeScaling::Linear { factor: 8.0 }));
    assert!(cfg.tie_embeddings, "Gemma ties its head unless the config says otherwise");
    // Gemma 2 caps by default (50 / 30) unless the config says null.
    let raw = json!({"architectures": ["Gemma2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16, "vocab_size": 456, "sliding_window": 8,
        "final_logit_softcapping": null});
    let cfg = ModelConfig::from_json(raw.clone(), std::path::Path::new("config.json")).unwrap();
    assert_eq!((cfg.attn_logit_softcap, cfg.final_logit_softcap), (Some(50.0), None));
    assert_eq!(cfg.layer_spans, vec![AttnSpan::Sliding, AttnSpan::Full]);
    let mut bad = raw.clone();
    bad["layer_types"] = json!(["sliding_attention"]);
    let e = ModelConfig::from_json(bad, std::path::Path::new("config.json")).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("layer_types lists 1 layers"), "{e}");
    let mut bad = raw.clone();
    bad["sliding_window"] = serde_json::Value::Null;
    let e = ModelConfig::from_json(bad, std::path::Path::new("config.json")).unwrap_err().to_string();
    assert!(e.contains("sliding_window"), "{e}");
    let mut bad = raw;
    bad["hidden_activation"] = json!("relu");
    let e = ModelConfig::from_json(bad, std::path::Path::new("config.json")).unwrap_err().to_string();
    assert!(e.contains("hidden_activation 'relu'"), "{e}");
}

#[test]
fn gemma_chat_masks_cover_model_turns_and_their_end_of_turn() {
    for family in ["gemma2", "gemma3"] {
        let tok = fixture_tokenizer(family);
        // Gemma 3 folds a system message into the first user turn: still not a target.
        let runs = chat_target_runs(&tok, answered_chat(family == "gemma3"));
        let texts: Vec<&str> = runs.iter().map(|(text, _)| text.as_str()).collect();
        let want: Vec<String> = CHAT_ANSWERS.iter().map(|a| format!("{a}<end_of_turn>")).collect();
        assert_eq!(texts, want, "{family}: exactly the model turns and their <end_of_turn> are targets");
        let end = tok.token_id("<end_of_turn>").unwrap();
        assert!(runs.iter().all(|(_, ids)| *ids.last().unwrap() == end), "{family}");
    }
    // Gemma 2's own template refuses a system message; the error says so.
    let tok = fixture_tokenizer("gemma2");
    let chat = Example::Chat { messages: answered_chat(true) };
    let e = Tokenizing { tok: &tok, max_len: 4096, train_on_inputs: false }.example(&chat).err().expect("a system message is refused").to_string();
    assert!(e.contains("System role not supported"), "{e}");
}

#[test]
fn gemma_gguf_uses_llama_cpp_names_and_reads_back_in_gguf_py() {
    let tmp = tempfile::tempdir().unwrap();
    // Gemma 3 (its own head, as llama.cpp's gemma3 allows).
    let base = fixture("models/gemma3");
    let reference = tmp.path().join("ref3");
    merged_reference(&base, None, &reference);
    let expect = expect_file(
        tmp.path(),
        json!({
            "general.architecture": "gemma3", "gemma3.block_count": 3, "gemma3.embedding_length": 64,
            "gemma3.attention.key_length": 32, "gemma3.attention.head_count_kv": 2,
            "gemma3.attention.sliding_window": 6, "gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 1e4,
            "gemma3.rope.scaling.factor": 2.0, "gemma3.attention.scale": 1.0 / 32f64.sqrt(),
            // The fixture's query_pre_attn_scalar (24) is folded into the q-norms (gguf_check.py
            // checks their values); the scale llama.cpp applies is its own, 1/√head_dim.
            "gemma3.attention.sliding_window_pattern": [true, false, true],
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": 2, "at:2:tokenizer.ggml.tokens": "<bos>",
        }),
    );
    for quant in [Quant::F16, Quant::Q4KM] {
        let r = export_gguf(&base, None, &tmp.path().join(format!("g3-{quant:?}")), quant).unwrap();
        let report = run_check(&["check", r.path.to_str().unwrap(), reference.to_str().unwrap(), expect.to_str().unwrap()]);
        let t = &report["tensors"];
        for name in ["blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight", "blk.1.attn_q_norm.weight", "output.weight"] {
            assert!(t.get(name).is_some(), "{quant:?}: {name} missing: {report}");
        }
    }
    // Gemma 2 as released: tied head (the fixture's copy, tied), soft-caps in the metadata.
    let tied = tmp.path().join("gemma2-tied");
    std::fs::create_dir_all(&tied).unwrap();
    let src = fixture("models/gemma2");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), tied.join(e.file_name())).unwrap();
        }
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tied.join("config.json")).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = json!(true);
    std::fs::write(tied.join("config.json"), cfg.to_string()).unwrap();
    let reference = tmp.path().join("ref2");
    merged_reference(&tied, None, &reference);
    let expect = expect_file(
        tmp.path(),
        json!({"general.architecture": "gemma2", "gemma2.attn_logit_softcapping": 5.0, "gemma2.final_logit_softcapping": 8.0,
               "gemma2.attention.sliding_window": 6, "gemma2.attention.key_length": 16}),
    );
    for quant in [Quant::F16, Quant::Q4KM] {
        let r = export_gguf(&tied, None, &tmp.path().join(format!("g2-{quant:?}")), quant).unwrap();
        let report = run_check(&["check", r.path.to_str().unwrap(), reference.to_str().unwrap(), expect.to_str().unwrap()]);
        assert!(report["tensors"].get("output.weight").is_none(), "{quant:?}: gemma2 reads its head from token_embd");
    }
    // The untied fixture cannot be a llama.cpp gemma2: refused, saying what to do.
    let e = export_gguf(&src, None, &tmp.path().join("untied"), Quant::F16).err().expect("an untied Gemma 2 is refused").to_string();
    assert!(e.contains("tie_word_embeddings") && e.contains("merged"), "{e}");
}

#[test]
fn serve_batches_gemma_requests_to_generates_answers() {
    // Prompts of different lengths, past the sliding window: batched decoding pads them.
    let users: Vec<String> = (0..4).map(|i| format!("Call the weather function for city number {i}{}", " again".repeat(2 * i))).collect();
    crate::common::serve_matches_generate(&fixture("models/gemma2"), &users, true, 10);
}

#[test]
fn qlora_trains_gemma_and_a_merged_lora_gives_the_adapters_logits() {
    let _rng = torch_rng_lock();
    for family in ["gemma2", "gemma3"] {
        let base = fixture(&format!("models/{family}"));
        let d = tempfile::tempdir().unwrap();
        let r = train_on_chat(&base, "qlora", 8, d.path());
        let (first, last) = (r.first_loss.unwrap(), r.last_loss.unwrap());
        assert!(last < first * 0.8, "{family} QLoRA: loss {first} → {last}");

        // A LoRA merged into the base (ftx export --format merged) is the adapter's model.
        let d = tempfile::tempdir().unwrap();
        train_on_chat(&base, "lora", 3, d.path());
        let adapter = d.path().join("out/final");
        let merged = d.path().join("merged");
        ftx::export::safetensors_out::export_merged_sharded(&base, Some(&adapter), &merged, Kind::Float, u64::MAX).unwrap();
        assert_merged_is_base_plus_adapter(&base, &adapter, &merged, family);
    }
}

#[test]
fn plan_shapes_of_gemma_build_the_same_models() {
    // `ftx plan` and `ftx bench train` take gemma-2-2b / gemma-3-4b from the shape table
    // (by hand: gemma-3-4b = 262208·2560 + 34·(2560·2048·2 + 2560·1024·2 + 3·2560·10240
    // + 4·2560 + 2·256) + 2560);
    // bench builds its random model from the shape's config.json: both must count alike.
    for (name, family, params) in [("gemma-2-2b", Family::Gemma2, 2_614_341_888i64), ("gemma-3-4b", Family::Gemma3, 3_880_263_168)] {
        let shape = ftx::plan::ModelShape::named(name).unwrap();
        let cfg = ModelConfig::from_json(shape.to_hf_config(), std::path::Path::new(name)).unwrap();
        assert_eq!(cfg.family, family, "{name}");
        assert_eq!(shape.params() as i64, params, "{name}: planner");
        assert_eq!(cfg.num_params(), params, "{name}: model config");
        assert!(cfg.tie_embeddings && cfg.layer_spans.contains(&AttnSpan::Full) && cfg.layer_spans.contains(&AttnSpan::Sliding));
    }
}
