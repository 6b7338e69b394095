//! GGUF export of mixture-of-experts models, read back by llama.cpp's own Python reader
//! (gguf-py): llama.cpp's tensor names (router `ffn_gate_inp`, experts stacked into 3-D
//! `ffn_{gate,up,down}_exps`), its MoE metadata, every tensor dequantised equal to the merged
//! weights (LoRA on experts and router folded in) within its type's tolerance, and
//! llama-quantize's type choices. Checkpoints llama.cpp would run differently are refused.

use crate::gguf::{expect_file, merged_reference, python, run_check};
use crate::gguf_llama_cpp::random_model;
use ftx::export::gguf::{export_gguf, Quant};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// gguf_check.py's `check` of `file` against `reference`, without asserting it passed.
fn check_report(file: &Path, reference: &Path, expect: &Path) -> (bool, Value) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/gguf_check.py");
    let o = Command::new(python()).arg(script).args(["check", file.to_str().unwrap(), reference.to_str().unwrap(), expect.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    (o.status.success(), serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}")))
}

#[test]
fn mixtral_gguf_stacks_lora_merged_experts_that_gguf_py_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let base = crate::common::fixture("models/mixtral");
    let adapter = crate::common::fixture("peft/adapters/lora_mixtral");
    let reference = tmp.path().join("ref");
    merged_reference(&base, Some(&adapter), &reference);
    let expect = expect_file(
        tmp.path(),
        json!({"general.architecture": "llama", "llama.expert_count": 4, "llama.expert_used_count": 2,
               "llama.feed_forward_length": 32, "llama.block_count": 2, "llama.rope.freq_base": 1e6}),
    );
    for quant in [Quant::F16, Quant::Q8_0, Quant::Q4KM] {
        // Through the CLI, as a user runs it.
        let out = tmp.path().join(format!("mixtral-{}.gguf", quant.label()));
        let o = Command::new(env!("CARGO_BIN_EXE_ftx"))
            .args(["export", "--model", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--format", "gguf"])
            .args(["--quant", &quant.label().to_ascii_lowercase(), "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{quant:?}: {}", String::from_utf8_lossy(&o.stderr));
        let report = run_check(&["check", out.to_str().unwrap(), reference.to_str().unwrap(), expect.to_str().unwrap()]);
        let ty = |n: &str| report["tensors"][n]["type"].as_str().unwrap_or_else(|| panic!("{n} missing: {report}")).to_owned();
        // 2 layers, 6 stacked expert tensors, 2 routers, no per-expert tensor left over.
        let names: Vec<&String> = report["tensors"].as_object().unwrap().keys().collect();
        assert_eq!(names.iter().filter(|n| n.contains("_exps.")).count(), 6, "{names:?}");
        assert!(!names.iter().any(|n| n.contains("experts")), "{names:?}");
        assert_eq!(ty("blk.1.ffn_gate_inp.weight"), "F32", "{quant:?}: routers stay f32");
        let (gate, down0, down1) = match quant {
            Quant::F16 => ("F16", "F16", "F16"),
            Quant::Q8_0 => ("Q8_0", "Q8_0", "Q8_0"),
            // Rows of 64 / 32 fall back from q4_K to q5_0; ffn_down of the last layer gets
            // q6_K (use_more_bits), which falls back to q8_0.
            _ => ("Q5_0", "Q5_0", "Q8_0"),
        };
        assert_eq!((ty("blk.0.ffn_gate_exps.weight").as_str(), ty("blk.0.ffn_down_exps.weight").as_str(), ty("blk.1.ffn_down_exps.weight").as_str()), (gate, down0, down1), "{quant:?}");
        let manifest: Value = serde_json::from_str(&std::fs::read_to_string(out.with_extension("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["architecture"], "llama");
        // 2 layers × (4 attention projections + router + 4 experts × 3 projections).
        assert_eq!(manifest["adapted_modules"], 34);
    }
    // The merge is load-bearing: the same f16 file is not the base model's experts or router.
    let base_ref = tmp.path().join("base-ref");
    merged_reference(&base, None, &base_ref);
    let (ok, report) = check_report(&tmp.path().join("mixtral-F16.gguf"), &base_ref, &expect);
    let problems = report["problems"].to_string();
    assert!(!ok && problems.contains("blk.0.ffn_gate_exps.weight") && problems.contains("blk.1.ffn_gate_inp.weight"), "{report}");
}

/// models/mixtral_fused (models/mixtral in transformers 5's fused layout, weights and config
/// only) with models/mixtral's tokenizer beside it, in `dir`.
pub(crate) fn fused_mixtral(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("mixtral_fused");
    std::fs::create_dir_all(&out).unwrap();
    for (model, files) in [("mixtral_fused", &["config.json", "model.safetensors"][..]), ("mixtral", &["tokenizer.json", "tokenizer_config.json", "generation_config.json"][..])] {
        for f in files {
            std::fs::copy(crate::common::fixture(&format!("models/{model}/{f}")), out.join(f)).unwrap();
        }
    }
    out
}

#[test]
fn fused_expert_checkpoints_export_the_same_tensors_as_per_expert_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let expect = expect_file(tmp.path(), json!({"general.architecture": "llama", "llama.expert_count": 4}));
    let mut reports = Vec::new();
    for base in [crate::common::fixture("models/mixtral"), fused_mixtral(tmp.path())] {
        let name = base.file_name().unwrap().to_str().unwrap().to_owned();
        let r = export_gguf(&base, None, &tmp.path().join(name), Quant::Q8_0).unwrap();
        // Each against the per-expert checkpoint: gguf_check.py stacks its experts itself.
        reports.push(run_check(&["check", r.path.to_str().unwrap(), crate::common::fixture("models/mixtral").to_str().unwrap(), expect.to_str().unwrap()]));
    }
    assert_eq!(reports[0]["tensors"], reports[1]["tensors"], "same types, errors and bytes verdicts");
    assert_eq!(reports[1]["tensors"]["blk.0.ffn_up_exps.weight"]["bytes_equal_gguf_py"], true);
}

#[test]
fn qwen3_moe_gguf_is_qwen3moe_with_expert_widths_and_k_quant_experts() {
    let tmp = tempfile::tempdir().unwrap();
    // Qwen3-MoE as released (every layer sparse, renormalised routing), rows of 256 and 512.
    let changes = json!({"mlp_only_layers": [], "norm_topk_prob": true, "hidden_size": 256, "moe_intermediate_size": 256,
                         "intermediate_size": 512, "head_dim": 64, "num_hidden_layers": 4});
    let base = random_model("qwen3_moe", changes, 0.02, tmp.path());
    let expect = expect_file(
        tmp.path(),
        json!({"general.architecture": "qwen3moe", "qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2,
               "qwen3moe.expert_feed_forward_length": 256, "qwen3moe.feed_forward_length": 512,
               "qwen3moe.attention.key_length": 64, "qwen3moe.block_count": 4}),
    );
    let r = export_gguf(&base, None, &tmp.path().join("q"), Quant::Q4KM).unwrap();
    assert!(r.fallbacks.is_empty(), "{:?}", r.fallbacks);
    // k-quant bytes are compared with libggml's own quantiser here (gguf_check.py).
    let report = run_check(&["check", r.path.to_str().unwrap(), base.to_str().unwrap(), expect.to_str().unwrap()]);
    let ty = |n: &str| report["tensors"][n]["type"].as_str().unwrap_or_else(|| panic!("{n} missing: {report}")).to_owned();
    for layer in 0..4 {
        // llama-quantize's _M rule with 4 layers: ffn_down of layers 2 and 3 get q6_K.
        let down = if layer >= 2 { "Q6_K" } else { "Q4_K" };
        assert_eq!(ty(&format!("blk.{layer}.ffn_down_exps.weight")), down, "layer {layer}");
        assert_eq!(ty(&format!("blk.{layer}.ffn_gate_exps.weight")), "Q4_K");
        assert_eq!(ty(&format!("blk.{layer}.ffn_up_exps.weight")), "Q4_K");
        assert_eq!(ty(&format!("blk.{layer}.ffn_gate_inp.weight")), "F32");
        assert_eq!(ty(&format!("blk.{layer}.attn_k_norm.weight")), "F32");
        assert_eq!(report["tensors"][format!("blk.{layer}.ffn_down_exps.weight")]["bytes_differing_from_ggml"], 0);
    }
}

#[test]
fn moe_checkpoints_llama_cpp_would_run_differently_are_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    // The fixture: a dense middle layer (mlp_only_layers) and unnormalised top-k routing.
    let e = format!("{:#}", export_gguf(&crate::common::fixture("models/qwen3_moe"), None, &tmp.path().join("q"), Quant::F16).unwrap_err());
    assert!(e.contains("qwen3_moe") && e.contains("layers [1]") && e.contains("--format merged"), "{e}");
    let o = Command::new(env!("CARGO_BIN_EXE_ftx"))
        .args(["export", "--model", crate::common::fixture("models/qwen3_moe").to_str().unwrap(), "--format", "gguf", "--out"])
        .arg(tmp.path().join("cli"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("qwen3moe architecture runs every layer"), "{stderr}");
    assert!(!tmp.path().join("cli").exists() || std::fs::read_dir(tmp.path().join("cli")).unwrap().next().is_none(), "nothing written");
}
