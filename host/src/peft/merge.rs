//! `ftx merge`: several LoRA adapters (PEFT folders) combined into one, with the semantics
//! of PEFT's `add_weighted_adapter` (peft/tuners/lora/model.py, peft/utils/merge_utils.py):
//!
//! - `cat`: ranks add; Aᵢ scaled by wᵢ·sᵢ and stacked, Bᵢ concatenated: exactly Σ wᵢ·ΔWᵢ.
//! - `linear`: same ranks; A = Σ sign·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (PEFT's cheap approximation).
//! - `svd`: Σ wᵢ·ΔWᵢ re-factorised by SVD to a target rank.
//! - `ties`: each ΔWᵢ trimmed to its largest `density` fraction, a sign elected per entry
//!   (sign of the sum), the agreeing weighted entries averaged; then SVD to rank.
//! - `dare`: entries of each ΔWᵢ dropped with probability p and the rest scaled by 1/(1−p)
//!   (seeded), summed with weights (or TIES-combined with `--dare-ties`); then SVD to rank.
//!
//! The result is a PEFT folder with `lora_alpha = r` (scaling 1), as PEFT writes it.

use super::LoraSettings;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// How adapters are combined.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    Cat,
    Linear,
    Svd,
    Ties { density: f64 },
    Dare { drop: f64, seed: u64, ties: bool },
}

/// Errors of `ftx merge`; each names the adapter folder or module concerned.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// An adapter folder could not be read.
    #[error("{path}: {problem}")]
    Adapter { path: PathBuf, problem: String },
    /// The request cannot be carried out (ranks differ, bad density, …).
    #[error("{0}")]
    Invalid(String),
    #[error("writing the merged adapter: {0}")]
    Io(#[from] std::io::Error),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// One input adapter: its settings and its modules' (A, B).
pub struct LoadedAdapter {
    pub path: PathBuf,
    pub settings: LoraSettings,
    pub base_model: Option<String>,
    /// module name → (A [r, in], B [out, r]), fp32.
    pub modules: BTreeMap<String, (Tensor, Tensor)>,
}

/// Reads a PEFT LoRA folder (DoRA adapters are refused: their ΔW is not B·A).
pub fn read_adapter(dir: &Path) -> Result<LoadedAdapter, MergeError> {
    let err = |problem: String| MergeError::Adapter { path: dir.to_owned(), problem };
    let dir = &super::adapter_dir(dir).map_err(err)?;
    let settings = super::read_adapter_config(dir).map_err(err)?;
    if settings.dora {
        return Err(err("is a DoRA adapter; ftx merge combines plain LoRA adapters (merge DoRA into the base with ftx export)".into()));
    }
    if settings.targets_expert_parameters() {
        // Their factors hold E blocks of rank r each; combining them as one rank-r·E factor
        // would mix experts.
        return Err(err("adapts the experts' stacked parameters (target_parameters mlp.experts.*), which ftx merge cannot combine; \
             merge it into the base with ftx export --format merged"
            .into()));
    }
    let cfg: serde_json::Value = std::fs::read_to_string(dir.join("adapter_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let base_model = cfg["base_model_name_or_path"].as_str().map(str::to_owned);
    let file = dir.join("adapter_model.safetensors");
    let tensors = crate::model::weights::read_safetensors(&file).map_err(|e| err(e.to_string()))?;
    let mut parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in tensors {
        let name = name.replace(".default", "");
        let stem = name.strip_prefix("base_model.model.").unwrap_or(&name).to_owned();
        if let Some(m) = stem.strip_suffix(".lora_A.weight") {
            parts.entry(m.to_owned()).or_default().0 = Some(t.to_kind(Kind::Float));
        } else if let Some(m) = stem.strip_suffix(".lora_B.weight") {
            parts.entry(m.to_owned()).or_default().1 = Some(t.to_kind(Kind::Float));
        } else {
            return Err(err(format!("{}: tensor {name} is not a LoRA factor", file.display())));
        }
    }
    let mut modules = BTreeMap::new();
    for (m, (a, b)) in parts {
        let (Some(a), Some(b)) = (a, b) else { return Err(err(format!("module {m} lacks lora_A or lora_B"))) };
        modules.insert(m, (a, b));
    }
    if modules.is_empty() {
        return Err(err(format!("{} holds no LoRA tensors", file.display())));
    }
    Ok(LoadedAdapter { path: dir.to_owned(), settings, base_model, modules })
}

/// The merged adapter: rank, and per module (A, B).
pub struct MergedAdapter {
    pub rank: i64,
    pub base_model: Option<String>,
    pub modules: BTreeMap<String, (Tensor, Tensor)>,
}

/// Keeps the `k = ⌊density·n⌋` largest-magnitude entries (PEFT's magnitude pruning).
fn magnitude_prune(t: &Tensor, density: f64) -> Tensor {
    if density >= 1.0 {
        return t.shallow_clone();
    }
    let flat = t.reshape([-1]);
    let k = (density * flat.numel() as f64) as i64;
    let mut mask = Tensor::zeros_like(&flat);
    if k > 0 {
        let (_, idx) = flat.abs().topk(k, 0, true, true);
        mask = mask.index_fill(0, &idx, 1.0);
    }
    (flat * mask).reshape(t.size())
}

/// TIES: elect a sign per entry from the (pruned, unweighted) tensors' sum, then average the
/// weighted entries that agree with it.
fn ties_combine(pruned: &[Tensor], weights: &[f64]) -> Tensor {
    let stacked = Tensor::stack(pruned, 0);
    let sign = stacked.sign();
    let total = stacked.sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
    let majority = total.ge(0.0).to_kind(Kind::Float) * 2.0 - 1.0;
    let agree = sign.eq_tensor(&majority.unsqueeze(0)).to_kind(Kind::Float);
    let w = Tensor::from_slice(weights).to_kind(Kind::Float).view([-1, 1, 1]);
    let mixed = (stacked * w * &agree).sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
    let count = agree.sum_dim_intlist([0i64].as_slice(), false, Kind::Float).clamp_min(1.0);
    mixed / count
}

/// Best rank-`r` factors (A = Vhᵣ, B = Uᵣ·Sᵣ) of `delta`, as PEFT's svd re-factorisation.
/// A rank above the matrix's smaller side is padded with zero factors, so every module has
/// the adapter's one rank.
fn svd_factors(delta: &Tensor, r: i64) -> (Tensor, Tensor) {
    let (u, s, v) = delta.svd(true, true);
    let vh = v.transpose(0, 1);
    let k = r.min(s.size()[0]);
    let mut b = u.narrow(1, 0, k) * s.narrow(0, 0, k).unsqueeze(0);
    let mut a = vh.narrow(0, 0, k);
    if k < r {
        let (out, inp) = (delta.size()[0], delta.size()[1]);
        a = Tensor::cat(&[a, Tensor::zeros([r - k, inp], (Kind::Float, tch::Device::Cpu))], 0);
        b = Tensor::cat(&[b, Tensor::zeros([out, r - k], (Kind::Float, tch::Device::Cpu))], 1);
    }
    (a.contiguous(), b.contiguous())
}

/// Combines `adapters` with `weights` by `method`; `rank` is the target rank of the SVD
/// methods (default: the largest input rank).
pub fn merge(adapters: &[LoadedAdapter], weights: &[f64], method: &Method, rank: Option<i64>) -> Result<MergedAdapter, MergeError> {
    let _g = tch::no_grad_guard();
    if adapters.is_empty() || adapters.len() != weights.len() {
        return Err(MergeError::Invalid(format!("{} adapters but {} weights: give one --weight per adapter", adapters.len(), weights.len())));
    }
    let ranks: Vec<i64> = adapters.iter().map(|a| a.settings.rank).collect();
    let new_rank = match method {
        Method::Cat => ranks.iter().sum(),
        Method::Linear => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(MergeError::Invalid(format!("linear merging needs equal ranks, got {ranks:?}: use cat or svd")));
            }
            ranks[0]
        }
        _ => rank.unwrap_or(*ranks.iter().max().unwrap_or(&1)),
    };
    if new_rank <= 0 {
        return Err(MergeError::Invalid(format!("target rank must be positive, got {new_rank}")));
    }
    match method {
        Method::Ties { density } if !(0.0..=1.0).contains(density) => {
            return Err(MergeError::Invalid(format!("TIES density must be in [0, 1], got {density}")));
        }
        Method::Dare { drop, .. } if !(0.0..1.0).contains(drop) => {
            return Err(MergeError::Invalid(format!("DARE drop rate must be in [0, 1), got {drop}")));
        }
        _ => {}
    }
    let names: BTreeSet<&String> = adapters.iter().flat_map(|a| a.modules.keys()).collect();
    let mut rng = match method {
        Method::Dare { seed, .. } => Some(rand_chacha::ChaCha8Rng::seed_from_u64(*seed)),
        _ => None,
    };
    let mut modules = BTreeMap::new();
    for name in names {
        // (A, B, scaling s, weight w) of the adapters that adapt this module.
        let present: Vec<(&Tensor, &Tensor, f64, f64)> = adapters
            .iter()
            .zip(weights)
            .filter_map(|(a, &w)| a.modules.get(name).map(|(fa, fb)| (fa, fb, a.settings.scaling(), w)))
            .collect();
        let (out, inp) = (present[0].1.size()[0], present[0].0.size()[1]);
        if present.iter().any(|(a, b, _, _)| b.size()[0] != out || a.size()[1] != inp) {
            return Err(MergeError::Invalid(format!("module {name}: the adapters disagree on its shape (different base models?)")));
        }
        let (a, b) = match method {
            Method::Cat => {
                let a = Tensor::cat(&present.iter().map(|(a, _, sc, w)| *a * (*w * *sc)).collect::<Vec<_>>(), 0);
                let b = Tensor::cat(&present.iter().map(|(_, b, _, _)| (*b).shallow_clone()).collect::<Vec<_>>(), 1);
                // Modules some adapters lack: zero rows/columns up to the common rank, as PEFT.
                let pad = new_rank - a.size()[0];
                let a = Tensor::cat(&[a, Tensor::zeros([pad, inp], (Kind::Float, tch::Device::Cpu))], 0);
                let b = Tensor::cat(&[b, Tensor::zeros([out, pad], (Kind::Float, tch::Device::Cpu))], 1);
                (a, b)
            }
            Method::Linear => {
                let mut a = Tensor::zeros([new_rank, inp], (Kind::Float, tch::Device::Cpu));
                let mut b = Tensor::zeros([out, new_rank], (Kind::Float, tch::Device::Cpu));
                for (fa, fb, sc, w) in &present {
                    let ws = w * sc;
                    let root = ws.abs().sqrt();
                    a += *fa * (root * ws.signum());
                    b += *fb * root;
                }
                (a, b)
            }
            _ => {
                let deltas: Vec<Tensor> = present.iter().map(|(a, b, sc, _)| b.matmul(a) * *sc).collect();
                let ws: Vec<f64> = present.iter().map(|p| p.3).collect();
                let delta = match method {
                    Method::Svd => weighted_sum(&deltas, &ws),
                    Method::Ties { density } => {
                        let pruned: Vec<Tensor> = deltas.iter().map(|d| magnitude_prune(d, *density)).collect();
                        ties_combine(&pruned, &ws)
                    }
                    Method::Dare { drop, ties, .. } => {
                        let rng = rng.as_mut().expect("seeded for DARE");
                        let kept: Vec<Tensor> = deltas.iter().map(|d| dare_drop(d, *drop, rng)).collect();
                        if *ties { ties_combine(&kept, &ws) } else { weighted_sum(&kept, &ws) }
                    }
                    Method::Cat | Method::Linear => unreachable!("handled above"),
                };
                svd_factors(&delta, new_rank)
            }
        };
        modules.insert(name.clone(), (a, b));
    }
    let base_model = adapters[0].base_model.clone();
    Ok(MergedAdapter { rank: new_rank, base_model, modules })
}

fn weighted_sum(ts: &[Tensor], ws: &[f64]) -> Tensor {
    ts.iter().zip(ws).map(|(t, w)| t * *w).reduce(|a, b| a + b).expect("at least one adapter")
}

/// DARE's random drop: each entry kept with probability 1 − p, kept ones scaled by 1/(1 − p).
fn dare_drop(t: &Tensor, p: f64, rng: &mut rand_chacha::ChaCha8Rng) -> Tensor {
    let n = t.numel();
    let mask: Vec<f32> = (0..n).map(|_| if rng.random::<f64>() < 1.0 - p { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::from_slice(&mask).view(t.size().as_slice());
    t * mask / (1.0 - p)
}

/// Writes `m` as a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
pub fn save(m: &MergedAdapter, dir: &Path, method: &Method) -> Result<(), MergeError> {
    let mut tensors = Vec::new();
    let mut leaves = BTreeSet::new();
    for (name, (a, b)) in &m.modules {
        tensors.push((format!("base_model.model.{name}.lora_A.weight"), a.contiguous()));
        tensors.push((format!("base_model.model.{name}.lora_B.weight"), b.contiguous()));
        leaves.insert(name.rsplit('.').next().unwrap_or(name).to_owned());
    }
    // Factors hold the scale already: alpha = r makes PEFT's scaling 1.
    let settings = super::LoraSettings {
        rank: m.rank,
        alpha: m.rank as f64,
        dropout: 0.0,
        target_modules: Vec::new(),
        rslora: false,
        dora: false,
        quantize_nf4: false,
        quantize_fp8: false,
    };
    let mut extra = serde_json::Map::new();
    extra.insert("lora_alpha".into(), m.rank.into()); // written as the integer r, as PEFT writes it
    extra.insert("ftx_merge".into(), format!("{method:?}").into());
    super::write_adapter_folder(dir, &tensors, &settings, leaves.into_iter().collect(), m.base_model.as_deref(), extra)?;
    Ok(())
}
