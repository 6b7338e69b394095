//! Mixture-of-experts layers in GGUF, as llama.cpp's `convert_hf_to_gguf.py` writes them:
//! the router as `blk.N.ffn_gate_inp.weight` (kept f32) and each projection's experts stacked
//! into one 3-D tensor, `blk.N.ffn_{gate,up,down}_exps.weight` of PyTorch shape
//! `[experts, rows, cols]` (ggml `{cols, rows, experts}`), with the expert counts as metadata.
//!
//! Mixtral loads as llama.cpp's `llama` architecture (which turns MoE on when
//! `llama.expert_count` is set), Qwen3-MoE as `qwen3moe`, gpt-oss as `gpt-oss` (its fused,
//! biased experts split and transposed as convert_hf_to_gguf's GptOssModel does for bf16
//! checkpoints; f16 / q8_0 / k-quant experts, which llama.cpp runs as well as its MXFP4). Both read every layer as a MoE layer
//! and renormalise the top-k routing weights; checkpoints that differ (Qwen3-MoE's dense
//! `mlp_only_layers`, `norm_topk_prob: false`) are refused rather than written into a file
//! llama.cpp would run as a different model.

use super::format::Value;
use crate::model::{Family, ModelConfig};
use std::collections::{HashMap, HashSet};

/// Why a mixture-of-experts checkpoint cannot become a GGUF file llama.cpp runs faithfully.
#[derive(Debug, thiserror::Error)]
pub enum MoeGgufError {
    /// llama.cpp's architecture for the family computes something the checkpoint does not.
    #[error("{0}; export merged safetensors instead (ftx export --format merged)")]
    Unsupported(String),
    /// The checkpoint lacks an expert tensor of a MoE layer, in both layouts ftx reads.
    #[error("layer {layer}: {missing} is missing (nor does the checkpoint have transformers 5's fused {fused}): is the checkpoint complete?")]
    MissingExperts { layer: usize, missing: String, fused: String },
    /// An expert tensor's shape is not what config.json implies.
    #[error("{name} has shape {got:?}, but config.json implies {want:?}")]
    Shape { name: String, got: Vec<i64>, want: Vec<i64> },
}

/// Where one stacked expert tensor's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertSource {
    /// One 2-D checkpoint tensor per expert (the Hub layout), in expert order.
    PerExpert(Vec<String>),
    /// transformers 5's fused `[experts, rows, cols]` tensor: rows `start..start + len` of
    /// each expert's matrix (the gate or up half of `gate_up_proj`), or all of them.
    Fused { hf: String, rows: Option<(i64, i64)> },
    /// gpt-oss's fused `[experts, in, out]` tensors (and `[experts, out]` biases): each
    /// expert's last axis, whole or every other entry from `from` (gate_up_proj interleaves
    /// gate, even, and up, odd), its matrix transposed to llama.cpp's `[out, in]` rows.
    Strided { hf: String, from: Option<i64> },
}

/// One stacked expert tensor of the GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertTensor {
    /// GGUF name (`blk.N.ffn_gate_exps.weight`, …).
    pub name: String,
    /// PyTorch shape, `[experts, rows, cols]`.
    pub shape: Vec<i64>,
    pub source: ExpertSource,
}

/// The stacked expert tensors of a checkpoint, and the checkpoint tensors they consume.
#[derive(Debug, Default)]
pub struct ExpertPlan {
    pub tensors: Vec<ExpertTensor>,
    pub consumed: HashSet<String>,
}

/// Refuses MoE checkpoints llama.cpp's architecture for the family would run differently.
pub fn check_llama_cpp_runs_it(cfg: &ModelConfig) -> Result<(), MoeGgufError> {
    let Some(moe) = &cfg.moe else { return Ok(()) };
    match cfg.family {
        // llama.cpp's llama: softmax over the top-k router logits, every layer MoE.
        Family::Mixtral => Ok(()),
        // llama.cpp's gpt-oss: its SwiGLU's gain and clamp are the released checkpoints'
        // constants (llama-graph.cpp, LLM_FFN_SWIGLU_OAI_MOE), and it reads an output matrix.
        Family::GptOss => {
            let num = |k: &str, default: f64| cfg.raw.get(k).and_then(serde_json::Value::as_f64).unwrap_or(default);
            let (alpha, limit) = (num("swiglu_alpha", 1.702), num("swiglu_limit", 7.0));
            if (alpha - 1.702).abs() > 1e-6 || (limit - 7.0).abs() > 1e-6 {
                return Err(MoeGgufError::Unsupported(format!(
                    "config.json sets swiglu_alpha {alpha} / swiglu_limit {limit}, but llama.cpp's gpt-oss architecture \
                     computes the experts' activation with the released checkpoints' 1.702 / 7.0, so it would run a different model"
                )));
            }
            if cfg.sliding_window.is_none() || !cfg.layer_spans.contains(&crate::model::AttnSpan::Sliding) {
                // Its graph builds the interleaved sliding/full KV cache and aborts without one.
                return Err(MoeGgufError::Unsupported(
                    "no layer of this gpt-oss slides (sliding_window / layer_types), but llama.cpp's gpt-oss architecture \
                     needs sliding-window layers (it aborts on a model without any)"
                        .into(),
                ));
            }
            if cfg.tie_embeddings {
                return Err(MoeGgufError::Unsupported(
                    "config.json ties the head to the embeddings, but llama.cpp's gpt-oss architecture reads a separate output matrix".into(),
                ));
            }
            Ok(())
        }
        Family::Qwen3Moe => {
            let dense: Vec<usize> = moe.sparse_layers.iter().enumerate().filter(|(_, s)| !**s).map(|(i, _)| i).collect();
            if !dense.is_empty() {
                return Err(MoeGgufError::Unsupported(format!(
                    "layers {dense:?} have a dense MLP (mlp_only_layers / decoder_sparse_step), but llama.cpp's qwen3moe \
                     architecture runs every layer as a mixture of experts"
                )));
            }
            if !moe.norm_topk_prob {
                return Err(MoeGgufError::Unsupported(
                    "config.json sets norm_topk_prob to false, but llama.cpp's qwen3moe architecture always renormalises \
                     the top-k routing weights (as Qwen3-MoE's released checkpoints do), so it would compute a different model"
                        .into(),
                ));
            }
            Ok(())
        }
        other => Err(MoeGgufError::Unsupported(format!("GGUF export of {other:?} mixture-of-experts models is not implemented"))),
    }
}

/// The MoE metadata llama.cpp reads (`{arch}.expert_count`, …), as convert_hf_to_gguf writes it.
pub fn metadata(cfg: &ModelConfig, arch: &str) -> Vec<(String, Value)> {
    let Some(moe) = &cfg.moe else { return Vec::new() };
    let mut kv = vec![
        (format!("{arch}.expert_count"), Value::U32(moe.experts as u32)),
        (format!("{arch}.expert_used_count"), Value::U32(moe.top_k as u32)),
    ];
    if matches!(cfg.family, Family::Qwen3Moe | Family::GptOss) {
        // Mixtral's experts are `feed_forward_length` wide; Qwen3-MoE's have their own width.
        kv.push((format!("{arch}.expert_feed_forward_length"), Value::U32(moe.expert_intermediate as u32)));
    }
    kv
}

/// Plans the stacked expert tensors of every MoE layer from the checkpoint's tensors
/// (`shapes`: name → shape), per-expert tensors first, else transformers 5's fused ones.
pub fn plan(cfg: &ModelConfig, shapes: &HashMap<String, Vec<i64>>) -> Result<ExpertPlan, MoeGgufError> {
    let mut out = ExpertPlan::default();
    let Some(moe) = &cfg.moe else { return Ok(out) };
    let (e, h, inter) = (moe.experts, cfg.hidden, moe.expert_intermediate);
    let check = |name: &str, want: &[i64]| -> Result<(), MoeGgufError> {
        match shapes.get(name) {
            Some(got) if got == want => Ok(()),
            got => Err(MoeGgufError::Shape { name: name.into(), got: got.cloned().unwrap_or_default(), want: want.to_vec() }),
        }
    };
    if cfg.family == Family::GptOss {
        return plan_gpt_oss(cfg.layers, e, h, inter, shapes, check);
    }
    let [g, u, d] = moe.naming.projections();
    // (GGUF tensor, projection name, matrix shape).
    let projections = [("ffn_gate_exps", g, [inter, h]), ("ffn_up_exps", u, [inter, h]), ("ffn_down_exps", d, [h, inter])];
    for (layer, _) in moe.sparse_layers.iter().enumerate().filter(|(_, s)| **s) {
        let prefix = format!("model.layers.{layer}.{}", moe.naming.prefix());
        let per_expert = |proj: &str| -> Vec<String> { (0..e).map(|x| format!("{prefix}.experts.{x}.{proj}.weight")).collect() };
        let fused = format!("model.layers.{layer}.mlp.experts");
        let (gate_up, down) = (format!("{fused}.gate_up_proj"), format!("{fused}.down_proj"));
        let first = per_expert(g).swap_remove(0);
        if shapes.contains_key(&first) {
            for (gguf, proj, shape) in projections {
                let names = per_expert(proj);
                for n in &names {
                    if !shapes.contains_key(n) {
                        return Err(MoeGgufError::MissingExperts { layer, missing: n.clone(), fused: gate_up.clone() });
                    }
                    check(n, &shape)?;
                }
                out.consumed.extend(names.iter().cloned());
                let stacked = vec![e, shape[0], shape[1]];
                out.tensors.push(ExpertTensor { name: format!("blk.{layer}.{gguf}.weight"), shape: stacked, source: ExpertSource::PerExpert(names) });
            }
        } else if shapes.contains_key(&gate_up) && shapes.contains_key(&down) {
            check(&gate_up, &[e, 2 * inter, h])?;
            check(&down, &[e, h, inter])?;
            // gate_up_proj holds the gate rows first, then the up rows (modeling_mixtral / qwen3_moe).
            let parts = [("ffn_gate_exps", &gate_up, Some((0, inter)), [inter, h]), ("ffn_up_exps", &gate_up, Some((inter, inter)), [inter, h]), ("ffn_down_exps", &down, None, [h, inter])];
            for (gguf, hf, rows, shape) in parts {
                let source = ExpertSource::Fused { hf: hf.clone(), rows };
                out.tensors.push(ExpertTensor { name: format!("blk.{layer}.{gguf}.weight"), shape: vec![e, shape[0], shape[1]], source });
            }
            out.consumed.extend([gate_up, down]);
        } else {
            return Err(MoeGgufError::MissingExperts { layer, missing: first, fused: gate_up });
        }
    }
    Ok(out)
}

/// gpt-oss's experts as convert_hf_to_gguf's GptOssModel writes a bf16 checkpoint's: each
/// layer's `gate_up_proj [E, H, 2I]` split into `ffn_gate_exps` (even columns) and
/// `ffn_up_exps` (odd), `down_proj [E, I, H]` as `ffn_down_exps`, each transposed to `[E, out,
/// in]`, and their biases split the same way (`….bias`, `[E, out]`).
fn plan_gpt_oss(
    layers: usize,
    e: i64,
    h: i64,
    inter: i64,
    shapes: &HashMap<String, Vec<i64>>,
    check: impl Fn(&str, &[i64]) -> Result<(), MoeGgufError>,
) -> Result<ExpertPlan, MoeGgufError> {
    let mut out = ExpertPlan::default();
    for layer in 0..layers {
        let p = format!("model.layers.{layer}.mlp.experts");
        let [gate_up, down, gate_up_bias, down_bias] = ["gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"].map(|n| format!("{p}.{n}"));
        if !shapes.contains_key(&gate_up) {
            return Err(MoeGgufError::MissingExperts { layer, missing: gate_up.clone(), fused: gate_up });
        }
        check(&gate_up, &[e, h, 2 * inter])?;
        check(&down, &[e, inter, h])?;
        check(&gate_up_bias, &[e, 2 * inter])?;
        check(&down_bias, &[e, h])?;
        let parts = [
            ("ffn_gate_exps.weight", &gate_up, Some(0), vec![e, inter, h]),
            ("ffn_up_exps.weight", &gate_up, Some(1), vec![e, inter, h]),
            ("ffn_down_exps.weight", &down, None, vec![e, h, inter]),
            ("ffn_gate_exps.bias", &gate_up_bias, Some(0), vec![e, inter]),
            ("ffn_up_exps.bias", &gate_up_bias, Some(1), vec![e, inter]),
            ("ffn_down_exps.bias", &down_bias, None, vec![e, h]),
        ];
        for (gguf, hf, from, shape) in parts {
            out.tensors.push(ExpertTensor { name: format!("blk.{layer}.{gguf}"), shape, source: ExpertSource::Strided { hf: hf.clone(), from } });
        }
        out.consumed.extend([gate_up, down, gate_up_bias, down_bias]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mixtral(experts: i64) -> ModelConfig {
        let raw = json!({"architectures": ["MixtralForCausalLM"], "hidden_size": 8, "intermediate_size": 4,
            "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 16,
            "num_local_experts": experts, "num_experts_per_tok": 2});
        ModelConfig::from_json(raw, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn per_expert_tensors_stack_in_expert_order_and_fused_ones_split_gate_from_up() {
        let cfg = mixtral(3);
        let mut shapes = HashMap::new();
        for layer in 0..2 {
            for x in 0..3 {
                let p = format!("model.layers.{layer}.block_sparse_moe.experts.{x}");
                shapes.insert(format!("{p}.w1.weight"), vec![4, 8]);
                shapes.insert(format!("{p}.w3.weight"), vec![4, 8]);
                shapes.insert(format!("{p}.w2.weight"), vec![8, 4]);
            }
        }
        let p = plan(&cfg, &shapes).unwrap();
        assert_eq!(p.tensors.len(), 6);
        assert_eq!(p.consumed.len(), 18);
        let down = &p.tensors[2];
        assert_eq!(down.name, "blk.0.ffn_down_exps.weight");
        assert_eq!(down.shape, vec![3, 8, 4]);
        let want: Vec<String> = (0..3).map(|x| format!("model.layers.0.block_sparse_moe.experts.{x}.w2.weight")).collect();
        assert_eq!(down.source, ExpertSource::PerExpert(want));
        assert_eq!(p.tensors[4].name, "blk.1.ffn_up_exps.weight");

        let mut fused = HashMap::new();
        for layer in 0..2 {
            fused.insert(format!("model.layers.{layer}.mlp.experts.gate_up_proj"), vec![3, 8, 8]);
            fused.insert(format!("model.layers.{layer}.mlp.experts.down_proj"), vec![3, 8, 4]);
        }
        let p = plan(&cfg, &fused).unwrap();
        let up = &p.tensors[1];
        assert_eq!((up.name.as_str(), up.shape.as_slice()), ("blk.0.ffn_up_exps.weight", &[3, 4, 8][..]));
        assert_eq!(up.source, ExpertSource::Fused { hf: "model.layers.0.mlp.experts.gate_up_proj".into(), rows: Some((4, 4)) });

        fused.remove("model.layers.1.mlp.experts.down_proj");
        let e = plan(&cfg, &fused).unwrap_err().to_string();
        assert!(e.contains("layer 1") && e.contains("experts.0.w1.weight") && e.contains("gate_up_proj"), "{e}");
        fused.insert("model.layers.1.mlp.experts.down_proj".into(), vec![3, 4, 8]);
        let e = plan(&cfg, &fused).unwrap_err().to_string();
        assert!(e.contains("down_proj has shape [3, 4, 8]") && e.contains("[3, 8, 4]"), "{e}");
    }

    #[test]
    fn gpt_oss_runs_in_llama_cpp_only_with_its_released_constants_sliding_layers_and_own_head() {
        let cfg = |extra: serde_json::Value| {
            let mut r = json!({"architectures": ["GptOssForCausalLM"], "hidden_size": 64, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                "vocab_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2});
            r.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            ModelConfig::from_json(r, std::path::Path::new("config.json")).unwrap()
        };
        check_llama_cpp_runs_it(&cfg(json!({}))).unwrap();
        let refused = |extra: serde_json::Value, what: &str| {
            let e = check_llama_cpp_runs_it(&cfg(extra)).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("--format merged"), "{e}");
        };
        refused(json!({"swiglu_limit": 2.0}), "swiglu_limit 2");
        refused(json!({"swiglu_alpha": 1.0}), "swiglu_alpha 1");
        refused(json!({"layer_types": ["full_attention", "full_attention"]}), "slides");
        refused(json!({"tie_word_embeddings": true}), "output matrix");
        let kv = metadata(&cfg(json!({})), "gpt-oss");
        assert!(kv.contains(&("gpt-oss.expert_feed_forward_length".into(), Value::U32(32))), "{kv:?}");
    }

    #[test]
    fn qwen3_moe_with_dense_layers_or_unnormalised_routing_is_refused() {
        let raw = |extra: serde_json::Value| {
            let mut r = json!({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 8, "intermediate_size": 4,
                "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 3, "vocab_size": 16, "head_dim": 4,
                "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 2, "norm_topk_prob": true});
            r.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            ModelConfig::from_json(r, std::path::Path::new("config.json")).unwrap()
        };
        check_llama_cpp_runs_it(&raw(json!({}))).unwrap();
        let e = check_llama_cpp_runs_it(&raw(json!({"mlp_only_layers": [1]}))).unwrap_err().to_string();
        assert!(e.contains("layers [1]") && e.contains("--format merged"), "{e}");
        let e = check_llama_cpp_runs_it(&raw(json!({"norm_topk_prob": false}))).unwrap_err().to_string();
        assert!(e.contains("norm_topk_prob") && e.contains("--format merged"), "{e}");
        let kv = metadata(&raw(json!({})), "qwen3moe");
        assert!(kv.contains(&("qwen3moe.expert_feed_forward_length".into(), Value::U32(2))), "{kv:?}");
        assert!(kv.contains(&("qwen3moe.expert_used_count".into(), Value::U32(2))), "{kv:?}");
    }
}
