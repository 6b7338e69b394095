//! NF4 storage for frozen weights (QLoRA): 4-bit NormalFloat codes in blocks of 64 with
//! double-quantised scales, laid out and rounded as bitsandbytes does, so a QLoRA base here
//! holds the same numbers as one made with `bnb.functional.quantize_4bit(..., "nf4")`.
//!
//! Layout: codes packed two per byte, the first element in the high nibble; one 8-bit code
//! per 64-block (the absmax, minus `offset`, on the signed dynamic map) and one fp32 scale
//! per 256 such codes.

use ftx_kernels::nf4::{dynamic_map_signed, NF4_BLOCK, NF4_CODE, SCALE_BLOCK};
use tch::{Device, Kind, Tensor};

/// A frozen weight in NF4.
pub struct Nf4Weight {
    /// `ceil(n/2)` bytes, two codes each (high nibble first).
    pub packed: Tensor,
    /// One 8-bit code per 64-block: the block's absmax minus `offset`, on the dynamic map.
    pub absmax_codes: Tensor,
    /// One fp32 scale per 256 absmax codes.
    pub absmax_scales: Tensor,
    /// Mean of the absmaxes, subtracted before their quantisation.
    pub offset: f64,
    shape: (i64, i64),
    kind: Kind,
    /// On the weight's device, so dequantising copies nothing from the host (a copy from
    /// pageable host memory waits for the device): each byte's two code values, `[256, 2]`,
    /// and the signed dynamic map of the absmax codes.
    pair_table: Tensor,
    absmax_map: Tensor,
}

/// Elements processed at a time when searching code books (bounds the temporary memory).
const CHUNK: i64 = 1 << 20;

/// For each element of `x` (fp32, 1-D), the index of the nearest entry of `code` (first on ties).
fn nearest_codes(x: &Tensor, code: &Tensor) -> Tensor {
    let n = x.size()[0];
    let parts: Vec<Tensor> = (0..n)
        .step_by(CHUNK as usize)
        .map(|s| {
            let part = x.narrow(0, s, CHUNK.min(n - s));
            (part.unsqueeze(1) - code.unsqueeze(0)).abs().argmin(1, false)
        })
        .collect();
    Tensor::cat(&parts, 0).to_kind(Kind::Uint8)
}

/// Per-block absmax of a 1-D fp32 tensor whose length is a multiple of `block`.
fn block_absmax(x: &Tensor, block: i64) -> Tensor {
    x.view([-1, block]).abs().amax([1].as_slice(), false)
}

fn pad_to(x: &Tensor, multiple: i64) -> Tensor {
    let n = x.size()[0];
    let padded = (n + multiple - 1) / multiple * multiple;
    if padded == n {
        x.shallow_clone()
    } else {
        Tensor::cat(&[x.shallow_clone(), x.zeros_like().narrow(0, 0, 1).expand([padded - n], false)], 0)
    }
}

fn safe_div(x: &Tensor, scale: &Tensor) -> Tensor {
    // A block of zeros has absmax 0; its codes must be the zero code, not NaN.
    x / scale.clamp_min(f32::MIN_POSITIVE as f64)
}

fn code_tensor(values: &[f32], device: Device) -> Tensor {
    Tensor::from_slice(values).to_device(device)
}

impl Nf4Weight {
    /// Quantises a dense `[out, in]` weight; `kind` is the dtype dequantisation returns.
    pub fn quantize(w: &Tensor, kind: Kind) -> Nf4Weight {
        let _guard = tch::no_grad_guard();
        let size = w.size();
        let device = w.device();
        let flat = w.to_kind(Kind::Float).flatten(0, -1);
        let n = flat.size()[0];
        let blocks = pad_to(&flat, NF4_BLOCK as i64);
        let absmax = block_absmax(&blocks, NF4_BLOCK as i64);
        let normed = safe_div(&blocks.view([-1, NF4_BLOCK as i64]), &absmax.unsqueeze(1)).flatten(0, -1);
        let codes = nearest_codes(&normed, &code_tensor(&NF4_CODE, device)).to_kind(Kind::Int64);
        let pairs = codes.narrow(0, 0, ((n + 1) / 2) * 2).view([-1, 2]);
        let packed = (pairs.select(1, 0) * 16 + pairs.select(1, 1)).to_kind(Kind::Uint8);

        let offset = absmax.mean(Kind::Float).double_value(&[]);
        let centred = pad_to(&(&absmax - offset), SCALE_BLOCK as i64);
        let scales = block_absmax(&centred, SCALE_BLOCK as i64);
        let normed2 = safe_div(&centred.view([-1, SCALE_BLOCK as i64]), &scales.unsqueeze(1)).flatten(0, -1);
        let nblocks = absmax.size()[0];
        let absmax_codes =
            nearest_codes(&normed2, &code_tensor(&dynamic_map_signed(), device)).narrow(0, 0, nblocks);
        let pairs: Vec<f32> = (0..256).flat_map(|b| [NF4_CODE[b >> 4], NF4_CODE[b & 15]]).collect();
        let pair_table = code_tensor(&pairs, device).view([256, 2]);
        let absmax_map = code_tensor(&dynamic_map_signed(), device);
        Nf4Weight { packed, absmax_codes, absmax_scales: scales, offset, shape: (size[0], size[1]), kind, pair_table, absmax_map }
    }

    /// The block absmaxes recovered from their double quantisation.
    pub fn absmax(&self) -> Tensor {
        let n = self.absmax_codes.size()[0];
        let scales = self.absmax_scales.repeat_interleave_self_int(SCALE_BLOCK as i64, 0, None).narrow(0, 0, n);
        self.absmax_map.index_select(0, &self.absmax_codes.to_kind(Kind::Int64)) * scales + self.offset
    }

    /// The dense weight in the compute dtype.
    pub fn dequantize(&self) -> Tensor {
        let (rows, cols) = self.shape;
        let out = Tensor::empty([rows, cols], (self.kind, self.packed.device()));
        self.dequantize_into(&out);
        out
    }

    /// Writes the dense weight, in `dst`'s dtype, into `dst` (`[out, in]`, e.g. this weight's
    /// rows of a stacked buffer). Each code byte is looked up once in a 256-entry table of its
    /// two values and the product with the block's absmax is rounded straight into `dst`: four
    /// passes, where unpacking the nibbles one operation at a time took eight at int64 width.
    pub fn dequantize_into(&self, dst: &Tensor) {
        let _guard = tch::no_grad_guard();
        let (rows, cols) = self.shape;
        assert_eq!(dst.size(), [rows, cols], "NF4 dequantisation target has the wrong shape");
        let n = rows * cols;
        let block = NF4_BLOCK as i64;
        let values = self.pair_table.index_select(0, &self.packed.to_kind(Kind::Int)).flatten(0, -1);
        let nb = self.absmax_codes.size()[0];
        let absmax = self.absmax().unsqueeze(1);
        if n % block == 0 && dst.is_contiguous() {
            // The fp32 product is rounded once, on the store into dst.
            let _ = values.narrow(0, 0, n).view([nb, block]).mul_out(&dst.view([nb, block]), &absmax);
            return;
        }
        let padded = pad_to(&values, block).narrow(0, 0, nb * block);
        let dense = padded.view([nb, block]) * absmax;
        let _ = dst.shallow_clone().copy_(&dense.flatten(0, -1).narrow(0, 0, n).view([rows, cols]));
    }

    /// Each code byte's two values, `[256, 2]` fp32, on the weight's device.
    pub fn pair_table(&self) -> &Tensor {
        &self.pair_table
    }

    /// `[out, in]` of the dense weight.
    pub fn shape(&self) -> (i64, i64) {
        self.shape
    }

    /// The dtype [`Nf4Weight::dequantize`] returns.
    pub fn compute_kind(&self) -> Kind {
        self.kind
    }
}
