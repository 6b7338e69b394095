//! Fused projections: q/k/v run as one GEMM and gate/up as one GEMM over the concatenated
//! weights, their LoRA A matrices concatenated into one skinny GEMM and their B matrices into
//! one block-diagonal GEMM, so the backward pass computes the input's gradient in one GEMM per
//! group instead of summing three (or two) per-projection gradients.
//!
//! Nothing about the members changes: each keeps its own base weight and adapter under its
//! own (PEFT) name. The concatenated base weight is, when the members' frozen weights lie one
//! after the other in one storage (as the loader places them), a view of that memory; else it
//! is concatenated per call (trainable weights, with autograd, so each member's gradient is
//! its own slice; NF4 weights dequantise straight into their slice of one buffer).
//!
//! The SwiGLU between the fused gate/up projection and the down projection runs as one autograd
//! node of the C++ shim (swiglu.cpp) that saves only the gate/up output and recomputes the rest.

use super::fp8::Fp8Weight;
use super::linear::{BaseWeight, Linear, LowRank, Weight};
use super::nf4::Nf4Weight;
use super::nodes;
use tch::{Kind, Tensor};

/// The members' outputs concatenated on the last dimension, or `None` when they cannot run as
/// one GEMM (mixed base storage, mixed adapters, or adapter dropout while training).
pub fn fused_forward(members: &[&Linear], x: &Tensor, train: bool) -> Option<Tensor> {
    let adapters = fused_adapters(members, train)?;
    let bias = fused_bias(members)?;
    let weight = fused_weight(members)?;
    Some(match adapters {
        None => weight.product(x, bias.as_ref()),
        Some(l) => {
            let xa = x.linear::<Tensor>(&l.a, None);
            let dora = l.dora.as_ref().map(|(m, sq)| (m, sq));
            low_rank_linear(x, &weight, bias.as_ref(), &xa, &l.a, &l.b, dora, l.scaling)
        }
    })
}

/// `x Wᵀ + b` plus the low-rank term of a LoRA (`s · xa Bᵀ`) or DoRA adapter, given
/// `xa = x' Aᵀ` (`x'` the adapter's input: `x`, or its dropout): the one formula the per-layer
/// adapters and the fused groups share.
///
/// DoRA (no dropout; `dora` = the magnitude and the base's squared row norms):
/// `m/‖W + s·BA‖ · (x Wᵀ + s · xa Bᵀ) + b`, the norm per output row and detached (PEFT's
/// `result + (scale − 1)·x Wᵀ + scale·s·lora` folded into one). Through the C++ node
/// ([`nodes::dora_linear`]) it costs LoRA's GEMMs and keeps only the output besides LoRA's
/// tensors; written out in autograd ops (without the shim) it keeps `x Wᵀ + s · xa Bᵀ` too.
#[allow(clippy::too_many_arguments)]
pub fn low_rank_linear(x: &Tensor, base: &BaseWeight<'_>, bias: Option<&Tensor>, xa: &Tensor, a: &Tensor, b: &Tensor, dora: Option<(&Tensor, &Tensor)>, s: f64) -> Tensor {
    let Some((m, base_row_sq)) = dora else {
        return add_low_rank(&base.product(x, bias), &(xa * s), b);
    };
    let w = base.dense();
    let norm = dora_norm(&w, base_row_sq, a, b, s).to_kind(w.kind());
    let nf4 = match base {
        BaseWeight::Nf4(qs) => Some(qs.as_slice()),
        BaseWeight::Dense(_) | BaseWeight::Fp8(_) => None,
    };
    let y = nodes::dora_linear(x, &w, nf4, xa, b, m, &norm, s).unwrap_or_else(|| {
        let scale = (m / &norm).view([1, -1]);
        scale * add_low_rank(&x.linear::<Tensor>(&w, None), &(xa * s), b)
    });
    match bias {
        Some(bias) => y + bias,
        None => y,
    }
}

/// `y + xa Bᵀ` with the up-projection and the sum in one GEMM (`addmm`), so the low-rank
/// output is never written and re-read at full width.
fn add_low_rank(y: &Tensor, xa: &Tensor, b: &Tensor) -> Tensor {
    let shape = y.size();
    let (rank, out) = (b.size()[1], *shape.last().expect("a linear output has a last dimension"));
    y.reshape([-1, out]).addmm(&xa.reshape([-1, rank]), &b.tr()).view(shape.as_slice())
}

/// L2 norm of each row, in fp32.
pub fn row_norm(w: &Tensor) -> Tensor {
    row_sq(w).sqrt()
}

/// Squared L2 norm of each row, in fp32.
pub fn row_sq(w: &Tensor) -> Tensor {
    w.to_kind(Kind::Float).pow_tensor_scalar(2).sum_dim_intlist([-1].as_slice(), false, Kind::Float)
}

/// DoRA's `‖W + s·BA‖` per output row (fp32, no gradient) without forming `BA` at full size:
/// `‖W‖² + 2s·Σₖ B ⊙ (W Aᵀ) + s²·Σₖ B ⊙ (B·A Aᵀ)`, with `‖W‖²` (`base_row_sq`) kept from the
/// frozen base. One `[out, r]` GEMM over W instead of five full-size fp32 passes; with a
/// block-diagonal B (fused projections) the off-block products vanish, so it is each member's
/// norm. On CUDA a bf16/fp16 `W Aᵀ` is one GEMM with an fp32 output (the inputs are exact in
/// fp32, so it equals the fp32 product without an fp32 copy of W); elsewhere W goes to fp32.
///
/// Batched too (the experts of a mixture-of-experts layer): `w [E, out, in]`, `a [E, r, in]`,
/// `b [E, out, r]` and `base_row_sq [E, out]` give `[E, out]`.
pub fn dora_norm(w: &Tensor, base_row_sq: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Tensor {
    let _g = tch::no_grad_guard();
    let half = matches!(w.kind(), Kind::BFloat16 | Kind::Half) && a.kind() == w.kind();
    let at = a.transpose(-2, -1);
    let wide = (half && w.device().is_cuda())
        .then(|| if w.dim() == 2 { w.f_mm_dtype(&at, Kind::Float) } else { w.f_bmm_dtype(&at, Kind::Float) }.ok())
        .flatten();
    let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
    let at = a.transpose(-2, -1);
    let wa = wide.unwrap_or_else(|| w.to_kind(Kind::Float).matmul(&at));
    let baa = b.matmul(&a.matmul(&at));
    let cross = (&b * (wa * (2.0 * s) + baa * (s * s))).sum_dim_intlist([-1].as_slice(), false, Kind::Float);
    (base_row_sq + cross).clamp_min(0.0).sqrt()
}

/// The members' adapters as one: A stacked, B block-diagonal, DoRA's magnitudes and base row
/// norms concatenated.
pub(super) struct FusedLowRank {
    pub(super) a: Tensor,
    pub(super) b: Tensor,
    pub(super) dora: Option<(Tensor, Tensor)>,
    pub(super) scaling: f64,
}

/// `Some(None)`: no member has an active adapter. `Some(Some(..))`: every member has one and
/// they combine. `None`: they cannot run fused.
pub(super) fn fused_adapters(members: &[&Linear], train: bool) -> Option<Option<FusedLowRank>> {
    let mut parts: Vec<LowRank<'_>> = Vec::with_capacity(members.len());
    let mut without = 0;
    for l in members {
        match &l.adapter {
            Some(a) if l.adapter_enabled => parts.push(a.low_rank()?),
            _ => without += 1,
        }
    }
    if without == members.len() {
        return Some(None);
    }
    let first = parts.first()?;
    let combine = without == 0
        && parts.iter().all(|p| {
            p.scaling == first.scaling
                && p.magnitude.is_some() == first.magnitude.is_some()
                && p.base_row_sq.is_some() == p.magnitude.is_some()
                && !(train && p.dropout > 0.0)
        });
    if !combine {
        return None;
    }
    let a = Tensor::cat(&parts.iter().map(|p| p.a).collect::<Vec<_>>(), 0);
    let b = Tensor::block_diag(&parts.iter().map(|p| p.b).collect::<Vec<_>>());
    let dora = first.magnitude.is_some().then(|| {
        let magnitudes: Vec<&Tensor> = parts.iter().filter_map(|p| p.magnitude).collect();
        let row_sqs: Vec<&Tensor> = parts.iter().filter_map(|p| p.base_row_sq).collect();
        (Tensor::cat(&magnitudes, 0), Tensor::cat(&row_sqs, 0))
    });
    Some(Some(FusedLowRank { a, b, dora, scaling: first.scaling }))
}

/// `Some(None)`: no member has a bias; `None`: only some have.
pub(crate) fn fused_bias(members: &[&Linear]) -> Option<Option<Tensor>> {
    let biases: Vec<&Tensor> = members.iter().filter_map(|l| l.base.bias.as_ref()).collect();
    match biases.len() {
        0 => Some(None),
        n if n == members.len() => Some(Some(Tensor::cat(&biases, 0))),
        _ => None,
    }
}

/// The members' base weights stacked on the output dimension, `[Σ out, in]`.
pub(crate) fn fused_weight<'a>(members: &[&'a Linear]) -> Option<BaseWeight<'a>> {
    let dense: Option<Vec<&Tensor>> = members
        .iter()
        .map(|l| match &l.base.weight {
            Weight::Dense(w) => Some(w),
            Weight::Nf4(_) | Weight::Fp8(_) => None,
        })
        .collect();
    if let Some(ws) = dense {
        let (kind, device, cols) = (ws[0].kind(), ws[0].device(), ws[0].size()[1]);
        if ws.iter().any(|w| w.kind() != kind || w.device() != device || w.size()[1] != cols) {
            return None;
        }
        if !ws.iter().any(|w| w.requires_grad()) {
            if let Some(view) = adjacent_view(&ws) {
                return Some(BaseWeight::Dense(view));
            }
        }
        return Some(BaseWeight::Dense(Tensor::cat(&ws, 0)));
    }
    let quantised: Option<Vec<&'a Nf4Weight>> = members
        .iter()
        .map(|&l| match &l.base.weight {
            Weight::Nf4(q) => Some(q),
            Weight::Dense(_) | Weight::Fp8(_) => None,
        })
        .collect();
    let Some(qs) = quantised else {
        let fp8: Vec<&'a Fp8Weight> = members
            .iter()
            .map(|&l| match &l.base.weight {
                Weight::Fp8(q) => Some(q),
                Weight::Dense(_) | Weight::Nf4(_) => None,
            })
            .collect::<Option<_>>()?;
        let (kind, cols) = (fp8[0].compute_kind(), fp8[0].shape().1);
        if fp8.iter().any(|q| q.compute_kind() != kind || q.shape().1 != cols) {
            return None;
        }
        return Some(BaseWeight::Fp8(fp8));
    };
    let (kind, cols) = (qs[0].compute_kind(), qs[0].shape().1);
    if qs.iter().any(|q| q.compute_kind() != kind || q.shape().1 != cols) {
        return None;
    }
    Some(BaseWeight::Nf4(qs))
}

/// Several FP8 weights stacked on the output dimension (a fused group's), `(codes, scale)`:
/// views when they lie one after the other in memory ([`make_adjacent`]), else copies.
pub fn stacked_fp8(ws: &[&Fp8Weight]) -> (Tensor, Tensor) {
    let codes: Vec<&Tensor> = ws.iter().map(|w| &w.codes).collect();
    let scales: Vec<&Tensor> = ws.iter().map(|w| &w.scale).collect();
    let view_or_cat = |ts: &[&Tensor]| adjacent_view(ts).unwrap_or_else(|| Tensor::cat(ts, 0));
    (view_or_cat(&codes), view_or_cat(&scales))
}

/// The tensors (1-D, or 2-D of one width) stacked on the first dimension as a view, without a
/// copy, when they lie one after the other in memory (contiguous, in order) within one
/// storage; libtorch refuses a view past the storage.
fn adjacent_view(ws: &[&Tensor]) -> Option<Tensor> {
    let first = ws[0];
    let cols = if first.dim() == 2 { first.size()[1] } else { 1 };
    let elt = first.kind().elt_size_in_bytes() as i64;
    let start = first.data_ptr() as i64;
    let mut rows = 0;
    for w in ws {
        if !w.is_contiguous() || w.dim() != first.dim() || w.data_ptr() as i64 != start + rows * cols * elt {
            return None;
        }
        rows += w.size()[0];
    }
    match first.dim() {
        2 => first.f_as_strided([rows, cols], [cols, 1], None::<i64>).ok(),
        _ => first.f_as_strided([rows], [1], None::<i64>).ok(),
    }
}

/// Stacks the weights on the output dimension into one new tensor and makes each weight a view
/// of its slice (so [`fused_forward`] finds them adjacent and runs without a copy). Weights
/// that are not all dense (or all FP8: codes and scales each), of one dtype, device and input
/// width stay as they are.
pub fn make_adjacent(members: &mut [&mut Linear]) {
    let _g = tch::no_grad_guard();
    if members.iter().all(|l| matches!(l.base.weight, Weight::Fp8(_))) {
        let ws: Vec<&Fp8Weight> = members.iter().map(|l| match &l.base.weight {
            Weight::Fp8(q) => q,
            _ => unreachable!("checked FP8 above"),
        }).collect();
        let (codes, scale) = stacked_fp8(&ws);
        let mut offset = 0;
        for l in members.iter_mut() {
            if let Weight::Fp8(q) = &mut l.base.weight {
                let rows = q.shape().0;
                q.codes = codes.narrow(0, offset, rows);
                q.scale = scale.narrow(0, offset, rows);
                offset += rows;
            }
        }
        return;
    }
    let ws: Option<Vec<Tensor>> = members
        .iter()
        .map(|l| match &l.base.weight {
            Weight::Dense(w) => Some(w.shallow_clone()),
            Weight::Nf4(_) | Weight::Fp8(_) => None,
        })
        .collect();
    let Some(ws) = ws else { return };
    let (kind, device, cols) = (ws[0].kind(), ws[0].device(), ws[0].size()[1]);
    if ws.iter().any(|w| w.kind() != kind || w.device() != device || w.size()[1] != cols || w.requires_grad()) {
        return;
    }
    let stacked = Tensor::cat(&ws, 0);
    let mut offset = 0;
    for l in members.iter_mut() {
        let rows = match &l.base.weight {
            Weight::Dense(w) => w.size()[0],
            Weight::Nf4(_) | Weight::Fp8(_) => unreachable!("checked dense above"),
        };
        l.base.weight = Weight::Dense(stacked.narrow(0, offset, rows));
        offset += rows;
    }
}
