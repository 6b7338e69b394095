//! AdamW with 8-bit moments, as bitsandbytes' `AdamW8bit`: each moment is stored as one byte
//! per value (an index into bitsandbytes' dynamic quantisation map, signed for the first
//! moment, unsigned for the second) plus one fp32 scale (the block's absolute maximum) per
//! block of 256 values. A step dequantises, updates in fp32 exactly as AdamW does, writes the
//! weight, and requantises each block to the code nearest its value / absmax. Tensors of fewer
//! than 4096 values keep fp32 moments, as bitsandbytes' `min_8bit_size`.
//!
//! The update rule and state layout follow bitsandbytes 0.50's
//! `optimizer_update_8bit_blockwise` (its PyTorch reference: weight decay before the update,
//! `p -= lr/c1 · m / (√v / √c2 + eps)`, an all-zero block stored with scale 1); checked against
//! it in tests/optim8bit.rs.

use tch::{Device, Kind, Tensor};

/// Values per quantisation block (bitsandbytes' blockwise optimizers use 256).
pub const BLOCK: i64 = 256;
/// Tensors with fewer values keep fp32 moments (bitsandbytes' `min_8bit_size` default).
pub const MIN_8BIT_SIZE: i64 = 4096;

/// bitsandbytes' dynamic quantisation map (`create_dynamic_map(signed)`): 256 sorted values in
/// [-1, 1] (signed) or [0, 1] (unsigned), dense near zero — a dynamic exponent (10⁻⁶ … 10⁰)
/// with a shrinking linear fraction. Computed with libtorch's own `linspace` and fp32
/// arithmetic, the same operations bitsandbytes runs, so the values agree bit for bit.
pub fn dynamic_map(signed: bool) -> Tensor {
    const MAX_EXPONENT_BITS: i32 = 7;
    const NON_SIGN_BITS: i32 = 7;
    let mut parts = Vec::new();
    for i in 0..MAX_EXPONENT_BITS {
        let items = if signed { (1i64 << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS)) + 1 } else { (1i64 << (i + NON_SIGN_BITS - MAX_EXPONENT_BITS + 1)) + 1 };
        let bounds = Tensor::linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu));
        let means = (bounds.narrow(0, 0, items - 1) + bounds.narrow(0, 1, items - 1)) / 2.0;
        let scale = 10f64.powi(-(MAX_EXPONENT_BITS - 1) + i);
        parts.push(&means * scale);
        if signed {
            parts.push(&means * -scale);
        }
    }
    // (With 7 exponent bits of 7 there are no extra linear items.)
    parts.push(Tensor::from_slice(&[0f32, 1.0]));
    let (sorted, _) = Tensor::cat(&parts, 0).sort(0, false);
    debug_assert_eq!(sorted.numel(), 256);
    sorted
}

/// One moment in 8 bits: a code per value and an fp32 scale per block.
pub struct Quantized {
    /// Indices into the map, one per value, in the parameter's shape (as bitsandbytes keeps them).
    pub codes: Tensor,
    /// Each block's absolute maximum (1 for an all-zero block).
    pub absmax: Tensor,
}

impl Quantized {
    /// The zero moment of a tensor of shape `shape` on `device`: every value at the map's 0.
    pub fn zeros(shape: &[i64], map: &Tensor, device: Device) -> Quantized {
        let zero = map.abs().argmin(0, false).int64_value(&[]);
        let n: i64 = shape.iter().product();
        Quantized {
            codes: Tensor::full(shape, zero, (Kind::Uint8, device)),
            absmax: Tensor::ones([(n + BLOCK - 1) / BLOCK], (Kind::Float, device)),
        }
    }

    /// The fp32 values (flat).
    pub fn dequantize(&self, map: &Tensor) -> Tensor {
        let n = self.codes.numel() as i64;
        let values = map.index_select(0, &self.codes.view([-1]).to_kind(Kind::Int64));
        let padded = values.constant_pad_nd([0, padding(n)]).view([-1, BLOCK]);
        (padded * self.absmax.unsqueeze(1)).view([-1]).narrow(0, 0, n)
    }

    /// Stores `values` (fp32, flat): each block's absmax, then each value's nearest code to
    /// value / absmax (ties to the lower code, as an argmin over the map).
    pub fn quantize(&mut self, values: &Tensor, map: &Tensor) {
        let n = values.numel() as i64;
        let blocks = values.constant_pad_nd([0, padding(n)]).view([-1, BLOCK]);
        let absmax = blocks.abs().amax([1].as_slice(), true);
        let absmax = absmax.masked_fill(&absmax.eq(0.0), 1.0);
        let scaled = (blocks / &absmax).view([-1]).narrow(0, 0, n);
        // The first code ≥ the value, and the one below it: the nearest is one of the two.
        let hi = scaled.bucketize(map, false, false).clamp(1, map.numel() as i64 - 1);
        let lo = &hi - 1;
        let d_lo = (&scaled - map.index_select(0, &lo)).abs();
        let d_hi = (&scaled - map.index_select(0, &hi)).abs();
        let nearest = hi.where_self(&d_hi.lt_tensor(&d_lo), &lo);
        let _ = self.codes.copy_(&nearest.to_kind(Kind::Uint8).view(self.codes.size().as_slice()));
        let _ = self.absmax.copy_(&absmax.view([-1]));
    }
}

/// Blocks that `n` values fill (the last one possibly in part).
pub fn blocks_of(n: i64) -> i64 {
    (n + BLOCK - 1) / BLOCK
}

/// Zeros that make `n` values whole blocks.
fn padding(n: i64) -> i64 {
    (BLOCK - n % BLOCK) % BLOCK
}

/// The two 8-bit moments of one parameter, with the maps they index.
pub struct Moments8bit {
    pub exp_avg: Quantized,
    pub exp_avg_sq: Quantized,
    signed_map: Tensor,
    unsigned_map: Tensor,
}

impl Moments8bit {
    /// Zero moments for a tensor of shape `shape` on `device`.
    pub fn new(shape: &[i64], device: Device) -> Moments8bit {
        let signed_map = dynamic_map(true).to_device(device);
        let unsigned_map = dynamic_map(false).to_device(device);
        Moments8bit {
            exp_avg: Quantized::zeros(shape, &signed_map, device),
            exp_avg_sq: Quantized::zeros(shape, &unsigned_map, device),
            signed_map,
            unsigned_map,
        }
    }

    /// The tensors a checkpoint keeps, by suffix: codes (u8) and block scales (fp32).
    pub fn state(&self) -> [(&'static str, Tensor); 4] {
        [
            ("state1", self.exp_avg.codes.shallow_clone()),
            ("absmax1", self.exp_avg.absmax.shallow_clone()),
            ("state2", self.exp_avg_sq.codes.shallow_clone()),
            ("absmax2", self.exp_avg_sq.absmax.shallow_clone()),
        ]
    }

    /// One AdamW step of `value` (fp32, updated in place) from `grad` already multiplied by the
    /// clipping coefficient; `step` counts from 1; `hyper` is (beta1, beta2, eps, weight decay).
    pub fn step(&mut self, value: &mut Tensor, grad: &Tensor, lr: f64, step: i64, hyper: (f64, f64, f64, f64)) {
        let (beta1, beta2, eps, weight_decay) = hyper;
        let shape = value.size();
        let g = grad.to_kind(Kind::Float).view([-1]);
        let m = self.exp_avg.dequantize(&self.signed_map) * beta1 + &g * (1.0 - beta1);
        let v = self.exp_avg_sq.dequantize(&self.unsigned_map) * beta2 + (&g * &g) * (1.0 - beta2);
        let bias1 = 1.0 - beta1.powi(step as i32);
        let bias2_sqrt = (1.0 - beta2.powi(step as i32)).sqrt();
        let denom = v.sqrt() / bias2_sqrt + eps;
        if weight_decay > 0.0 {
            let _ = value.g_mul_scalar_(1.0 - lr * weight_decay);
        }
        let _ = value.g_add_(&((&m / denom) * (-lr / bias1)).view(shape.as_slice()));
        self.exp_avg.quantize(&m, &self.signed_map);
        self.exp_avg_sq.quantize(&v, &self.unsigned_map);
    }
}

/// Bytes of optimizer state a tensor of `n` values costs: 2 bytes per value and two fp32
/// scales per block in 8 bits, or 8 bytes per value below [`MIN_8BIT_SIZE`].
pub fn state_bytes(n: i64) -> i64 {
    if n < MIN_8BIT_SIZE {
        8 * n
    } else {
        2 * n + 2 * 4 * ((n + BLOCK - 1) / BLOCK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maps_are_sorted_unique_and_span_their_range() {
        for (signed, lo) in [(true, -1.0), (false, 0.0)] {
            let m = Vec::<f32>::try_from(dynamic_map(signed)).unwrap();
            assert_eq!(m.len(), 256);
            assert!(m.windows(2).all(|w| w[0] < w[1]), "signed={signed}");
            assert_eq!((m[0].min(lo as f32), *m.last().unwrap()), (lo as f32, 1.0));
            assert!(m.contains(&0.0));
        }
    }

    #[test]
    fn quantisation_picks_the_nearest_code_per_block() {
        let map = dynamic_map(true);
        let mut q = Quantized::zeros(&[300], &map, Device::Cpu);
        let x = Tensor::randn([300], (Kind::Float, Device::Cpu));
        q.quantize(&x, &map);
        let codes = Vec::<u8>::try_from(&q.codes).unwrap();
        let absmax = Vec::<f32>::try_from(&q.absmax).unwrap();
        let xs = Vec::<f32>::try_from(&x).unwrap();
        let mv = Vec::<f32>::try_from(&map).unwrap();
        for (i, &v) in xs.iter().enumerate() {
            let a = absmax[i / 256];
            let s = v / a;
            let best = (0..256).min_by(|&j, &k| (s - mv[j]).abs().total_cmp(&(s - mv[k]).abs())).unwrap();
            assert_eq!(codes[i] as usize, best, "value {i}");
        }
        let back = Vec::<f32>::try_from(q.dequantize(&map)).unwrap();
        assert!(back.iter().zip(&xs).all(|(b, x)| (b - x).abs() <= 0.02 * absmax[0].max(absmax[1])));
        assert_eq!(state_bytes(5000), 10000 + 2 * 4 * 20);
        assert_eq!(state_bytes(100), 800);
    }
}
