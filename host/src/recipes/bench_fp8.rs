//! The rowwise e4m3 quantisation kernel of the FP8 GEMMs in `ftx bench kernels`: bf16 rows of
//! width 2048, 8192 and 16384 (batch × seq of them), with and without a per-column factor,
//! quantised by the kernel (on the CPU: its reference version) and by libtorch's composition
//! it replaces (`quantize_rows_reference`, src/model/fp8.h) on the same device.
//!
//! - Checked bit for bit: every e4m3 code and every float32 scale must be the composition's.
//!   Besides random rows, one row of zeros, one of tiny values (2⁻¹⁰⁰ times) and one holding an
//!   infinity.
//! - Timed, each way, with the bytes the quantisation must move (x read once, the codes and
//!   scales written) per second: the kernel's effective bandwidth beside the composition's.

use super::bench_kernels::{median_ms, KernelBenchSettings};
use crate::gpu::kernels::{fp8_quantize_kernel_fits, fp8_quantize_rows, Fp8QuantizePath};
use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// The row widths checked (a hidden size, and MLP widths of the 8b–70b class).
pub const WIDTHS: [i64; 3] = [2048, 8192, 16384];

/// One shape's result: one JSON line of `ftx bench kernels`.
#[derive(Debug, Clone, Serialize)]
pub struct Fp8QuantizeBenchResult {
    pub kernel: &'static str,
    pub dtype: &'static str,
    /// `[rows, n]`.
    pub shape: Vec<i64>,
    /// Whether the rows were multiplied by a per-column factor.
    pub col_scale: bool,
    /// Codes (of rows · n) and scales (of rows) whose bits differ from the composition's.
    pub q_mismatches: i64,
    pub scale_mismatches: i64,
    pub kernel_ms: f64,
    pub composition_ms: f64,
    /// The bytes the quantisation must move (x read once, codes and scales written), per second.
    pub kernel_gb_s: f64,
    pub composition_gb_s: f64,
    pub speedup: f64,
    /// Every code and scale equal to the composition's (false when skipped).
    pub pass: bool,
    /// Why nothing was checked: the kernel does not run on this GPU (older than sm_89).
    pub skipped: Option<String>,
}

/// Bits of `a` and `b` (same shape and type) that differ, counted per element.
fn bit_mismatches(a: &Tensor, b: &Tensor, as_kind: Kind) -> i64 {
    a.view_dtype(as_kind).ne_tensor(&b.view_dtype(as_kind)).sum(Kind::Int64).int64_value(&[])
}

/// Random bf16 rows `[rows, n]` on `device`: normal values, then row 0 zeros, row 1 scaled by
/// 2⁻¹⁰⁰, and an infinity in row 2 (as many of those as there are rows).
fn rows_of(rows: i64, n: i64, device: Device) -> Tensor {
    let x = Tensor::randn([rows, n], (Kind::Float, device));
    if rows > 0 {
        let _ = x.get(0).fill_(0.0);
    }
    if rows > 1 {
        let _ = x.get(1).g_mul_scalar_(2f64.powi(-100));
    }
    if rows > 2 {
        let _ = x.get(2).get(n / 2).fill_(f64::INFINITY);
    }
    x.to_kind(Kind::BFloat16)
}

/// One line per width, with and without a column factor, in bf16 (skipped unless `s.kinds`
/// holds bf16).
pub fn bench_fp8_quantize(s: &KernelBenchSettings) -> Result<Vec<Fp8QuantizeBenchResult>> {
    if !s.kinds.contains(&Kind::BFloat16) {
        return Ok(Vec::new());
    }
    let rows = s.batch * s.seq;
    tch::manual_seed(9);
    let mut results = Vec::new();
    for n in WIDTHS {
        let x = rows_of(rows, n, s.device);
        let factor = (Tensor::randn([n], (Kind::Float, s.device)) * 0.5).exp();
        for col in [None, Some(&factor)] {
            results.push(measure(s, &x, col)?);
        }
    }
    Ok(results)
}

fn measure(s: &KernelBenchSettings, x: &Tensor, col: Option<&Tensor>) -> Result<Fp8QuantizeBenchResult> {
    let (rows, n) = (x.size()[0], x.size()[1]);
    let mut r = Fp8QuantizeBenchResult {
        kernel: "fp8_quantize_rows",
        dtype: "bf16",
        shape: vec![rows, n],
        col_scale: col.is_some(),
        q_mismatches: 0,
        scale_mismatches: 0,
        kernel_ms: 0.0,
        composition_ms: 0.0,
        kernel_gb_s: 0.0,
        composition_gb_s: 0.0,
        speedup: 0.0,
        pass: false,
        skipped: None,
    };
    if let Err(why) = fp8_quantize_kernel_fits(x) {
        r.skipped = Some(why);
        return Ok(r);
    }
    let run = |path| fp8_quantize_rows(x, col, path).map_err(|e| anyhow::anyhow!("fp8 quantize_rows ({path:?}) of {rows}×{n}: {e}"));
    let (q, scale) = run(Fp8QuantizePath::KernelTable)?;
    let (q_ref, scale_ref) = run(Fp8QuantizePath::Composition)?;
    r.q_mismatches = bit_mismatches(&q, &q_ref, Kind::Uint8);
    r.scale_mismatches = bit_mismatches(&scale, &scale_ref, Kind::Int);
    r.pass = r.q_mismatches == 0 && r.scale_mismatches == 0;
    drop((q, scale, q_ref, scale_ref));

    let mut failed = None;
    let mut time = |path| {
        median_ms(s.device, s.iters, &mut || {
            if let Err(e) = run(path) {
                failed.get_or_insert(e);
            }
        })
    };
    r.kernel_ms = time(Fp8QuantizePath::KernelTable)?;
    r.composition_ms = time(Fp8QuantizePath::Composition)?;
    if let Some(e) = failed {
        return Err(e);
    }
    let bytes = (rows * n * (2 + 1) + rows * 4 + if col.is_some() { n * 4 } else { 0 }) as f64;
    let gb_s = |ms: f64| (bytes / (ms.max(1e-9) * 1e-3) / 1e9 * 10.0).round() / 10.0;
    (r.kernel_gb_s, r.composition_gb_s) = (gb_s(r.kernel_ms), gb_s(r.composition_ms));
    r.speedup = (r.composition_ms / r.kernel_ms.max(1e-9) * 100.0).round() / 100.0;
    let round = |v: f64| (v * 1e4).round() / 1e4;
    (r.kernel_ms, r.composition_ms) = (round(r.kernel_ms), round(r.composition_ms));
    Ok(r)
}
