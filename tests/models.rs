//! Model parity with HF transformers (logits, greedy text, chat templates), and the errors
//! broken checkpoints give.

use crate::common::{fixture, ids, json, max_diff, tensor};
use ftx::model::decoder::LoadOptions;
use ftx::model::generate::{generate, GenerateOptions};
use ftx::model::tokenizer::Message;
use ftx::model::{CausalLm, KvCache, ModelError, TextTokenizer};
use tch::{Device, Kind, Tensor};

const FAMILIES: &[&str] = &["llama3", "llama2", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi4mini", "mixtral", "qwen3_moe", "gpt_oss"];
const CPU32: LoadOptions = LoadOptions { device: Device::Cpu, kind: Kind::Float };

fn load(name: &str) -> (CausalLm, TextTokenizer, serde_json::Value) {
    let dir = fixture(&format!("models/{name}"));
    let model = CausalLm::load(&dir, CPU32).unwrap_or_else(|e| panic!("{name}: {e}"));
    let tok = TextTokenizer::load(&dir, model.config.vocab).unwrap();
    (model, tok, json(&format!("models/{name}/expected/expected.json")))
}

fn messages(v: &serde_json::Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn logits_match_transformers_within_1e4_for_every_family() {
    let _g = tch::no_grad_guard();
    for name in FAMILIES {
        let (model, tok, exp) = load(name);
        let input = ids(&exp["input_ids"]);
        assert_eq!(tok.encode(exp["text"].as_str().unwrap(), true).unwrap(), input, "{name}: tokenizer ids");
        let x = Tensor::from_slice(&input.iter().map(|&i| i as i64).collect::<Vec<_>>()).unsqueeze(0);
        let logits = model.forward(&x, None).squeeze_dim(0);
        let want = tensor(&format!("models/{name}/expected/logits.safetensors"), "logits");
        let d = max_diff(&logits, &want);
        assert!(d < 1e-4, "{name}: max |logit diff| = {d}");

        // The same through the KV cache in two chunks, against transformers' own two chunks
        // (equal to the one-shot logits except under LongRoPE, whose factors depend on the
        // call's largest position: phi4mini).
        let split = exp["cache_split"].as_i64().unwrap();
        let mut cache = KvCache::new(&model.config);
        let a = model.forward(&x.narrow(1, 0, split), Some(&mut cache));
        let b = model.forward(&x.narrow(1, split, x.size()[1] - split), Some(&mut cache));
        let want = tensor(&format!("models/{name}/expected/logits.safetensors"), "logits_pos_offset");
        let d = max_diff(&Tensor::cat(&[a, b], 1).squeeze_dim(0), &want);
        assert!(d < 1e-4, "{name}: cached max |logit diff| = {d}");
    }
}

#[test]
fn greedy_continuation_is_token_for_token_identical() {
    for name in FAMILIES {
        let (model, tok, exp) = load(name);
        let g = &exp["greedy"];
        let opts = GenerateOptions { max_new_tokens: g["max_new_tokens"].as_u64().unwrap() as usize, ..Default::default() };
        let out = generate(&model, &tok, &ids(&g["prompt_ids"]), &opts, |_| {}).unwrap();
        assert_eq!(out.ids, ids(&g["output_ids"]), "{name}");
    }
}

#[test]
fn chat_templates_render_like_apply_chat_template() {
    for name in FAMILIES {
        let (_, tok, exp) = load(name);
        let mut cases = vec!["chat"];
        for extra in ["chat_no_system", "chat_think_history", "chat_enable_thinking_false"] {
            if exp.get(extra).is_some() {
                cases.push(extra);
            }
        }
        for case in cases {
            let c = &exp[case];
            let msgs = messages(&c["messages"]);
            let kwargs = c.get("template_kwargs").and_then(|k| k.as_object()).cloned().unwrap_or_default();
            let got = tok.render_chat_with(&msgs, true, &kwargs).unwrap();
            assert_eq!(got, c["rendered"].as_str().unwrap(), "{name}/{case} with generation prompt");
            let got = tok.render_chat_with(&msgs, false, &kwargs).unwrap();
            assert_eq!(got, c["rendered_no_gen"].as_str().unwrap(), "{name}/{case} without generation prompt");
            let rendered = tok.render_chat_with(&msgs, true, &kwargs).unwrap();
            assert_eq!(tok.encode(&rendered, false).unwrap(), ids(&c["ids"]), "{name}/{case} ids");
        }
    }
}

#[test]
fn stop_ids_come_from_generation_config() {
    let (_, tok, _) = load("llama3");
    assert_eq!(tok.stop_ids, vec![449, 452]);
}

// ---- hostile and broken inputs: each names the file and the problem ----

/// A copy of a fixture model in a temp dir, to break.
fn scratch(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(&format!("models/{name}"))).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
    }
    dir
}

fn load_err(dir: &std::path::Path) -> String {
    match CausalLm::load(dir, CPU32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_files_are_named() {
    let d = scratch("llama3");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("missing"), "{e}");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");
    let d = scratch("llama3");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = TextTokenizer::load(d.path(), 453).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
}

#[test]
fn unknown_architecture_is_refused_with_the_supported_list() {
    let d = scratch("llama3");
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("GPTNeoXForCausalLM") && e.contains("LlamaForCausalLM") && e.contains("config.json"), "{e}");
}

#[test]
fn truncated_safetensors_is_an_error_not_a_crash() {
    let d = scratch("llama3");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
    std::fs::write(&p, &bytes[..5]).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn lying_safetensors_header_is_an_error() {
    let d = scratch("llama3");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    // Claim a bigger tensor than the bytes given to it.
    header["model.norm.weight"]["shape"] = serde_json::json!([4096]);
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() < n {
        h.push(b' ');
    }
    h.truncate(n.max(h.len()));
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, out).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn shapes_that_disagree_with_config_are_named() {
    let d = scratch("llama3");
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(96);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("gate_proj.weight") && e.contains("config.json implies [96, 64]"), "{e}");
}

#[test]
fn tokenizer_larger_than_the_vocabulary_is_refused() {
    let dir = fixture("models/llama3");
    let e = TextTokenizer::load(&dir, 300).err().unwrap();
    assert!(matches!(e, ModelError::Invalid { .. }));
    let e = e.to_string();
    assert!(e.contains("tokenizer.json") && e.contains("453 tokens") && e.contains("vocab_size is 300"), "{e}");
}

#[test]
fn missing_tensor_and_bad_json_are_named() {
    let d = scratch("llama3");
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");

    let d = scratch("llama3");
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.layers.2") && e.contains("missing"), "{e}");
}
