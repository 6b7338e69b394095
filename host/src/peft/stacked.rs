//! Mixture-of-experts adapters stored stacked: each projection of a MoE layer (Mixtral's
//! `w1`/`w3`/`w2`, Qwen3-MoE's `gate_proj`/`up_proj`/`down_proj`) keeps its experts' LoRA / DoRA
//! factors as one leaf each, A `[E, r, in]`, B `[E, out, r]` (DoRA's magnitude `[E, out]`),
//! instead of `E` adapters of their own. The experts' grouped GEMMs then take the leaves as
//! they are (`model::grouped_experts`): no stacking per forward, one gradient tensor per
//! projection, and the optimizer walks a few leaves per layer instead of thousands of tiny
//! tensors.
//!
//! Each expert's adapter stays under its PEFT name as an [`ExpertSliceAdapter`], whose tensors
//! are slices of the leaves taken per use: saved adapter folders (PEFT's per-expert keys),
//! loading into them, merging and exports are as for per-expert adapters.
//!
//! The trainer's parameter list ([`super::trainable_tensors`]) names each leaf after its
//! experts' PEFT names with the expert index replaced by `*`:
//! `base_model.model.model.layers.0.block_sparse_moe.experts.*.w1.lora_A.weight` (checkpoints'
//! optimizer state is keyed by these names).

use super::lora::LoraAdapter;
use crate::model::linear::{Adapter, BaseLinear, ExpertSlice, Linear, LowRank, StackedFactors};
use crate::model::CausalLm;
use tch::Tensor;

/// What stands for the expert index in a stacked leaf's name.
pub const ALL_EXPERTS: &str = "*";

/// Expert `expert`'s LoRA / DoRA adapter as slice `expert` of [`StackedFactors`] shared with
/// the layer's other experts.
pub struct ExpertSliceAdapter {
    factors: StackedFactors,
    expert: i64,
}

impl ExpertSliceAdapter {
    /// The expert's adapter as a plain [`LoraAdapter`] whose tensors are slices of the leaves,
    /// taken now (so they follow a leaf whose data an optimizer moved).
    fn view(&self) -> LoraAdapter {
        let (f, e) = (&self.factors, self.expert);
        LoraAdapter {
            a: f.a.get(e),
            b: f.b.get(e),
            magnitude: f.magnitude.as_ref().map(|m| m.get(e)),
            base_row_sq: f.base_row_sq.as_ref().map(|s| s.get(e)),
            scaling: f.scaling,
            dropout: f.dropout,
        }
    }
}

impl Adapter for ExpertSliceAdapter {
    fn forward(&self, x: &Tensor, base: &BaseLinear, train: bool) -> Tensor {
        self.view().forward(x, base, train)
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.view().named_tensors()
    }

    fn delta_weight(&self, base: &BaseLinear) -> Tensor {
        self.view().delta_weight(base)
    }

    fn expert_slice(&self) -> Option<ExpertSlice<'_>> {
        Some(ExpertSlice { factors: &self.factors, expert: self.expert })
    }
}

/// The name with its expert index replaced by [`ALL_EXPERTS`], and that index:
/// `model.layers.0.mlp.experts.3.gate_proj` → (`model.layers.0.mlp.experts.*.gate_proj`, 3).
/// `None` for a name without `.experts.<index>.`.
pub fn split_expert(name: &str) -> Option<(String, i64)> {
    let at = name.find(".experts.")? + ".experts.".len();
    let (index, rest) = name[at..].split_once('.')?;
    let e = index.parse::<i64>().ok()?;
    Some((format!("{}{ALL_EXPERTS}.{rest}", &name[..at]), e))
}

/// The stacked leaves of `factors`, named as the trainer lists them: `base_model.model.<key>.`
/// then PEFT's suffixes (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`), `key`
/// being the experts' module name with [`ALL_EXPERTS`] for the index.
pub fn named_leaves(key: &str, factors: &StackedFactors) -> Vec<(String, Tensor)> {
    let mut out = vec![
        (format!("base_model.model.{key}.lora_A.weight"), factors.a.shallow_clone()),
        (format!("base_model.model.{key}.lora_B.weight"), factors.b.shallow_clone()),
    ];
    if let Some(m) = &factors.magnitude {
        out.push((format!("base_model.model.{key}.lora_magnitude_vector"), m.shallow_clone()));
    }
    out
}

/// Re-stores every MoE projection whose experts all carry alike LoRA / DoRA adapters (same
/// shapes, dtype, scaling, dropout, DoRA or not) as [`StackedFactors`]: the experts' factors
/// copied, in expert order, into one trainable leaf each, and every expert's adapter replaced
/// by its [`ExpertSliceAdapter`]. Values are unchanged (a copy), and so is every PEFT name.
/// Projections with some experts unadapted, or adapters of another kind, are left as they are.
/// Returns how many projections were stacked.
pub fn stack_expert_adapters(model: &mut CausalLm) -> usize {
    let _g = tch::no_grad_guard();
    // The linears come layer by layer, expert by expert; gather each projection's experts.
    let mut groups: Vec<(String, Vec<(i64, &mut Linear)>)> = Vec::new();
    for (name, lin) in model.linears_mut() {
        let Some((key, e)) = split_expert(&name) else { continue };
        match groups.iter_mut().rev().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push((e, lin)),
            None => groups.push((key, vec![(e, lin)])),
        }
    }
    let mut stacked = 0;
    for (_, members) in groups {
        let Some(factors) = stacked_factors(&members) else { continue };
        for (e, lin) in members {
            lin.adapter = Some(Box::new(ExpertSliceAdapter { factors: factors.shallow_clone(), expert: e }));
        }
        stacked += 1;
    }
    stacked
}

/// The experts' adapters of one projection copied into stacked leaves, when they are experts
/// `0..E` in order, all with alike LoRA / DoRA adapters, all switched on alike.
fn stacked_factors(members: &[(i64, &mut Linear)]) -> Option<StackedFactors> {
    let mut parts: Vec<LowRank<'_>> = Vec::with_capacity(members.len());
    for (i, (e, lin)) in members.iter().enumerate() {
        if *e != i as i64 || lin.adapter_enabled != members[0].1.adapter_enabled {
            return None;
        }
        parts.push(lin.adapter.as_ref()?.low_rank()?);
    }
    let stacked = StackedFactors::stack(&parts)?;
    let leaf = |t: Tensor| t.set_requires_grad(true);
    Some(StackedFactors { a: leaf(stacked.a), b: leaf(stacked.b), magnitude: stacked.magnitude.map(leaf), ..stacked })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_names_split_into_the_stacked_name_and_the_index() {
        assert_eq!(split_expert("model.layers.0.mlp.experts.3.gate_proj"), Some(("model.layers.0.mlp.experts.*.gate_proj".to_owned(), 3)));
        assert_eq!(
            split_expert("base_model.model.model.layers.11.block_sparse_moe.experts.127.w2.lora_B.weight.exp_avg"),
            Some(("base_model.model.model.layers.11.block_sparse_moe.experts.*.w2.lora_B.weight.exp_avg".to_owned(), 127))
        );
        // gpt-oss's fused experts and dense projections have no expert index.
        assert_eq!(split_expert("model.layers.0.mlp.experts.lora_A.weight"), None);
        assert_eq!(split_expert("model.layers.0.mlp.down_proj"), None);
    }
}
