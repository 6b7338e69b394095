//! ggml tensor types and their reference quantisers, written from ggml's description of
//! each block layout (ggml-common.h) and its reference algorithms (ggml-quants.c:
//! `quantize_row_*_ref`, `make_qkx2_quants`, `make_qx_quants`), so that files load in
//! llama.cpp and quantise as `llama-quantize` does without an importance matrix.
//!
//! Arithmetic is kept in f32 in ggml's order; rounding to nearest uses ggml's
//! `nearest_int` (round half to even via the 1.5·2²³ trick) and `roundf` (half away from
//! zero) where ggml does.

use half::f16;

/// The ggml tensor types ftx writes (the numbers are ggml's `ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
}

/// Elements per k-quant super-block.
pub const QK_K: usize = 256;

impl GgmlType {
    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 => 1,
            GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 => 2,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q4K => 2 + 2 + 12 + QK_K / 2,
            GgmlType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            GgmlType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// ggml's name (`q4_K`, …), as llama.cpp prints it.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4K => "q4_K",
            GgmlType::Q5K => "q5_K",
            GgmlType::Q6K => "q6_K",
        }
    }

    /// Bytes that `n` elements (a multiple of the block length) take.
    pub fn bytes_for(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }

    /// Encodes `x` (its length a multiple of the block length) into `out`.
    pub fn quantize(self, x: &[f32], out: &mut Vec<u8>) {
        debug_assert_eq!(x.len() % self.block_len(), 0);
        out.reserve(self.bytes_for(x.len()));
        match self {
            GgmlType::F32 => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            GgmlType::F16 => x.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            GgmlType::Q8_0 => x.chunks(32).for_each(|b| q8_0_block(b, out)),
            GgmlType::Q5_0 => x.chunks(32).for_each(|b| q5_0_block(b, out)),
            GgmlType::Q5_1 => x.chunks(32).for_each(|b| q5_1_block(b, out)),
            GgmlType::Q4K => x.chunks(QK_K).for_each(|b| q4_k_block(b, out)),
            GgmlType::Q5K => x.chunks(QK_K).for_each(|b| q5_k_block(b, out)),
            GgmlType::Q6K => x.chunks(QK_K).for_each(|b| q6_k_block(b, out)),
        }
    }
}

fn fp16(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// `v` through fp16 and back, as ggml re-reads a scale it has just stored.
fn via_fp16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// ggml's `nearest_int`: round to nearest, ties to even, for |v| < 2²².
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&fp16(d));
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// Largest-magnitude value (its sign kept), as Q4_0/Q5_0 choose their scale.
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn pack_q5(q: &[u8; 32], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let (a, b) = (q[j], q[j + 16]);
        qs[j] = (a & 0x0f) | ((b & 0x0f) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend_from_slice(&qs);
}

fn q5_0_block(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&fp16(d));
    let mut q = [0u8; 32];
    for (j, v) in x.iter().enumerate() {
        // ggml: MIN(31, (int8_t)(x*id + 16.5f)) — truncation toward zero, then clamp.
        q[j] = ((v * id + 16.5) as i8).min(31) as u8;
    }
    pack_q5(&q, out);
}

fn q5_1_block(x: &[f32], out: &mut Vec<u8>) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&fp16(d));
    out.extend_from_slice(&fp16(min));
    let mut q = [0u8; 32];
    for (j, v) in x.iter().enumerate() {
        q[j] = ((v - min) * id + 0.5) as u8;
    }
    pack_q5(&q, out);
}

/// ggml's `make_qkx2_quants`: a scale and (non-positive) min for `x` with levels 0..=nmax,
/// searched over `nstep` candidate scales for the least weighted error. Returns
/// (scale, −min) and fills `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(nmax: i32, x: &[f32], w: &[f32], l: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut laux = vec![0u8; n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let lf = q as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l.copy_from_slice(&laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// The 6-bit scales and mins of Q4_K/Q5_K, packed into 12 bytes as ggml does.
fn pack_scales_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0x0f) | ((lm[j] & 0x0f) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The shared part of Q4_K and Q5_K: per 32-element sub-block scale/min search, 6-bit
/// scale quantisation, then the levels re-derived from the stored (fp16) scales.
/// Returns (d, dmin, packed scales, levels).
fn k_quant_levels(x: &[f32], nmax: i32, rmin: f32, rdelta: f32, nstep: i32) -> ([u8; 2], [u8; 2], [u8; 12], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    let mut weights = [0.0f32; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * j + 32], rmin, rdelta, nstep);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        // ggml stores nearest_int into a uint8_t before MIN(63, ·): wrap like C does.
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scales_k4(&ls, &lm);
    let d = fp16(max_scale / 63.0);
    let dmin = fp16(max_min / 63.0);
    let (df, dminf) = (via_fp16(max_scale / 63.0), via_fp16(max_min / 63.0));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dd = df * sc as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = dminf * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dd).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, l)
}

fn q4_k_block(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, scales, l) = k_quant_levels(x, 15, -1.0, 0.1, 20);
    out.extend_from_slice(&d);
    out.extend_from_slice(&dmin);
    out.extend_from_slice(&scales);
    for j in (0..QK_K).step_by(64) {
        for i in 0..32 {
            out.push(l[j + i] | (l[j + i + 32] << 4));
        }
    }
}

fn q5_k_block(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, scales, l) = k_quant_levels(x, 31, -0.5, 0.1, 15);
    out.extend_from_slice(&d);
    out.extend_from_slice(&dmin);
    out.extend_from_slice(&scales);
    let mut qh = [0u8; QK_K / 8];
    let mut ql = [0u8; QK_K / 2];
    let (mut m1, mut m2) = (1u8, 2u8);
    for (chunk, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * chunk + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
    out.extend_from_slice(&qh);
    out.extend_from_slice(&ql);
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights (weights x²):
/// a signed scale for levels −nmax..nmax−1, refined over 18 candidate scales.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        l[i] = (q + nmax) as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let w = v * v;
            sumlx += w * v * q as f32;
            suml2 += w * q as f32 * q as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q6_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for ib in 0..QK_K / 16 {
        let s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < 1e-15 {
        out.extend(std::iter::repeat_n(0u8, GgmlType::Q6K.block_bytes()));
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = fp16(1.0 / iscale);
    let df = via_fp16(1.0 / iscale);
    let mut sc = [0i8; QK_K / 16];
    for ib in 0..QK_K / 16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..QK_K / 16 {
        let dd = df * sc[j] as f32;
        if dd == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dd).clamp(-32, 31) + 32) as i8;
        }
    }
    let l: Vec<u8> = l.iter().map(|&v| v as u8).collect();
    let mut ql = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 4];
    for (half, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            let q1 = l[j + i] & 0x0f;
            let q2 = l[j + i + 32] & 0x0f;
            let q3 = l[j + i + 64] & 0x0f;
            let q4 = l[j + i + 96] & 0x0f;
            ql[64 * half + i] = q1 | (q3 << 4);
            ql[64 * half + i + 32] = q2 | (q4 << 4);
            qh[32 * half + i] =
                (l[j + i] >> 4) | ((l[j + i + 32] >> 4) << 2) | ((l[j + i + 64] >> 4) << 4) | ((l[j + i + 96] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&v| v as u8));
    out.extend_from_slice(&d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!([nearest_int(0.5), nearest_int(1.5), nearest_int(-2.5), nearest_int(2.6)], [0, 2, -2, 3]);
    }

    #[test]
    fn q8_0_of_a_known_block() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        let mut out = Vec::new();
        GgmlType::Q8_0.quantize(&x, &mut out);
        assert_eq!(out.len(), 34);
        // d = 16/127; x[0] = -16 → -127.
        assert_eq!(f16::from_le_bytes([out[0], out[1]]), f16::from_f32(16.0 / 127.0));
        assert_eq!(out[2] as i8, -127);
        assert_eq!(out[18] as i8, 0);
    }

    #[test]
    fn block_sizes_match_ggml() {
        assert_eq!(
            [GgmlType::Q4K.block_bytes(), GgmlType::Q5K.block_bytes(), GgmlType::Q6K.block_bytes(), GgmlType::Q5_0.block_bytes(), GgmlType::Q5_1.block_bytes()],
            [144, 176, 210, 22, 24]
        );
    }
}
