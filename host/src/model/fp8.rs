//! FP8 storage for frozen weights (`method.fp8`): e4m3 codes with one fp32 scale per output
//! row, so that the LoRA block nodes run the frozen base's GEMMs on FP8 tensor cores
//! (lora_block.h, fp8.h). Half the bytes of a bf16 base; each row keeps e4m3's 3 mantissa bits
//! relative to its own largest entry.
//!
//! Quantisation, per row `w` of the weight: `amax = max|w|`, `q = e4m3(clamp(w · 448/amax, ±448))`
//! (round to nearest even), `scale = amax/448` (an all-zero row: scale 1, zeros), so
//! `w ≈ q · scale` — the formula fp8.h applies to activations on the fly.

use tch::{Kind, Tensor};

/// e4m3's largest finite value.
pub const E4M3_MAX: f64 = 448.0;

/// A frozen `[out, in]` weight in FP8 (e4m3) with a per-row scale.
pub struct Fp8Weight {
    /// `[out, in]`, `Kind::Float8e4m3fn`, contiguous.
    pub codes: Tensor,
    /// `[out]`, fp32.
    pub scale: Tensor,
    kind: Kind,
}

/// Rowwise e4m3 quantisation of a 2-D tensor (see the module's docs): `(codes, scale [rows])`.
pub fn quantize_rows(x: &Tensor) -> (Tensor, Tensor) {
    let _g = tch::no_grad_guard();
    let v = x.to_kind(Kind::Float);
    let amax = v.abs().amax([-1].as_slice(), true);
    let nonzero = amax.gt(0.0);
    let ones = amax.ones_like();
    let inv = ones.where_self(&nonzero.logical_not(), &(amax.full_like(E4M3_MAX) / &amax));
    let scale = ones.where_self(&nonzero.logical_not(), &(&amax / E4M3_MAX));
    let codes = (v * inv).clamp(-E4M3_MAX, E4M3_MAX).to_kind(Kind::Float8e4m3fn);
    (codes, scale.squeeze_dim(-1))
}

impl Fp8Weight {
    /// Quantises a dense `[out, in]` weight; `kind` is the dtype the layer computes in.
    pub fn quantize(w: &Tensor, kind: Kind) -> Fp8Weight {
        let (codes, scale) = quantize_rows(w);
        Fp8Weight { codes, scale, kind }
    }

    /// Whether the FP8 GEMM takes a weight of this shape (widths in multiples of 16, as
    /// cuBLASLt's FP8 kernels need).
    pub fn fits(out: i64, inp: i64) -> bool {
        out % 16 == 0 && inp % 16 == 0
    }

    /// The weight in the compute dtype, `codes · scale` per row.
    pub fn dequantize(&self) -> Tensor {
        let _g = tch::no_grad_guard();
        (self.codes.to_kind(Kind::Float) * self.scale.unsqueeze(1)).to_kind(self.kind)
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (i64, i64) {
        let s = self.codes.size();
        (s[0], s[1])
    }

    /// The dtype the layer computes in.
    pub fn compute_kind(&self) -> Kind {
        self.kind
    }
}
