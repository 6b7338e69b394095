//! MXFP4 (OCP microscaling FP4), the layout gpt-oss's published checkpoints store their
//! experts in (`quantization_config.quant_method = "mxfp4"`): for a parameter `P` the file holds
//! `P_blocks` (uint8 `[E, rows, G, 16]`, two FP4 E2M1 codes a byte, the low nibble first) and
//! `P_scales` (uint8 `[E, rows, G]`, one E8M0 exponent per 32 values, bias 127), where `rows`
//! is the parameter's output dimension and `G·32` its input one. Dequantised as transformers'
//! `integrations/mxfp4.py` (`convert_moe_packed_tensors`) does:
//! `value = FP4[code] · 2^(scale − 127)`, rows of `G·32` values, then the last two axes swapped
//! to transformers' `[E, in, out]` layout (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`).
//! Every product is exact in bf16 (a 2-bit-mantissa value times a power of two), so
//! dequantising in fp32 and rounding to bf16 gives transformers' bf16 tensors bit for bit.

use tch::{Device, Kind, Tensor};

/// The 16 FP4 E2M1 values by code (sign bit 3, two exponent bits, one mantissa bit).
pub const FP4_VALUES: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// The suffixes of the two tensors that hold one MXFP4 parameter.
pub const BLOCKS_SUFFIX: &str = "_blocks";
pub const SCALES_SUFFIX: &str = "_scales";

/// The dequantised shape `[E, G·32, rows]` of blocks `[E, rows, G, 16]` with scales
/// `[E, rows, G]`, or why the pair is not MXFP4.
pub fn dequantized_shape(blocks: &[i64], scales: &[i64]) -> Result<Vec<i64>, String> {
    match (blocks, scales) {
        ([e, rows, g, 16], [se, srows, sg]) if (e, rows, g) == (se, srows, sg) => Ok(vec![*e, g * 32, *rows]),
        _ => Err(format!("MXFP4 blocks {blocks:?} and scales {scales:?} do not pair as [E, rows, G, 16] / [E, rows, G]")),
    }
}

/// Dequantises `blocks` (uint8 `[E, rows, G, 16]`) with `scales` (uint8 `[E, rows, G]`) to
/// fp32 `[E, G·32, rows]` on `device`, one expert at a time (the index tensors of a whole
/// gpt-oss-120b expert stack would take tens of GB).
pub fn dequantize(blocks: &Tensor, scales: &Tensor, device: Device) -> Tensor {
    let _g = tch::no_grad_guard();
    let (e, rows, g) = (blocks.size()[0], blocks.size()[1], blocks.size()[2]);
    let lut = Tensor::from_slice(&FP4_VALUES).to_device(device);
    let experts: Vec<Tensor> = (0..e)
        .map(|x| {
            let b = blocks.get(x).to_device(device).to_kind(Kind::Int64);
            let lo = b.bitwise_and(15);
            let hi = b.bitwise_right_shift_tensor_scalar(4);
            // [rows, G, 16, 2] → [rows, G, 32]: the low nibble is the even value.
            let codes = Tensor::stack(&[lo, hi], -1).reshape([rows, g, 32]);
            let values = lut.index_select(0, &codes.reshape([-1])).reshape([rows, g, 32]);
            let exp = scales.get(x).to_device(device).to_kind(Kind::Float) - 127.0;
            let scaled = values * exp.exp2().unsqueeze(-1);
            scaled.reshape([rows, g * 32]).transpose(0, 1)
        })
        .collect();
    Tensor::stack(&experts, 0).contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_scales_and_axes_follow_transformers() {
        // One expert, 2 rows, one group: row 0 codes 1 (0.5) low / 0xF (−6) high in byte 0,
        // the rest 0x22 (1.0, 1.0); row 1 all 0x77 (6.0). Scales: 2^1 and 2^−2.
        let mut bytes = vec![0x22u8; 32];
        bytes[0] = 0xF1;
        bytes[16..].fill(0x77);
        let blocks = Tensor::from_slice(&bytes).view([1, 2, 1, 16]);
        let scales = Tensor::from_slice(&[128u8, 125]).view([1, 2, 1]);
        assert_eq!(dequantized_shape(&blocks.size(), &scales.size()).unwrap(), vec![1, 32, 2]);
        let w = dequantize(&blocks, &scales, Device::Cpu);
        assert_eq!(w.size(), vec![1, 32, 2]);
        assert_eq!(w.double_value(&[0, 0, 0]), 1.0);
        assert_eq!(w.double_value(&[0, 1, 0]), -12.0);
        assert_eq!(w.double_value(&[0, 2, 0]), 2.0);
        assert_eq!(w.double_value(&[0, 31, 1]), 1.5);
        assert!(dequantized_shape(&[1, 2, 1, 8], &[1, 2, 1]).is_err());
    }
}
