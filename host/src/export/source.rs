//! The tensors of a base checkpoint with a PEFT adapter folded in, produced one at a time.
//!
//! Exports stream from here: the base stays memory-mapped, the (small) adapter is loaded
//! whole, and each requested tensor is read, merged in fp32 and handed over, so a model
//! larger than RAM exports without being held.

use crate::model::linear::{Adapter, BaseLinear, Weight};
use crate::model::weights::WeightFiles;
use crate::model::ModelConfig;
use crate::peft::lora::LoraAdapter;
use crate::peft::LoraSettings;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// What can go wrong opening or reading a merge source. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The base checkpoint could not be read.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// The adapter folder is unreadable or does not fit the base.
    #[error("{path}: {problem}")]
    Adapter { path: PathBuf, problem: String },
}

/// One adapted projection: its LoRA factors (and DoRA magnitude).
struct ModuleAdapter {
    a: Tensor,
    b: Tensor,
    magnitude: Option<Tensor>,
}

/// A base checkpoint plus an optional adapter, read tensor by tensor.
pub struct MergedSource {
    /// The base checkpoint folder (a Hub id's snapshot in the cache).
    pub base: PathBuf,
    /// The base model's config.json.
    pub config: ModelConfig,
    /// The adapter folder, if any.
    pub adapter: Option<PathBuf>,
    files: WeightFiles,
    settings: Option<LoraSettings>,
    modules: HashMap<String, ModuleAdapter>,
    /// Stacked-experts parameters (gpt-oss's `….mlp.experts.gate_up_proj`) → their LoRA
    /// factors (A `[r·E, in]`, B `[out, r·E]`), by the checkpoint tensor they change.
    experts: HashMap<String, (Tensor, Tensor)>,
}

impl MergedSource {
    /// Opens `base` (memory-mapped) and loads the adapter in `adapter`, checking that every
    /// adapted module exists in the base with matching shapes.
    pub fn open(base: &Path, adapter: Option<&Path>) -> Result<Self, SourceError> {
        let config = ModelConfig::load(base)?;
        let files = WeightFiles::open(base)?;
        let mut modules = HashMap::new();
        let mut experts = HashMap::new();
        let mut settings = None;
        let adapter = match adapter {
            Some(dir) => Some(crate::peft::adapter_dir(dir).map_err(|problem| SourceError::Adapter { path: dir.to_owned(), problem })?),
            None => None,
        };
        if let Some(dir) = adapter.as_deref() {
            let err = |problem: String| SourceError::Adapter { path: dir.to_owned(), problem };
            let s = crate::peft::read_adapter_config(dir).map_err(err)?;
            let path = dir.join("adapter_model.safetensors");
            let tensors = crate::model::weights::read_safetensors(&path).map_err(|e| err(e.to_string()))?;
            let mut parts: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
            for (name, t) in tensors {
                let name = name.replace(".default", "");
                let stem = name.strip_prefix("base_model.model.").unwrap_or(&name);
                let (module, slot) = if let Some(m) = stem.strip_suffix(".lora_A.weight") {
                    (m, 0)
                } else if let Some(m) = stem.strip_suffix(".lora_B.weight") {
                    (m, 1)
                } else if let Some(m) = stem.strip_suffix(".lora_magnitude_vector") {
                    (m, 2)
                } else {
                    return Err(err(format!("{}: tensor {name} is not a LoRA/DoRA tensor ftx can merge", path.display())));
                };
                parts.entry(module.to_owned()).or_default()[slot] = Some(t.to_kind(Kind::Float));
            }
            let shapes: HashMap<String, Vec<i64>> = files.shapes().into_iter().collect();
            for (module, [a, b, m]) in parts {
                let (Some(a), Some(b)) = (a, b) else {
                    return Err(err(format!("{}: module {module} lacks lora_A or lora_B", path.display())));
                };
                if let Some(tensor) = expert_parameter(&module, &s) {
                    let tensor = tensor.map_err(|problem| err(format!("{}: {problem}", path.display())))?;
                    let base_shape = shapes.get(&tensor).ok_or_else(|| {
                        err(format!("adapts {tensor}, which the base model in {} does not have", base.display()))
                    })?;
                    let (re, inp, out) = (a.size()[0], a.size()[1], b.size()[0]);
                    let fits = base_shape.len() == 3
                        && base_shape[1..] == [inp, out]
                        && b.size()[1] == re
                        && re == s.rank * base_shape[0];
                    if !fits {
                        return Err(err(format!(
                            "{tensor}: the adapter's lora_A {:?} / lora_B {:?} do not fit the base's {base_shape:?} with r = {} (wrong base model?)",
                            a.size(),
                            b.size(),
                            s.rank
                        )));
                    }
                    experts.insert(tensor, (a, b));
                    continue;
                }
                let base_shape = shapes.get(&format!("{module}.weight")).ok_or_else(|| {
                    err(format!("adapts {module}, which the base model in {} does not have", base.display()))
                })?;
                let (out, inp) = (b.size()[0], a.size()[1]);
                if base_shape != &[out, inp] {
                    return Err(err(format!(
                        "{module}: adapter implies [{out}, {inp}] but the base weight is {base_shape:?} (wrong base model?)"
                    )));
                }
                if s.dora && m.is_none() {
                    return Err(err(format!("{module}: a DoRA adapter needs lora_magnitude_vector")));
                }
                modules.insert(module, ModuleAdapter { a, b, magnitude: m });
            }
            settings = Some(s);
        }
        let base = crate::hub::resolve_model(base).map_err(crate::model::ModelError::from)?;
        Ok(MergedSource { base, config, adapter, files, settings, modules, experts })
    }

    /// Every tensor of the base checkpoint: name and shape, sorted by name.
    pub fn shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.files.shapes()
    }

    /// How many projections the adapter changes.
    pub fn adapted_modules(&self) -> usize {
        self.modules.len() + self.experts.len()
    }

    /// Loads `name` as fp32 on the CPU, with the adapter's ΔW added when it adapts it.
    pub fn load(&self, name: &str) -> Result<Tensor, SourceError> {
        let _g = tch::no_grad_guard();
        let w = self.files.load_any(name, Kind::Float)?;
        if let (Some((a, b)), Some(s)) = (self.experts.get(name), &self.settings) {
            return Ok(&w + crate::model::expert_lora::delta(a, b, w.size()[0], s.scaling()));
        }
        let module = name.strip_suffix(".weight").unwrap_or("");
        let (Some(m), Some(s)) = (self.modules.get(module), &self.settings) else {
            return Ok(w);
        };
        let adapter = LoraAdapter {
            a: m.a.shallow_clone(),
            b: m.b.shallow_clone(),
            magnitude: m.magnitude.as_ref().map(Tensor::shallow_clone),
            base_row_sq: None,
            scaling: s.scaling(),
            dropout: 0.0,
        };
        let base = BaseLinear { weight: Weight::Dense(w), bias: None };
        let delta = adapter.delta_weight(&base);
        Ok(base.dense_weight() + delta)
    }

    /// SHA-256 of every input file (config, weights, tokenizer, adapter), for manifests.
    pub fn input_hashes(&self) -> std::io::Result<serde_json::Map<String, serde_json::Value>> {
        let mut out = serde_json::Map::new();
        let mut add = |label: String, path: &Path| -> std::io::Result<()> {
            if path.is_file() {
                out.insert(label, crate::util::sha256_file(path)?.into());
            }
            Ok(())
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&self.base)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            let fname = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
            if fname.ends_with(".safetensors") || fname.ends_with(".json") || fname.ends_with(".jinja") {
                add(format!("base/{fname}"), &p)?;
            }
        }
        if let Some(dir) = &self.adapter {
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                add(format!("adapter/{f}"), &dir.join(f))?;
            }
        }
        Ok(out)
    }
}

/// The checkpoint tensor a PEFT module stem of an adapter adapts when it is a stacked-experts
/// wrapper (`model.layers.0.mlp.experts[.base_layer]`): PEFT nests one wrapper per targeted
/// parameter in the order the module registers them (`gate_up_proj`, then `down_proj`), the
/// last outermost ([`crate::model::expert_lora::peft_stems`]). `None` for other modules.
fn expert_parameter(stem: &str, s: &LoraSettings) -> Option<Result<String, String>> {
    let mut module = stem;
    let mut depth = 0;
    while let Some(inner) = module.strip_suffix(".base_layer") {
        module = inner;
        depth += 1;
    }
    if !module.ends_with(".mlp.experts") {
        return None;
    }
    let leaves: Vec<&str> = ["gate_up_proj", "down_proj"]
        .into_iter()
        .filter(|l| s.target_modules.iter().any(|t| t.ends_with(&format!("experts.{l}"))))
        .collect();
    Some(match leaves.len().checked_sub(depth + 1) {
        Some(i) => Ok(format!("{module}.{}", leaves[i])),
        None => Err(format!(
            "tensors under {stem} do not match adapter_config.json's target_parameters ({} expert parameters targeted)",
            leaves.len()
        )),
    })
}
