//! LoRA on a stacked-experts parameter `W [E, in, out]` (gpt-oss's `mlp.experts.gate_up_proj`
//! and `down_proj`), computed as PEFT 0.21's `ParamWrapper` does for
//! `LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])`:
//!
//! - `lora_A.weight [r·E, in]`: rows `e·r .. (e+1)·r` are expert e's `A_e [r, in]`;
//! - `lora_B.weight [out, r·E]`: column `k·E + e` is column k of expert e's `B_e [out, r]`
//!   (PEFT views it as `[out, r, E]`);
//! - `ΔW[e] = s · A_eᵀ B_eᵀ` (`[in, out]`, `s = alpha / r`, rsLoRA `alpha / √r`), and the
//!   experts' GEMMs use `W + ΔW`, formed once per forward (what PEFT's parametrisation does),
//!   so autograd reaches A and B through it.
//!
//! PEFT refuses dropout and DoRA on such parameters (dropout cannot be factored out of
//! `x (W + ΔW)`), and so does ftx. When one module has several targeted parameters PEFT nests
//! its wrappers in the order the module registers them: the first parameter's factors are
//! saved under `<module>.base_layer.lora_A.weight`, the last one's under
//! `<module>.lora_A.weight` ([`peft_stems`]).

use tch::{Kind, Tensor};

/// The LoRA factors of one stacked-experts parameter.
pub struct ExpertLora {
    /// `lora_A.weight`, `[r·E, in]` (expert-major rows).
    pub a: Tensor,
    /// `lora_B.weight`, `[out, r·E]` (rank-major columns).
    pub b: Tensor,
    /// `E`, the number of experts.
    pub experts: i64,
    /// `alpha / r` (rsLoRA: `alpha / √r`).
    pub scaling: f64,
    /// False while a reference policy runs with adapters switched off.
    pub enabled: bool,
}

impl ExpertLora {
    /// A fresh adapter for `base [E, in, out]` as PEFT initialises one (`nn.Linear(in, r·E)`'s
    /// Kaiming-uniform A, bound `1/√in`; B = 0), in the base's dtype and device, trainable.
    pub fn init(base: &Tensor, rank: i64, scaling: f64) -> ExpertLora {
        let (e, inp, _) = dims(base);
        let bound = 1.0 / (inp as f64).sqrt();
        let a = Tensor::empty([rank * e, inp], (Kind::Float, base.device())).uniform_(-bound, bound);
        Self::with_a(base, a, rank, scaling)
    }

    /// An adapter to be filled from a file: A = B = 0 (draws nothing from libtorch's generator).
    pub fn zeros(base: &Tensor, rank: i64, scaling: f64) -> ExpertLora {
        let (e, inp, _) = dims(base);
        Self::with_a(base, Tensor::zeros([rank * e, inp], (Kind::Float, base.device())), rank, scaling)
    }

    fn with_a(base: &Tensor, a: Tensor, rank: i64, scaling: f64) -> ExpertLora {
        let (e, _, out) = dims(base);
        let a = a.to_kind(base.kind()).set_requires_grad(true);
        let b = Tensor::zeros([out, rank * e], (base.kind(), base.device())).set_requires_grad(true);
        ExpertLora { a, b, experts: e, scaling, enabled: true }
    }

    /// `ΔW [E, in, out] = s · A_eᵀ B_eᵀ` for every expert e, in the factors' dtype (PEFT's
    /// `einsum("o r e, e r i -> e i o", B, A) · s`, as one batched GEMM).
    pub fn delta(&self) -> Tensor {
        delta(&self.a, &self.b, self.experts, self.scaling)
    }

    /// `base + ΔW` when switched on, else `base` itself (no copy).
    pub fn apply(&self, base: &Tensor) -> Tensor {
        if self.enabled { base + self.delta().to_kind(base.kind()) } else { base.shallow_clone() }
    }

    /// The factors under PEFT's names relative to the wrapper (`lora_A.weight`, `lora_B.weight`).
    pub fn named_tensors(&self) -> Vec<(&'static str, Tensor)> {
        vec![("lora_A.weight", self.a.shallow_clone()), ("lora_B.weight", self.b.shallow_clone())]
    }
}

/// `ΔW [E, in, out]` of factors `a [r·E, in]`, `b [out, r·E]` with `experts` = E and scale `s`
/// (also what exports merge from an adapter file).
pub fn delta(a: &Tensor, b: &Tensor, experts: i64, scaling: f64) -> Tensor {
    let (re, inp) = (a.size()[0], a.size()[1]);
    let out = b.size()[0];
    let r = re / experts;
    let lhs = a.view([experts, r, inp]).transpose(1, 2);
    let rhs = b.view([out, r, experts]).permute([2, 1, 0]);
    lhs.bmm(&rhs) * scaling
}

/// The effective weight of a stacked-experts parameter: `base + ΔW` with an active adapter.
pub fn effective(base: &Tensor, lora: Option<&ExpertLora>) -> Tensor {
    match lora {
        Some(l) => l.apply(base),
        None => base.shallow_clone(),
    }
}

fn dims(base: &Tensor) -> (i64, i64, i64) {
    let s = base.size();
    (s[0], s[1], s[2])
}

/// One stacked-experts parameter of a layer that PEFT can adapt through `target_parameters`.
pub struct ExpertParam<'a> {
    /// Its HF name within the model (`model.layers.0.mlp.experts.gate_up_proj`).
    pub name: String,
    /// The frozen base `[E, in, out]`.
    pub base: &'a mut Tensor,
    /// Its adapter, if attached.
    pub lora: &'a mut Option<ExpertLora>,
}

/// PEFT's module stems (`<module>[.base_layer]*`, without `base_model.model.`) of the adapted
/// parameters `names` (full HF names, e.g. `model.layers.0.mlp.experts.gate_up_proj`, in
/// registration order): within one module the last adapted parameter's wrapper is the outer
/// one (`<module>`), each earlier one a `base_layer` deeper.
pub fn peft_stems(names: &[String]) -> Vec<String> {
    let module = |n: &str| n.rsplit_once('.').map_or(String::new(), |(m, _)| m.to_owned());
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let m = module(n);
            let later = names[i + 1..].iter().filter(|o| module(o) == m).count();
            format!("{m}{}", ".base_layer".repeat(later))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_is_peft_einsum_and_stems_nest_in_registration_order() {
        let (e, r, inp, out) = (3i64, 2i64, 5i64, 4i64);
        let a = Tensor::randn([r * e, inp], (Kind::Double, tch::Device::Cpu));
        let b = Tensor::randn([out, r * e], (Kind::Double, tch::Device::Cpu));
        let d = delta(&a, &b, e, 0.5);
        // einsum("o r e, e r i -> e i o") written out element by element.
        let (av, bv) = (a.view([e, r, inp]), b.view([out, r, e]));
        for x in 0..e {
            for i in 0..inp {
                for o in 0..out {
                    let want: f64 = (0..r).map(|k| bv.double_value(&[o, k, x]) * av.double_value(&[x, k, i])).sum::<f64>() * 0.5;
                    assert!((d.double_value(&[x, i, o]) - want).abs() < 1e-12);
                }
            }
        }
        let names: Vec<String> = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
            .map(String::from)
            .to_vec();
        assert_eq!(peft_stems(&names), ["model.layers.0.mlp.experts.base_layer", "model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]);
    }
}
