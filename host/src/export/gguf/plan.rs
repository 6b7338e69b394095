//! Which GGUF tensors a checkpoint becomes, under which names and ggml types: llama.cpp's
//! tensor names for llama-family decoders, its Q/K row permutation for the `llama`
//! architecture, and `llama-quantize`'s per-tensor type choices for each preset.

use super::quants::GgmlType;
use crate::model::{Family, ModelConfig};
use tch::Tensor;

/// The quantisation presets `ftx export --format gguf --quant` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    F16,
    Q8_0,
    Q4KM,
    Q5KM,
    Q6K,
}

impl std::str::FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" => Quant::F16,
            "q8_0" => Quant::Q8_0,
            "q4_k_m" => Quant::Q4KM,
            "q5_k_m" => Quant::Q5KM,
            "q6_k" => Quant::Q6K,
            other => return Err(format!("unknown GGUF quantisation '{other}': use f16, q8_0, q4_k_m, q5_k_m or q6_k")),
        })
    }
}

impl Quant {
    /// llama.cpp's `llama_ftype` number (`general.file_type`).
    pub fn file_type(self) -> u32 {
        match self {
            Quant::F16 => 1,
            Quant::Q8_0 => 7,
            Quant::Q4KM => 15,
            Quant::Q5KM => 17,
            Quant::Q6K => 18,
        }
    }

    /// The preset's name as llama.cpp spells it in file names.
    pub fn label(self) -> &'static str {
        match self {
            Quant::F16 => "F16",
            Quant::Q8_0 => "Q8_0",
            Quant::Q4KM => "Q4_K_M",
            Quant::Q5KM => "Q5_K_M",
            Quant::Q6K => "Q6_K",
        }
    }

    fn default_type(self) -> GgmlType {
        match self {
            Quant::F16 => GgmlType::F16,
            Quant::Q8_0 => GgmlType::Q8_0,
            Quant::Q4KM => GgmlType::Q4K,
            Quant::Q5KM => GgmlType::Q5K,
            Quant::Q6K => GgmlType::Q6K,
        }
    }
}

/// llama.cpp's architecture name for a family (Mistral loads as `llama`).
pub fn arch_name(family: Family) -> &'static str {
    match family {
        Family::Llama | Family::Mistral | Family::Mixtral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
        Family::Qwen3Moe => "qwen3moe",
        Family::Gemma2 => "gemma2",
        Family::Gemma3 => "gemma3",
        Family::Phi3 => "phi3",
        Family::GptOss => "gpt-oss",
    }
}

/// The GGUF name of a Hugging Face tensor of `family` (Gemma's four norms a layer have
/// names of their own), or None for tensors llama.cpp does not read.
pub fn gguf_name_for(family: Family, hf: &str) -> Option<String> {
    if family == Family::GptOss {
        // convert_hf_to_gguf's GptOssModel: the second norm is post_attention_norm, the
        // router ffn_gate_inp, the sinks a `.weight` of their own.
        let layer_tail = hf.strip_prefix("model.layers.").and_then(|rest| rest.split_once('.'));
        if let Some((layer, tail)) = layer_tail {
            let renamed = match tail {
                "self_attn.sinks" => Some("attn_sinks.weight".to_owned()),
                _ => [("post_attention_layernorm.", "post_attention_norm."), ("mlp.router.", "ffn_gate_inp.")]
                    .iter()
                    .find_map(|(from, to)| tail.strip_prefix(from).map(|kind| format!("{to}{kind}"))),
            };
            if let Some(r) = renamed {
                return Some(format!("blk.{}.{r}", layer.parse::<usize>().ok()?));
            }
        }
    }
    if family.is_gemma() {
        let renamed = [
            (".post_attention_layernorm.", ".post_attention_norm."),
            (".pre_feedforward_layernorm.", ".ffn_norm."),
            (".post_feedforward_layernorm.", ".post_ffw_norm."),
        ];
        for (from, to) in renamed {
            if let Some((head, kind)) = hf.split_once(from) {
                let layer = head.strip_prefix("model.layers.")?.parse::<usize>().ok()?;
                return Some(format!("blk.{layer}{to}{kind}"));
            }
        }
    }
    gguf_name(hf)
}

/// What llama.cpp adds to a tensor on conversion: Gemma's RMSNorm weights are stored as
/// `1 + w` (its runtime scales by the weight, Gemma's reference by `1 + w`).
pub fn norm_shift(family: Family, hf: &str) -> Option<f64> {
    (family.is_gemma() && hf.ends_with("norm.weight")).then_some(1.0)
}

/// The attention scale llama.cpp's gemma2 / gemma3 use: 1/√head_dim, except for the 27B
/// models (told apart by their layer count) 1/√(hidden / heads); they ignore
/// `attention.scale`. Released Gemmas' `query_pre_attn_scalar` agrees with it.
pub fn llama_cpp_gemma_scale(cfg: &ModelConfig) -> f64 {
    let is_27b = matches!((cfg.family, cfg.layers), (Family::Gemma2, 46) | (Family::Gemma3, 62));
    let d = if is_27b { cfg.hidden as f64 / cfg.heads as f64 } else { cfg.head_dim as f64 };
    1.0 / d.sqrt()
}

/// The factor folded into a Gemma tensor so that llama.cpp's fixed attention scale gives the
/// checkpoint's `query_pre_attn_scalar^-½`: queries scaled by c scale every score by c. Gemma 3
/// normalises q after q_proj, so c goes into its q-norm; Gemma 2 into q_proj itself. None when
/// nothing needs folding (every released Gemma).
pub fn gemma_query_fold(cfg: &ModelConfig, gguf: &str) -> Option<f64> {
    let wanted = 1.0 / cfg.query_pre_attn_scalar?.sqrt();
    let c = wanted / llama_cpp_gemma_scale(cfg);
    if (c - 1.0).abs() < 1e-9 {
        return None;
    }
    let target = match cfg.family {
        Family::Gemma3 => ".attn_q_norm.weight",
        Family::Gemma2 => ".attn_q.weight",
        _ => return None,
    };
    gguf.ends_with(target).then_some(c)
}

/// The GGUF name of a Hugging Face tensor of the Llama-like families, or None for tensors
/// llama.cpp does not read.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        // Phi-3's packed projections: llama.cpp's phi3 reads them packed too (gate/up as
        // ffn_up, split at run time).
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_up_proj" => "ffn_up",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        // A MoE layer's router (Mixtral's Hub name, and Qwen3-MoE's / transformers 5's); its
        // experts are stacked by `moe::plan`.
        "block_sparse_moe.gate" | "mlp.gate" => "ffn_gate_inp",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// Layer index of a `blk.N.` tensor.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Reorders the rows of a Q or K projection (weight or bias) from Hugging Face's rotate-half
/// RoPE layout to the interleaved pairs llama.cpp's `llama` architecture expects.
pub fn permute_qk(t: &Tensor, heads: i64) -> Tensor {
    let size = t.size();
    let rows = size[0];
    let mut shape = vec![heads, 2, rows / heads / 2];
    shape.extend_from_slice(&size[1..]);
    t.reshape(&shape).transpose(1, 2).reshape(&size)
}

/// How many heads to permute `gguf` by, if the architecture needs it.
pub fn permute_heads(cfg: &ModelConfig, gguf: &str) -> Option<i64> {
    if arch_name(cfg.family) != "llama" {
        return None;
    }
    let module = gguf.rsplit_once('.')?.0;
    if module.ends_with(".attn_q") {
        Some(cfg.heads)
    } else if module.ends_with(".attn_k") {
        Some(cfg.kv_heads)
    } else {
        None
    }
}

/// `llama-quantize`'s rule for the layers that get more bits in the `_M` mixes.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2
}

/// The ggml type of one tensor under `quant`, and why when it differs from the preset's
/// own type (a shape fallback). `tied` = the model has no separate output matrix;
/// `experts` = experts per MoE layer (0 for dense models).
///
/// As llama.cpp's `llama_tensor_get_type` (llama-quant.cpp, the version llama-cpp-python
/// 0.3.36 vendors): vectors, norms and MoE routers are not quantised; the output matrix
/// gets q6_K; attn_v-like tensors (attn_v, and a packed attn_qkv, which that version
/// categorises with attn_v) and ffn_down (dense or stacked experts) get q6_K in the `_M`
/// mixes on the layers `use_more_bits` picks; an 8-expert model (Mixtral 8x7B) gets q8_0
/// for attn_v / attn_k and q5_K for attn_output in q4_K_M.
pub fn tensor_type(quant: Quant, gguf: &str, shape: &[i64], n_layers: usize, tied: bool, experts: usize) -> (GgmlType, Option<String>) {
    // Norms, biases, other vectors and routers stay f32, as convert_hf_to_gguf writes them
    // and llama-quantize keeps them.
    if shape.len() < 2 || gguf.ends_with("_norm.weight") || !gguf.ends_with(".weight") || gguf.ends_with(".ffn_gate_inp.weight") {
        return (GgmlType::F32, None);
    }
    let row = *shape.last().unwrap_or(&0) as usize;
    if quant == Quant::F16 {
        return (GgmlType::F16, None);
    }
    if quant == Quant::Q8_0 {
        // convert_hf_to_gguf --outtype q8_0 keeps rows that are not whole blocks in f16.
        return if row % 32 == 0 {
            (GgmlType::Q8_0, None)
        } else {
            (GgmlType::F16, Some(format!("row of {row} is not a multiple of 32: f16")))
        };
    }
    let mut ty = quant.default_type();
    let is_output = gguf == "output.weight" || (tied && gguf == "token_embd.weight");
    let mixed = matches!(quant, Quant::Q4KM | Quant::Q5KM);
    let more_bits = mixed && use_more_bits(layer_of(gguf).unwrap_or(0), n_layers);
    if is_output {
        ty = if row % 256 != 0 { GgmlType::Q8_0 } else { GgmlType::Q6K };
    } else if gguf.ends_with(".attn_v.weight") || gguf.ends_with(".attn_qkv.weight") {
        if more_bits {
            ty = GgmlType::Q6K;
        }
        if experts == 8 {
            ty = GgmlType::Q8_0;
        }
    } else if gguf.ends_with(".attn_k.weight") && experts == 8 {
        ty = GgmlType::Q8_0;
    } else if gguf.ends_with(".attn_output.weight") && experts == 8 && quant == Quant::Q4KM {
        ty = GgmlType::Q5K;
    } else if gguf.contains(".ffn_down") && more_bits {
        ty = GgmlType::Q6K;
    }
    if row % ty.block_len() == 0 {
        return (ty, None);
    }
    // llama-quantize's fallbacks for rows that are not whole 256-element super-blocks.
    let fallback = match ty {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        _ => GgmlType::Q8_0,
    };
    let fallback = if row % 32 == 0 { fallback } else { GgmlType::F16 };
    (fallback, Some(format!("row of {row} is not a multiple of {}: {} instead of {}", ty.block_len(), fallback.name(), ty.name())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map_to_llama_cpp_names() {
        assert_eq!(gguf_name("model.layers.2.block_sparse_moe.gate.weight").as_deref(), Some("blk.2.ffn_gate_inp.weight"));
        assert_eq!(gguf_name("model.layers.2.mlp.gate.weight").as_deref(), Some("blk.2.ffn_gate_inp.weight"));
        assert_eq!(gguf_name("model.layers.3.self_attn.q_proj.bias").as_deref(), Some("blk.3.attn_q.bias"));
        assert_eq!(gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(), Some("blk.0.ffn_down.weight"));
        assert_eq!(gguf_name("model.layers.1.self_attn.k_norm.weight").as_deref(), Some("blk.1.attn_k_norm.weight"));
        assert_eq!(gguf_name("model.rotary_emb.inv_freq"), None);
        let oss = |hf: &str| gguf_name_for(Family::GptOss, hf);
        assert_eq!(oss("model.layers.1.self_attn.sinks").as_deref(), Some("blk.1.attn_sinks.weight"));
        assert_eq!(oss("model.layers.1.mlp.router.bias").as_deref(), Some("blk.1.ffn_gate_inp.bias"));
        assert_eq!(oss("model.layers.2.post_attention_layernorm.weight").as_deref(), Some("blk.2.post_attention_norm.weight"));
        assert_eq!(oss("model.layers.2.self_attn.o_proj.bias").as_deref(), Some("blk.2.attn_output.bias"));
        assert_eq!(oss("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
    }

    #[test]
    fn q4_k_m_mix_follows_llama_quantize() {
        // 32 layers: layers 0-3, 28-31 and every third in between get q6_K for attn_v/ffn_down.
        let more: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(more, vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        let (t, _) = tensor_type(Quant::Q4KM, "blk.5.attn_v.weight", &[1024, 4096], 32, false, 0);
        assert_eq!(t, GgmlType::Q4K);
        let (t, _) = tensor_type(Quant::Q4KM, "blk.6.ffn_down.weight", &[4096, 14336], 32, false, 0);
        assert_eq!(t, GgmlType::Q6K);
        let (t, _) = tensor_type(Quant::Q4KM, "output.weight", &[32000, 4096], 32, false, 0);
        assert_eq!(t, GgmlType::Q6K);
        let (t, why) = tensor_type(Quant::Q4KM, "blk.5.attn_q.weight", &[64, 64], 32, false, 0);
        assert_eq!(t, GgmlType::Q5_0);
        assert!(why.unwrap().contains("not a multiple of 256"));
        assert_eq!(tensor_type(Quant::Q5KM, "blk.5.attn_q.weight", &[64, 64], 32, false, 0).0, GgmlType::Q5_1);
        assert_eq!(tensor_type(Quant::Q4KM, "output_norm.weight", &[4096], 32, false, 0).0, GgmlType::F32);
        // A packed q/k/v follows attn_v's rule.
        assert_eq!(tensor_type(Quant::Q4KM, "blk.6.attn_qkv.weight", &[9216, 3072], 32, false, 0).0, GgmlType::Q6K);
        assert_eq!(tensor_type(Quant::Q4KM, "blk.5.attn_qkv.weight", &[9216, 3072], 32, false, 0).0, GgmlType::Q4K);
    }

    #[test]
    fn q4_k_m_of_moe_follows_llama_quantize() {
        // Mixtral 8x7B: stacked ffn_down experts follow ffn_down's layer rule, the router stays
        // f32 (in every preset), and 8 experts lift attn_v/attn_k to q8_0, attn_output to q5_K.
        let exps = [8, 4096, 14336];
        assert_eq!(tensor_type(Quant::Q4KM, "blk.6.ffn_down_exps.weight", &exps, 32, false, 8).0, GgmlType::Q6K);
        assert_eq!(tensor_type(Quant::Q4KM, "blk.5.ffn_down_exps.weight", &exps, 32, false, 8).0, GgmlType::Q4K);
        assert_eq!(tensor_type(Quant::Q4KM, "blk.6.ffn_gate_exps.weight", &[8, 14336, 4096], 32, false, 8).0, GgmlType::Q4K);
        for quant in [Quant::F16, Quant::Q8_0, Quant::Q4KM] {
            assert_eq!(tensor_type(quant, "blk.0.ffn_gate_inp.weight", &[8, 4096], 32, false, 8).0, GgmlType::F32);
        }
        assert_eq!(tensor_type(Quant::Q4KM, "blk.5.attn_v.weight", &[1024, 4096], 32, false, 8).0, GgmlType::Q8_0);
        assert_eq!(tensor_type(Quant::Q6K, "blk.5.attn_k.weight", &[1024, 4096], 32, false, 8).0, GgmlType::Q8_0);
        assert_eq!(tensor_type(Quant::Q4KM, "blk.5.attn_output.weight", &[4096, 4096], 32, false, 8).0, GgmlType::Q5K);
        assert_eq!(tensor_type(Quant::Q5KM, "blk.5.attn_output.weight", &[4096, 4096], 32, false, 8).0, GgmlType::Q5K);
        // Qwen3-30B-A3B: 128 experts, none of the 8-expert bumps.
        assert_eq!(tensor_type(Quant::Q4KM, "blk.5.attn_k.weight", &[512, 2048], 48, false, 128).0, GgmlType::Q4K);
        assert_eq!(tensor_type(Quant::Q4KM, "blk.47.ffn_down_exps.weight", &[128, 2048, 768], 48, false, 128).0, GgmlType::Q6K);
    }
}
