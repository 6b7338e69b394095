//! Parameter-efficient fine-tuning: attaching LoRA / DoRA adapters to a model's linear
//! layers (optionally over an NF4-quantised base, QLoRA), and saving them in PEFT's layout
//! (`adapter_config.json` + `adapter_model.safetensors`) so HF PEFT loads them.

pub mod lora;
pub mod merge;
pub mod stacked;

use crate::model::linear::{BaseLinear, Linear, Weight};
use crate::model::nf4::Nf4Weight;
use crate::model::expert_lora::{peft_stems, ExpertLora, ExpertParam};
use crate::model::CausalLm;
use lora::LoraAdapter;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Tensor;

/// The projections of a decoder layer, which `all-linear` targets (never lm_head): the seven
/// of Llama-like layers first, then Phi-3's packed `qkv_proj` and `gate_up_proj` (PEFT's
/// names).
pub const ALL_LINEAR: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"];

/// What `all-linear` targets besides [`ALL_LINEAR`] in mixture-of-experts layers, as PEFT's
/// `all-linear` does: the router (`gate`) and Mixtral's expert projections (`w1` gate, `w3`
/// up, `w2` down; Qwen3-MoE's experts use the MLP names).
pub const MOE_LINEAR: &[&str] = &["gate", "w1", "w2", "w3"];

/// Projections that are no `nn.Linear` in transformers, which PEFT adapts through
/// `target_parameters` (`"router.weight"`: gpt-oss's router): targeted only when named (PEFT's
/// `all-linear` leaves them out), saved under `target_parameters`.
pub const PARAMETER_TARGETS: &[&str] = &["router"];

/// Stacked 3-D expert parameters PEFT adapts through `target_parameters` (gpt-oss's
/// `mlp.experts.gate_up_proj [E, H, 2I]` and `mlp.experts.down_proj [E, I, H]`; PEFT's
/// `ParamWrapper`, [`crate::model::expert_lora`]): targeted when named (`experts.gate_up_proj`,
/// or with the `mlp.` prefix, as PEFT writes them), never by `all-linear`.
pub const EXPERT_PARAMETERS: &[&str] = &["experts.gate_up_proj", "experts.down_proj"];

/// How adapters are attached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names (suffixes, as PEFT matches them) or `["all-linear"]`.
    pub target_modules: Vec<String>,
    /// Scale by `alpha / √r` instead of `alpha / r` (Kalajdzievski, 2023).
    pub rslora: bool,
    /// DoRA: learn a per-row magnitude too.
    pub dora: bool,
    /// QLoRA: store the frozen projections as NF4.
    pub quantize_nf4: bool,
    /// `method.fp8`: store the frozen projections as FP8 (e4m3, per-row scales), their GEMMs
    /// on FP8 tensor cores in the LoRA block nodes.
    #[serde(default)]
    pub quantize_fp8: bool,
}

impl LoraSettings {
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.rslora { self.alpha / (self.rank as f64).sqrt() } else { self.alpha / self.rank as f64 }
    }

    /// Whether the stacked-experts parameter `name` (`model.layers.0.mlp.experts.down_proj`) is
    /// targeted.
    fn targets_parameter(&self, name: &str) -> bool {
        self.target_modules.iter().any(|t| t.contains("experts.") && (name == t || name.ends_with(&format!(".{t}"))))
    }

    /// Whether any target names a stacked-experts parameter.
    pub fn targets_expert_parameters(&self) -> bool {
        self.target_modules.iter().any(|t| EXPERT_PARAMETERS.iter().any(|p| t == p || t.ends_with(&format!(".{p}"))))
    }

    fn targets(&self, module: &str) -> bool {
        let leaf = module.rsplit('.').next().unwrap_or(module);
        let linear = ALL_LINEAR.contains(&leaf) || MOE_LINEAR.contains(&leaf);
        self.target_modules.iter().any(|t| t == "all-linear" && linear || module == t || leaf == t || module.ends_with(&format!(".{t}")))
    }

    /// Checks every target names a projection the model has.
    pub fn validate(&self) -> Result<(), String> {
        if self.rank <= 0 {
            return Err(format!("LoRA rank must be positive, got {}", self.rank));
        }
        if self.quantize_fp8 && self.quantize_nf4 {
            return Err("method.fp8 stores the frozen base in FP8 and QLoRA in NF4: choose one (kind = \"lora\" with fp8 = true, or kind = \"qlora\")".into());
        }
        for t in &self.target_modules {
            let known = ALL_LINEAR.iter().chain(MOE_LINEAR).chain(PARAMETER_TARGETS).chain(EXPERT_PARAMETERS);
            if t != "all-linear" && !known.clone().any(|l| t == l || t.ends_with(&format!(".{l}"))) {
                let names: Vec<&str> = known.copied().collect();
                return Err(format!("target module '{t}' is not a projection; use all-linear or some of {}", names.join(", ")));
            }
        }
        let router = self.target_modules.iter().any(|t| PARAMETER_TARGETS.iter().any(|p| t == p || t.ends_with(&format!(".{p}"))));
        if router && self.dora {
            // The router is adapted as PEFT's target_parameters, whose ParamWrapper has no DoRA.
            return Err(format!(
                "DoRA on the router ({}) is not possible: PEFT adapts it through target_parameters, which refuses DoRA; \
                 leave it out of target_modules (DoRA on attention) or set dora = false",
                PARAMETER_TARGETS.join(", ")
            ));
        }
        if self.targets_expert_parameters() && (self.dropout > 0.0 || self.dora) {
            // PEFT's ParamWrapper refuses both: dropout cannot be factored out of x (W + ΔW).
            return Err(format!(
                "LoRA on the experts' stacked parameters ({}) works without dropout and DoRA, as PEFT's target_parameters: \
                 set dropout = 0 and dora = false, or leave the experts out of target_modules",
                EXPERT_PARAMETERS.join(", ")
            ));
        }
        Ok(())
    }
}

/// Attaches adapters to the targeted projections (quantising the base first for QLoRA),
/// MoE experts' stored stacked ([`stacked`]), and returns the trainable tensors
/// ([`trainable_tensors`]: PEFT's names, the experts' stacked leaves under theirs).
pub fn attach(model: &mut CausalLm, s: &LoraSettings) -> Result<Vec<(String, Tensor)>, String> {
    attach_as(model, s, LoraAdapter::init, ExpertLora::init)?;
    stacked::stack_expert_adapters(model);
    Ok(trainable_tensors(model))
}

/// [`attach`] with every MoE expert's adapter its own leaves (stacked per forward instead,
/// the layout before [`stacked`]), returning them under PEFT's names: the same initial values
/// (the same draws). Kept as the reference the stacked layout is tested and measured against.
pub fn attach_per_expert(model: &mut CausalLm, s: &LoraSettings) -> Result<Vec<(String, Tensor)>, String> {
    attach_as(model, s, LoraAdapter::init, ExpertLora::init)
}

/// [`attach`] with every adapter zero ([`LoraAdapter::zeros`]), for weights that
/// [`load_adapter_tensors`] then fills: draws nothing from libtorch's global generator. MoE
/// experts' adapters stay per expert (as a loaded adapter serves and merges); training stacks
/// them with [`stacked::stack_expert_adapters`] once filled.
pub fn attach_unfilled(model: &mut CausalLm, s: &LoraSettings) -> Result<Vec<(String, Tensor)>, String> {
    attach_as(model, s, LoraAdapter::zeros, ExpertLora::zeros)
}

/// [`attach`], each adapter made by `make(base, rank, scaling, dropout, dora)`, each
/// stacked-experts one by `make_experts(base, rank, scaling)`.
fn attach_as(
    model: &mut CausalLm,
    s: &LoraSettings,
    make: fn(&BaseLinear, i64, f64, f64, bool) -> LoraAdapter,
    make_experts: fn(&Tensor, i64, f64) -> ExpertLora,
) -> Result<Vec<(String, Tensor)>, String> {
    s.validate()?;
    let _g = tch::no_grad_guard();
    let kind = model.kind;
    let mut names = Vec::new();
    if s.quantize_fp8 {
        quantize_fp8(model)?;
    }
    for (name, lin) in model.linears_mut() {
        if s.quantize_nf4 {
            quantize_nf4(&name, lin, kind);
        }
        if s.targets(&name) {
            lin.adapter = Some(Box::new(make(&lin.base, s.rank, s.scaling(), s.dropout, s.dora)));
            names.push(name);
        }
    }
    if s.quantize_nf4 {
        for l in model.layers.iter_mut() {
            l.parts_mut().mlp.quantize_experts_nf4(kind);
        }
    }
    for p in expert_params_mut(model) {
        if s.targets_parameter(&p.name) {
            *p.lora = Some(make_experts(p.base, s.rank, s.scaling()));
            names.push(p.name);
        }
    }
    if s.targets_expert_parameters() && !names.iter().any(|n| n.contains(".experts.")) {
        return Err(format!(
            "target_modules names the experts' stacked parameters ({}), which only gpt-oss has; this model's experts (if any) are nn.Linear projections: target them by name",
            EXPERT_PARAMETERS.join(", ")
        ));
    }
    if names.is_empty() {
        let mut leaves: Vec<String> = model.linears_mut().into_iter().filter_map(|(n, _)| n.rsplit('.').next().map(str::to_owned)).collect();
        leaves.dedup();
        leaves.sort();
        leaves.dedup();
        return Err(format!(
            "no module matched target_modules {:?}; this model's projections are {} (or use all-linear)",
            s.target_modules,
            leaves.join(", ")
        ));
    }
    Ok(adapter_tensors(model))
}

/// Stores the frozen base weight of `lin` (named `name`) as NF4 (computing in `kind`), if it is
/// dense. bitsandbytes quantises every linear of the decoder (lm_head stays dense); a MoE
/// router (`….gate`) is no nn.Linear in transformers 5 and stays dense too.
fn quantize_nf4(name: &str, lin: &mut Linear, kind: tch::Kind) {
    if name.ends_with(".gate") || name == "gate" || name.ends_with(".router") {
        return;
    }
    if let Weight::Dense(w) = &lin.base.weight {
        let q = Nf4Weight::quantize(w, kind);
        lin.base = BaseLinear { weight: Weight::Nf4(q), bias: lin.base.bias.take() };
    }
}

/// Stores every dense projection of the decoder layers as FP8 (`method.fp8`) whose widths the
/// FP8 GEMM takes, keeping each fused group (q/k/v, gate/up) adjacent in memory so the block
/// nodes read its codes without a copy. Left dense: lm_head and the embeddings (outside the
/// layers), MoE routers and experts (the grouped GEMMs multiply dense weights), and any
/// projection whose widths are not multiples of 16.
fn quantize_fp8(model: &mut CausalLm) -> Result<(), String> {
    use crate::model::fp8::Fp8Weight;
    if let tch::Device::Cuda(i) = model.device {
        // at::_scaled_mm's FP8 GEMMs: Ada, Hopper and newer.
        if let Some(g) = crate::gpu::gpus().into_iter().find(|g| g.index == i).filter(|g| g.capability < (8, 9)) {
            return Err(format!(
                "method.fp8: FP8 GEMMs need a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); cuda:{i} ({}) is {}.{}: set fp8 = false (or kind = \"qlora\" for a 4-bit base)",
                g.name, g.capability.0, g.capability.1
            ));
        }
    }
    let _g = tch::no_grad_guard();
    let kind = model.kind;
    let mut groups: std::collections::BTreeMap<(String, usize), Vec<(usize, &mut Linear)>> = Default::default();
    for (name, lin) in model.linears_mut() {
        if !name.starts_with("model.layers.") || name.contains(".experts.") || name.ends_with(".gate") || name.ends_with(".router") {
            continue;
        }
        let Weight::Dense(w) = &lin.base.weight else { continue };
        let (out, inp) = lin.base.shape();
        if !Fp8Weight::fits(out, inp) || w.requires_grad() {
            continue;
        }
        lin.base.weight = Weight::Fp8(Fp8Weight::quantize(w, kind));
        let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
        let member = [("q_proj", 0), ("k_proj", 1), ("v_proj", 2), ("gate_proj", 10), ("up_proj", 11)];
        if let Some(&(_, order)) = member.iter().find(|(m, _)| *m == leaf) {
            groups.entry((prefix.to_owned(), order / 10)).or_default().push((order, lin));
        }
    }
    for (_, mut members) in groups {
        members.sort_by_key(|(order, _)| *order);
        let mut lins: Vec<&mut Linear> = members.into_iter().map(|(_, l)| l).collect();
        crate::model::fused::make_adjacent(&mut lins);
    }
    Ok(())
}

/// Quantises every projection (and gpt-oss's fused experts) of one decoder layer to NF4 (as
/// [`attach`] does for QLoRA), so
/// that a model can be built layer by layer without ever being whole in bf16
/// (`CausalLm::random_with`); [`attach`] then leaves the NF4 weights as they are.
pub fn quantize_layer_nf4(layer: &mut dyn crate::model::decoder::Block, kind: tch::Kind) {
    let _g = tch::no_grad_guard();
    for (name, lin) in layer.linears_mut() {
        quantize_nf4(&name, lin, kind);
    }
    layer.parts_mut().mlp.quantize_experts_nf4(kind);
}

/// Every stacked-experts parameter of `model` (gpt-oss's fused experts; layer by layer, each
/// layer's in the order its module registers them) with its HF name, and its adapter slot.
pub fn expert_params_mut(model: &mut CausalLm) -> Vec<ExpertParam<'_>> {
    let mut out = Vec::new();
    for (i, l) in model.layers.iter_mut().enumerate() {
        for mut p in l.parts_mut().mlp.expert_params_mut() {
            p.name = format!("model.layers.{i}.{}", p.name);
            out.push(p);
        }
    }
    out
}

/// Every adapter tensor, named as PEFT saves it
/// (`base_model.model.<module>.lora_A.weight`, `….lora_magnitude_vector`; a stacked-experts
/// parameter's under its module's, `….experts[.base_layer].lora_A.weight`).
pub fn adapter_tensors(model: &mut CausalLm) -> Vec<(String, Tensor)> {
    named_adapter_tensors(model, false)
}

/// The tensors an optimizer trains: [`adapter_tensors`], except that the experts' adapters
/// stored stacked ([`stacked`]) come as their leaves (once per projection and layer, named
/// `base_model.model.<…>.experts.*.<projection>.lora_A.weight`, [`stacked::named_leaves`])
/// instead of their per-expert slices, which are no leaves.
pub fn trainable_tensors(model: &mut CausalLm) -> Vec<(String, Tensor)> {
    named_adapter_tensors(model, true)
}

/// [`adapter_tensors`], or with `leaves` [`trainable_tensors`].
fn named_adapter_tensors(model: &mut CausalLm, leaves: bool) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (name, lin) in model.linears_mut() {
        if let Some(a) = &lin.adapter {
            if let (true, Some(slice)) = (leaves, a.expert_slice()) {
                if let (0, Some((key, _))) = (slice.expert, stacked::split_expert(&name)) {
                    out.extend(stacked::named_leaves(&key, slice.factors));
                }
                continue;
            }
            for (suffix, t) in a.named_tensors() {
                out.push((format!("base_model.model.{name}.{suffix}"), t));
            }
        }
    }
    let adapted: Vec<(String, Vec<(&'static str, Tensor)>)> =
        expert_params_mut(model).into_iter().filter_map(|p| p.lora.as_ref().map(|l| (p.name, l.named_tensors()))).collect();
    let names: Vec<String> = adapted.iter().map(|(n, _)| n.clone()).collect();
    for (stem, (_, tensors)) in peft_stems(&names).into_iter().zip(adapted) {
        out.extend(tensors.into_iter().map(|(suffix, t)| (format!("base_model.model.{stem}.{suffix}"), t)));
    }
    out
}

/// Loads adapter tensors saved under PEFT names into the attached adapters (shapes checked).
pub fn load_adapter_tensors(model: &mut CausalLm, tensors: &[(String, Tensor)]) -> Result<(), String> {
    let _g = tch::no_grad_guard();
    let current = adapter_tensors(model);
    for (name, mut dst) in current {
        let src = tensors
            .iter()
            .find(|(n, _)| *n == name || n.replace(".default", "") == name)
            .map(|(_, t)| t)
            .ok_or_else(|| format!("adapter tensor {name} is missing"))?;
        if src.size() != dst.size() {
            return Err(format!("adapter tensor {name} has shape {:?}, expected {:?}", src.size(), dst.size()));
        }
        dst.copy_(&src.to_kind(dst.kind()).to_device(dst.device()));
    }
    Ok(())
}

/// The local folder of the adapter `dir` names: `dir` itself when it exists (or is not shaped
/// like a Hub id), else the snapshot of the Hub adapter repository `org/name[@revision]` in the
/// Hub cache, downloaded first unless `HF_HUB_OFFLINE` is set. Every reader of an adapter
/// folder goes through it, so every command takes a Hub id wherever it takes an adapter.
pub fn adapter_dir(dir: &Path) -> Result<std::path::PathBuf, String> {
    crate::hub::resolve_model(dir).map_err(|e| e.to_string())
}

/// Reads a PEFT adapter folder's `adapter_config.json` into [`LoraSettings`].
pub fn read_adapter_config(dir: &Path) -> Result<LoraSettings, String> {
    let cfg_path = adapter_dir(dir)?.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let c: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let num = |k: &str| c.get(k).and_then(serde_json::Value::as_f64).ok_or_else(|| format!("{}: needs a number \"{k}\"", cfg_path.display()));
    let targets = match c.get("target_modules") {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => return Err(format!("{}: needs \"target_modules\"", cfg_path.display())),
    };
    // `target_parameters`: ["router.weight"] names the module whose weight is adapted; the
    // experts' stacked parameters (`mlp.experts.gate_up_proj`, or just `gate_up_proj`, which
    // PEFT matches by suffix) become `mlp.experts.<name>`.
    let mut targets = targets;
    if let Some(serde_json::Value::Array(a)) = c.get("target_parameters") {
        for p in a.iter().filter_map(|v| v.as_str()) {
            let leaf = p.rsplit('.').next().unwrap_or(p);
            targets.push(match leaf {
                "gate_up_proj" | "down_proj" => format!("mlp.experts.{leaf}"),
                _ => p.strip_suffix(".weight").unwrap_or(p).to_owned(),
            });
        }
    }
    let flag = |k: &str| c.get(k).and_then(serde_json::Value::as_bool).unwrap_or(false);
    Ok(LoraSettings {
        rank: num("r")? as i64,
        alpha: num("lora_alpha")?,
        dropout: 0.0,
        target_modules: targets,
        rslora: flag("use_rslora"),
        dora: flag("use_dora"),
        quantize_nf4: false,
        quantize_fp8: false,
    })
}

/// Reads a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`) and
/// attaches it to `model`, drawing nothing from libtorch's global generator.
pub fn load_adapter(model: &mut CausalLm, dir: &Path) -> Result<LoraSettings, String> {
    let s = read_adapter_config(dir)?;
    load_adapter_with(model, dir, &s)?;
    Ok(s)
}

/// Attaches adapters with the settings `s` (those of the folder, perhaps with another dropout
/// or an NF4 base) and loads the folder's weights into them.
pub fn load_adapter_with(model: &mut CausalLm, dir: &Path, s: &LoraSettings) -> Result<(), String> {
    let weights = adapter_dir(dir)?.join("adapter_model.safetensors");
    attach_unfilled(model, s)?;
    let tensors = crate::model::weights::read_safetensors(&weights).map_err(|e| e.to_string())?;
    load_adapter_tensors(model, &tensors).map_err(|e| format!("{}: {e}", weights.display()))
}

/// Switches every adapter on or off (off = the base model, e.g. as a reference policy).
pub fn set_adapters_enabled(model: &mut CausalLm, enabled: bool) {
    for (_, lin) in model.linears_mut() {
        lin.adapter_enabled = enabled;
    }
    for p in expert_params_mut(model) {
        if let Some(l) = p.lora {
            l.enabled = enabled;
        }
    }
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` in PEFT's layout.
pub fn save_adapter(model: &mut CausalLm, s: &LoraSettings, base_path: &str, dir: &Path) -> std::io::Result<()> {
    let tensors = adapter_tensors(model);
    let mut targets: Vec<String> = model
        .linears_mut()
        .into_iter()
        .filter(|(_, l)| l.adapter.is_some())
        .map(|(n, _)| n.rsplit('.').next().unwrap_or("").to_owned())
        .collect();
    targets.sort();
    targets.dedup();
    let (parameters, targets): (Vec<String>, Vec<String>) = targets.into_iter().partition(|t| PARAMETER_TARGETS.contains(&t.as_str()));
    let mut parameters: Vec<String> = parameters.iter().map(|t| format!("{t}.weight")).collect();
    // The experts' stacked parameters, as PEFT spells them (`mlp.experts.gate_up_proj`).
    for p in expert_params_mut(model) {
        let leaf = p.name.rsplit_once(".mlp.").map_or(p.name.clone(), |(_, l)| format!("mlp.{l}"));
        if p.lora.is_some() && !parameters.contains(&leaf) {
            parameters.push(leaf);
        }
    }
    let mut extra = serde_json::Map::new();
    if !parameters.is_empty() {
        let names = parameters.into_iter().map(serde_json::Value::String).collect();
        extra.insert("target_parameters".to_owned(), serde_json::Value::Array(names));
    }
    write_adapter_folder(dir, &tensors, s, targets, Some(base_path), extra)
}

/// Writes a PEFT adapter folder: `adapter_config.json` describing `s` with `targets` as its
/// target modules (the `extra` keys added, or replacing the defaults), and `tensors` (PEFT's names) as
/// `adapter_model.safetensors`.
pub fn write_adapter_folder(
    dir: &Path,
    tensors: &[(String, Tensor)],
    s: &LoraSettings,
    targets: Vec<String>,
    base_path: Option<&str>,
    extra: serde_json::Map<String, serde_json::Value>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": s.rank,
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "target_modules": targets,
        "use_rslora": s.rslora,
        "use_dora": s.dora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    config.as_object_mut().expect("a JSON object").extend(extra);
    crate::util::write_atomic(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    crate::model::weights::write_safetensors(&dir.join("adapter_model.safetensors"), tensors)
}
