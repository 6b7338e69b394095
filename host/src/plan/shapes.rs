//! Model shapes: the handful of numbers that decide a decoder's parameter count and
//! activation size, a table of public checkpoints, and a reader for HF `config.json`.

use super::PlanError;
use serde_json::Value;

/// The dimensions of a Llama-style decoder (RMSNorm, GQA attention, SwiGLU MLP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelShape {
    /// Display name (a table key, or the config's `_name_or_path` / `model_type`).
    pub name: String,
    /// Residual stream width `h`.
    pub hidden: u64,
    /// SwiGLU inner width `i` (gate/up output, down input).
    pub intermediate: u64,
    /// Number of decoder layers `L`.
    pub layers: u64,
    /// Query heads `a`.
    pub heads: u64,
    /// Key/value heads (GQA); equals `heads` for plain multi-head attention.
    pub kv_heads: u64,
    /// Per-head width; `heads * head_dim` need not equal `hidden` (e.g. Gemma, Qwen3-0.6B).
    pub head_dim: u64,
    /// Vocabulary size `V`.
    pub vocab: u64,
    /// Whether `lm_head` shares the embedding matrix.
    pub tied_embeddings: bool,
    /// Biases on q/k/v (the Qwen2 family).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k (the Qwen3 and Gemma 3 families).
    pub qk_norm: bool,
    /// The layer layout around those numbers.
    pub layout: Layout,
}

/// What kind of layer the shape's numbers describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// Pre-norm SwiGLU layers (Llama, Mistral, Qwen).
    #[default]
    Llama,
    /// Gemma 2: four norms a layer, GeGLU, soft-capped attention (written out, not fused).
    Gemma2,
    /// Gemma 3: Gemma 2's layer with q/k norms and no soft-capping.
    Gemma3,
    /// Pre-norm layers whose MLP is a mixture of experts (Mixtral, Qwen3-MoE, gpt-oss).
    Moe(MoeShape),
    /// Phi-3 / Phi-4-mini: Llama's layer with q/k/v and gate/up packed into one projection
    /// each (so LoRA has one adapter per pack), LongRoPE and partial rotary.
    Phi3,
}

/// The mixture-of-experts part of a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    /// Experts per layer.
    pub experts: u64,
    /// Experts each token is routed to.
    pub top_k: u64,
    /// Each expert's SwiGLU inner width.
    pub expert_intermediate: u64,
    pub family: MoeFamily,
}

/// Which MoE family a shape is (their layers' extras differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeFamily {
    Mixtral,
    Qwen3Moe,
    /// gpt-oss: biases on attention (o too), router and experts, one attention sink per head.
    GptOss,
}

/// MoE rows: a [`Row`] of the dense numbers (intermediate = the expert width), then experts,
/// top-k and family.
#[rustfmt::skip]
const KNOWN_MOE: &[(Row, u64, u64, MoeFamily)] = &[
    (("mixtral-8x7b",  4096, 14336, 32, 32, 8, 128,  32000, false, false, false, Layout::Llama),   8, 2, MoeFamily::Mixtral),
    (("qwen3-30b-a3b", 2048,   768, 48, 32, 4, 128, 151936, false, false, true,  Layout::Llama), 128, 8, MoeFamily::Qwen3Moe),
    (("gpt-oss-20b",   2880,  2880, 24, 64, 8,  64, 201088, false, true,  false, Layout::Llama),  32, 4, MoeFamily::GptOss),
];

/// (name, hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied, qkv_bias, qk_norm, layout)
#[rustfmt::skip]
type Row = (&'static str, u64, u64, u64, u64, u64, u64, u64, bool, bool, bool, Layout);

/// Public checkpoints, transcribed from their `config.json`.
#[rustfmt::skip]
const KNOWN: &[Row] = &[
    ("llama-3.2-1b",  2048,  8192, 16, 32,  8,  64, 128256, true,  false, false, Layout::Llama),
    ("llama-3.2-3b",  3072,  8192, 28, 24,  8, 128, 128256, true,  false, false, Layout::Llama),
    ("llama-3.1-8b",  4096, 14336, 32, 32,  8, 128, 128256, false, false, false, Layout::Llama),
    ("llama-3.1-70b", 8192, 28672, 80, 64,  8, 128, 128256, false, false, false, Layout::Llama),
    ("llama-2-7b",    4096, 11008, 32, 32, 32, 128,  32000, false, false, false, Layout::Llama),
    ("mistral-7b",    4096, 14336, 32, 32,  8, 128,  32000, false, false, false, Layout::Llama),
    ("qwen2.5-0.5b",   896,  4864, 24, 14,  2,  64, 151936, true,  true, false, Layout::Llama),
    ("qwen2.5-7b",    3584, 18944, 28, 28,  4, 128, 152064, false, true, false, Layout::Llama),
    ("qwen2.5-72b",   8192, 29568, 80, 64,  8, 128, 152064, false, true, false, Layout::Llama),
    ("qwen3-8b",      4096, 12288, 36, 32,  8, 128, 151936, false, false, true, Layout::Llama),
    // Gemma 3 4B: the text model of gemma-3-4b-it (its vision tower not counted).
    ("gemma-2-2b",    2304,  9216, 26,  8,  4, 256, 256000, true,  false, false, Layout::Gemma2),
    ("gemma-3-4b",    2560, 10240, 34,  8,  4, 256, 262208, true,  false, true,  Layout::Gemma3),
    ("phi-4-mini",    3072,  8192, 32, 24,  8, 128, 200064, true,  false, false, Layout::Phi3),
];

/// `cfg` with every key of `own` set (added, or replacing its value).
fn with_keys(mut cfg: serde_json::Value, own: serde_json::Value) -> serde_json::Value {
    for (k, v) in own.as_object().expect("an object") {
        cfg[k] = v.clone();
    }
    cfg
}

impl ModelShape {
    /// A Hugging Face `config.json` for this shape (its family's architecture), so a
    /// random model of a public shape can be built without downloading anything.
    pub fn to_hf_config(&self) -> serde_json::Value {
        match self.layout {
            Layout::Llama | Layout::Gemma2 | Layout::Gemma3 => {}
            Layout::Moe(m) => return self.moe_hf_config(m),
            Layout::Phi3 => {
                // Phi-4-mini's: 0.75 of each head rotated, LongRoPE over 4k → 128k (factor
                // lists flat here: a random model's benchmark needs their shape, not values).
                let factors = vec![1.0; (self.head_dim * 3 / 4 / 2) as usize];
                return serde_json::json!({
                    "architectures": ["Phi3ForCausalLM"],
                    "model_type": "phi3",
                    "hidden_size": self.hidden,
                    "intermediate_size": self.intermediate,
                    "num_hidden_layers": self.layers,
                    "num_attention_heads": self.heads,
                    "num_key_value_heads": self.kv_heads,
                    "vocab_size": self.vocab,
                    "tie_word_embeddings": self.tied_embeddings,
                    "rms_norm_eps": 1e-5,
                    "partial_rotary_factor": 0.75,
                    "max_position_embeddings": 131072,
                    "original_max_position_embeddings": 4096,
                    "rope_theta": 10000.0,
                    "rope_scaling": {"type": "longrope", "short_factor": factors, "long_factor": factors},
                    "sliding_window": 262144,
                });
            }
        }
        // Llama, Qwen2, Qwen3 and the Gemmas: the same keys, but for each family's own.
        let (arch, model_type, own) = match self.layout {
            Layout::Gemma2 | Layout::Gemma3 => {
                let gemma2 = self.layout == Layout::Gemma2;
                let (arch, model_type) = if gemma2 { ("Gemma2ForCausalLM", "gemma2") } else { ("Gemma3ForCausalLM", "gemma3_text") };
                let own = serde_json::json!({
                    "query_pre_attn_scalar": self.head_dim,
                    "rms_norm_eps": 1e-6,
                    "sliding_window": if gemma2 { 4096 } else { 1024 },
                    "max_position_embeddings": if gemma2 { 8192 } else { 131072 },
                });
                (arch, model_type, own)
            }
            _ => {
                let (arch, model_type) = if self.qk_norm {
                    ("Qwen3ForCausalLM", "qwen3")
                } else if self.qkv_bias {
                    ("Qwen2ForCausalLM", "qwen2")
                } else {
                    ("LlamaForCausalLM", "llama")
                };
                (arch, model_type, serde_json::json!({"rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072}))
            }
        };
        let cfg = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied_embeddings,
        });
        with_keys(cfg, own)
    }

    /// config.json of a MoE shape (Mixtral, Qwen3-MoE or gpt-oss architecture).
    fn moe_hf_config(&self, m: MoeShape) -> serde_json::Value {
        let cfg = serde_json::json!({
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e6,
            "max_position_embeddings": 32768,
            "num_experts_per_tok": m.top_k,
        });
        let extra = match m.family {
            MoeFamily::Mixtral => serde_json::json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "intermediate_size": m.expert_intermediate, "num_local_experts": m.experts}),
            MoeFamily::Qwen3Moe => serde_json::json!({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "intermediate_size": 6144, "moe_intermediate_size": m.expert_intermediate, "num_experts": m.experts,
                "norm_topk_prob": true, "rms_norm_eps": 1e-6}),
            MoeFamily::GptOss => serde_json::json!({"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
                "intermediate_size": m.expert_intermediate, "num_local_experts": m.experts, "sliding_window": 128}),
        };
        with_keys(cfg, extra)
    }

    /// The shape of a known public checkpoint (see [`ModelShape::known_names`]).
    pub fn named(name: &str) -> Option<ModelShape> {
        if let Some((row, experts, top_k, family)) = KNOWN_MOE.iter().find(|m| m.0 .0.eq_ignore_ascii_case(name)) {
            let mut shape = Self::from_row(row);
            shape.layout = Layout::Moe(MoeShape { experts: *experts, top_k: *top_k, expert_intermediate: row.2, family: *family });
            return Some(shape);
        }
        Some(Self::from_row(KNOWN.iter().find(|row| row.0.eq_ignore_ascii_case(name))?))
    }

    fn from_row(row: &Row) -> ModelShape {
        let &(n, hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied, bias, qkn, layout) = row;
        ModelShape {
            name: n.to_string(),
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab,
            tied_embeddings: tied,
            qkv_bias: bias,
            qk_norm: qkn,
            layout,
        }
    }

    /// Names accepted by [`ModelShape::named`], in table order.
    pub fn known_names() -> Vec<&'static str> {
        KNOWN.iter().map(|row| row.0).chain(KNOWN_MOE.iter().map(|m| m.0 .0)).collect()
    }

    /// Reads a Hugging Face `config.json`. Absent `num_key_value_heads` means plain MHA,
    /// absent (or null) `head_dim` means `hidden / heads`; `model_type` "qwen2" implies
    /// q/k/v biases and "qwen3" implies q/k norms, as transformers builds them.
    pub fn from_hf_config(cfg: &Value) -> Result<ModelShape, PlanError> {
        let hidden = required(cfg, "hidden_size")?;
        let heads = required(cfg, "num_attention_heads")?;
        if heads == 0 {
            return Err(PlanError::BadValue {
                key: "num_attention_heads",
                value: "0".into(),
            });
        }
        let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
        let name = match cfg.get("_name_or_path").and_then(Value::as_str) {
            Some(path) if !path.is_empty() => path,
            _ if !model_type.is_empty() => model_type,
            _ => "custom",
        };
        // Mixture of experts: the shape's intermediate width is the experts'.
        let moe = match model_type {
            "mixtral" | "gpt_oss" => Some((
                required(cfg, "num_local_experts")?,
                required(cfg, "intermediate_size")?,
                if model_type == "mixtral" { MoeFamily::Mixtral } else { MoeFamily::GptOss },
            )),
            "qwen3_moe" => Some((required(cfg, "num_experts")?, required(cfg, "moe_intermediate_size")?, MoeFamily::Qwen3Moe)),
            _ => None,
        };
        let moe = match moe {
            Some((experts, expert_intermediate, family)) => {
                let top_k = required(cfg, "num_experts_per_tok")?;
                Some(MoeShape { experts, top_k, expert_intermediate, family })
            }
            None => None,
        };
        Ok(ModelShape {
            name: name.to_string(),
            hidden,
            intermediate: match moe {
                Some(m) => m.expert_intermediate,
                None => required(cfg, "intermediate_size")?,
            },
            layers: required(cfg, "num_hidden_layers")?,
            heads,
            kv_heads: optional(cfg, "num_key_value_heads")?.unwrap_or(heads),
            head_dim: optional(cfg, "head_dim")?.unwrap_or(hidden / heads),
            vocab: required(cfg, "vocab_size")?,
            tied_embeddings: cfg
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias: model_type == "qwen2" || model_type == "gpt_oss",
            qk_norm: model_type == "qwen3" || model_type == "qwen3_moe" || model_type.starts_with("gemma3"),
            layout: match (model_type, moe) {
                (_, Some(m)) => Layout::Moe(m),
                ("gemma2", _) => Layout::Gemma2,
                ("gemma3" | "gemma3_text", _) => Layout::Gemma3,
                ("phi3", _) => Layout::Phi3,
                _ => Layout::Llama,
            },
        })
    }

    /// The linear maps of one layer as `(name, in, out)`: the "all-linear" LoRA targets,
    /// and (for QLoRA) exactly the matrices bitsandbytes quantizes. Seven, or Phi-3's four
    /// (q/k/v and gate/up packed).
    pub fn linears(&self) -> Vec<(&'static str, u64, u64)> {
        let (h, i) = (self.hidden, self.intermediate);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        if self.layout == Layout::Phi3 {
            return vec![("qkv_proj", h, q + 2 * kv), ("o_proj", q, h), ("gate_up_proj", h, 2 * i), ("down_proj", i, h)];
        }
        vec![
            ("q_proj", h, q),
            ("k_proj", h, kv),
            ("v_proj", h, kv),
            ("o_proj", q, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        ]
    }

    /// Parameters in one layer's linear weight matrices (no biases, no norms): in a MoE layer
    /// every expert's three projections and the router.
    pub fn layer_linear_params(&self) -> u64 {
        match self.layout {
            Layout::Moe(m) => {
                let attention: u64 = self.linears()[..4].iter().map(|&(_, i, o)| i * o).sum();
                attention + m.experts * 3 * self.hidden * m.expert_intermediate + m.experts * self.hidden
            }
            _ => self.linears().iter().map(|&(_, i, o)| i * o).sum(),
        }
    }

    /// One layer's linear maps as `(in, out, how many)`: [`ModelShape::linears`] for dense
    /// layers; attention, the router and every expert's projections for MoE layers (what
    /// `all-linear` adapters attach to and QLoRA quantises).
    pub fn layer_linears(&self) -> Vec<(u64, u64, u64)> {
        match self.layout {
            Layout::Moe(m) => {
                let mut out: Vec<(u64, u64, u64)> = self.linears()[..4].iter().map(|&(_, i, o)| (i, o, 1)).collect();
                out.push((self.hidden, m.experts, 1));
                out.push((self.hidden, m.expert_intermediate, 2 * m.experts));
                out.push((m.expert_intermediate, self.hidden, m.experts));
                out
            }
            _ => self.linears().iter().map(|&(_, i, o)| (i, o, 1)).collect(),
        }
    }

    /// Parameters one token passes through: [`ModelShape::params`] with each MoE layer's
    /// experts counted `top_k` times instead of `experts` times (what a token's FLOPs scale
    /// with).
    pub fn active_params(&self) -> u64 {
        match self.layout {
            Layout::Moe(m) => self.params() - self.layers * (m.experts - m.top_k) * 3 * self.hidden * m.expert_intermediate,
            _ => self.params(),
        }
    }

    /// Exact parameter count: embeddings, per layer q/k/v/o (+ q/k/v biases, + q/k norms),
    /// gate/up/down and two RMSNorms, the final norm, and `lm_head` unless tied.
    pub fn params(&self) -> u64 {
        let embed = self.vocab * self.hidden;
        let lm_head = if self.tied_embeddings { 0 } else { embed };
        embed
            + self.layers * (self.layer_linear_params() + self.layer_small_params())
            + self.hidden
            + lm_head
    }

    /// Per-layer vectors: the two RMSNorm weights, optional q/k/v biases and q/k norms.
    fn layer_small_params(&self) -> u64 {
        let bias = if self.qkv_bias {
            (self.heads + 2 * self.kv_heads) * self.head_dim
        } else {
            0
        };
        let qk_norm = if self.qk_norm { 2 * self.head_dim } else { 0 };
        let norms = if matches!(self.layout, Layout::Llama | Layout::Phi3 | Layout::Moe(_)) { 2 } else { 4 };
        // gpt-oss: o_proj bias, a sink per head, router and expert biases.
        let gpt_oss = match self.layout {
            Layout::Moe(m) if m.family == MoeFamily::GptOss => {
                self.hidden + self.heads + m.experts + m.experts * (2 * m.expert_intermediate + self.hidden)
            }
            _ => 0,
        };
        norms * self.hidden + bias + qk_norm + gpt_oss
    }
}

fn optional(cfg: &Value, key: &'static str) -> Result<Option<u64>, PlanError> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| PlanError::BadValue {
            key,
            value: v.to_string(),
        }),
    }
}

fn required(cfg: &Value, key: &'static str) -> Result<u64, PlanError> {
    optional(cfg, key)?.ok_or(PlanError::MissingKey(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> u64 {
        ModelShape::named(name).unwrap().params()
    }

    #[test]
    fn llama_3_2_1b_by_hand() {
        // embed 128256*2048 = 262_668_288 (tied, so no lm_head)
        // layer: q 2048*2048 = 4_194_304, k = v = 2048*512 = 1_048_576, o = 4_194_304,
        //        gate = up = down = 2048*8192 = 16_777_216, norms 2*2048 = 4096
        //        = 8_388_608 + 2_097_152 + 50_331_648 + 4096 = 60_821_504
        // total = 262_668_288 + 16*60_821_504 + 2048 (final norm) = 1_235_814_400
        assert_eq!(p("llama-3.2-1b"), 1_235_814_400);
    }

    #[test]
    fn known_totals() {
        // llama-3.1-8b: 2*128256*4096 + 32*(41_943_040 + 176_160_768 + 8192) + 4096
        assert_eq!(p("llama-3.1-8b"), 8_030_261_248);
        // The rest are the counts the safetensors index / model cards report.
        assert_eq!(p("llama-3.2-3b"), 3_212_749_824);
        assert_eq!(p("llama-3.1-70b"), 70_553_706_496);
        assert_eq!(p("llama-2-7b"), 6_738_415_616);
        assert_eq!(p("mistral-7b"), 7_241_732_096);
        assert_eq!(p("qwen2.5-0.5b"), 494_032_768);
        assert_eq!(p("qwen2.5-7b"), 7_615_616_512);
        assert_eq!(p("qwen3-8b"), 8_190_735_360);
        // gemma-2-2b: 256000*2304 + 26*(2304*2048*2 + 2304*1024*2 + 3*2304*9216 + 4*2304) + 2304
        assert_eq!(p("gemma-2-2b"), 2_614_341_888);
        // phi-4-mini: 200064*3072 (tied) + 32*(3072*5120 + 3072*3072 + 3072*16384 + 8192*3072
        // + 2*3072) + 3072: its 3.84B.
        assert_eq!(p("phi-4-mini"), 3_836_021_760);
        let q72 = p("qwen2.5-72b");
        assert!((72_650_000_000..72_750_000_000).contains(&q72), "{q72}");
    }

    #[test]
    fn names_round_trip() {
        for name in ModelShape::known_names() {
            assert_eq!(ModelShape::named(name).unwrap().name, name);
        }
        assert!(ModelShape::named("LLAMA-3.1-8B").is_some());
        assert!(ModelShape::named("gpt-5").is_none());
    }

    #[test]
    fn hf_config() {
        let cfg = serde_json::json!({
            "_name_or_path": "Qwen/Qwen2.5-0.5B", "model_type": "qwen2",
            "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
            "tie_word_embeddings": true, "head_dim": null
        });
        let shape = ModelShape::from_hf_config(&cfg).unwrap();
        assert_eq!(shape.head_dim, 64);
        assert!(shape.qkv_bias && !shape.qk_norm);
        assert_eq!(shape.params(), p("qwen2.5-0.5b"));

        // Defaults: MHA, untied, no biases.
        let cfg = serde_json::json!({
            "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000, "model_type": "llama"
        });
        assert_eq!(
            ModelShape::from_hf_config(&cfg).unwrap().params(),
            p("llama-2-7b")
        );
    }

    #[test]
    fn hf_config_errors_name_the_key() {
        let cfg = serde_json::json!({ "hidden_size": 64, "num_attention_heads": 4 });
        let err = ModelShape::from_hf_config(&cfg).unwrap_err();
        assert_eq!(err, PlanError::MissingKey("intermediate_size"));
        assert!(err.to_string().contains("intermediate_size"));

        let cfg = serde_json::json!({ "hidden_size": "big" });
        let err = ModelShape::from_hf_config(&cfg).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
    }
}
