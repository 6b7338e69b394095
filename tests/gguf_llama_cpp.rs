//! llama.cpp itself (llama-cpp-python, which tests/env.sh builds) runs the GGUF export of every
//! family ftx exports: it loads the f16 file under the family's llama.cpp architecture name,
//! its last-position logits of a prompt are close to ftx's and its greedy continuation is
//! ftx's; the q4_k_m file loads and its logits stay close within a looser tolerance.
//!
//! Tolerances, relative to ftx's logits at that position: f16 (f16 weights, and llama.cpp's
//! f16 rounding of activations in its f16 matmuls) within 1% of ftx's largest |logit| for
//! every token (measured: at most 0.2%); q4_k_m (on the tiny fixtures mostly q5_0 / q8_0
//! fallbacks, as their rows are not 256-element super-blocks; the wide models have real
//! q4_K / q6_K rows) a relative RMS error ‖Δ‖/‖logits‖ within 0.75 (measured 0.11 to 0.62,
//! the most where quantisation flips a MoE routing choice: quantised weights move tiny random
//! models' logits that much; that each quantised tensor holds the right values is checked
//! tensor by tensor in tests/gguf.rs and gguf_moe.rs). Greedy ids from the f16 file equal ftx's
//! at every step where ftx's top two logits are further apart than twice the f16 file's
//! measured max |Δlogit| (so f16 noise cannot flip them); past the first such near tie the two
//! continuations may part, so comparing stops there — after at least 2 tokens.

use crate::common::{fixture, max_diff, torch_rng_lock};
use crate::gguf::{python, run_check};
use ftx::export::gguf::{export_gguf, Quant};
use ftx::model::decoder::LoadOptions;
use ftx::model::{CausalLm, ModelConfig, TextTokenizer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const CPU32: LoadOptions = LoadOptions { device: Device::Cpu, kind: Kind::Float };
/// The prompt: longer than the fixtures' sliding windows (6) and Phi-4-mini's LongRoPE
/// pretraining context (8), so those paths are exercised.
const PROMPT: &str = "The quick brown fox jumps over the lazy dog, and then it runs far away.";
const NEW_TOKENS: usize = 6;
/// Largest |llama.cpp − ftx| over the vocabulary (f16), as a share of ftx's largest |logit|.
const F16_TOLERANCE: f64 = 0.01;
/// Largest ‖llama.cpp − ftx‖₂ / ‖ftx‖₂ over the vocabulary.
const Q4_K_M_TOLERANCE: f64 = 0.75;

/// What llama.cpp made of a GGUF file.
pub(crate) struct LlamaCppRun {
    /// llama.cpp's description of the model it loaded (`llama_model_desc`: architecture first).
    pub desc: String,
    /// Its greedy continuation.
    pub ids: Vec<u32>,
    /// The prompt's last-position logits.
    pub last_logits: Tensor,
}

/// Runs `path` in llama.cpp on `prompt`, `n` greedy tokens (tests/gguf_check.py `generate`,
/// which fails when llama-cpp-python is not installed).
pub(crate) fn llama_cpp(path: &Path, prompt: &[u32], n: usize) -> LlamaCppRun {
    let ids = prompt.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let r = run_check(&["generate", path.to_str().unwrap(), &ids, &n.to_string()]);
    let logits: Vec<f32> = r["last_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    LlamaCppRun {
        desc: r["desc"].as_str().unwrap_or_default().to_owned(),
        ids: r["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect(),
        last_logits: Tensor::from_slice(&logits),
    }
}

/// Checks `model` (+ `adapter`) exported as f16 and q4_k_m in llama.cpp against ftx running
/// the same model (the adapter loaded on the base, not merged: an independent path).
fn runs_in_llama_cpp_as_in_ftx(model: &Path, adapter: Option<&Path>, arch: &str) {
    runs_in_llama_cpp_as_in_ftx_within(model, adapter, arch, Q4_K_M_TOLERANCE);
}

/// [`runs_in_llama_cpp_as_in_ftx`] with another q4_k_m tolerance.
fn runs_in_llama_cpp_as_in_ftx_within(model: &Path, adapter: Option<&Path>, arch: &str, q4_k_m_tolerance: f64) {
    let tmp = tempfile::tempdir().unwrap();
    let mut ftx_model = CausalLm::load(model, CPU32).unwrap();
    if let Some(a) = adapter {
        ftx::peft::load_adapter(&mut ftx_model, a).unwrap();
    }
    let tok = TextTokenizer::load(model, ftx_model.config.vocab).unwrap();
    let prompt = tok.encode(PROMPT, true).unwrap();
    assert!(prompt.len() > 8, "{} tokens", prompt.len());
    let input = Tensor::from_slice(&prompt.iter().map(|&i| i as i64).collect::<Vec<_>>()).unsqueeze(0);
    let ours = tch::no_grad(|| ftx_model.forward(&input, None)).get(0).get(-1);
    let scale = ours.abs().max().double_value(&[]);
    let opts = ftx::model::generate::GenerateOptions { max_new_tokens: NEW_TOKENS, ..Default::default() };
    let our_ids = ftx::model::generate::generate(&ftx_model, &tok, &prompt, &opts, |_| {}).unwrap().ids;
    for (quant, tolerance) in [(Quant::F16, F16_TOLERANCE), (Quant::Q4KM, q4_k_m_tolerance)] {
        let r = export_gguf(model, adapter, &tmp.path().join(format!("{quant:?}")), quant).unwrap();
        let cpp = llama_cpp(&r.path, &prompt, NEW_TOKENS);
        assert_eq!(cpp.desc.split(' ').next(), Some(arch), "{}: llama.cpp loaded it as '{}'", model.display(), cpp.desc);
        let max_rel = max_diff(&ours, &cpp.last_logits) / scale;
        let rms_rel = (&ours - &cpp.last_logits).norm().double_value(&[]) / ours.norm().double_value(&[]);
        println!("{} {quant:?}: llama.cpp '{}', max |Δ| / max |logit| = {max_rel:.5}, ‖Δ‖/‖logits‖ = {rms_rel:.5}", model.display(), cpp.desc);
        let diff = if quant == Quant::F16 { max_rel } else { rms_rel };
        assert!(diff < tolerance, "{} {quant:?}: llama.cpp's logits differ from ftx's by {diff:.4} (> {tolerance})", model.display());
        if quant == Quant::F16 {
            let mut seq: Vec<i64> = prompt.iter().map(|&i| i as i64).collect();
            let mut compared = 0;
            for (&a, &b) in our_ids.iter().zip(&cpp.ids) {
                let logits = tch::no_grad(|| ftx_model.forward(&Tensor::from_slice(&seq).unsqueeze(0), None)).get(0).get(-1);
                let (top, _) = logits.topk(2, -1, true, true);
                let margin = top.double_value(&[0]) - top.double_value(&[1]);
                if margin < 2.0 * max_rel * scale {
                    break;
                }
                assert_eq!(a, b, "{}: greedy token {compared}, ftx vs llama.cpp (ftx's ids {our_ids:?}, llama.cpp's {:?})", model.display(), cpp.ids);
                compared += 1;
                seq.push(a as i64);
            }
            println!("{}: {compared} of {NEW_TOKENS} greedy tokens compared (ftx {our_ids:?}, llama.cpp {:?})", model.display(), cpp.ids);
            assert!(compared >= 2, "{}: only {compared} greedy tokens were clear of near ties", model.display());
        }
    }
}

/// A copy of fixture `name` with config.json keys replaced by `changes`.
fn fixture_with(name: &str, changes: Value, dir: &Path) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(fixture(&format!("models/{name}"))).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
        }
    }
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().extend(changes.as_object().unwrap().clone());
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    out
}

/// A random checkpoint of fixture `name`'s family and tokenizer, its config.json changed by
/// `changes`, weights N(0, `std`²) (wide enough models get real k-quant rows).
pub(crate) fn random_model(name: &str, changes: Value, std: f64, dir: &Path) -> PathBuf {
    let _rng = torch_rng_lock();
    let src = fixture(&format!("models/{name}"));
    let mut raw: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    raw.as_object_mut().unwrap().extend(changes.as_object().unwrap().clone());
    let cfg = ModelConfig::from_json(raw.clone(), &src.join("config.json")).unwrap();
    let model = CausalLm::random(cfg, CPU32, 11).unwrap();
    let _g = tch::no_grad_guard();
    for (n, t) in model.named_tensors() {
        if !n.ends_with("norm.weight") {
            let _ = t.shallow_clone().f_mul_scalar_(std / 0.02).unwrap();
        }
    }
    let out = dir.join(format!("{name}-random"));
    model.save_pretrained(&src, &out).unwrap();
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&raw).unwrap()).unwrap();
    out
}

#[test]
fn llama_cpp_runs_llama_exports_as_ftx_does() {
    runs_in_llama_cpp_as_in_ftx(&fixture("models/llama3"), Some(&fixture("peft/adapters/lora_llama3")), "llama");
    runs_in_llama_cpp_as_in_ftx(&fixture("models/llama2"), None, "llama");
    runs_in_llama_cpp_as_in_ftx(&fixture("models/llama2_spm"), None, "llama");
    runs_in_llama_cpp_as_in_ftx(&fixture("models/mistral"), None, "llama");
}

#[test]
fn llama_cpp_runs_qwen_exports_as_ftx_does() {
    runs_in_llama_cpp_as_in_ftx(&fixture("models/qwen2"), None, "qwen2");
    runs_in_llama_cpp_as_in_ftx(&fixture("models/qwen3"), None, "qwen3");
}

#[test]
fn llama_cpp_runs_gemma_exports_as_ftx_does() {
    let tmp = tempfile::tempdir().unwrap();
    // llama.cpp's gemma2 always reads its head from the embeddings: the fixture, tied.
    runs_in_llama_cpp_as_in_ftx(&fixture_with("gemma2", json!({"tie_word_embeddings": true}), tmp.path()), None, "gemma2");
    runs_in_llama_cpp_as_in_ftx(&fixture("models/gemma3"), None, "gemma3");
}

#[test]
fn llama_cpp_runs_phi_exports_as_ftx_does() {
    // llama.cpp's phi3 attends to the whole context (its sliding window is disabled, with a
    // warning; so does ftx's export): the fixture without its window of 6.
    let tmp = tempfile::tempdir().unwrap();
    runs_in_llama_cpp_as_in_ftx(&fixture_with("phi3", json!({"sliding_window": null}), tmp.path()), None, "phi3");
    runs_in_llama_cpp_as_in_ftx(&fixture("models/phi4mini"), None, "phi3");
}

#[test]
fn llama_cpp_runs_mixtral_with_merged_expert_and_router_lora_as_ftx_does() {
    runs_in_llama_cpp_as_in_ftx(&fixture("models/mixtral"), Some(&fixture("peft/adapters/lora_mixtral")), "llama");
    let tmp = tempfile::tempdir().unwrap();
    runs_in_llama_cpp_as_in_ftx(&crate::gguf_moe::fused_mixtral(tmp.path()), None, "llama");
}

#[test]
fn llama_cpp_runs_qwen3_moe_exports_as_ftx_does() {
    // The fixture has a dense middle layer and unnormalised routing, which llama.cpp's qwen3moe
    // cannot run (refused: tests/gguf_moe.rs); this one is Qwen3-MoE as released (every layer
    // sparse, norm_topk_prob on), wide enough for real q4_K / q6_K expert rows.
    let tmp = tempfile::tempdir().unwrap();
    let changes = json!({"mlp_only_layers": [], "norm_topk_prob": true, "hidden_size": 256, "moe_intermediate_size": 256,
                         "intermediate_size": 512, "head_dim": 64});
    runs_in_llama_cpp_as_in_ftx(&random_model("qwen3_moe", changes, 0.05, tmp.path()), None, "qwen3moe");
}

#[test]
fn llama_cpp_runs_gpt_oss_exports_as_ftx_does() {
    // llama.cpp's gpt-oss computes the experts' SwiGLU with the released clamp (7; the fixture's
    // 2 is refused, tests/gpt_oss.rs) and always rounds YaRN's correction range to whole
    // dimensions (`truncate: true`; the fixture's false is checked below): the fixture so; then
    // with PEFT's own adapter on q_proj, the router and both fused expert tensors
    // (target_parameters) merged in; then with its experts stored as MXFP4.
    let tmp = tempfile::tempdir().unwrap();
    let yarn = |truncate: bool| {
        json!({"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
               "truncate": truncate, "original_max_position_embeddings": 64})
    };
    let changes = json!({"swiglu_limit": 7.0, "rope_parameters": yarn(true)});
    let model = fixture_with("gpt_oss", changes.clone(), tmp.path());
    runs_in_llama_cpp_as_in_ftx(&model, None, "gpt-oss");
    let adapter = tmp.path().join("peft_experts");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(fixture("peft/lora_gpt_oss_experts_init.safetensors"), adapter.join("adapter_model.safetensors")).unwrap();
    let meta = crate::common::json("peft/lora_gpt_oss_experts.json");
    let mut config = meta["peft_config"].clone();
    config.as_object_mut().unwrap().extend(json!({"peft_type": "LORA", "r": meta["r"], "lora_alpha": meta["alpha"]}).as_object().unwrap().clone());
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    // q4_k_m (rows of 64: q5_0 / q8_0 fallbacks) of this 3-layer model under a large random
    // adapter, or with random MXFP4 experts, flips many top-2 routing choices: it loads and
    // runs, its logits within ‖Δ‖/‖logits‖ < 1 (measured 0.79 and 0.73; the plain fixture 0.68);
    // the wide model below holds the q4_k_m check proper (measured 0.34).
    runs_in_llama_cpp_as_in_ftx_within(&model, Some(&adapter), "gpt-oss", 1.0);
    runs_in_llama_cpp_as_in_ftx_within(&fixture_with("gpt_oss_mxfp4", changes.clone(), tmp.path()), None, "gpt-oss", 1.0);
    // Rows of 256: real q4_K / q6_K expert rows.
    let wide = json!({"swiglu_limit": 7.0, "rope_parameters": yarn(true), "hidden_size": 256, "intermediate_size": 256, "head_dim": 64});
    runs_in_llama_cpp_as_in_ftx(&random_model("gpt_oss", wide, 0.05, tmp.path()), None, "gpt-oss");

    // gpt-oss's own `truncate: false` exports (with a warning) and llama.cpp runs it as the
    // truncated YaRN: within the f16 tolerance of ftx with `truncate: true`, not of ftx as
    // configured (the fixture's 8 frequencies make the blend's difference large).
    let untruncated = tmp.path().join("untruncated");
    std::fs::create_dir_all(&untruncated).unwrap();
    let model = fixture_with("gpt_oss", json!({"swiglu_limit": 7.0, "rope_parameters": yarn(false)}), &untruncated);
    let r = export_gguf(&model, None, &untruncated.join("gguf"), Quant::F16).unwrap();
    let tok = TextTokenizer::load(&model, ModelConfig::load(&model).unwrap().vocab).unwrap();
    let prompt = tok.encode(PROMPT, true).unwrap();
    let cpp = llama_cpp(&r.path, &prompt, 1);
    let input = Tensor::from_slice(&prompt.iter().map(|&i| i as i64).collect::<Vec<_>>()).unsqueeze(0);
    let ftx_last = |truncate: bool| {
        let mut cfg = ModelConfig::load(&model).unwrap();
        match &mut cfg.rope_scaling {
            ftx::model::RopeScaling::Yarn { truncate: t, .. } => *t = truncate,
            other => panic!("{other:?}"),
        }
        let m = CausalLm::from_weights(cfg, &ftx::model::weights::WeightFiles::open(&model).unwrap(), CPU32).unwrap();
        tch::no_grad(|| m.forward(&input, None)).get(0).get(-1)
    };
    let (as_configured, as_truncated) = (ftx_last(false), ftx_last(true));
    let rel = |ours: &Tensor| max_diff(ours, &cpp.last_logits) / ours.abs().max().double_value(&[]);
    let (configured, truncated) = (rel(&as_configured), rel(&as_truncated));
    println!("gpt-oss truncate: false in llama.cpp: max |Δ| / max |logit| {configured:.4} vs ftx as configured, {truncated:.4} vs ftx truncated");
    assert!(truncated < F16_TOLERANCE, "llama.cpp vs ftx with truncated YaRN: {truncated}");
}

#[test]
fn llama_cpp_runs_wide_k_quant_llama_as_ftx_does() {
    // Rows of 256 and 512: the q4_k_m file holds real q4_K / q6_K blocks.
    let tmp = tempfile::tempdir().unwrap();
    let changes = json!({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "head_dim": 64});
    runs_in_llama_cpp_as_in_ftx(&random_model("llama3", changes, 0.05, tmp.path()), None, "llama");
}

#[test]
fn llama_cpp_python_is_installed_where_the_tests_run() {
    // The checks above need it; a missing install fails here with what to do, not in a skip.
    let o = std::process::Command::new(python()).args(["-c", "import llama_cpp; print(llama_cpp.__version__)"]).output().unwrap();
    assert!(
        o.status.success(),
        "{}: llama-cpp-python is not installed; run tests/env.sh (it builds it once):\n{}",
        python().display(),
        String::from_utf8_lossy(&o.stderr)
    );
}
