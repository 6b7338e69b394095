//! RMSNorm, the normalisation every supported family uses (Gemma's scaling by 1 + w included).

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
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let width = *x.size().last().expect("a norm's input has a last dimension");
        if self.unit_offset {
            // As Gemma's reference: normalise and scale in fp32, then round once.
            let w = self.weight.to_kind(Kind::Float) + 1.0;
            return x.to_kind(Kind::Float).rms_norm([width].as_slice(), Some(&w), self.eps).to_kind(x.kind());
        }
        x.rms_norm([width].as_slice(), Some(&self.weight), self.eps)
    }
}
