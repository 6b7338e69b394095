//! DoRA's pieces against independent references, on the CPU:
//! - the norm of `W + s·BA` from its expansion (`model::fused::dora_norm`, fp32 arithmetic) against
//!   the norm of the formed matrix in fp64, for fp32 and bf16 factors, with B small, trained-size
//!   and large;
//! - the DoRA linear (the C++ node: the scale folded into the GEMMs' weights, m's gradient from
//!   the output) against PEFT's formula written out in fp64 autograd ops, dense and NF4 bases,
//!   fp32 and bf16: the output and the gradients of x, A, B and the magnitude.

use crate::common::{max_diff, torch_rng_lock};
use ftx::model::fused::{dora_norm, low_rank_linear, row_sq};
use ftx::model::linear::BaseWeight;
use ftx::model::nf4::Nf4Weight;
use tch::{Device, Kind, Tensor};

const S: f64 = 2.0;

fn randn(shape: &[i64], std: f64) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu)) * std
}

/// ‖W + s·BA‖ per row, the matrix formed, in fp64.
fn formed_norm(w: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
    let d = |t: &Tensor| t.to_kind(Kind::Double);
    (d(w) + d(b).mm(&d(a)) * S).pow_tensor_scalar(2).sum_dim_intlist([1].as_slice(), false, Kind::Double).sqrt()
}

fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    max_diff(got, want) / want.abs().max().double_value(&[])
}

#[test]
fn dora_norm_expansion_equals_the_norm_of_the_formed_matrix() {
    let _rng = torch_rng_lock();
    tch::manual_seed(21);
    let (out, inp, r) = (48, 40, 4);
    let w = randn(&[out, inp], 0.05);
    let bound = 1.0 / (inp as f64).sqrt();
    let a = Tensor::empty([r, inp], (Kind::Float, Device::Cpu)).uniform_(-bound, bound);
    // B: just off zero (the first steps, where the cross terms are tiny beside ‖W‖²), the size
    // training reaches, and large enough that s·BA outweighs W.
    for b_std in [1e-4, 0.05, 1.0] {
        let b = randn(&[out, r], b_std);
        // fp32 factors, and bf16 ones (the expansion runs in fp32 on their exact values): both
        // within 1e-5 of the fp64 norm of the formed matrix (fp32 rounding is ~1e-7 here).
        for kind in [Kind::Float, Kind::BFloat16] {
            let (w, a, b) = (w.to_kind(kind), a.to_kind(kind), b.to_kind(kind));
            let got = dora_norm(&w, &row_sq(&w), &a, &b, S);
            assert_eq!(got.kind(), Kind::Float);
            let d = rel_diff(&got, &formed_norm(&w, &a, &b));
            assert!(d < 1e-5, "{kind:?}, B ~ N(0, {b_std}²): expansion off by {d:e} (relative)");
        }
    }
}

/// PEFT's DoRA forward (`lora/dora.py`), fp64: `result + (scale − 1)·base + scale·s·lora` with
/// `scale = m / ‖W + s·BA‖`, the norm detached.
fn peft_dora(x: &Tensor, w: &Tensor, bias: &Tensor, a: &Tensor, b: &Tensor, m: &Tensor) -> Tensor {
    let norm = formed_norm(w, a, b).detach();
    let scale = (m / norm).view([1, 1, -1]);
    let base = x.linear::<Tensor>(&w.to_kind(Kind::Double), None);
    let lora = x.linear::<Tensor>(a, None).linear::<Tensor>(b, None);
    let result = &base + bias;
    result + (&scale - 1.0) * base + scale * lora * S
}

/// Output and gradients (x, A, B, m) of `Σ y ⊙ g` for leaves of `kind`.
fn output_and_grads(kind: Kind, leaves: &[&Tensor], g: &Tensor, f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Tensor> = leaves.iter().map(|t| t.to_kind(kind).detach().set_requires_grad(true)).collect();
    let y = f(&vars);
    (y.to_kind(Kind::Double) * g).sum(Kind::Double).backward();
    (y.detach(), vars.iter().map(|v| v.grad()).collect())
}

#[test]
fn dora_linear_matches_pefts_formula_with_every_gradient() {
    let _rng = torch_rng_lock();
    tch::manual_seed(22);
    let (out, inp, r) = (48, 64, 4);
    let w = randn(&[out, inp], 0.05);
    let bias = randn(&[out], 0.1);
    let x = randn(&[2, 6, inp], 1.0);
    let a = randn(&[r, inp], 0.1);
    let b = randn(&[out, r], 0.1);
    let g = randn(&[2, 6, out], 1.0).to_kind(Kind::Double);
    // The magnitude as training leaves it: the base's row norms, moved.
    let m = row_sq(&w).sqrt() * (randn(&[out], 0.1) + 1.0);
    let q = Nf4Weight::quantize(&w, Kind::Float);
    // Each base as the engine holds it, and the dense weight PEFT's formula sees for it.
    let bases: [(&str, BaseWeight<'_>, Tensor); 2] = [("dense", BaseWeight::Dense(w.shallow_clone()), w.shallow_clone()), ("nf4", BaseWeight::Nf4(vec![&q]), q.dequantize())];
    for (name, base, w_ref) in &bases {
        let (want_y, want) = output_and_grads(Kind::Double, &[&x, &a, &b, &m], &g, |v| peft_dora(&v[0], w_ref, &bias.to_kind(Kind::Double), &v[1], &v[2], &v[3]));
        // fp32: 1e-5 of each tensor's largest entry. bf16 (dense only; NF4 computes in its own
        // compute dtype): the output and gradients rounded to bf16 (2⁻⁸ relative) through a few
        // GEMMs, 3e-2.
        let kinds: &[(Kind, f64)] = if *name == "dense" { &[(Kind::Float, 1e-5), (Kind::BFloat16, 3e-2)] } else { &[(Kind::Float, 1e-5)] };
        for &(kind, tol) in kinds {
            let base_k = match base {
                BaseWeight::Dense(w) => BaseWeight::Dense(w.to_kind(kind)),
                BaseWeight::Nf4(qs) => BaseWeight::Nf4(qs.clone()),
                BaseWeight::Fp8(qs) => BaseWeight::Fp8(qs.clone()),
            };
            let w_k = w_ref.to_kind(kind);
            let (got_y, got) = output_and_grads(kind, &[&x, &a, &b, &m], &g, |v| {
                let xa = v[0].linear::<Tensor>(&v[1], None);
                low_rank_linear(&v[0], &base_k, Some(&bias.to_kind(kind)), &xa, &v[1], &v[2], Some((&v[3], &row_sq(&w_k))), S)
            });
            let d = rel_diff(&got_y, &want_y);
            assert!(d < tol, "{name} {kind:?}: output off by {d:e}");
            for ((t, got), want) in ["x", "A", "B", "magnitude"].iter().zip(&got).zip(&want) {
                let d = rel_diff(got, want);
                assert!(d < tol, "{name} {kind:?}: gradient of {t} off by {d:e}");
            }
        }
    }
}

/// A magnitude entry of exactly 0 (an optimiser step landing on 0.0; PEFT initialises m to the
/// base's row norms) zeroes its row's output; its gradient is 0 (the node recovers `x Wᵀ + s·xa
/// Bᵀ` from the output, which is 0 there), never NaN, and the other rows are untouched.
#[test]
fn a_zero_magnitude_entry_gives_a_zero_row_and_no_nan() {
    let _rng = torch_rng_lock();
    tch::manual_seed(23);
    let (out, inp, r) = (8, 16, 2);
    let w = randn(&[out, inp], 0.1);
    let x = randn(&[3, inp], 1.0);
    let a = randn(&[r, inp], 0.1);
    let b = randn(&[out, r], 0.1);
    let m = row_sq(&w).sqrt().index_fill(0, &Tensor::from_slice(&[5i64]), 0.0);
    let g = randn(&[3, out], 1.0).to_kind(Kind::Double);
    let (want_y, want) = output_and_grads(Kind::Double, &[&x, &a, &b, &m], &g, |v| peft_dora(&v[0].unsqueeze(0), &w, &Tensor::zeros([out], (Kind::Double, Device::Cpu)), &v[1], &v[2], &v[3]).squeeze_dim(0));
    let base = BaseWeight::Dense(w.shallow_clone());
    let (got_y, got) = output_and_grads(Kind::Float, &[&x, &a, &b, &m], &g, |v| {
        let xa = v[0].linear::<Tensor>(&v[1], None);
        low_rank_linear(&v[0], &base, None, &xa, &v[1], &v[2], Some((&v[3], &row_sq(&w))), S)
    });
    assert!(rel_diff(&got_y, &want_y) < 1e-5);
    assert_eq!(got_y.select(1, 5).abs().max().double_value(&[]), 0.0);
    let dm = &got[3];
    assert_eq!(dm.isnan().any().int64_value(&[]), 0, "NaN in the magnitude's gradient: {dm}");
    assert_eq!(dm.double_value(&[5]), 0.0);
    let keep = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 6, 7]);
    assert!(rel_diff(&dm.index_select(0, &keep), &want[3].index_select(0, &keep)) < 1e-5);
    for (t, k) in [("x", 0), ("A", 1), ("B", 2)] {
        assert!(rel_diff(&got[k], &want[k]) < 1e-5, "gradient of {t}");
    }
}
