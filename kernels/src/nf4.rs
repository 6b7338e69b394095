//! Code books of 4-bit NormalFloat (NF4) quantisation and of the 8-bit dynamic map used to
//! double-quantise its block scales, as bitsandbytes defines them.

/// The 16 NF4 levels (Dettmers et al., QLoRA, appendix E): quantiles of N(0,1) rescaled to
/// [-1, 1], with an exact zero. Index = the 4-bit code.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Elements per NF4 block (one absmax each).
pub const NF4_BLOCK: usize = 64;
/// Block scales per second-level block in double quantisation.
pub const SCALE_BLOCK: usize = 256;

/// The signed 8-bit dynamic-exponent map (bitsandbytes `create_dynamic_map(signed=True)`):
/// for each exponent i in 0..7, `2^i` evenly spaced fractions in [0.1, 1] scaled by
/// `10^(i-6)`, positive and negative, plus 0 and 1, sorted. 256 values.
pub fn dynamic_map_signed() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = (1usize << i) + 1;
        // torch.linspace(0.1, 1, items) in float32, then midpoints of neighbours.
        let bounds: Vec<f32> = linspace_f32(0.1, 1.0, items);
        // The Python scale 10^(i-6) is rounded to f32, then multiplies f32 tensors.
        let scale = 10f64.powi(i - 6) as f32;
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|&m| scale * m));
        data.extend(means.iter().map(|&m| -scale * m));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `torch.linspace` in float32: the first half counts up from `start`, the second half
/// counts down from `end`, each value one fused multiply-add, as ATen's CPU kernel does.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - 1 - i) as f32, end) })
        .collect()
}

/// Index of the code-book entry nearest to `x` (lowest index on exact ties).
pub fn nearest(code: &[f32], x: f32) -> u8 {
    let mut best = 0usize;
    let mut best_d = f32::INFINITY;
    for (i, &c) in code.iter().enumerate() {
        let d = (c - x).abs();
        if d < best_d {
            best = i;
            best_d = d;
        }
    }
    best as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_code_is_sorted_symmetric_in_range_with_zero() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(NF4_CODE[0], -1.0);
        assert_eq!(NF4_CODE[15], 1.0);
        assert_eq!(NF4_CODE[7], 0.0);
    }

    #[test]
    fn dynamic_map_has_256_sorted_values_with_hand_checked_entries() {
        let m = dynamic_map_signed();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        // Exponent 6 (scale 1), 64 fractions: the largest mean is (0.9859375 + 1) / 2.
        assert!((m[254] - 0.992_968_75).abs() < 1e-6, "{}", m[254]);
        // Exponent 0 (scale 1e-6), one fraction: the mean of 0.1 and 1.
        assert!(m.iter().any(|&v| (v - 0.55e-6).abs() < 1e-12));
        assert_eq!(m.iter().filter(|&&v| v == 0.0).count(), 1);
    }
}
