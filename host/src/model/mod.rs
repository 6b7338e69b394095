//! Hugging Face checkpoints: configuration, weights, tokenizer and chat template, the decoder
//! forward pass, and generation.
//!
//! One family per file ([`llama`], [`mistral`], [`qwen2`], [`qwen3`], [`gemma2`], [`gemma3`],
//! [`phi3`], [`mixtral`], [`qwen3_moe`], [`gpt_oss`]):
//! each reads its `config.json` into a [`ModelConfig`], which says how the shared decoder
//! ([`decoder`]) is built (biases, q/k norms, RoPE scaling, sliding windows). The layers
//! themselves are [`block::Block`]s: the pre-norm block of the Llama-like families
//! ([`block::PreNormBlock`], whose MLP is a mixture of experts, [`moe::SparseMoe`], for
//! [`mixtral`] and [`qwen3_moe`]), or a family's own (Gemma's sandwich-norm block,
//! [`gemma2::SandwichBlock`]; gpt-oss's block with attention sinks and biased, clamped experts,
//! [`gpt_oss::GptOssBlock`]), each read top to bottom in its own file.

pub mod attention;
pub mod block;
pub mod decoder;
pub mod dora_block;
pub mod expert_lora;
pub mod fp8;
pub mod fused;
pub mod gemma2;
pub mod gemma3;
pub mod generate;
pub mod gpt_oss;
pub mod grouped_experts;
pub mod grouped_mm;
pub mod linear;
pub mod lora_block;
pub mod llama;
pub mod mistral;
pub mod mixtral;
pub mod moe;
pub mod mxfp4;
pub mod nf4;
pub mod nodes;
pub mod norm;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;
mod save;
pub mod sentencepiece;
pub mod tokenizer;
pub mod weights;

pub use decoder::{AttnMask, CausalLm, KvCache};
pub use tokenizer::TextTokenizer;

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Everything that can go wrong loading or running a checkpoint. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file the checkpoint needs is absent.
    #[error("{}: missing ({hint})", path.display())]
    Missing { path: PathBuf, hint: &'static str },
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// A file is present but wrong; `problem` says how and what to do.
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    /// config.json names an architecture ftx does not implement.
    #[error("{}: unknown architecture '{arch}'; ftx supports {}", path.display(), SUPPORTED.join(", "))]
    UnknownArchitecture { path: PathBuf, arch: String },
    /// A tensor the configuration requires is not in any weight file.
    #[error("tensor {name} is missing from the weights ({files})")]
    MissingTensor { name: String, files: String },
    /// A Hub id could not be resolved into the cache.
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    /// A libtorch operation failed (shape or device mismatch at run time).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            return ModelError::Missing { path: path.to_owned(), hint: "file not found" };
        }
        ModelError::Io { path: path.to_owned(), source }
    }
    pub(crate) fn file(path: &Path, problem: impl Into<String>) -> Self {
        ModelError::Invalid { path: path.to_owned(), problem: problem.into() }
    }
}

/// Architectures (config.json `architectures[0]`) that ftx implements.
pub const SUPPORTED: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "Phi3ForCausalLM",
    "GptOssForCausalLM",
];

/// The model families, one file each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2, 3, 3.1, 3.2.
    Llama,
    /// Mistral (sliding-window attention).
    Mistral,
    /// Qwen2 and Qwen2.5 (q/k/v biases).
    Qwen2,
    /// Qwen3 (per-head q/k RMSNorm).
    Qwen3,
    /// Gemma 2 (sandwich norms, GeGLU, soft-capping, alternating sliding/global layers).
    Gemma2,
    /// Gemma 3 text (Gemma 2's block with q/k norms and a RoPE base per layer kind).
    Gemma3,
    /// Mixtral (Mistral with a mixture-of-experts MLP, top-2 of 8).
    Mixtral,
    /// Qwen3-MoE (Qwen3 with a mixture-of-experts MLP, top-k of many).
    Qwen3Moe,
    /// Phi-3, Phi-3.5 and Phi-4-mini (packed q/k/v and gate/up, LongRoPE, partial rotary).
    Phi3,
    /// gpt-oss (attention sinks, alternating sliding/full layers, YaRN, a biased router over
    /// biased, clamped SwiGLU experts stored as fused 3-D tensors).
    GptOss,
}

impl Family {
    /// Whether the family's layers are Gemma's sandwich-norm block.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }
}

/// Which keys a layer's attention sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnSpan {
    /// Every earlier position.
    Full,
    /// The last `sliding_window` positions (the query's own included).
    Sliding,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Mistral, Qwen.
    Silu,
    /// GELU, tanh approximation (GeGLU): Gemma's `gelu_pytorch_tanh`.
    GeluTanh,
}

/// How rotary position embeddings are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_positions: f64 },
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini; "su" in older configs): one factor per
    /// rotary frequency, the short list while a call's positions stay within
    /// `original_max_positions`, the long list past it; cos and sin scaled by
    /// `attention_factor` (`√(1 + ln s / ln original)`, s = max / original positions, unless
    /// the config gives it).
    LongRope { short_factor: Vec<f64>, long_factor: Vec<f64>, original_max_positions: i64, attention_factor: f64 },
    /// YaRN (gpt-oss): frequencies whose wavelength fits `original_max_positions` less than
    /// `beta_slow` times are divided by `factor`, those fitting more than `beta_fast` times
    /// kept, a linear ramp between (the correction range floored/ceiled when `truncate`); cos
    /// and sin scaled by `attention_factor` (`0.1 ln factor + 1` unless the config gives it).
    Yarn { factor: f64, beta_fast: f64, beta_slow: f64, original_max_positions: f64, truncate: bool, attention_factor: f64 },
}

/// The shape and options of a decoder-only transformer, read from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which family file read it.
    pub family: Family,
    /// `architectures[0]`, kept for export.
    pub architecture: String,
    pub hidden: i64,
    pub intermediate: i64,
    pub layers: usize,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub vocab: i64,
    pub rms_eps: f64,
    pub tie_embeddings: bool,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// The share of each head's dimensions that is rotated (Phi-4-mini: 0.75; 1 otherwise).
    pub partial_rotary_factor: f64,
    /// q/k/v and gate/up are stored as one projection each (`qkv_proj`, `gate_up_proj`:
    /// Phi-3).
    pub packed_projections: bool,
    /// Bias on q/k/v projections (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The window of [`AttnSpan::Sliding`] layers (Mistral, Qwen2 when enabled, Gemma).
    pub sliding_window: Option<i64>,
    /// Each layer's attention span: all `Sliding` when a Llama-like config sets a window,
    /// Gemma's `layer_types` otherwise.
    pub layer_spans: Vec<AttnSpan>,
    /// The MLP's gate activation.
    pub hidden_act: Activation,
    /// RMSNorm scales by `1 + w` (Gemma) instead of `w`.
    pub norm_unit_offset: bool,
    /// Embeddings multiplied by √hidden (Gemma).
    pub scale_embeddings: bool,
    /// Attention scores scaled by `query_pre_attn_scalar^-½` instead of `head_dim^-½`.
    pub query_pre_attn_scalar: Option<f64>,
    /// `c · tanh(s / c)` on attention scores (Gemma 2).
    pub attn_logit_softcap: Option<f64>,
    /// `c · tanh(z / c)` on the output logits (Gemma 2).
    pub final_logit_softcap: Option<f64>,
    /// RoPE base of sliding layers when it differs from the global one (Gemma 3); those
    /// layers use plain (unscaled) RoPE.
    pub local_rope_theta: Option<f64>,
    pub max_positions: i64,
    /// The mixture-of-experts MLP (Mixtral, Qwen3-MoE); `None` for dense families.
    pub moe: Option<moe::MoeConfig>,
    /// The raw config.json, written back unchanged on export.
    pub raw: Value,
}

impl ModelConfig {
    /// Reads `dir/config.json` and dispatches to the family that understands it.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = crate::hub::resolve_model(dir)?.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::Missing {
                path: path.clone(),
                hint: "a Hugging Face checkpoint folder needs config.json",
            },
            _ => ModelError::io(&path, e),
        })?;
        let raw: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::file(&path, format!("not valid JSON: {e}")))?;
        Self::from_json(raw, &path)
    }

    /// Reads a parsed config.json; `path` is used in error messages.
    pub fn from_json(raw: Value, path: &Path) -> Result<Self, ModelError> {
        let mut cfg = Self::read_family(raw, path)?;
        if cfg.layer_spans.is_empty() {
            let span = if cfg.sliding_window.is_some() { AttnSpan::Sliding } else { AttnSpan::Full };
            cfg.layer_spans = vec![span; cfg.layers];
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn read_family(raw: Value, path: &Path) -> Result<Self, ModelError> {
        let arch = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| raw.get("model_type").and_then(Value::as_str).map(str::to_owned))
            .ok_or_else(|| ModelError::file(path, "has neither \"architectures\" nor \"model_type\""))?;
        let cfg = match arch.as_str() {
            "LlamaForCausalLM" | "llama" => llama::config(&raw, path)?,
            "MistralForCausalLM" | "mistral" => mistral::config(&raw, path)?,
            "Qwen2ForCausalLM" | "qwen2" => qwen2::config(&raw, path)?,
            "Qwen3ForCausalLM" | "qwen3" => qwen3::config(&raw, path)?,
            "Gemma2ForCausalLM" | "gemma2" => gemma2::config(&raw, path)?,
            "Gemma3ForCausalLM" | "gemma3_text" => gemma3::config(&raw, path)?,
            "MixtralForCausalLM" | "mixtral" => mixtral::config(&raw, path)?,
            "Qwen3MoeForCausalLM" | "qwen3_moe" => qwen3_moe::config(&raw, path)?,
            "Phi3ForCausalLM" | "phi3" => phi3::config(&raw, path)?,
            "GptOssForCausalLM" | "gpt_oss" => gpt_oss::config(&raw, path)?,
            _ => return Err(ModelError::UnknownArchitecture { path: path.to_owned(), arch }),
        };
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::file(path, m));
        if self.hidden <= 0 || self.heads <= 0 || self.kv_heads <= 0 || self.vocab <= 0 || self.layers == 0 {
            return bad("hidden_size, num_attention_heads, num_key_value_heads, vocab_size and num_hidden_layers must be positive".into());
        }
        if self.heads % self.kv_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.heads, self.kv_heads
            ));
        }
        if self.layer_spans.len() != self.layers {
            return bad(format!(
                "layer_types lists {} layers but num_hidden_layers is {}",
                self.layer_spans.len(),
                self.layers
            ));
        }
        if self.layer_spans.contains(&AttnSpan::Sliding) && self.sliding_window.is_none_or(|w| w <= 0) {
            return bad("sliding-attention layers need a positive integer \"sliding_window\"".into());
        }
        if let Some(m) = &self.moe {
            if m.experts <= 0 || m.top_k <= 0 || m.top_k > m.experts || m.expert_intermediate <= 0 {
                return bad(format!(
                    "mixture of experts needs 0 < num_experts_per_tok ({}) <= experts ({}) and a positive expert intermediate size ({})",
                    m.top_k, m.experts, m.expert_intermediate
                ));
            }
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        let rotary = self.rotary_dim();
        if rotary <= 0 || rotary % 2 != 0 || rotary > self.head_dim {
            return bad(format!(
                "partial_rotary_factor {} gives {rotary} rotary dimensions of head_dim {}: they must be even and between 2 and head_dim",
                self.partial_rotary_factor, self.head_dim
            ));
        }
        if let RopeScaling::LongRope { short_factor, long_factor, .. } = &self.rope_scaling {
            for (key, list) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if list.len() as i64 != rotary / 2 {
                    return bad(format!(
                        "rope scaling 'longrope': \"{key}\" has {} entries but the {rotary} rotary dimensions need {}",
                        list.len(),
                        rotary / 2
                    ));
                }
            }
        }
        Ok(())
    }

    /// How many dimensions of each head are rotated (`int(head_dim × partial_rotary_factor)`,
    /// as transformers computes it).
    pub fn rotary_dim(&self) -> i64 {
        (self.head_dim as f64 * self.partial_rotary_factor) as i64
    }

    /// Parameter count of the model (embeddings counted once when tied; every expert).
    pub fn num_params(&self) -> i64 {
        self.count_params(false)
    }

    /// Parameters a token passes through: as [`ModelConfig::num_params`], but of each MoE
    /// layer's experts only the `top_k` it is routed to (what a token's FLOPs scale with).
    pub fn active_params(&self) -> i64 {
        self.count_params(true)
    }

    fn count_params(&self, active_only: bool) -> i64 {
        let (h, i, hd) = (self.hidden, self.intermediate, self.head_dim);
        let attn = h * self.heads * hd * 2 + h * self.kv_heads * hd * 2;
        let norms = if self.family.is_gemma() { 4 } else { 2 };
        let qk_norms = if self.qk_norm { 2 * hd } else { 0 };
        let mlp = |layer: usize| match &self.moe {
            Some(m) if m.sparse_layers.get(layer).copied().unwrap_or(true) => {
                let used = if active_only { m.top_k } else { m.experts };
                used * 3 * h * m.expert_intermediate + m.experts * h
            }
            _ => 3 * h * i,
        };
        // gpt-oss: q/k/v/o biases, a sink per head, router and expert biases (every expert's).
        let gpt_oss = match (&self.moe, self.family) {
            (Some(m), Family::GptOss) => (self.heads + 2 * self.kv_heads) * hd + h + self.heads + m.experts * (1 + 2 * m.expert_intermediate + h),
            _ => 0,
        };
        let layers: i64 = (0..self.layers).map(|l| attn + mlp(l) + norms * h + qk_norms + gpt_oss).sum();
        let head = if self.tie_embeddings { 0 } else { self.vocab * h };
        self.vocab * h + layers + h + head
    }
}

/// Typed reads of config.json keys, with errors that name the file and the key.
pub(crate) struct Keys<'a> {
    pub raw: &'a Value,
    pub path: &'a Path,
}

impl Keys<'_> {
    pub fn int(&self, key: &str) -> Result<i64, ModelError> {
        self.raw
            .get(key)
            .and_then(Value::as_i64)
            .ok_or_else(|| ModelError::file(self.path, format!("needs an integer \"{key}\"")))
    }
    pub fn int_or(&self, key: &str, default: i64) -> Result<i64, ModelError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_i64().ok_or_else(|| ModelError::file(self.path, format!("\"{key}\" must be an integer"))),
        }
    }
    pub fn float_or(&self, key: &str, default: f64) -> Result<f64, ModelError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| ModelError::file(self.path, format!("\"{key}\" must be a number"))),
        }
    }
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| ModelError::file(self.path, format!("\"{key}\" must be true or false"))),
        }
    }
    pub fn opt_float(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ModelError::file(self.path, format!("\"{key}\" must be a number or null"))),
        }
    }
    pub fn opt_int(&self, key: &str) -> Result<Option<i64>, ModelError> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| ModelError::file(self.path, format!("\"{key}\" must be an integer or null"))),
        }
    }

    /// The fields every Llama-like config shares; families adjust the options afterwards.
    pub fn llama_like(&self, family: Family, default_theta: f64) -> Result<ModelConfig, ModelError> {
        let hidden = self.int("hidden_size")?;
        let heads = self.int("num_attention_heads")?;
        let architecture = self
            .raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        Ok(ModelConfig {
            family,
            architecture,
            hidden,
            intermediate: self.int("intermediate_size")?,
            layers: self.int("num_hidden_layers")?.max(0) as usize,
            heads,
            kv_heads: self.int_or("num_key_value_heads", heads)?,
            head_dim: self.int_or("head_dim", if heads > 0 { hidden / heads } else { 0 })?,
            vocab: self.int("vocab_size")?,
            rms_eps: self.float_or("rms_norm_eps", 1e-6)?,
            tie_embeddings: self.bool_or("tie_word_embeddings", false)?,
            rope_theta: self.rope_theta(default_theta)?,
            rope_scaling: self.rope_scaling()?,
            partial_rotary_factor: self.partial_rotary_factor()?,
            packed_projections: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_window: None,
            layer_spans: Vec::new(),
            hidden_act: Activation::Silu,
            norm_unit_offset: false,
            scale_embeddings: false,
            query_pre_attn_scalar: None,
            attn_logit_softcap: None,
            final_logit_softcap: None,
            local_rope_theta: None,
            moe: None,
            max_positions: self.int_or("max_position_embeddings", 4096)?,
            raw: self.raw.clone(),
        })
    }

    fn rope_params(&self) -> Option<&Value> {
        // transformers 5 nests RoPE settings under "rope_parameters"; 4.x used top-level keys.
        // Families with a RoPE per layer kind (Gemma 3) nest once more: the global layers'
        // settings are under "full_attention".
        let params = self.raw.get("rope_parameters").filter(|v| v.is_object())?;
        Some(params.get("full_attention").filter(|v| v.is_object()).unwrap_or(params))
    }

    /// `rope_parameters.<section>.<key>` (transformers 5's per-layer-kind RoPE settings).
    pub fn rope_section_float(&self, section: &str, key: &str) -> Option<f64> {
        self.raw.get("rope_parameters")?.get(section)?.get(key)?.as_f64()
    }

    /// `layer_types` (transformers 5: "sliding_attention" / "full_attention" per layer), or
    /// `None` when absent.
    pub fn layer_types(&self) -> Result<Option<Vec<AttnSpan>>, ModelError> {
        let Some(list) = self.raw.get("layer_types").filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let bad = || ModelError::file(self.path, "\"layer_types\" must be a list of \"sliding_attention\" / \"full_attention\"");
        list.as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|v| match v.as_str() {
                Some("sliding_attention") => Ok(AttnSpan::Sliding),
                Some("full_attention") => Ok(AttnSpan::Full),
                _ => Err(bad()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// `partial_rotary_factor`, from the RoPE parameters (transformers 5) or the top level
    /// (4.x), 1 when absent.
    fn partial_rotary_factor(&self) -> Result<f64, ModelError> {
        match self.rope_params().and_then(|p| p.get("partial_rotary_factor")) {
            Some(v) => v.as_f64().ok_or_else(|| ModelError::file(self.path, "\"partial_rotary_factor\" must be a number")),
            None => self.float_or("partial_rotary_factor", 1.0),
        }
    }

    /// LongRoPE's settings as transformers reads them: `original_max_position_embeddings`
    /// from the top level first (Phi-3 keeps it there), the attention factor from the config
    /// or from `factor` (itself max / original positions unless given).
    fn long_rope(&self, s: &Value) -> Result<RopeScaling, ModelError> {
        let list = |k: &str| -> Result<Vec<f64>, ModelError> {
            s.get(k)
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                .ok_or_else(|| ModelError::file(self.path, format!("rope scaling 'longrope' needs \"{k}\", a list of numbers")))
        };
        let max_positions = self.int_or("max_position_embeddings", 4096)?;
        let original = match self.opt_int("original_max_position_embeddings")? {
            Some(o) => o,
            None => s.get("original_max_position_embeddings").and_then(Value::as_i64).unwrap_or(max_positions),
        };
        if original <= 1 {
            return Err(ModelError::file(self.path, "rope scaling 'longrope' needs original_max_position_embeddings > 1"));
        }
        let factor = s.get("factor").and_then(Value::as_f64).unwrap_or(max_positions as f64 / original as f64);
        let attention_factor = match s.get("attention_factor").and_then(Value::as_f64) {
            Some(a) => a,
            None if factor <= 1.0 => 1.0,
            None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
        };
        Ok(RopeScaling::LongRope {
            short_factor: list("short_factor")?,
            long_factor: list("long_factor")?,
            original_max_positions: original,
            attention_factor,
        })
    }

    /// YaRN's settings as transformers reads them (`_compute_yarn_parameters`): `factor`
    /// (max / original positions when null), `beta_fast` 32 and `beta_slow` 1 by default,
    /// `truncate` true by default, the attention factor from the config, from `mscale` /
    /// `mscale_all_dim`, or `0.1 ln factor + 1`.
    fn yarn(&self, s: &Value) -> Result<RopeScaling, ModelError> {
        let original = s
            .get("original_max_position_embeddings")
            .and_then(Value::as_f64)
            .ok_or_else(|| ModelError::file(self.path, "rope scaling 'yarn' needs a number \"original_max_position_embeddings\""))?;
        if original <= 1.0 {
            return Err(ModelError::file(self.path, "rope scaling 'yarn' needs original_max_position_embeddings > 1"));
        }
        let max_positions = self.int_or("max_position_embeddings", 4096)? as f64;
        let factor = s.get("factor").and_then(Value::as_f64).unwrap_or(max_positions / original);
        let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
        let num = |k: &str| s.get(k).and_then(Value::as_f64).filter(|v| *v != 0.0);
        let attention_factor = match (num("attention_factor"), num("mscale"), num("mscale_all_dim")) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
            _ => mscale(factor, 1.0),
        };
        Ok(RopeScaling::Yarn {
            factor,
            beta_fast: num("beta_fast").unwrap_or(32.0),
            beta_slow: num("beta_slow").unwrap_or(1.0),
            original_max_positions: original,
            truncate: s.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            attention_factor,
        })
    }

    fn rope_theta(&self, default: f64) -> Result<f64, ModelError> {
        if let Some(t) = self.rope_params().and_then(|p| p.get("rope_theta")).and_then(Value::as_f64) {
            return Ok(t);
        }
        self.float_or("rope_theta", default)
    }

    fn rope_scaling(&self) -> Result<RopeScaling, ModelError> {
        let s = match self.raw.get("rope_scaling").filter(|v| v.is_object()).or_else(|| self.rope_params()) {
            None => return Ok(RopeScaling::None),
            Some(s) => s,
        };
        let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
        let f = |k: &str| {
            s.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| ModelError::file(self.path, format!("rope scaling '{kind}' needs a number \"{k}\"")))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_positions: f("original_max_position_embeddings")?,
            }),
            "linear" => Ok(RopeScaling::Linear { factor: f("factor")? }),
            "longrope" | "su" => self.long_rope(s),
            "yarn" => self.yarn(s),
            other => Err(ModelError::file(
                self.path,
                format!("rope scaling '{other}' is not supported (ftx supports default, llama3, linear, longrope, yarn)"),
            )),
        }
    }
}

/// Parses `fp32|bf16|fp16`.
pub fn parse_dtype(s: &str) -> anyhow::Result<tch::Kind> {
    match s.to_ascii_lowercase().as_str() {
        "fp32" | "f32" | "float32" => Ok(tch::Kind::Float),
        "bf16" | "bfloat16" => Ok(tch::Kind::BFloat16),
        "fp16" | "f16" | "float16" => Ok(tch::Kind::Half),
        other => anyhow::bail!("unknown dtype '{other}': use fp32, bf16 or fp16"),
    }
}
