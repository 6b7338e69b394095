//! The linear layer every projection uses: a frozen or trainable base (dense, NF4 for QLoRA,
//! or FP8 for `method.fp8`) plus an optional adapter (LoRA, DoRA) that the `peft` stage
//! attaches.

use super::fp8::Fp8Weight;
use super::nf4::Nf4Weight;
use tch::{Kind, Tensor};

/// Where a linear layer's base weight lives.
pub enum Weight {
    /// A plain `[out, in]` tensor.
    Dense(Tensor),
    /// NF4-quantised and frozen (QLoRA); dequantised to the compute dtype per use.
    Nf4(Nf4Weight),
    /// FP8 (e4m3, per-row scales) and frozen (`method.fp8`): the LoRA block nodes multiply the
    /// codes on FP8 tensor cores; elsewhere dequantised to the compute dtype per use.
    Fp8(Fp8Weight),
}

/// `y = x Wᵀ + b`, the part of a layer that exists without adapters.
pub struct BaseLinear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

/// A base weight as a GEMM takes it: dense, or NF4 or FP8 weights stacked on the output
/// dimension (one projection's, or a fused group's), dequantised where they are multiplied
/// (except FP8 in the LoRA block nodes).
pub enum BaseWeight<'a> {
    Dense(Tensor),
    Nf4(Vec<&'a Nf4Weight>),
    Fp8(Vec<&'a Fp8Weight>),
}

impl BaseWeight<'_> {
    /// `x Wᵀ + b`. NF4 goes through an autograd node that dequantises again in backward
    /// instead of keeping the dequantised weight (`model::nodes::nf4_linear`); FP8 outside the
    /// block nodes (adapter dropout, no adapter) dequantises and multiplies in the compute dtype.
    pub fn product(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        match self {
            BaseWeight::Dense(w) => x.linear(w, bias),
            BaseWeight::Nf4(qs) => super::nodes::nf4_linear(x, qs, bias),
            BaseWeight::Fp8(_) => x.linear(&self.dense(), bias),
        }
    }

    /// The weight as one dense tensor in the compute dtype, `[Σ out, in]`.
    pub fn dense(&self) -> Tensor {
        match self {
            BaseWeight::Dense(w) => w.shallow_clone(),
            BaseWeight::Nf4(qs) => super::nodes::dequantize_stacked(qs),
            BaseWeight::Fp8(ws) => Tensor::cat(&ws.iter().map(|w| w.dequantize()).collect::<Vec<_>>(), 0),
        }
    }
}

impl BaseLinear {
    /// The weight as a dense tensor in the compute dtype (dequantised when NF4).
    pub fn dense_weight(&self) -> Tensor {
        match &self.weight {
            Weight::Dense(w) => w.shallow_clone(),
            Weight::Nf4(q) => q.dequantize(),
            Weight::Fp8(q) => q.dequantize(),
        }
    }

    /// The weight as [`BaseWeight`] (no copy, no dequantisation yet).
    pub fn base_weight(&self) -> BaseWeight<'_> {
        match &self.weight {
            Weight::Dense(w) => BaseWeight::Dense(w.shallow_clone()),
            Weight::Nf4(q) => BaseWeight::Nf4(vec![q]),
            Weight::Fp8(q) => BaseWeight::Fp8(vec![q]),
        }
    }

    /// `x Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.base_weight().product(x, self.bias.as_ref())
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (i64, i64) {
        match &self.weight {
            Weight::Dense(w) => {
                let s = w.size();
                (s[0], s[1])
            }
            Weight::Nf4(q) => q.shape(),
            Weight::Fp8(q) => q.shape(),
        }
    }

    /// The compute dtype.
    pub fn kind(&self) -> Kind {
        match &self.weight {
            Weight::Dense(w) => w.kind(),
            Weight::Nf4(q) => q.compute_kind(),
            Weight::Fp8(q) => q.compute_kind(),
        }
    }
}

/// A trainable addition to a frozen linear layer (implemented in `peft`).
pub trait Adapter: Send {
    /// The layer's output for input `x`, base included (`train` enables dropout).
    fn forward(&self, x: &Tensor, base: &BaseLinear, train: bool) -> Tensor;
    /// The adapter's tensors under PEFT's names relative to the layer, e.g. `lora_A.weight`.
    fn named_tensors(&self) -> Vec<(String, Tensor)>;
    /// The weight change this adapter applies, as a dense `[out, in]` tensor (for merging).
    fn delta_weight(&self, base: &BaseLinear) -> Tensor;
    /// Its low-rank factors when it is a LoRA or DoRA adapter, so that projections sharing an
    /// input can run their adapters as one (`model::fused`); `None` keeps it on its own.
    fn low_rank(&self) -> Option<LowRank<'_>> {
        None
    }
    /// When this adapter is one expert's slice of factors stored stacked over a MoE layer's
    /// experts: those factors and its expert, so that the experts' grouped GEMMs use the
    /// stacked leaves as they are (`model::grouped_experts`); `None` otherwise.
    fn expert_slice(&self) -> Option<ExpertSlice<'_>> {
        None
    }
}

/// LoRA / DoRA factors of one projection of every expert of a MoE layer, each one leaf
/// stacked over the experts (expert `e`'s adapter is slice `e` of each). Every expert's adapter
/// keeps its own handles to the same leaves, so an optimizer that moves a leaf's data
/// (`set_data`: flat buffers, FSDP) moves it for all of them; slices are taken per use, never
/// kept.
pub struct StackedFactors {
    /// `[E, r, in]`
    pub a: Tensor,
    /// `[E, out, r]`
    pub b: Tensor,
    /// `[E, out]`, DoRA only.
    pub magnitude: Option<Tensor>,
    /// DoRA: the frozen experts' squared row norms (fp32, `[E, out]`; not trained).
    pub base_row_sq: Option<Tensor>,
    pub scaling: f64,
    pub dropout: f64,
}

impl StackedFactors {
    /// Handles to the same leaves (no copy).
    pub fn shallow_clone(&self) -> StackedFactors {
        StackedFactors {
            a: self.a.shallow_clone(),
            b: self.b.shallow_clone(),
            magnitude: self.magnitude.as_ref().map(Tensor::shallow_clone),
            base_row_sq: self.base_row_sq.as_ref().map(Tensor::shallow_clone),
            scaling: self.scaling,
            dropout: self.dropout,
        }
    }

    /// One projection's experts' factors (`parts[e]`: expert e's) stacked into new tensors,
    /// when they are alike: same shapes, dtype and device, scaling and dropout, DoRA or not.
    /// `None` otherwise (or for no parts).
    pub fn stack(parts: &[LowRank<'_>]) -> Option<StackedFactors> {
        let first = parts.first()?;
        let alike = parts.iter().all(|p| {
            p.a.size() == first.a.size()
                && p.b.size() == first.b.size()
                && p.a.kind() == first.a.kind()
                && p.a.device() == first.a.device()
                && p.scaling == first.scaling
                && p.dropout == first.dropout
                && p.magnitude.is_some() == first.magnitude.is_some()
                && p.base_row_sq.is_some() == first.base_row_sq.is_some()
        });
        if !alike {
            return None;
        }
        let stack = |pick: &dyn for<'b> Fn(&LowRank<'b>) -> Option<&'b Tensor>| -> Option<Tensor> {
            parts.iter().map(pick).collect::<Option<Vec<&Tensor>>>().map(|ts| Tensor::stack(&ts, 0))
        };
        Some(StackedFactors {
            a: stack(&|p| Some(p.a))?,
            b: stack(&|p| Some(p.b))?,
            magnitude: stack(&|p| p.magnitude),
            base_row_sq: stack(&|p| p.base_row_sq),
            scaling: first.scaling,
            dropout: first.dropout,
        })
    }

    /// Experts stacked, `E`.
    pub fn experts(&self) -> i64 {
        self.a.size()[0]
    }

    /// Whether `other` holds the very same leaves (same data and shapes).
    pub fn same_leaves(&self, other: &StackedFactors) -> bool {
        let same = |x: &Tensor, y: &Tensor| x.data_ptr() == y.data_ptr() && x.size() == y.size();
        let same_opt = |x: &Option<Tensor>, y: &Option<Tensor>| match (x, y) {
            (Some(x), Some(y)) => same(x, y),
            (None, None) => true,
            _ => false,
        };
        same(&self.a, &other.a) && same(&self.b, &other.b) && same_opt(&self.magnitude, &other.magnitude) && same_opt(&self.base_row_sq, &other.base_row_sq)
    }
}

/// One expert's place in [`StackedFactors`].
pub struct ExpertSlice<'a> {
    pub factors: &'a StackedFactors,
    /// Which slice of the stacked factors is this expert's.
    pub expert: i64,
}

/// A LoRA / DoRA adapter's factors: the layer computes `x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ`
/// (DoRA: rescaled per output row by `magnitude / ‖W + s·BA‖`).
pub struct LowRank<'a> {
    /// `[r, in]`
    pub a: &'a Tensor,
    /// `[out, r]`
    pub b: &'a Tensor,
    /// `[out]`, DoRA only.
    pub magnitude: Option<&'a Tensor>,
    /// DoRA: the frozen base weight's squared row norms `‖W‖²` (fp32, `[out]`).
    pub base_row_sq: Option<&'a Tensor>,
    pub scaling: f64,
    pub dropout: f64,
}

/// A projection: base plus optional adapter.
pub struct Linear {
    pub base: BaseLinear,
    pub adapter: Option<Box<dyn Adapter>>,
    /// False while computing a reference policy with adapters switched off.
    pub adapter_enabled: bool,
}

impl Linear {
    /// A dense layer without adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { base: BaseLinear { weight: Weight::Dense(weight), bias }, adapter: None, adapter_enabled: true }
    }

    /// The layer's output; `train` switches adapter dropout on.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        match &self.adapter {
            Some(a) if self.adapter_enabled => a.forward(x, &self.base, train),
            _ => self.base.forward(x),
        }
    }

    /// The layer's output in evaluation mode.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }
}
