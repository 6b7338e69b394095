//! A merged checkpoint written as safetensors shards plus `model.safetensors.index.json`
//! (Hugging Face's layout), streamed: each shard's header is computed from shapes, then
//! every tensor is read, merged and converted only when its bytes are written.

use super::source::{MergedSource, SourceError};
use anyhow::{Context, Result};
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Kind;

/// A tensor that is produced when safetensors asks for its bytes.
struct LazyTensor<'a> {
    src: &'a MergedSource,
    name: String,
    shape: Vec<usize>,
    kind: Kind,
    error: &'a RefCell<Option<SourceError>>,
    bar: &'a indicatif::ProgressBar,
}

fn dtype_of(kind: Kind) -> Dtype {
    match kind {
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        _ => Dtype::F32,
    }
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        dtype_of(self.kind)
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.bar.set_message(self.name.clone());
        let n = self.data_len();
        let mut buf = vec![0u8; n];
        match self.src.load(&self.name) {
            Ok(t) => {
                let t = t.to_kind(self.kind).contiguous();
                t.copy_data_u8(&mut buf, t.numel());
            }
            // safetensors cannot carry our error: remember it; the file is discarded.
            Err(e) => *self.error.borrow_mut() = Some(e),
        }
        self.bar.inc(1);
        Cow::Owned(buf)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.kind.elt_size_in_bytes()
    }
}

/// Groups tensors (in name order) into shards of at most `max_bytes` (a tensor larger than
/// that gets a shard of its own).
pub fn plan_shards(tensors: &[(String, u64)], max_bytes: u64) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut current = 0u64;
    for (name, bytes) in tensors {
        if shards.is_empty() || (current + bytes > max_bytes && current > 0) {
            shards.push(Vec::new());
            current = 0;
        }
        shards.last_mut().expect("pushed above").push(name.clone());
        current += bytes;
    }
    shards
}

/// Writes `base` (+ adapter, merged in fp32) to `out` as `kind` safetensors, sharded at
/// `max_shard_bytes`, with config/tokenizer files and an `ftx-manifest.json`. Returns the
/// weight files written.
pub fn export_merged_sharded(base: &Path, adapter: Option<&Path>, out: &Path, kind: Kind, max_shard_bytes: u64) -> Result<Vec<PathBuf>> {
    let src = MergedSource::open(base, adapter)?;
    let local_base = crate::hub::resolve_model(base)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let shapes = src.shapes();
    let sizes: Vec<(String, u64)> = shapes
        .iter()
        .map(|(n, s)| (n.clone(), s.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64))
        .collect();
    let total: u64 = sizes.iter().map(|(_, b)| b).sum();
    let shards = plan_shards(&sizes, max_shard_bytes);
    let names: Vec<String> = if shards.len() == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=shards.len()).map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len())).collect()
    };
    let shape_of: HashMap<&str, &Vec<i64>> = shapes.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let error = RefCell::new(None);
    let bar = indicatif::ProgressBar::new(shapes.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} tensors · {msg} · {elapsed_precise}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut temps = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let meta: HashMap<String, String> = [("format".to_owned(), "pt".to_owned())].into();
    for (shard, file) in shards.iter().zip(&names) {
        let tmp = out.join(format!(".{file}.tmp-{}", std::process::id()));
        let views: Vec<(String, LazyTensor)> = shard
            .iter()
            .map(|n| {
                let shape = shape_of[n.as_str()].iter().map(|&d| d as usize).collect();
                (n.clone(), LazyTensor { src: &src, name: n.clone(), shape, kind, error: &error, bar: &bar })
            })
            .collect();
        let written = safetensors::serialize_to_file(views, Some(meta.clone()), &tmp);
        let failed = error.borrow_mut().take();
        if let Some(e) = failed.map(anyhow::Error::from).or(written.err().map(anyhow::Error::from)) {
            for t in temps.iter().map(|(t, _): &(PathBuf, PathBuf)| t).chain([&tmp]) {
                let _ = std::fs::remove_file(t);
            }
            return Err(e.context(format!("writing {}", out.join(file).display())));
        }
        std::fs::File::open(&tmp)?.sync_all()?;
        for n in shard {
            weight_map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
        temps.push((tmp, out.join(file)));
    }
    bar.finish_and_clear();
    // Old weights of another layout would shadow or mix with the new ones.
    let index = out.join("model.safetensors.index.json");
    let _ = std::fs::remove_file(&index);
    let _ = std::fs::remove_file(out.join("model.safetensors"));
    for (tmp, dst) in &temps {
        std::fs::rename(tmp, dst).with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
    }
    if names.len() > 1 {
        let idx = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        crate::util::write_atomic(&index, serde_json::to_string_pretty(&idx)?.as_bytes())?;
    }
    let mut config = src.config.raw.clone();
    let dtype = match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    };
    for key in ["torch_dtype", "dtype"] {
        config[key] = serde_json::Value::String(dtype.into());
    }
    // MXFP4 experts (gpt-oss's published checkpoints) were written dequantised, in `kind`.
    if config.get("quantization_config").and_then(|q| q.get("quant_method")).and_then(serde_json::Value::as_str) == Some("mxfp4") {
        if let Some(c) = config.as_object_mut() {
            c.remove("quantization_config");
        }
    }
    crate::util::write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    for f in crate::model::tokenizer::TOKENIZER_FILES.iter().chain(&["generation_config.json"]) {
        let s = local_base.join(f);
        if s.exists() {
            crate::util::write_atomic(&out.join(f), &std::fs::read(&s)?)?;
        }
    }
    let files: Vec<PathBuf> = temps.into_iter().map(|(_, d)| d).collect();
    let mut hashes = serde_json::Map::new();
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
        hashes.insert(name, crate::util::sha256_file(f)?.into());
    }
    let manifest = serde_json::json!({
        "format": "merged-safetensors",
        // As given (a Hub id stays an id): `ftx push` names the base and finds the run from these.
        "base_model": base.display().to_string(),
        "adapter": adapter.map(|a| a.canonicalize().unwrap_or_else(|_| a.to_owned())),
        "dtype": dtype,
        "tensor_count": shapes.len(),
        "total_bytes": total,
        "max_shard_bytes": max_shard_bytes,
        "shards": hashes,
        "adapted_modules": src.adapted_modules(),
        "inputs": src.input_hashes()?,
        "ftx_version": env!("CARGO_PKG_VERSION"),
    });
    crate::util::write_atomic(&out.join("ftx-manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::plan_shards;

    #[test]
    fn shards_fill_up_to_the_limit_and_big_tensors_stand_alone() {
        let t = |n: &str, b: u64| (n.to_owned(), b);
        let s = plan_shards(&[t("a", 3), t("b", 3), t("c", 10), t("d", 1)], 6);
        assert_eq!(s, vec![vec!["a", "b"], vec!["c"], vec!["d"]]);
    }
}
