//! RMSNorm, the normalisation every supported family uses (Gemma's scaling by 1 + w included).

use crate::gpu::kernels;
use tch::{Kind, Tensor};

/// Root-mean-square layer norm over the last dimension.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    /// Scale by `1 + weight` (Gemma's norms, whose checkpoints store the offset from 1).
    pub unit_offset: bool,
}

impl RmsNorm {
    /// libtorch's `rms_norm` (one fused kernel each way on GPU, statistics in fp32 as
    /// transformers computes them) instead of the seven elementwise passes, and their saved
    /// fp32 copies, that the formula written out costs.
    /// On CUDA, with the fused kernels active (`gpu::kernels`), one NVRTC kernel each way.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if kernels::active_for(x) && kernels::rms_norm_fits(x, &self.weight) {
            return kernels::rms_norm(x, None, &self.weight, self.eps, self.offset()).1;
        }
        let width = *x.size().last().expect("a norm's input has a last dimension");
        if self.unit_offset {
            // As Gemma's reference: normalise and scale in fp32, then round once.
            let w = self.weight.to_kind(Kind::Float) + 1.0;
            return x.to_kind(Kind::Float).rms_norm([width].as_slice(), Some(&w), self.eps).to_kind(x.kind());
        }
        x.rms_norm([width].as_slice(), Some(&self.weight), self.eps)
    }

    /// `(x', norm(x))` for an `x` that is also the residual stream: where the kernels are
    /// active and `x` needs a gradient, `x'` is `x` passed through the norm's node, so the
    /// stream's gradient is added into the norm's input gradient by its backward kernel (no
    /// separate add); else `x` itself. Use `x'` for the residual.
    pub fn forward_passing(&self, x: &Tensor) -> (Tensor, Tensor) {
        if x.requires_grad() && kernels::active_for(x) && kernels::rms_norm_fits(x, &self.weight) {
            return kernels::rms_norm_passing(x, &self.weight, self.eps, self.offset());
        }
        (x.shallow_clone(), self.forward(x))
    }

    /// `(x + r, norm(x + r))`: the residual add and the norm of its sum, as one fused kernel
    /// each way where the kernels are active (the sum rounded to `x`'s type first, as the
    /// separate add rounds it).
    pub fn forward_add(&self, x: &Tensor, r: &Tensor) -> (Tensor, Tensor) {
        let fits = kernels::active_for(x) && r.kind() == x.kind() && r.size() == x.size() && kernels::rms_norm_fits(x, &self.weight) && kernels::aligned_rows(r);
        if fits {
            let (sum, y) = kernels::rms_norm(x, Some(r), &self.weight, self.eps, self.offset());
            return (sum.expect("the residual add returns its sum"), y);
        }
        let sum = x + r;
        let y = self.forward(&sum);
        (sum, y)
    }

    /// What the kernels add to the weight: 1 for `1 + w` norms.
    fn offset(&self) -> f64 {
        if self.unit_offset {
            1.0
        } else {
            0.0
        }
    }
}
