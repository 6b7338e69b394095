//! GGUF export: every file is read back by llama.cpp's own Python reader (`gguf`), its
//! metadata checked and each tensor dequantised and compared with the merged weights;
//! q8_0 / q5_0 / q5_1 bytes equal gguf-py's quantiser, k-quant bytes equal libggml's (from
//! llama-cpp-python). llama.cpp running the files: tests/gguf_llama_cpp.rs.

use crate::common::{fixture, max_diff, torch_rng_lock};
use ftx::export::gguf::{export_gguf, Quant};
use ftx::model::decoder::LoadOptions;
use ftx::model::{CausalLm, ModelConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind};

const CPU32: LoadOptions = LoadOptions { device: Device::Cpu, kind: Kind::Float };

/// The Python that has `gguf` (tests/env.sh installs it into the project venv).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FTX_PYTHON") {
        return p.into();
    }
    let venv = std::env::var_os("FTX_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    venv.join("bin/python")
}

fn check_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/gguf_check.py")
}

/// Runs gguf_check.py; returns its JSON report, panicking with it on failure.
pub(crate) fn run_check(args: &[&str]) -> Value {
    let out = Command::new(python()).arg(check_script()).args(args).output().expect("running python (see tests/env.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "gguf_check.py {args:?} failed:\n{stdout}\n{stderr}");
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}"))
}

/// The merged model as an fp32 HF checkpoint (the reference the GGUF is compared with).
pub(crate) fn merged_reference(base: &Path, adapter: Option<&Path>, dir: &Path) {
    ftx::export::safetensors_out::export_merged_sharded(base, adapter, dir, Kind::Float, u64::MAX).unwrap();
}

pub(crate) fn expect_file(dir: &Path, v: Value) -> PathBuf {
    let p = dir.join("expect.json");
    std::fs::write(&p, v.to_string()).unwrap();
    p
}

/// A llama-family checkpoint wide enough for k-quants (rows of 256 and 512), random
/// weights, the llama3 fixture's tokenizer.
fn wide_model(dir: &Path) {
    let src = fixture("models/llama3");
    let mut raw: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    raw["hidden_size"] = json!(256);
    raw["intermediate_size"] = json!(512);
    raw["num_hidden_layers"] = json!(4);
    raw["head_dim"] = json!(64);
    let cfg = ModelConfig::from_json(raw.clone(), &src.join("config.json")).unwrap();
    let model = CausalLm::random(cfg, CPU32, 5).unwrap();
    model.save_pretrained(&src, dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&raw).unwrap()).unwrap();
}

#[test]
fn every_quant_of_a_merged_llama3_reads_back_in_gguf_py() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("models/llama3");
    let adapter = fixture("peft/adapters/lora_llama3");
    let reference = tmp.path().join("ref");
    merged_reference(&base, Some(&adapter), &reference);
    let expect = expect_file(
        tmp.path(),
        json!({
            "general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
            "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.context_length": 256, "llama.rope.freq_base": 500000.0, "llama.attention.layer_norm_rms_epsilon": 1e-6,
            "tokenizer.ggml.model": "gpt2", "len:tokenizer.ggml.tokens": 453, "at:448:tokenizer.ggml.tokens": "<|begin_of_text|>",
            "at:448:tokenizer.ggml.token_type": 3, "at:5:tokenizer.ggml.token_type": 1,
            "tokenizer.ggml.bos_token_id": 448, "tokenizer.ggml.add_bos_token": true,
        }),
    );
    for (quant, file_type) in [(Quant::F16, 1), (Quant::Q8_0, 7), (Quant::Q4KM, 15), (Quant::Q5KM, 17), (Quant::Q6K, 18)] {
        let out = tmp.path().join(format!("{quant:?}"));
        let r = export_gguf(&base, Some(&adapter), &out, quant).unwrap();
        assert!(r.path.ends_with(format!("llama3-{}.gguf", quant.label())), "{}", r.path.display());
        // The tiny model's rows (64, 128) are not whole 256-blocks: llama-quantize's fallbacks.
        let report = run_check(&["check", r.path.to_str().unwrap(), reference.to_str().unwrap(), expect.to_str().unwrap()]);
        let types = &report["tensors"];
        let want_q = match quant {
            Quant::F16 => "F16",
            Quant::Q8_0 | Quant::Q6K => "Q8_0",
            Quant::Q4KM => "Q5_0",
            Quant::Q5KM => "Q5_1",
        };
        assert_eq!(types["blk.0.attn_q.weight"]["type"], want_q, "{quant:?}: {report}");
        assert_eq!(types["blk.0.attn_norm.weight"]["type"], "F32");
        if quant != Quant::F16 {
            // Tied embeddings are the output matrix: q8_0 when rows are not 256-multiples.
            assert_eq!(types["token_embd.weight"]["type"], "Q8_0", "{quant:?}");
            assert_eq!(types["token_embd.weight"]["bytes_equal_gguf_py"], true);
        }
        let manifest: Value = serde_json::from_str(&std::fs::read_to_string(&r.manifest).unwrap()).unwrap();
        assert_eq!(manifest["file_type"], file_type);
        assert_eq!(manifest["tensor_count"], r.tensors);
        assert!(manifest["inputs"]["adapter/adapter_model.safetensors"].is_string());
        // Rows of 64 and 128 are whole q8_0 blocks; only the k-quant presets fall back.
        assert_eq!(r.fallbacks.is_empty(), matches!(quant, Quant::F16 | Quant::Q8_0), "{quant:?}: {:?}", r.fallbacks);
    }
}

#[test]
fn k_quants_of_a_wide_model_match_ggml_and_the_m_mixes() {
    // Draws from libtorch's global generator: hold the lock, so tests comparing dropout
    // masks across runs in other threads see no draws of ours in between.
    let _rng = torch_rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("wide");
    wide_model(&base);
    let expect = expect_file(tmp.path(), json!({"general.architecture": "llama", "llama.embedding_length": 256}));
    for quant in [Quant::Q4KM, Quant::Q5KM, Quant::Q6K] {
        let r = export_gguf(&base, None, &tmp.path().join(format!("{quant:?}.gguf")), quant).unwrap();
        assert!(r.fallbacks.is_empty(), "{quant:?}: {:?}", r.fallbacks);
        let report = run_check(&["check", r.path.to_str().unwrap(), base.to_str().unwrap(), expect.to_str().unwrap()]);
        println!("{quant:?}: k-quant bytes {}", report["kquant_bytes"]);
        let t = |n: &str| report["tensors"][n]["type"].as_str().unwrap().to_owned();
        let (main, other) = match quant {
            Quant::Q4KM => ("Q4_K", "Q6_K"),
            Quant::Q5KM => ("Q5_K", "Q6_K"),
            _ => ("Q6_K", "Q6_K"),
        };
        // llama-quantize's _M rule with 4 layers: attn_v and ffn_down of layers 2 and 3 get q6_K.
        for layer in 0..4 {
            let more = if layer >= 2 { other } else { main };
            assert_eq!(t(&format!("blk.{layer}.attn_v.weight")), more, "{quant:?} layer {layer}");
            assert_eq!(t(&format!("blk.{layer}.ffn_down.weight")), more, "{quant:?} layer {layer}");
            assert_eq!(t(&format!("blk.{layer}.attn_q.weight")), main);
            assert_eq!(t(&format!("blk.{layer}.ffn_up.weight")), main);
        }
        assert_eq!(t("token_embd.weight"), "Q6_K", "tied embeddings quantise as the output matrix");
        assert_eq!(t("output_norm.weight"), "F32");
    }
}

#[test]
fn the_modelfile_template_renders_like_the_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    for (family, stop) in [("llama3", "<|eot_id|>"), ("qwen2", "<|im_end|>")] {
        let out = tmp.path().join(family);
        let r = export_gguf(&fixture(&format!("models/{family}")), None, &out, Quant::F16).unwrap();
        let text = std::fs::read_to_string(&r.modelfile).unwrap();
        assert!(text.contains(&format!("FROM ./{}", r.path.file_name().unwrap().to_str().unwrap())), "{text}");
        assert!(text.contains(&format!("PARAMETER stop \"{stop}\"")), "{text}");
        let template = text.split("TEMPLATE \"\"\"").nth(1).unwrap().split("\"\"\"").next().unwrap();
        // Ollama fills .System and .Prompt; the reply starts where .Response is.
        let filled = template
            .replace("{{ if .System }}", "")
            .replace("{{ if .Prompt }}", "")
            .replace("{{ end }}", "")
            .replace("{{ .System }}", "Be brief.")
            .replace("{{ .Prompt }}", "Hello there");
        let filled = filled.split("{{ .Response }}").next().unwrap();
        let model_vocab = ModelConfig::load(&fixture(&format!("models/{family}"))).unwrap().vocab;
        let tok = ftx::model::TextTokenizer::load(&fixture(&format!("models/{family}")), model_vocab).unwrap();
        let msgs = [ftx::model::tokenizer::Message::new("system", "Be brief."), ftx::model::tokenizer::Message::new("user", "Hello there")];
        let hf = tok.render_chat(&msgs, true).unwrap();
        let hf = hf.strip_prefix(tok.bos_token.as_deref().unwrap_or("")).unwrap_or(&hf);
        assert_eq!(filled, hf, "{family}");
    }
}

#[test]
fn sharded_merged_export_reloads_and_matches_the_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("models/llama3");
    let adapter = fixture("peft/adapters/lora_llama3");
    let single = tmp.path().join("single");
    let sharded = tmp.path().join("sharded");
    ftx::export::export_merged(&base, &adapter, &single, Kind::Float).unwrap();
    let files = ftx::export::safetensors_out::export_merged_sharded(&base, Some(&adapter), &sharded, Kind::Float, 100_000).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    let index: Value = serde_json::from_str(&std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 20);
    assert!(!sharded.join("model.safetensors").exists());
    assert!(sharded.join("ftx-manifest.json").exists());
    let a = CausalLm::load(&single, CPU32).unwrap();
    let b = CausalLm::load(&sharded, CPU32).unwrap();
    for ((n, x), (_, y)) in a.named_tensors().iter().zip(b.named_tensors().iter()) {
        assert_eq!(max_diff(x, y), 0.0, "{n}");
    }
}
