//! The linear layer every projection uses: a frozen or trainable base (dense, or NF4 for
//! QLoRA) plus an optional adapter (LoRA, DoRA) that the `peft` stage attaches.

use super::nf4::Nf4Weight;
use tch::{Kind, Tensor};

/// Where a linear layer's base weight lives.
pub enum Weight {
    /// A plain `[out, in]` tensor.
    Dense(Tensor),
    /// NF4-quantised and frozen (QLoRA); dequantised to the compute dtype per use.
    Nf4(Nf4Weight),
}

/// `y = x Wᵀ + b`, the part of a layer that exists without adapters.
pub struct BaseLinear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl BaseLinear {
    /// The weight as a dense tensor in the compute dtype (dequantised when NF4).
    pub fn dense_weight(&self) -> Tensor {
        match &self.weight {
            Weight::Dense(w) => w.shallow_clone(),
            Weight::Nf4(q) => q.dequantize(),
        }
    }

    /// `x Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match &self.weight {
            Weight::Dense(w) => x.linear(w, self.bias.as_ref()),
            Weight::Nf4(q) => x.linear(&q.dequantize(), self.bias.as_ref()),
        }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (i64, i64) {
        match &self.weight {
            Weight::Dense(w) => {
                let s = w.size();
                (s[0], s[1])
            }
            Weight::Nf4(q) => q.shape(),
        }
    }

    /// The compute dtype.
    pub fn kind(&self) -> Kind {
        match &self.weight {
            Weight::Dense(w) => w.kind(),
            Weight::Nf4(q) => q.compute_kind(),
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
