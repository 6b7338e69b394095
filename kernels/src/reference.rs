//! CPU reference versions of the fused CUDA kernels (src/cuda/fused.cu): the same formulas,
//! float32 accumulation, one rounding per stored element (bf16: round to nearest even). The
//! CUDA kernels are checked against these on the GPU (`ftx bench kernels`), and these against
//! libtorch's composite ops and autograd on CPU (tests/kernels.rs).

use half::bf16;

/// An element type the kernels read and write.
pub trait Elem: Copy + Send + Sync + 'static {
    /// The value in float32 (exact for both types).
    fn to_f32(self) -> f32;
    /// `v` rounded to this type (to nearest even).
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl Elem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> bf16 {
        bf16::from_f32(v)
    }
}

/// RMSNorm with the residual add, forward, over rows of width `n`: `s = x + r` (rounded; written
/// to `sum` when `residual` is given), `rstd = 1/√(mean(s²) + eps)`, `y = s · rstd · (w + offset)`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_forward<T: Elem>(x: &[T], residual: Option<&[T]>, w: &[T], mut sum: Option<&mut [T]>, y: &mut [T], rstd: &mut [f32], n: usize, eps: f32, offset: f32) {
    let mut s = vec![0f32; n];
    for (row, r_out) in rstd.iter_mut().enumerate() {
        let span = row * n..(row + 1) * n;
        for (j, v) in s.iter_mut().enumerate() {
            let xv = x[span.start + j];
            *v = match residual {
                Some(r) => {
                    let rounded = T::from_f32(xv.to_f32() + r[span.start + j].to_f32());
                    if let Some(out) = sum.as_deref_mut() {
                        out[span.start + j] = rounded;
                    }
                    rounded.to_f32()
                }
                None => xv.to_f32(),
            };
        }
        let mean_sq = s.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        *r_out = inv;
        for (j, v) in s.iter().enumerate() {
            y[span.start + j] = T::from_f32(v * inv * (w[j].to_f32() + offset));
        }
    }
}

/// RMSNorm (with the residual add) backward: `dx = rstd · (g − n̂ · mean(g · n̂)) + dsum` with
/// `n̂ = s · rstd`, `g = dy · (w + offset)`; and, with `dw`, `dw = Σ_rows dy · n̂` (summed in
/// float32, rounded once).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward<T: Elem>(sum: &[T], w: &[T], rstd: &[f32], dy: &[T], dsum: Option<&[T]>, dx: &mut [T], dw: Option<&mut [T]>, n: usize, offset: f32) {
    let mut dw_acc = vec![0f32; n];
    let mut nh = vec![0f32; n];
    let mut g = vec![0f32; n];
    for (row, &inv) in rstd.iter().enumerate() {
        let base = row * n;
        let mut dot = 0f32;
        for j in 0..n {
            let d = dy[base + j].to_f32();
            nh[j] = sum[base + j].to_f32() * inv;
            g[j] = d * (w[j].to_f32() + offset);
            dot += g[j] * nh[j];
            dw_acc[j] += d * nh[j];
        }
        let mean = dot / n as f32;
        for j in 0..n {
            let extra = dsum.map_or(0.0, |ds| ds[base + j].to_f32());
            dx[base + j] = T::from_f32(inv * (g[j] - nh[j] * mean) + extra);
        }
    }
    if let Some(dw) = dw {
        for (o, v) in dw.iter_mut().zip(&dw_acc) {
            *o = T::from_f32(*v);
        }
    }
}

/// The shape of a rotary call (see [`crate::RopeArgs`]); strides in elements.
#[derive(Debug, Clone, Copy)]
pub struct RopeShape {
    pub batch: usize,
    pub tokens: usize,
    pub q_heads: usize,
    pub k_heads: usize,
    pub head_dim: usize,
    pub rot: usize,
    pub q_strides: [usize; 3],
    pub k_strides: [usize; 3],
    pub cos_strides: [usize; 2],
}

impl RopeShape {
    /// Elements a strided `[B, T, heads, head_dim]` input spans from its first element.
    pub fn span(&self, strides: [usize; 3], heads: usize) -> usize {
        if self.batch == 0 || self.tokens == 0 || heads == 0 {
            return 0;
        }
        (self.batch - 1) * strides[0] + (self.tokens - 1) * strides[1] + (heads - 1) * strides[2] + self.head_dim
    }
    /// Elements the cos/sin tables span.
    pub fn table_span(&self) -> usize {
        if self.batch == 0 || self.tokens == 0 {
            return 0;
        }
        (self.batch - 1) * self.cos_strides[0] + (self.tokens - 1) * self.cos_strides[1] + self.rot
    }
}

/// Rotary embedding of q (and k): for each head, with `h = rot / 2`,
/// `out[i] = x[i]·cos[i] − x[i+h]·sin[i]`, `out[i+h] = x[i+h]·cos[i+h] + x[i]·sin[i+h]`
/// (transformers' `x·cos + rotate_half(x)·sin`); `inverse`: the transposed rotation,
/// `out[i] = x[i]·cos[i] + x[i+h]·sin[i+h]`, `out[i+h] = x[i+h]·cos[i+h] − x[i]·sin[i]`.
/// Dimensions past `rot` are copied. Outputs contiguous `[B, T, heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn rope<T: Elem>(shape: &RopeShape, q: &[T], k: Option<&[T]>, q_out: &mut [T], k_out: Option<&mut [T]>, cos: &[T], sin: &[T], inverse: bool) {
    let one = |x: &[T], strides: [usize; 3], heads: usize, out: &mut [T]| {
        let (hd, half) = (shape.head_dim, shape.rot / 2);
        for b in 0..shape.batch {
            for t in 0..shape.tokens {
                let tab = b * shape.cos_strides[0] + t * shape.cos_strides[1];
                let (c, s) = (&cos[tab..tab + shape.rot], &sin[tab..tab + shape.rot]);
                for h in 0..heads {
                    let src = &x[b * strides[0] + t * strides[1] + h * strides[2]..][..hd];
                    let dst = &mut out[((b * shape.tokens + t) * heads + h) * hd..][..hd];
                    for i in 0..half {
                        let (x1, x2) = (src[i].to_f32(), src[i + half].to_f32());
                        let (c1, c2, s1, s2) = (c[i].to_f32(), c[i + half].to_f32(), s[i].to_f32(), s[i + half].to_f32());
                        let (o1, o2) = if inverse { (x1 * c1 + x2 * s2, x2 * c2 - x1 * s1) } else { (x1 * c1 - x2 * s1, x2 * c2 + x1 * s2) };
                        dst[i] = T::from_f32(o1);
                        dst[i + half] = T::from_f32(o2);
                    }
                    dst[shape.rot..].copy_from_slice(&src[shape.rot..]);
                }
            }
        }
    };
    one(q, shape.q_strides, shape.q_heads, q_out);
    if let (Some(k), Some(k_out)) = (k, k_out) {
        one(k, shape.k_strides, shape.k_heads, k_out);
    }
}

fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

/// SwiGLU forward: `h = silu(g) · u` for `gu = [g | u]` rows (row stride `gu_stride`).
pub fn swiglu_forward<T: Elem>(gu: &[T], gu_stride: usize, h: &mut [T], rows: usize, inner: usize) {
    for r in 0..rows {
        let row = &gu[r * gu_stride..][..2 * inner];
        for c in 0..inner {
            let g = row[c].to_f32();
            h[r * inner + c] = T::from_f32(g * sigmoid(g) * row[inner + c].to_f32());
        }
    }
}

/// SwiGLU backward: `dgu = [dh · u · σ(g)(1 + g(1 − σ(g))) | dh · silu(g)]`, silu recomputed
/// from g.
pub fn swiglu_backward<T: Elem>(gu: &[T], gu_stride: usize, dh: &[T], dh_stride: usize, dgu: &mut [T], rows: usize, inner: usize) {
    for r in 0..rows {
        let row = &gu[r * gu_stride..][..2 * inner];
        for c in 0..inner {
            let (g, u, d) = (row[c].to_f32(), row[inner + c].to_f32(), dh[r * dh_stride + c].to_f32());
            let sg = sigmoid(g);
            dgu[r * 2 * inner + c] = T::from_f32(d * u * sg * (1.0 + g * (1.0 - sg)));
            dgu[r * 2 * inner + inner + c] = T::from_f32(d * g * sg);
        }
    }
}

/// Cross-entropy of one row of logits `z` (their float32 values) against `target`, as
/// [`crate::CrossEntropyArgs`] defines it: `x = z` or `c·tanh(z/c)` (`softcap` c > 0), returns
/// `logsumexp(x) − x[target]`; with `grad` (`z`'s length), writes
/// `(softmax(x) − onehot(target)) · scale · (1 − tanh²(z/c) when capped)`. The sum of the
/// exponentials accumulates in float64 (a reference closer to the exact value than either
/// float32 order it checks). `ignore_index`: loss 0, gradient 0; a target outside the row: NaN.
pub fn cross_entropy_row(z: &[f32], target: i64, ignore_index: i64, softcap: f32, scale: f32, grad: Option<&mut [f32]>) -> f32 {
    if target == ignore_index {
        if let Some(g) = grad {
            g.fill(0.0);
        }
        return 0.0;
    }
    let capped = |v: f32| if softcap > 0.0 { softcap * (v / softcap).tanh() } else { v };
    // The running maximum keeps a NaN, so that NaN logits give a NaN loss (as libtorch's).
    let m = z.iter().map(|&v| capped(v)).fold(f32::NEG_INFINITY, |a, b| if b > a || b.is_nan() { b } else { a });
    let sum: f64 = if m == f32::NEG_INFINITY { 0.0 } else { z.iter().map(|&v| ((capped(v) - m) as f64).exp()).sum() };
    let lse = m + sum.ln() as f32;
    let t = usize::try_from(target).ok().filter(|&t| t < z.len());
    if let Some(g) = grad {
        for (j, (o, &v)) in g.iter_mut().zip(z).enumerate() {
            let (x, slope) = if softcap > 0.0 {
                let th = (v / softcap).tanh();
                (softcap * th, 1.0 - th * th)
            } else {
                (v, 1.0)
            };
            let d = (x - lse).exp() - if Some(j) == t { 1.0 } else { 0.0 };
            *o = d * scale * slope;
        }
    }
    match t {
        Some(t) => lse - capped(z[t]),
        None => f32::NAN,
    }
}

/// e4m3's largest finite value (float8_e4m3fn has no infinities).
pub const E4M3_MAX: f32 = 448.0;

/// c10's float32 → float8_e4m3fn conversion (`fp8e4m3fn_from_fp32_value`), bit for bit: round
/// to nearest even, subnormals in steps of 2⁻⁹, the sign kept (−0 is 0x80); NaN, and any
/// magnitude from 480 up (past 448 once rounded), become NaN (0x7f with the sign).
pub fn e4m3_from_f32(f: f32) -> u8 {
    const NAN_FROM: u32 = 0x43f0_0000; // 480.0
    const SMALLEST_NORMAL: u32 = 121 << 23; // 2⁻⁶
    const DENORM: u32 = 141 << 23; // 2¹⁴, whose ulp is 2⁻⁹: e4m3's subnormal step
    let bits = f.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let mag = bits & 0x7fff_ffff;
    let code = if mag >= NAN_FROM {
        0x7f
    } else if mag < SMALLEST_NORMAL {
        // The float add rounds |f| to a multiple of 2⁻⁹ (to nearest even); the low bits count them.
        ((f32::from_bits(mag) + f32::from_bits(DENORM)).to_bits() - DENORM) as u8
    } else {
        // Rebias the exponent (127 → 7) and round the 23-bit mantissa to 3 bits, to nearest even.
        let odd = (mag >> 20) & 1;
        (mag.wrapping_add(((7i32 - 127) << 23) as u32).wrapping_add(0x7_ffff + odd) >> 20) as u8
    };
    code | sign
}

/// Rowwise e4m3 quantisation (see [`crate::Fp8QuantizeRows`]) of `scale.len()` rows of width
/// `n` of `x` (row stride `x_stride`), with an optional per-column factor `[n]`: codes into `q`
/// (`[rows, n]`), one scale per row into `scale`. The same float32 operations as libtorch's
/// composition, in the same order, so every code and scale is bit for bit its.
pub fn fp8_quantize_rows<T: Elem>(x: &[T], x_stride: usize, col_scale: Option<&[f32]>, q: &mut [u8], scale: &mut [f32], n: usize) {
    let mut v = vec![0f32; n];
    for (r, s_out) in scale.iter_mut().enumerate() {
        let row = &x[r * x_stride..][..n];
        for (j, o) in v.iter_mut().enumerate() {
            *o = match col_scale {
                Some(c) => row[j].to_f32() * c[j],
                None => row[j].to_f32(),
            };
        }
        // libtorch's amax keeps a NaN (and then `amax > 0` is false).
        let amax = v.iter().fold(0f32, |m, &a| if m.is_nan() || a.is_nan() { f32::NAN } else { m.max(a.abs()) });
        let (inv, s) = if amax > 0.0 { (E4M3_MAX / amax, amax / E4M3_MAX) } else { (1.0, 1.0) };
        *s_out = s;
        for (o, &a) in q[r * n..][..n].iter_mut().zip(&v) {
            let t = a * inv;
            *o = e4m3_from_f32(if t.is_nan() { t } else { t.clamp(-E4M3_MAX, E4M3_MAX) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_rounds_to_nearest_even_with_subnormals_and_nan_past_448() {
        let sub = 2f32.powi(-9); // the smallest subnormal, code 0x01
        let cases: [(f32, u8); 18] = [
            (0.0, 0x00),
            (-0.0, 0x80),
            (1.0, 0x38),
            (0.5, 0x30),
            (448.0, 0x7e),
            (-448.0, 0xfe),
            (sub, 0x01),
            (0.5 * sub, 0x00),        // a tie between 0 and 2⁻⁹: even, 0
            (0.500_001 * sub, 0x01),  // just past the tie
            (1.5 * sub, 0x02),        // a tie between 1 and 2 steps: even, 2
            (2.5 * sub, 0x02),        // a tie between 2 and 3 steps: even, 2
            (-3.0 * sub, 0x83),
            (7.5 * sub, 0x08),        // a tie just under 2⁻⁶ rounds up to the smallest normal
            (1.0625, 0x38),           // 1 + 1/16, a tie between 1 and 1.125: even, 1
            (1.1875, 0x3a),           // 1.125 + 1/16, a tie between 1.125 and 1.25: even, 1.25
            (464.0, 0x7e),            // a tie between 448 and 480 (no such value): even, 448
            (470.0, 0x7f),            // past it: NaN, as c10's conversion (hence the clamp)
            (f32::NAN, 0x7f),
        ];
        for (v, code) in cases {
            assert_eq!(e4m3_from_f32(v), code, "{v:e}");
        }
        assert_eq!(e4m3_from_f32(-f32::NAN), 0xff);
        assert_eq!(e4m3_from_f32(f32::INFINITY), 0x7f);
        assert_eq!(e4m3_from_f32(1e-45), 0x00); // a float32 subnormal
    }

    #[test]
    fn fp8_quantize_rows_of_hand_computed_rows() {
        let sub = 2f32.powi(-9);
        // Four rows of width 4 at row stride 5 (the fifth column is not read).
        #[rustfmt::skip]
        let x: [f32; 20] = [
            448.0, 1.0625, -1.1875, 1.5 * sub, 99.0, // amax 448: inv 1, scale 1; ties and a subnormal as they are
            0.0, -0.0, 0.0, 0.0, 99.0,                // all zero: scale 1, codes keep the sign
            13.0, -6.5, 0.0, 1.0, 99.0,               // 13 · fl(448/13) = 448.00003: clamped to 448
            1.0, 2.0, -4.0, 0.25, 99.0,               // with the column factor below: v = [0.5, 448, −2, 0.125]
        ];
        let mut q = [0u8; 16];
        let mut scale = [0f32; 4];
        fp8_quantize_rows(&x, 5, None, &mut q, &mut scale, 4);
        assert_eq!(&q[..4], &[0x7e, 0x38, 0xba, 0x02]);
        assert_eq!(scale[0], 1.0);
        assert_eq!(&q[4..8], &[0x00, 0x80, 0x00, 0x00]);
        assert_eq!(scale[1], 1.0);
        let inv = 448f32 / 13.0;
        assert!(13.0 * inv > 448.0, "the saturating case is no longer one");
        // −6.5 · fl(448/13) ≈ −224 (1.75 · 2⁷): code 0xf6; 1 · 34.46154 rounds to 36.
        assert_eq!(&q[8..12], &[0x7e, 0xf6, 0x00, e4m3_from_f32(inv)]);
        assert_eq!(e4m3_from_f32(inv), 0x61); // 36 = 1.125 · 2⁵
        assert_eq!(scale[2].to_bits(), (13f32 / 448.0).to_bits());
        // The plain fourth row: amax 4, inv 112: [112, 224, −448, 28].
        assert_eq!(&q[12..], &[0x6e, 0x76, 0xfe, 0x5e]);
        assert_eq!(scale[3], 4.0 / 448.0);
        let c = [0.5f32, 224.0, 0.5, 0.5];
        fp8_quantize_rows(&x[15..], 5, Some(&c), &mut q[..4], &mut scale[..1], 4);
        // v = [0.5, 448, −2, 0.125]: amax 448, inv 1.
        assert_eq!(&q[..4], &[0x30, 0x7e, 0xc0, 0x20]);
        assert_eq!(scale[0], 1.0);
        // A NaN anywhere in the row: amax is NaN, so inv = scale = 1 and the rest is clamped.
        fp8_quantize_rows(&[f32::NAN, 600.0, -1.0], 3, None, &mut q[..3], &mut scale[..1], 3);
        assert_eq!((&q[..3], scale[0]), (&[0x7f, 0x7e, 0xb8][..], 1.0));
    }

    #[test]
    fn cross_entropy_of_hand_computed_rows() {
        // z = [0, ln 3]: softmax [¼, ¾]; target 1: loss ln 4 − ln 3, gradient [¼, −¼] · scale.
        let z = [0.0f32, 3f32.ln()];
        let mut g = [0f32; 2];
        let loss = cross_entropy_row(&z, 1, -100, 0.0, 0.5, Some(&mut g));
        assert!((loss - (4f32.ln() - 3f32.ln())).abs() < 1e-6, "{loss}");
        assert!((g[0] - 0.125).abs() < 1e-7 && (g[1] + 0.125).abs() < 1e-7, "{g:?}");
        // Soft-capped at c = 2: x = 2·tanh(z/2); the gradient carries 1 − tanh².
        let z = [1.0f32, -3.0, 0.5];
        let x: Vec<f32> = z.iter().map(|v| 2.0 * (v / 2.0).tanh()).collect();
        let lse = x.iter().map(|v| v.exp()).sum::<f32>().ln();
        let loss = cross_entropy_row(&z, 0, -100, 2.0, 1.0, Some(&mut [0f32; 3]));
        assert!((loss - (lse - x[0])).abs() < 1e-6, "{loss} vs {}", lse - x[0]);
        let mut g = [0f32; 3];
        cross_entropy_row(&z, 0, -100, 2.0, 1.0, Some(&mut g));
        let slope = |v: f32| 1.0 - (v / 2.0).tanh().powi(2);
        assert!((g[2] - (x[2] - lse).exp() * slope(z[2])).abs() < 1e-6, "{g:?}");
        assert!((g[0] - ((x[0] - lse).exp() - 1.0) * slope(z[0])).abs() < 1e-6, "{g:?}");
        // An ignored row: zero loss and gradient; a target past the row: NaN.
        let mut g = [7f32; 2];
        assert_eq!(cross_entropy_row(&[1.0, 2.0], -100, -100, 0.0, 1.0, Some(&mut g)), 0.0);
        assert_eq!(g, [0.0, 0.0]);
        assert!(cross_entropy_row(&[1.0, 2.0], 2, -100, 0.0, 1.0, None).is_nan());
        assert!(cross_entropy_row(&[1.0, f32::NAN], 0, -100, 0.0, 1.0, None).is_nan());
    }

    #[test]
    fn rms_norm_of_a_hand_computed_row() {
        // x + r = [1, 3]: mean of squares 5, rstd 1/√5; w = [2, 1] with offset 0.
        let (x, r, w) = ([0.5f32, 1.0], [0.5f32, 2.0], [2.0f32, 1.0]);
        let (mut s, mut y, mut rstd) = ([0f32; 2], [0f32; 2], [0f32; 1]);
        rms_norm_forward(&x, Some(&r), &w, Some(&mut s), &mut y, &mut rstd, 2, 0.0, 0.0);
        let inv = 1.0 / 5f32.sqrt();
        assert_eq!(s, [1.0, 3.0]);
        assert!((rstd[0] - inv).abs() < 1e-7);
        assert!((y[0] - 2.0 * inv).abs() < 1e-6 && (y[1] - 3.0 * inv).abs() < 1e-6, "{y:?}");
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let n = 5;
        let x: Vec<f32> = (0..n).map(|i| 0.3 * i as f32 - 0.7).collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + 0.1 * i as f32).collect();
        let dy: Vec<f32> = (0..n).map(|i| 0.2 - 0.15 * i as f32).collect();
        let loss = |x: &[f32], w: &[f32]| {
            let (mut y, mut rstd) = (vec![0f32; n], [0f32; 1]);
            rms_norm_forward(x, None, w, None, &mut y, &mut rstd, n, 1e-6, 1.0);
            y.iter().zip(&dy).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let (mut y, mut rstd) = (vec![0f32; n], [0f32; 1]);
        rms_norm_forward(&x, None, &w, None, &mut y, &mut rstd, n, 1e-6, 1.0);
        let dsum = vec![0.25f32; n];
        let (mut dx, mut dw) = (vec![0f32; n], vec![0f32; n]);
        rms_norm_backward(&x, &w, &rstd, &dy, Some(&dsum), &mut dx, Some(&mut dw), n, 1.0);
        let h = 1e-3f32;
        for j in 0..n {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[j] += h;
            xm[j] -= h;
            let fd = (loss(&xp, &w) - loss(&xm, &w)) / (2.0 * h as f64) + 0.25;
            assert!((dx[j] as f64 - fd).abs() < 2e-3, "dx[{j}] {} vs {fd}", dx[j]);
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[j] += h;
            wm[j] -= h;
            let fd = (loss(&x, &wp) - loss(&x, &wm)) / (2.0 * h as f64);
            assert!((dw[j] as f64 - fd).abs() < 2e-3, "dw[{j}] {} vs {fd}", dw[j]);
        }
    }

    #[test]
    fn rope_inverse_undoes_the_rotation_and_copies_the_rest() {
        // One token, one head of 6 dimensions, the first 4 rotating (partial rotary).
        let shape = RopeShape { batch: 1, tokens: 1, q_heads: 1, k_heads: 0, head_dim: 6, rot: 4, q_strides: [6, 6, 6], k_strides: [0; 3], cos_strides: [4, 4] };
        let (a, b) = (0.3f32, 1.1f32);
        let cos = [a.cos(), b.cos(), a.cos(), b.cos()];
        let sin = [a.sin(), b.sin(), a.sin(), b.sin()];
        let q = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = [0f32; 6];
        rope(&shape, &q, None, &mut out, None, &cos, &sin, false);
        // Pair (q[0], q[2]) turns by a: [1·cos a − 3·sin a, 3·cos a + 1·sin a].
        assert!((out[0] - (a.cos() - 3.0 * a.sin())).abs() < 1e-6);
        assert!((out[2] - (3.0 * a.cos() + a.sin())).abs() < 1e-6);
        assert_eq!(&out[4..], &[5.0, 6.0]);
        let mut back = [0f32; 6];
        rope(&shape, &out, None, &mut back, None, &cos, &sin, true);
        for (x, y) in q.iter().zip(&back) {
            assert!((x - y).abs() < 1e-5, "{q:?} vs {back:?}");
        }
    }

    #[test]
    fn swiglu_of_hand_computed_values() {
        // g = 0: silu 0, silu' = ½; g = 2: silu = 2σ(2).
        let gu = [0.0f32, 2.0, 3.0, -1.0];
        let mut h = [0f32; 2];
        swiglu_forward(&gu, 4, &mut h, 1, 2);
        let s2 = 1.0 / (1.0 + (-2f32).exp());
        assert_eq!(h[0], 0.0);
        assert!((h[1] - 2.0 * s2 * -1.0).abs() < 1e-6);
        let mut dgu = [0f32; 4];
        swiglu_backward(&gu, 4, &[1.0, 1.0], 2, &mut dgu, 1, 2);
        assert!((dgu[0] - 3.0 * 0.5).abs() < 1e-6, "{dgu:?}");
        assert!((dgu[3] - 2.0 * s2).abs() < 1e-6);
    }
}
