//! LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024) adapters, computed as HF PEFT does.
//!
//! LoRA: `y = base(x) + s · B(A(dropout(x)))` with `s = alpha / r` (rsLoRA: `alpha / √r`).
//! DoRA: the same low-rank direction, rescaled per output row by a learned magnitude:
//! `y = base(x) + (m/‖W + s·BA‖ − 1) · (base(x) − b) + (m/‖W + s·BA‖) · s · B(A(x))`,
//! the norm taken per output row and detached from the graph (DoRA §4.3).

use crate::model::fused::{dora_norm, low_rank_linear, row_norm, row_sq};
use crate::model::linear::{Adapter, BaseLinear, LowRank};
use tch::{Kind, Tensor};

/// A LoRA or DoRA adapter on one linear layer.
pub struct LoraAdapter {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    /// `[out]`, DoRA only.
    pub magnitude: Option<Tensor>,
    /// DoRA: the frozen base weight's squared row norms (fp32, `[out]`), kept so that the
    /// norm of `W + s·BA` never needs `BA` at full size (computed per call when `None`).
    pub base_row_sq: Option<Tensor>,
    pub scaling: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// A fresh adapter as PEFT initialises one: A ~ U(−1/√in, 1/√in) (Kaiming-uniform with
    /// a = √5), B = 0, and for DoRA the magnitude = row norms of the base weight.
    pub fn init(base: &BaseLinear, r: i64, scaling: f64, dropout: f64, dora: bool) -> LoraAdapter {
        let (_, inp) = base.shape();
        let bound = 1.0 / (inp as f64).sqrt();
        Self::with_a(base, |device| Tensor::empty([r, inp], (Kind::Float, device)).uniform_(-bound, bound), scaling, dropout, dora)
    }

    /// An adapter to be filled from a file: A = B = 0 (DoRA: the magnitude = the base's row
    /// norms). Unlike [`LoraAdapter::init`] it draws nothing from libtorch's process-wide
    /// generator, so loading an adapter leaves a seeded run's random stream as it was.
    pub fn zeros(base: &BaseLinear, r: i64, scaling: f64, dropout: f64, dora: bool) -> LoraAdapter {
        let (_, inp) = base.shape();
        Self::with_a(base, |device| Tensor::zeros([r, inp], (Kind::Float, device)), scaling, dropout, dora)
    }

    /// The adapter with A = `a(device)` (fp32, cast to the layer's dtype), B = 0 and, for DoRA,
    /// the base's row norms as magnitude, all marked trainable.
    fn with_a(base: &BaseLinear, a: impl FnOnce(tch::Device) -> Tensor, scaling: f64, dropout: f64, dora: bool) -> LoraAdapter {
        let (out, _) = base.shape();
        let kind = base.kind();
        let w = base.dense_weight();
        let device = w.device();
        let a = a(device).to_kind(kind);
        let r = a.size()[0];
        let b = Tensor::zeros([out, r], (kind, device));
        let base_row_sq = dora.then(|| row_sq(&w));
        let magnitude = base_row_sq.as_ref().map(|sq| sq.sqrt().to_kind(kind));
        let mut adapter = LoraAdapter { a, b, magnitude, base_row_sq, scaling, dropout };
        adapter.set_trainable();
        adapter
    }

    /// Marks A, B (and the magnitude) as requiring gradients.
    pub fn set_trainable(&mut self) {
        for t in self.tensors_mut() {
            *t = t.detach().set_requires_grad(true);
        }
    }

    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.a, &mut self.b];
        if let Some(m) = &mut self.magnitude {
            v.push(m);
        }
        v
    }

    /// `B A`, the low-rank direction `[out, in]`.
    fn ba(&self) -> Tensor {
        self.b.matmul(&self.a)
    }
}

impl Adapter for LoraAdapter {
    fn forward(&self, x: &Tensor, base: &BaseLinear, train: bool) -> Tensor {
        let dropping = train && self.dropout > 0.0;
        let dropped = if dropping { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        let Some(m) = &self.magnitude else {
            let xa = dropped.linear::<Tensor>(&self.a, None);
            return low_rank_linear(x, &base.base_weight(), base.bias.as_ref(), &xa, &self.a, &self.b, None, self.scaling);
        };
        let base_row_sq = self.base_row_sq.as_ref().map_or_else(|| row_sq(&base.dense_weight()), Tensor::shallow_clone);
        if !dropping {
            let xa = x.linear::<Tensor>(&self.a, None);
            return low_rank_linear(x, &base.base_weight(), base.bias.as_ref(), &xa, &self.a, &self.b, Some((m, &base_row_sq)), self.scaling);
        }
        let w = base.dense_weight();
        let norm = dora_norm(&w, &base_row_sq, &self.a, &self.b, self.scaling).to_kind(w.kind());
        let scale = (m / norm).view([1, -1]);
        // With dropout active PEFT recomputes the base output on the dropped input.
        let lora = dropped.linear::<Tensor>(&self.a, None).linear::<Tensor>(&self.b, None);
        let result = x.linear(&w, base.bias.as_ref());
        let base_no_bias = dropped.linear::<Tensor>(&w, None);
        result + (&scale - 1.0) * base_no_bias + scale * lora * self.scaling
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("lora_A.weight".to_owned(), self.a.shallow_clone()),
            ("lora_B.weight".to_owned(), self.b.shallow_clone()),
        ];
        if let Some(m) = &self.magnitude {
            v.push(("lora_magnitude_vector".to_owned(), m.shallow_clone()));
        }
        v
    }

    fn low_rank(&self) -> Option<LowRank<'_>> {
        Some(LowRank {
            a: &self.a,
            b: &self.b,
            magnitude: self.magnitude.as_ref(),
            base_row_sq: self.base_row_sq.as_ref(),
            scaling: self.scaling,
            dropout: self.dropout,
        })
    }

    fn delta_weight(&self, base: &BaseLinear) -> Tensor {
        let _g = tch::no_grad_guard();
        let ba = self.ba().to_kind(Kind::Float) * self.scaling;
        match &self.magnitude {
            None => ba,
            Some(m) => {
                let w = base.dense_weight().to_kind(Kind::Float);
                let merged = &w + &ba;
                let scale = m.to_kind(Kind::Float) / row_norm(&merged);
                merged * scale.unsqueeze(1) - w
            }
        }
    }
}
