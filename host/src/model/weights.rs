//! Reading a checkpoint's tensors from `*.safetensors` files, single or sharded; and the plain
//! tensor-file reads and writes that checkpoints, adapters and exports share
//! ([`read_safetensors`], [`write_safetensors`]).
//!
//! Files are memory-mapped copy-on-write: a tensor whose dtype and device already match is
//! used in place (no copy), and writing to it (full fine-tuning) touches private pages only.
//! Headers are validated before any tensor is built, so a truncated or lying file is an
//! error naming the file, never a crash. MXFP4 parameters (gpt-oss's published experts,
//! `P_blocks` + `P_scales`) are read as the dequantised tensor `P` ([`super::mxfp4`]).

use super::mxfp4::{BLOCKS_SUFFIX, SCALES_SUFFIX};
use super::ModelError;
use memmap2::MmapMut;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// All tensors of a checkpoint, by name, still in their files.
pub struct WeightFiles {
    files: Vec<(PathBuf, Arc<MmapMut>)>,
    /// name -> (file index, dtype, shape, byte range inside the file)
    index: HashMap<String, Entry>,
    /// Parameters stored as MXFP4 (`P_blocks` + `P_scales`, gpt-oss's published experts),
    /// by the name `P` they are read under, with their dequantised shape.
    mxfp4: HashMap<String, Vec<i64>>,
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<i64>,
    start: usize,
    end: usize,
}

impl WeightFiles {
    /// Opens `model.safetensors`, or every shard named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let dir = &crate::hub::resolve_model(dir)?;
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::file(&index_path, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::file(&index_path, "has no \"weight_map\" object"))?;
            let mut shards: Vec<String> =
                map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
            shards.sort();
            shards.dedup();
            shards.iter().map(|s| dir.join(s)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::Missing {
                path: single,
                hint: "a checkpoint folder needs model.safetensors or model.safetensors.index.json with its shards",
            });
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: copy-on-write private mapping; other processes changing the file under us
            // is the usual mmap caveat, accepted by every checkpoint loader.
            let map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }.map_err(|e| ModelError::io(&path, e))?;
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| ModelError::file(&path, format!("not a valid safetensors file ({e})")))?;
            for (name, view) in st.tensors() {
                let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                let bytes = view.data();
                let start = bytes.as_ptr() as usize - map.as_ptr() as usize;
                index.insert(name, Entry { file: i, dtype: view.dtype(), shape, start, end: start + bytes.len() });
            }
            files.push((path, Arc::new(map)));
        }
        let mxfp4 = mxfp4_pairs(&index, &files)?;
        Ok(WeightFiles { files, index, mxfp4 })
    }

    /// Loads one tensor, checks its shape, and converts it to `kind` on `device`.
    /// An MXFP4 parameter (`P_blocks` + `P_scales`) is read under its own name `P`,
    /// dequantised on `device` ([`super::mxfp4`]).
    pub fn load(&self, name: &str, expected: &[i64], kind: Kind, device: Device) -> Result<Tensor, ModelError> {
        if let Some(shape) = self.mxfp4.get(name) {
            if shape != expected {
                let path = &self.files[self.index[&format!("{name}{BLOCKS_SUFFIX}")].file].0;
                return Err(ModelError::file(path, format!("MXFP4 tensor {name} dequantises to {shape:?} but config.json implies {expected:?}")));
            }
            let part = |suffix: &str| {
                let n = format!("{name}{suffix}");
                self.load(&n, &self.index[&n].shape, Kind::Uint8, Device::Cpu)
            };
            return Ok(super::mxfp4::dequantize(&part(BLOCKS_SUFFIX)?, &part(SCALES_SUFFIX)?, device).to_kind(kind));
        }
        let e = self.index.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_owned(),
            files: self.files.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", "),
        })?;
        let path = &self.files[e.file].0;
        if e.shape != expected {
            return Err(ModelError::file(
                path,
                format!("tensor {name} has shape {:?} but config.json implies {expected:?}", e.shape),
            ));
        }
        let src_kind = kind_of(e.dtype).ok_or_else(|| {
            ModelError::file(path, format!("tensor {name} has dtype {:?}, which ftx cannot load", e.dtype))
        })?;
        let map = &self.files[e.file].1;
        let bytes = &map[e.start..e.end];
        let t = if (bytes.as_ptr() as usize) % src_kind.elt_size_in_bytes() == 0 {
            // SAFETY: the range was validated by safetensors against the shape and dtype; the
            // mapping lives as long as `self`, and tensors that alias it (same kind, CPU) keep
            // `self` alive through the model that holds both.
            unsafe { Tensor::from_blob(bytes.as_ptr(), &e.shape, &[], src_kind, Device::Cpu) }
        } else {
            Tensor::f_from_data_size(bytes, &e.shape, src_kind).map_err(|err| ModelError::file(path, err.to_string()))?
        };
        let t = t.to_kind(kind).to_device(device);
        Ok(t)
    }

    /// Every tensor's name and shape, sorted by name (for exports that stream tensor by tensor);
    /// an MXFP4 parameter as the one dequantised tensor it is read as.
    pub fn shapes(&self) -> Vec<(String, Vec<i64>)> {
        let packed = |n: &str| {
            [BLOCKS_SUFFIX, SCALES_SUFFIX].iter().any(|s| n.strip_suffix(s).is_some_and(|p| self.mxfp4.contains_key(p)))
        };
        let mut v: Vec<(String, Vec<i64>)> =
            self.index.iter().filter(|(n, _)| !packed(n)).map(|(n, e)| (n.clone(), e.shape.clone())).collect();
        v.extend(self.mxfp4.iter().map(|(n, s)| (n.clone(), s.clone())));
        v.sort();
        v
    }

    /// Loads one tensor as stored (any shape; MXFP4 dequantised), converted to `kind` on the CPU.
    pub fn load_any(&self, name: &str, kind: Kind) -> Result<Tensor, ModelError> {
        let shape = self.mxfp4.get(name).or_else(|| self.index.get(name).map(|e| &e.shape)).cloned().unwrap_or_default();
        self.load(name, &shape, kind, Device::Cpu)
    }

    /// Keeps the mappings alive beside tensors that alias them.
    pub fn keep_alive(&self) -> Vec<Arc<MmapMut>> {
        self.files.iter().map(|(_, m)| m.clone()).collect()
    }
}

/// The MXFP4 parameters among `index`'s tensors: every `P_blocks` with a `P_scales` beside it
/// and no plain `P`, both uint8 and shaped as MXFP4 (else an error naming the file).
fn mxfp4_pairs(index: &HashMap<String, Entry>, files: &[(PathBuf, Arc<MmapMut>)]) -> Result<HashMap<String, Vec<i64>>, ModelError> {
    let mut out = HashMap::new();
    for (name, blocks) in index {
        let Some(param) = name.strip_suffix(BLOCKS_SUFFIX) else { continue };
        let Some(scales) = index.get(&format!("{param}{SCALES_SUFFIX}")) else { continue };
        if index.contains_key(param) {
            continue;
        }
        let path = &files[blocks.file].0;
        if blocks.dtype != Dtype::U8 || scales.dtype != Dtype::U8 {
            return Err(ModelError::file(
                path,
                format!("{name} / {param}{SCALES_SUFFIX} are {:?} / {:?}; MXFP4 blocks and scales are uint8", blocks.dtype, scales.dtype),
            ));
        }
        let shape = super::mxfp4::dequantized_shape(&blocks.shape, &scales.shape).map_err(|e| ModelError::file(path, format!("{param}: {e}")))?;
        out.insert(param.to_owned(), shape);
    }
    Ok(out)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Writes tensors as safetensors, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("t"), std::process::id()));
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&cpu, &tmp).map_err(std::io::Error::other)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> std::io::Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
}
