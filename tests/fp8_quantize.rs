//! The rowwise e4m3 quantisation of the FP8 GEMMs (src/model/fp8.h) on the CPU: the kernel
//! table's CPU reference version (ftx-kernels), reached through the same C++ entry the CUDA
//! kernel is, against libtorch's composition `quantize_rows_reference` (`Float8e4m3fn`), bit
//! for bit — every code, every scale — in float32 and bf16, with and without the column factor,
//! on rows spanning e4m3's whole range (subnormals and exact ties included). The CUDA kernel is
//! held to the same composition by `ftx bench kernels` on a GPU.

use crate::common::torch_rng_lock;
use ftx::gpu::kernels::{fp8_quantize_kernel_fits, fp8_quantize_rows, Fp8QuantizePath};
use ftx::gpu::ledger;
use tch::{Device, Kind, Tensor};

/// Codes and scales whose bits differ between two quantisations.
fn mismatches(a: &(Tensor, Tensor), b: &(Tensor, Tensor)) -> (i64, i64) {
    let count = |x: &Tensor, y: &Tensor, k: Kind| x.view_dtype(k).ne_tensor(&y.view_dtype(k)).sum(Kind::Int64).int64_value(&[]);
    (count(&a.0, &b.0, Kind::Uint8), count(&a.1, &b.1, Kind::Int))
}

/// `[rows, n]` rows of very different scales, and within each row values ~e±9 apart (so that
/// many land among e4m3's subnormals once scaled); row 0 holds exact ties at amax 448 (inv 1),
/// row 1 zeros (and a −0), row 2 values around 2⁻¹⁰⁰.
fn spread_rows(rows: i64, n: i64) -> Tensor {
    let row_scale = (Tensor::randn([rows, 1], (Kind::Float, Device::Cpu)) * 4.0).exp();
    let x = Tensor::randn([rows, n], (Kind::Float, Device::Cpu)) * (Tensor::randn([rows, n], (Kind::Float, Device::Cpu)) * 3.0).exp() * row_scale;
    let sub = 2f64.powi(-9);
    // Each halfway between two codes: 1.0625 (1 | 1.125 → 1), 1.1875 (1.125 | 1.25 → 1.25),
    // 2.375 (2.25 | 2.5 → 2.5), 76 (72 | 80 → 80), and among the subnormals (steps of 2⁻⁹).
    let ties = [448.0, 1.0625, -1.1875, 0.5 * sub, 1.5 * sub, -2.5 * sub, 7.5 * sub, 2.375, 76.0];
    let tie_row = Tensor::zeros([n], (Kind::Float, Device::Cpu));
    tie_row.narrow(0, 0, ties.len() as i64).copy_(&Tensor::from_slice(&ties));
    x.get(0).copy_(&tie_row);
    let _ = x.get(1).fill_(0.0);
    let _ = x.get(1).get(3).fill_(-0.0);
    let _ = x.get(2).g_mul_scalar_(2f64.powi(-100) / x.get(2).abs().max().double_value(&[]));
    x
}

#[test]
fn the_cpu_reference_equals_libtorchs_composition_bit_for_bit() {
    let _g = torch_rng_lock();
    tch::manual_seed(15);
    let (rows, n) = (48i64, 96i64);
    let x32 = spread_rows(rows, n);
    // The column factor: lognormal, as the weight's per-row scales spread.
    let factor = (Tensor::randn([n], (Kind::Float, Device::Cpu)) * 2.0).exp();
    for kind in [Kind::Float, Kind::BFloat16] {
        let x = x32.to_kind(kind);
        // Rows at a stride wider than the width (a view into wider rows) as well.
        let wide = Tensor::zeros([rows, n + 24], (kind, Device::Cpu));
        wide.narrow(1, 8, n).copy_(&x);
        for (label, input) in [("contiguous", x.shallow_clone()), ("strided", wide.narrow(1, 8, n))] {
            for col in [None, Some(&factor)] {
                let what = format!("{kind:?} {label} rows, column factor {}", col.is_some());
                let reference = fp8_quantize_rows(&input, col, Fp8QuantizePath::Composition).unwrap();
                let table = fp8_quantize_rows(&input, col, Fp8QuantizePath::KernelTable).unwrap();
                assert_eq!(table.0.kind(), Kind::Float8e4m3fn, "{what}");
                assert_eq!((table.0.size(), table.1.size(), table.1.kind()), (vec![rows, n], vec![rows, 1], Kind::Float), "{what}");
                assert_eq!(mismatches(&table, &reference), (0, 0), "{what}");
                // What the GEMMs call takes the composition on the CPU: the same bits.
                assert_eq!(mismatches(&fp8_quantize_rows(&input, col, Fp8QuantizePath::Auto).unwrap(), &reference), (0, 0), "{what}");
                // The rows exercise e4m3's range: subnormal codes (exponent 0, mantissa ≠ 0),
                // codes at ±448, and the all-zero row's scale of 1.
                let codes = table.0.view_dtype(Kind::Uint8).to_kind(Kind::Int64);
                let subnormal = (codes.bitwise_and(0x78).eq(0)).logical_and(&codes.bitwise_and(7).ne(0)).sum(Kind::Int64).int64_value(&[]);
                assert!(subnormal > 50, "{what}: only {subnormal} subnormal codes");
                assert!(codes.bitwise_and(0x7f).eq(0x7e).sum(Kind::Int64).int64_value(&[]) >= rows - 1, "{what}: a row without its ±448");
                assert_eq!(table.1.double_value(&[1, 0]), 1.0, "{what}: the zero row's scale");
            }
        }
        // The tie row through the composition, by hand (amax 448: inv = scale = 1; no factor).
        let q = fp8_quantize_rows(&x, None, Fp8QuantizePath::KernelTable).unwrap().0.view_dtype(Kind::Uint8);
        let tie_codes: Vec<u8> = Vec::try_from(q.get(0).narrow(0, 0, 9)).unwrap();
        assert_eq!(tie_codes, [0x7e, 0x38, 0xba, 0x00, 0x02, 0x82, 0x08, 0x42, 0x6a], "{kind:?}");
    }
}

#[test]
fn rows_holding_an_infinity_or_a_nan_quantise_as_libtorch_does() {
    let _g = torch_rng_lock();
    tch::manual_seed(16);
    let x = Tensor::randn([4, 32], (Kind::Float, Device::Cpu));
    let _ = x.get(0).get(5).fill_(f64::INFINITY);
    let _ = x.get(1).get(7).fill_(f64::NAN);
    let _ = x.get(2).get(9).fill_(f64::NEG_INFINITY);
    for kind in [Kind::Float, Kind::BFloat16] {
        let x = x.to_kind(kind);
        let (reference, table) =
            (fp8_quantize_rows(&x, None, Fp8QuantizePath::Composition).unwrap(), fp8_quantize_rows(&x, None, Fp8QuantizePath::KernelTable).unwrap());
        assert_eq!(mismatches(&table, &reference), (0, 0), "{kind:?}");
        // An infinity: scale ∞ (inv 0); a NaN: scale 1, the row clamped as it is.
        let scales: Vec<f32> = Vec::try_from(table.1.view([-1])).unwrap();
        assert!(scales[0].is_infinite() && scales[1] == 1.0 && scales[2].is_infinite() && scales[3].is_finite(), "{scales:?}");
    }
}

#[test]
fn the_kernel_path_says_what_it_cannot_take() {
    let x = Tensor::randn([4, 16], (Kind::BFloat16, Device::Cpu));
    assert_eq!(fp8_quantize_kernel_fits(&x), Ok(()));
    let e = fp8_quantize_kernel_fits(&x.view([2, 2, 16])).unwrap_err();
    assert!(e.contains("2-D"), "{e}");
    let e = fp8_quantize_kernel_fits(&x.to_kind(Kind::Half)).unwrap_err();
    assert!(e.contains("bf16"), "{e}");
    let e = fp8_quantize_rows(&x.transpose(0, 1), None, Fp8QuantizePath::KernelTable).unwrap_err();
    assert!(e.contains("contiguous rows"), "{e}");
    let e = fp8_quantize_rows(&x, Some(&Tensor::ones([15], (Kind::Float, Device::Cpu))), Fp8QuantizePath::KernelTable).unwrap_err();
    assert!(e.contains("one value per column"), "{e}");
}

#[test]
fn the_ledger_counts_the_quantisation_as_one_kernel_of_its_bytes() {
    // One ledger at a time in the process: the ledger tests hold this lock too.
    let _g = torch_rng_lock();
    let (rows, n) = (6i64, 40i64);
    let x = Tensor::randn([rows, n], (Kind::BFloat16, Device::Cpu));
    let c = Tensor::ones([n], (Kind::Float, Device::Cpu));
    let ((), l) = ledger::record(|| {
        let _ = fp8_quantize_rows(&x, Some(&c), Fp8QuantizePath::KernelTable).unwrap();
    })
    .expect("a ledger");
    let (count, bytes, _) = l.total(|e| e.op == "ftx::kernel::fp8_quantize_rows");
    // Reads x (bf16) and the factor (float32); writes one byte per code and a float32 scale per row.
    assert_eq!((count, bytes), (1, (rows * n * 2 + n * 4 + rows * n + rows * 4) as f64), "{:#?}", l.entries);
}
