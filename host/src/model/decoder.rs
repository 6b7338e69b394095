//! The decoder-only transformer every supported family shares, read top to bottom:
//! embeddings (× √hidden for Gemma) → N × [`Block`] → final RMSNorm → LM head (soft-capped
//! for Gemma 2). The layers are whichever block type the family builds
//! ([`PreNormBlock`] for Llama, Mistral, Qwen and Phi-3, and with a mixture-of-experts MLP
//! ([`moe::SparseMoe`]) for Mixtral and Qwen3-MoE; Gemma's [`SandwichBlock`]; gpt-oss's
//! [`GptOssBlock`]); attention, masks
//! and the KV cache are in [`super::attention`].

pub use super::attention::{AttnInputs, AttnMask, Attention, KvCache, LayerCache, PagedKv, Rope, SpanInputs};
pub use super::block::{Block, LayerLoader, Mlp, PreNormBlock, RmsNorm};
use super::gemma2::SandwichBlock;
use super::gpt_oss::GptOssBlock;
use super::moe;
use super::linear::Linear;
use super::weights::WeightFiles;
use super::{AttnSpan, Family, ModelConfig, ModelError, RopeScaling};
use memmap2::MmapMut;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// How to load a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of the weights: Float, BFloat16 or Half.
    pub kind: Kind,
}

/// A causal language model: the whole decoder plus its head.
pub struct CausalLm {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Box<dyn Block>>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<Linear>,
    pub rope: Rope,
    /// The sliding layers' rotary tables when they differ from the global ones (Gemma 3).
    pub rope_local: Option<Rope>,
    pub device: Device,
    pub kind: Kind,
    /// Weight files that CPU tensors may alias.
    _maps: Vec<Arc<MmapMut>>,
}

impl CausalLm {
    /// Loads `dir` (config.json + safetensors) onto `opts.device` in `opts.kind`.
    pub fn load(dir: &Path, opts: LoadOptions) -> Result<CausalLm, ModelError> {
        let config = ModelConfig::load(dir)?;
        let files = WeightFiles::open(dir)?;
        Self::from_weights(config, &files, opts)
    }

    /// Builds the model from already-opened weight files.
    pub fn from_weights(config: ModelConfig, files: &WeightFiles, opts: LoadOptions) -> Result<CausalLm, ModelError> {
        let load = |name: &str, shape: &[i64]| files.load(name, shape, opts.kind, opts.device);
        Self::build(config, opts, &load, &mut |_| {}, files.keep_alive())
    }

    /// A randomly initialised model (weights ~ N(0, 0.02²), norms 1 (Gemma's 1 + w norms: w =
    /// 0), biases 0), as transformers initialises one: for benchmarks and the demo's base model.
    pub fn random(config: ModelConfig, opts: LoadOptions, seed: i64) -> Result<CausalLm, ModelError> {
        Self::random_with(config, opts, seed, &mut |_| {})
    }

    /// [`CausalLm::random`], handing each decoder layer to `finish_layer` as soon as it is
    /// built (e.g. to quantise it, so that a model too large in bf16 never is whole).
    pub fn random_with(config: ModelConfig, opts: LoadOptions, seed: i64, finish_layer: &mut dyn FnMut(&mut dyn Block)) -> Result<CausalLm, ModelError> {
        tch::manual_seed(seed);
        let unit_offset = config.norm_unit_offset;
        let init = |name: &str, shape: &[i64]| -> Result<Tensor, ModelError> {
            let t = if name.ends_with("norm.weight") && unit_offset {
                // Gemma's norms scale by 1 + w: w = 0 is the identity scale.
                Tensor::zeros(shape, (opts.kind, opts.device))
            } else if name.ends_with("norm.weight") {
                Tensor::ones(shape, (opts.kind, opts.device))
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, (opts.kind, opts.device))
            } else {
                (Tensor::randn(shape, (Kind::Float, opts.device)) * 0.02).to_kind(opts.kind)
            };
            Ok(t)
        };
        Self::build(config, opts, &init, finish_layer, Vec::new())
    }

    /// Builds the model, taking each tensor (by HF name and expected shape) from `load`.
    fn build(
        config: ModelConfig,
        opts: LoadOptions,
        load: &dyn Fn(&str, &[i64]) -> Result<Tensor, ModelError>,
        finish_layer: &mut dyn FnMut(&mut dyn Block),
        maps: Vec<Arc<MmapMut>>,
    ) -> Result<CausalLm, ModelError> {
        let c = &config;
        let loader = LayerLoader { cfg: c, load };
        let mut layers: Vec<Box<dyn Block>> = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let mut layer: Box<dyn Block> = if c.family == Family::GptOss {
                Box::new(GptOssBlock::load(&loader, i)?)
            } else if let Some(moe_cfg) = &c.moe {
                Box::new(moe::load_block(&loader, i, moe_cfg)?)
            } else if c.family.is_gemma() {
                Box::new(SandwichBlock::load(&loader, i)?)
            } else {
                Box::new(PreNormBlock::load(&loader, i)?)
            };
            finish_layer(layer.as_mut());
            layers.push(layer);
        }
        // Some tied checkpoints still ship lm_head.weight; the tie decides, as in transformers.
        let lm_head = if c.tie_embeddings { None } else { Some(loader.linear("lm_head", c.vocab, c.hidden, false)?) };
        let rope_local = c.local_rope_theta.map(|theta| Rope::new(c.rotary_dim(), theta, &RopeScaling::None, opts.device));
        Ok(CausalLm {
            embed_tokens: load("model.embed_tokens.weight", &[c.vocab, c.hidden])?,
            layers,
            norm: loader.norm("model.norm", c.hidden)?,
            lm_head,
            rope: Rope::new(c.rotary_dim(), c.rope_theta, &c.rope_scaling, opts.device),
            rope_local,
            device: opts.device,
            kind: opts.kind,
            _maps: maps,
            config,
        })
    }

    /// Token embeddings `[B, T, hidden]` for ids `[B, T]`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        let e = Tensor::embedding(&self.embed_tokens, ids, -1, false, false);
        if !self.config.scale_embeddings {
            return e;
        }
        // √hidden rounded to the compute dtype first, as transformers multiplies.
        let scale = Tensor::from((self.config.hidden as f64).sqrt()).to_kind(self.kind).to_device(self.device);
        e * scale
    }

    /// Rotary tables for `positions [B, T]` and masks, for each attention span the layers use:
    /// `mask(window)` gives the mask with that window (`None`: full causal).
    pub fn attn_inputs(&self, positions: &Tensor, mask: impl Fn(Option<i64>) -> AttnMask) -> AttnInputs {
        let spans = &self.config.layer_spans;
        let build = |rope: &Rope, window: Option<i64>| {
            let (cos, sin) = rope.cos_sin(positions, self.kind);
            SpanInputs { cos, sin, mask: mask(window) }
        };
        AttnInputs {
            full: spans.contains(&AttnSpan::Full).then(|| build(&self.rope, None)),
            sliding: spans
                .contains(&AttnSpan::Sliding)
                .then(|| build(self.rope_local.as_ref().unwrap_or(&self.rope), self.config.sliding_window)),
            sliced_backward: false,
        }
    }

    /// Final norm then vocabulary projection: logits `[B, T, vocab]`, soft-capped where the
    /// family caps them.
    pub fn head(&self, hidden: &Tensor) -> Tensor {
        let h = self.norm.forward(hidden);
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h),
            None => h.linear::<Tensor>(&self.embed_tokens, None),
        };
        match self.config.final_logit_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// The last hidden state (before the final norm) for ids `[B, T]`.
    pub fn hidden(&self, ids: &Tensor, inp: &AttnInputs, mut cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let mut h = self.embed(ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = layer.forward(&h, inp, layer_cache, train);
        }
        h
    }

    /// Logits `[B, T, vocab]` for `ids [B, T]` continuing the cache (if any), causally.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let past = cache.as_ref().map_or(0, |c| c.len());
        let positions = Tensor::arange_start(past, past + t, (Kind::Int64, self.device)).unsqueeze(0).expand([b, t], false);
        let inp = self.attn_inputs(&positions, |window| AttnMask::causal_with_offset(t, past, window, self.device));
        self.head(&self.hidden(ids, &inp, cache, false))
    }

    /// Runs q/k/v and gate/up as fused GEMMs (the default) or each projection on its own
    /// (the reference the fused path is tested against).
    pub fn set_fused_projections(&mut self, on: bool) {
        for l in &mut self.layers {
            l.set_fused(on);
        }
    }

    /// Runs LoRA q/k/v and MLPs as the hand-derived nodes of `model::lora_block` where they
    /// apply (the default, unless `FTX_BLOCK_NODE=0`), or through autograd's composition.
    pub fn set_block_nodes(&mut self, on: bool) {
        for l in &mut self.layers {
            l.set_block_nodes(on);
        }
    }

    /// Selective MLP recompute (`train.recompute = "mlp"`): each dense MLP's LoRA node keeps
    /// only its input and `x·Aᵀ` products and runs gate/up again in backward
    /// ([`super::block::Mlp::recompute`]; where the node applies: `train::recompute` checks).
    pub fn set_mlp_recompute(&mut self, on: bool) {
        for l in &mut self.layers {
            super::block::FeedForward::set_recompute(l.parts_mut().mlp.as_mut(), on);
        }
    }

    /// Every projection with its HF module name (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            out.extend(l.linears_mut().into_iter().map(|(name, lin)| (format!("model.layers.{i}.{name}"), lin)));
        }
        out
    }

    /// Every dense tensor of the base model under its HF name (NF4 weights are skipped).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        use super::linear::Weight;
        let mut out = vec![("model.embed_tokens.weight".to_owned(), self.embed_tokens.shallow_clone())];
        let mut lin = |name: String, l: &Linear| {
            if let Weight::Dense(w) = &l.base.weight {
                out.push((format!("{name}.weight"), w.shallow_clone()));
            }
            if let Some(b) = &l.base.bias {
                out.push((format!("{name}.bias"), b.shallow_clone()));
            }
        };
        for (i, l) in self.layers.iter().enumerate() {
            for (name, linear) in l.linears() {
                lin(format!("model.layers.{i}.{name}"), linear);
            }
        }
        if let Some(head) = &self.lm_head {
            lin("lm_head".to_owned(), head);
        }
        for (i, l) in self.layers.iter().enumerate() {
            for (name, norm) in l.norms() {
                out.push((format!("model.layers.{i}.{name}.weight"), norm.weight.shallow_clone()));
            }
            out.extend(l.other_tensors().into_iter().map(|(name, t)| (format!("model.layers.{i}.{name}"), t)));
        }
        out.push(("model.norm.weight".to_owned(), self.norm.weight.shallow_clone()));
        out
    }
}
