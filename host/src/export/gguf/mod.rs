//! `ftx export --format gguf`: a base checkpoint (with an adapter merged in) as one GGUF v3
//! file that llama.cpp, Ollama and LM Studio load, in f16, q8_0 or a k-quant mix.
//!
//! Conventions follow llama.cpp's `convert_hf_to_gguf.py` (names, metadata, Q/K permutation,
//! Llama 3 `rope_freqs`, Phi-3's packed projections and LongRoPE factor tensors, MoE experts
//! stacked into 3-D tensors: [`moe`]) and `llama-quantize` (per-tensor types of each preset). The file is
//! streamed: the header is computed from shapes, then each tensor is read, merged,
//! quantised and written before the next is touched; a temp file is renamed at the end.

pub mod format;
pub mod moe;
pub mod plan;
pub mod quants;
pub mod vocab;
pub mod vocab_spm;

use super::source::MergedSource;
use crate::model::{Family, ModelConfig, RopeScaling};
use anyhow::{bail, Context, Result};
use format::{TensorInfo, Value};
pub use plan::Quant;
use quants::GgmlType;
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    /// The .gguf file.
    pub path: PathBuf,
    /// The Ollama Modelfile beside it.
    pub modelfile: PathBuf,
    /// The JSON manifest beside it.
    pub manifest: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors whose type fell back from the preset's, with why.
    pub fallbacks: Vec<(String, String)>,
    /// File size in bytes.
    pub bytes: u64,
}

/// Where a tensor's values come from.
enum Origin {
    /// A checkpoint tensor (Hugging Face name), permuted by this many heads if set, plus
    /// `shift` if set (Gemma's norms), times `scale` if set (Gemma's attention scale, folded).
    Checkpoint { hf: String, permute: Option<i64>, shift: Option<f64>, scale: Option<f64> },
    /// Per-frequency RoPE factors from config.json: Llama 3.1's `rope_freqs` (computed),
    /// Phi-3's LongRoPE lists (`rope_factors_long` / `_short`).
    RopeFreqs(Vec<f32>),
    /// A MoE projection's experts, stacked (each expert's matrix merged on its own).
    Experts(moe::ExpertSource),
}

struct Planned {
    info: TensorInfo,
    origin: Origin,
}

/// Order llama.cpp's converter writes tensors in: embeddings, rope factors, blocks in
/// order, final norm, output.
fn sort_key(name: &str) -> (u8, usize, String) {
    match name {
        "token_embd.weight" => (0, 0, String::new()),
        "rope_freqs.weight" => (1, 0, String::new()),
        "rope_factors_long.weight" => (1, 1, String::new()),
        "rope_factors_short.weight" => (1, 2, String::new()),
        "output_norm.weight" => (3, 0, String::new()),
        "output.weight" => (4, 0, String::new()),
        _ => {
            let layer = name.split('.').nth(1).and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
            (2, layer, name.to_owned())
        }
    }
}

/// Llama 3.1 RoPE factors as convert_hf_to_gguf computes them (`rope_freqs.weight`).
fn llama3_rope_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } = cfg.rope_scaling else {
        return None;
    };
    let dim = cfg.head_dim as f64;
    let low_wavelen = original_max_positions / low_freq_factor;
    let high_wavelen = original_max_positions / high_freq_factor;
    let factors = (0..cfg.head_dim / 2)
        .map(|i| {
            let freq = 1.0 / cfg.rope_theta.powf((2 * i) as f64 / dim);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect();
    Some(factors)
}

/// The architecture metadata llama.cpp reads for a llama-family decoder.
fn model_metadata(cfg: &ModelConfig, name: &str, quant: Quant) -> Vec<(String, Value)> {
    let arch = plan::arch_name(cfg.family);
    let k = |s: &str| format!("{arch}.{s}");
    let mut kv = vec![
        ("general.architecture".to_owned(), Value::Str(arch.into())),
        ("general.name".to_owned(), Value::Str(name.into())),
        ("general.file_type".to_owned(), Value::U32(quant.file_type())),
        ("general.quantization_version".to_owned(), Value::U32(2)),
        (k("context_length"), Value::U32(cfg.max_positions as u32)),
        (k("embedding_length"), Value::U32(cfg.hidden as u32)),
        (k("block_count"), Value::U32(cfg.layers as u32)),
        (k("feed_forward_length"), Value::U32(cfg.intermediate as u32)),
        (k("attention.head_count"), Value::U32(cfg.heads as u32)),
        (k("attention.head_count_kv"), Value::U32(cfg.kv_heads as u32)),
        (k("attention.key_length"), Value::U32(cfg.head_dim as u32)),
        (k("attention.value_length"), Value::U32(cfg.head_dim as u32)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_eps as f32)),
        (k("vocab_size"), Value::U32(cfg.vocab as u32)),
        (k("rope.dimension_count"), Value::U32(cfg.rotary_dim() as u32)),
    ];
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        kv.push((k("rope.scaling.type"), Value::Str("linear".into())));
        kv.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    if cfg.family == Family::Phi3 && cfg.sliding_window.is_some_and(|w| w < cfg.max_positions) {
        tracing::warn!(
            window = cfg.sliding_window,
            "llama.cpp's phi3 architecture does not apply the sliding window (it attends to the whole context): \
             outputs past the window differ from ftx's and transformers'"
        );
    }
    if cfg.family == Family::Phi3 {
        // As convert_hf_to_gguf's Phi3MiniModel: the window (0 for none), the pretraining
        // context, and LongRoPE's attention factor (its factor lists are tensors).
        kv.push((k("attention.sliding_window"), Value::U32(cfg.sliding_window.unwrap_or(0) as u32)));
        let original = match &cfg.rope_scaling {
            RopeScaling::LongRope { original_max_positions, attention_factor, .. } => {
                kv.push((k("rope.scaling.attn_factor"), Value::F32(*attention_factor as f32)));
                *original_max_positions
            }
            _ => cfg.raw.get("original_max_position_embeddings").and_then(serde_json::Value::as_i64).unwrap_or(cfg.max_positions),
        };
        kv.push((k("rope.scaling.original_context_length"), Value::U32(original as u32)));
    }
    kv.extend(moe::metadata(cfg, arch));
    if cfg.family == Family::GptOss {
        kv.extend(gpt_oss_metadata(cfg, arch));
    }
    if cfg.family.is_gemma() {
        if let Some(w) = cfg.sliding_window {
            kv.push((k("attention.sliding_window"), Value::U32(w as u32)));
        }
        if cfg.query_pre_attn_scalar.is_some() {
            // The scale the file's scores need: llama.cpp's own, the checkpoint's folded into
            // the queries where they differ (plan::gemma_query_fold).
            kv.push((k("attention.scale"), Value::F32(plan::llama_cpp_gemma_scale(cfg) as f32)));
        }
        // Which layers slide: llama.cpp reads the per-layer pattern when given (its default is
        // the released 1:1 / 5:1 patterns).
        if cfg.sliding_window.is_some() {
            let pattern = cfg.layer_spans.iter().map(|s| *s == crate::model::AttnSpan::Sliding).collect();
            kv.push((k("attention.sliding_window_pattern"), Value::BoolArray(pattern)));
        }
        if let Some(c) = cfg.attn_logit_softcap {
            kv.push((k("attn_logit_softcapping"), Value::F32(c as f32)));
        }
        if let Some(c) = cfg.final_logit_softcap {
            kv.push((k("final_logit_softcapping"), Value::F32(c as f32)));
        }
        if let Some(theta) = cfg.local_rope_theta {
            kv.push((k("rope.freq_base_swa"), Value::F32(theta as f32)));
        }
    }
    kv
}

/// gpt-oss's attention metadata, as convert_hf_to_gguf's GptOssModel writes it: the window and
/// which layers slide, and YaRN (llama.cpp applies `0.1 ln factor + 1` itself; a config's
/// other attention factor goes in as the ratio).
fn gpt_oss_metadata(cfg: &ModelConfig, arch: &str) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{arch}.{s}");
    let mut kv = vec![
        (k("attention.sliding_window"), Value::U32(cfg.sliding_window.unwrap_or(0) as u32)),
        (k("attention.sliding_window_pattern"), Value::BoolArray(cfg.layer_spans.iter().map(|s| *s == crate::model::AttnSpan::Sliding).collect())),
    ];
    if let RopeScaling::Yarn { factor, beta_fast, beta_slow, original_max_positions, truncate, attention_factor } = cfg.rope_scaling {
        kv.push((k("rope.scaling.type"), Value::Str("yarn".into())));
        kv.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
        kv.push((k("rope.scaling.original_context_length"), Value::U32(original_max_positions as u32)));
        kv.push((k("rope.scaling.yarn_beta_fast"), Value::F32(beta_fast as f32)));
        kv.push((k("rope.scaling.yarn_beta_slow"), Value::F32(beta_slow as f32)));
        let ratio = attention_factor / (0.1 * factor.ln() + 1.0);
        if (ratio - 1.0).abs() > 1e-6 {
            kv.push((k("rope.scaling.attn_factor"), Value::F32(ratio as f32)));
        }
        if !truncate {
            tracing::warn!(
                "config.json's YaRN has truncate: false (gpt-oss's own setting), but llama.cpp always rounds the correction range \
                 to whole dimensions: a few blended RoPE frequencies differ slightly from ftx's and transformers'"
            );
        }
    }
    kv
}

/// Where the .gguf goes: `out` itself when it ends in `.gguf`, else `out/<name>-<QUANT>.gguf`.
pub fn output_path(out: &Path, model_name: &str, quant: Quant) -> PathBuf {
    if out.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        out.to_owned()
    } else {
        out.join(format!("{model_name}-{}.gguf", quant.label()))
    }
}

/// Exports `base` (+ the PEFT adapter in `adapter`, merged in fp32) as GGUF under `out`
/// (a folder, or a path ending in .gguf), with an Ollama Modelfile and a manifest beside it.
pub fn export_gguf(base: &Path, adapter: Option<&Path>, out: &Path, quant: Quant) -> Result<GgufExport> {
    let src = MergedSource::open(base, adapter)?;
    let cfg = src.config.clone();
    moe::check_llama_cpp_runs_it(&cfg)
        .with_context(|| format!("{}: cannot export {} as GGUF", base.join("config.json").display(), cfg.architecture))?;
    // A Hub id (`org/name@rev`) names the file after `name`.
    let model_name = base
        .canonicalize()
        .unwrap_or_else(|_| base.to_owned())
        .file_name()
        .and_then(|n| n.to_string_lossy().split('@').next().map(str::to_owned))
        .unwrap_or_else(|| "model".into());
    let base_arg = base;
    let base = &crate::hub::resolve_model(base)?;
    let path = output_path(out, &model_name, quant);

    let mut planned = Vec::new();
    let tied = cfg.tie_embeddings || !src.shapes().iter().any(|(n, _)| n == "lm_head.weight");
    let experts = moe::plan(&cfg, &src.shapes().into_iter().collect()).with_context(|| format!("{}: planning the experts", base.display()))?;
    for e in experts.tensors {
        planned.push(Planned { info: TensorInfo { name: e.name, shape: e.shape, ty: GgmlType::F32 }, origin: Origin::Experts(e.source) });
    }
    for (hf, shape) in src.shapes() {
        if experts.consumed.contains(&hf) {
            continue;
        }
        let Some(name) = plan::gguf_name_for(cfg.family, &hf) else {
            tracing::warn!(tensor = %hf, "not part of the GGUF model (llama.cpp does not read it): skipped");
            continue;
        };
        if tied && name == "output.weight" {
            continue;
        }
        let permute = plan::permute_heads(&cfg, &name);
        let shift = plan::norm_shift(cfg.family, &hf);
        let scale = plan::gemma_query_fold(&cfg, &name);
        planned.push(Planned { info: TensorInfo { name, shape, ty: GgmlType::F32 }, origin: Origin::Checkpoint { hf, permute, shift, scale } });
    }
    if cfg.family == Family::Gemma2 && !tied {
        // llama.cpp's gemma2 reads the head from token_embd.weight; an untied head would be dropped.
        bail!(
            "{}: this Gemma 2 checkpoint has its own lm_head (tie_word_embeddings is false), but llama.cpp's \
             gemma2 architecture always uses the embeddings as the head; export it as safetensors (ftx export --format merged) instead",
            base.display()
        );
    }
    if cfg.family != Family::Qwen2 && cfg.family != Family::Qwen3 {
        if let Some(f) = llama3_rope_factors(&cfg) {
            let info = TensorInfo { name: "rope_freqs.weight".into(), shape: vec![f.len() as i64], ty: GgmlType::F32 };
            planned.push(Planned { info, origin: Origin::RopeFreqs(f) });
        }
    } else if matches!(cfg.rope_scaling, RopeScaling::Llama3 { .. }) {
        bail!("{}: RoPE scaling {:?} is not supported by ftx's GGUF export for {:?}", base.display(), cfg.rope_scaling, cfg.family);
    }
    if let RopeScaling::LongRope { short_factor, long_factor, .. } = &cfg.rope_scaling {
        for (name, factors) in [("rope_factors_long.weight", long_factor), ("rope_factors_short.weight", short_factor)] {
            let f: Vec<f32> = factors.iter().map(|&x| x as f32).collect();
            let info = TensorInfo { name: name.into(), shape: vec![f.len() as i64], ty: GgmlType::F32 };
            planned.push(Planned { info, origin: Origin::RopeFreqs(f) });
        }
    }
    planned.sort_by_key(|p| sort_key(&p.info.name));
    let mut fallbacks = Vec::new();
    for p in &mut planned {
        let n_experts = cfg.moe.as_ref().map_or(0, |m| m.experts as usize);
        let (ty, why) = plan::tensor_type(quant, &p.info.name, &p.info.shape, cfg.layers, tied, n_experts);
        p.info.ty = ty;
        if let Some(why) = why {
            fallbacks.push((p.info.name.clone(), why));
        }
    }
    if !fallbacks.is_empty() {
        tracing::warn!(count = fallbacks.len(), "tensors whose rows are not whole quantisation blocks use a fallback type");
    }

    let mut kv = model_metadata(&cfg, &model_name, quant);
    kv.extend(vocab::metadata(base, cfg.family, cfg.vocab).map_err(anyhow::Error::msg)?);
    let infos: Vec<TensorInfo> = planned.iter().map(|p| p.info.clone()).collect();

    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fname = path.file_name().and_then(|n| n.to_str()).unwrap_or("model.gguf").to_owned();
    let tmp = dir.join(format!(".{fname}.tmp-{}", std::process::id()));
    let result = write_file(&tmp, &src, &kv, &infos, &planned);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", path.display())));
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    let bytes = std::fs::metadata(&path)?.len();

    let modelfile = dir.join("Modelfile");
    let text = super::modelfile::modelfile(&fname, base, cfg.vocab).map_err(anyhow::Error::msg)?;
    crate::util::write_atomic(&modelfile, text.as_bytes())?;

    let manifest_path = dir.join(format!("{}.manifest.json", path.file_stem().and_then(|s| s.to_str()).unwrap_or("model")));
    let types: serde_json::Map<String, serde_json::Value> =
        infos.iter().map(|t| (t.name.clone(), serde_json::Value::String(t.ty.name().into()))).collect();
    let manifest = serde_json::json!({
        "format": "gguf",
        // As given (a Hub id stays an id): `ftx push` names the base and finds the run from these.
        "base_model": base_arg.display().to_string(),
        "adapter": adapter.map(|a| a.canonicalize().unwrap_or_else(|_| a.to_owned())),
        "gguf_version": 3,
        "file": fname,
        "sha256": crate::util::sha256_file(&path)?,
        "bytes": bytes,
        "quant": quant.label(),
        "file_type": quant.file_type(),
        "architecture": plan::arch_name(cfg.family),
        "tensor_count": infos.len(),
        "adapted_modules": src.adapted_modules(),
        "tensor_types": types,
        "fallbacks": fallbacks.iter().map(|(n, w)| serde_json::json!({"tensor": n, "why": w})).collect::<Vec<_>>(),
        "inputs": src.input_hashes()?,
        "ftx_version": env!("CARGO_PKG_VERSION"),
    });
    crate::util::write_atomic(&manifest_path, serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    Ok(GgufExport { path, modelfile, manifest: manifest_path, tensors: infos.len(), fallbacks, bytes })
}

/// The values of one planned tensor, fp32, in GGUF row order, handed to `emit` in whole-row
/// blocks: the tensor at once, or a stacked MoE tensor one expert at a time (so a large
/// expert tensor is never held twice).
fn for_each_block(src: &MergedSource, p: &Planned, mut emit: impl FnMut(Vec<f32>) -> Result<()>) -> Result<()> {
    let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(Vec::<f32>::try_from(&t.contiguous().view([-1]))?) };
    match &p.origin {
        Origin::RopeFreqs(f) => emit(f.clone()),
        Origin::Checkpoint { hf, permute, shift, scale } => {
            let t = src.load(hf)?;
            let t = match permute {
                Some(h) => plan::permute_qk(&t, *h),
                None => t,
            };
            let t = match shift {
                Some(s) => t + *s,
                None => t,
            };
            let t = match scale {
                Some(c) => t * *c,
                None => t,
            };
            emit(flat(t)?)
        }
        // Each expert's matrix merged with its own LoRA delta (if the adapter has one).
        Origin::Experts(moe::ExpertSource::PerExpert(names)) => names.iter().try_for_each(|hf| emit(flat(src.load(hf)?)?)),
        Origin::Experts(moe::ExpertSource::Strided { hf, from }) => {
            let t = src.load(hf)?;
            let last = t.dim() as i64 - 2;
            (0..t.size()[0]).try_for_each(|x| {
                let m = t.get(x);
                let m = match from {
                    Some(f) => m.slice(last, *f, None::<i64>, 2),
                    None => m,
                };
                // A matrix [in, out] becomes llama.cpp's [out, in] rows; a bias stays a row.
                emit(flat(if last == 1 { m.transpose(0, 1) } else { m })?)
            })
        }
        Origin::Experts(moe::ExpertSource::Fused { hf, rows }) => {
            let t = src.load(hf)?;
            (0..t.size()[0]).try_for_each(|x| {
                let m = t.get(x);
                emit(flat(match rows {
                    Some((start, len)) => m.narrow(0, *start, *len),
                    None => m,
                })?)
            })
        }
    }
}

fn write_file(tmp: &Path, src: &MergedSource, kv: &[(String, Value)], infos: &[TensorInfo], planned: &[Planned]) -> Result<()> {
    let file = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    format::write_header(&mut w, kv, infos)?;
    let bar = indicatif::ProgressBar::new(planned.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} tensors · {msg} · {elapsed_precise}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for p in planned {
        bar.set_message(p.info.name.clone());
        let row = *p.info.shape.last().unwrap_or(&1) as usize;
        // Rows are independent: quantise groups of them in parallel, keep their order.
        let rows_per_job = (1usize << 16).div_ceil(row.max(1)).max(1);
        let mut written = 0u64;
        for_each_block(src, p, |x| {
            let chunks: Vec<Vec<u8>> = x
                .par_chunks(row * rows_per_job)
                .map(|c| {
                    let mut out = Vec::new();
                    p.info.ty.quantize(c, &mut out);
                    out
                })
                .collect();
            for c in chunks {
                w.write_all(&c)?;
                written += c.len() as u64;
            }
            Ok(())
        })?;
        if written != p.info.nbytes() {
            bail!("{}: wrote {written} bytes where its shape {:?} needs {}", p.info.name, p.info.shape, p.info.nbytes());
        }
        format::write_padding(&mut w, written)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    let _ = std::io::stdout().flush();
    Ok(())
}
