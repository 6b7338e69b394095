//! The experts of a mixture-of-experts layer as grouped work: with the (token, expert)
//! assignments sorted by expert, each projection of every expert is one [`grouped_mm`] over the
//! whole sorted buffer (and so are its LoRA factors), never one small GEMM per expert.
//!
//! The experts stay [`Linear`]s, one per expert projection, under their PEFT names: adapters,
//! NF4, merging and saving see them as before. Their frozen weights are views of one stacked
//! tensor per projection (`[E, out, in]`, as the loader places them), which the grouped GEMM
//! reads without a copy; trainable weights (full fine-tuning) are stacked per call
//! ([`fused_weight`]: with autograd, each expert's gradient its own slice), and NF4 ones
//! dequantised into one buffer per call by an autograd node that keeps only the NF4 bytes for
//! backward ([`nf4_grouped_linear`]). The experts' LoRA / DoRA factors are used as the stacked
//! leaves they are stored as (`[E, r, in]`, `[E, out, r]`: [`super::linear::StackedFactors`], attached by
//! `peft::stacked`), one gradient per projection; adapters kept per expert (loaded for
//! serving or merging, serve's row-routed ones) are stacked per call instead, with autograd to
//! each expert's own factors.

use super::fused::{dora_norm, fused_bias, fused_weight};
use super::grouped_mm::grouped_mm;
use super::linear::{Adapter, BaseWeight, Linear, LowRank, StackedFactors, Weight};
use super::nf4::Nf4Weight;
use super::nodes::{dequantize_stacked, nf4_grouped_linear};
use tch::{Device, Kind, Tensor};

/// The `N·k` assignments of a forward sorted by expert (stably, so each expert's rows keep
/// token order).
pub struct SortedAssignments {
    /// Assignment index (`token · k + slot`) of each sorted row, int64 `[N·k]`.
    pub order: Tensor,
    /// The token of each sorted row, int64 `[N·k]`.
    pub token: Tensor,
    /// Where each expert's rows are.
    pub rows: ExpertRows,
}

/// Which expert each row of a sorted buffer belongs to.
pub struct ExpertRows {
    /// Cumulative row ends per expert, int32 `[E]` (what [`grouped_mm`] takes).
    pub offs: Tensor,
    /// The expert of each row, int64 `[rows]`.
    pub expert: Tensor,
}

impl SortedAssignments {
    /// The assignments `idx [N, k]` (expert ids) of a layer of `experts` experts, sorted.
    pub fn new(idx: &Tensor, experts: i64) -> SortedAssignments {
        let k = idx.size()[1];
        let (expert, order) = idx.reshape([-1]).sort_stable(true, 0, false);
        let token = order.divide_scalar_mode(k, "floor");
        // Expert e's rows end after the last id ≤ e: a search, with no host sync (bincount's
        // size check would read the maximum back).
        let ids = Tensor::arange(experts, (Kind::Int64, expert.device()));
        let offs = ids.searchsorted(&expert, true, true, "right", None::<Tensor>);
        SortedAssignments { order, token, rows: ExpertRows { offs, expert } }
    }
}

impl ExpertRows {
    /// `t [E, d]` gathered per row: `[rows, d]`, each row its expert's.
    pub fn per_row(&self, t: &Tensor) -> Tensor {
        t.index_select(0, &self.expert)
    }

    /// The rows' end per expert, on the host.
    fn ends(&self) -> Vec<i64> {
        Vec::<i64>::try_from(self.offs.to_device(Device::Cpu).to_kind(Kind::Int64)).expect("group ends are integers")
    }
}

/// Projections of every expert on the sorted rows `x [rows, in]`: `members[p][e]` is projection
/// `p` (e.g. gate, up) of expert `e`. Returns the projections' outputs side by side,
/// `[rows, Σ out]`, each row through its own expert's. Several projections run as one grouped
/// GEMM when `fused` and their adapters combine (as [`super::fused::fused_forward`]'s do);
/// each projection is one grouped GEMM (plus two for LoRA) when its experts' adapters are
/// alike, and only adapters that cannot be stacked (serve's row-routed ones) run per expert.
pub fn project(members: &[Vec<&Linear>], x: &Tensor, rows: &ExpertRows, fused: bool, train: bool) -> Tensor {
    if members.len() > 1 && fused {
        if let Some(y) = grouped(&per_expert(members), x, rows, train) {
            return y;
        }
    }
    let outs: Vec<Tensor> = members
        .iter()
        .map(|p| grouped(&per_expert(std::slice::from_ref(p)), x, rows, train).unwrap_or_else(|| one_by_one(p, x, rows, train)))
        .collect();
    match outs.len() {
        1 => outs.into_iter().next().expect("one projection"),
        _ => Tensor::cat(&outs, 1),
    }
}

/// `members[p][e]` regrouped by expert: `[e][p]`.
fn per_expert<'a>(members: &[Vec<&'a Linear>]) -> Vec<Vec<&'a Linear>> {
    (0..members[0].len()).map(|e| members.iter().map(|p| p[e]).collect()).collect()
}

/// The experts' LoRA / DoRA factors stacked: A `[E, Σr, in]`, B transposed and block-diagonal
/// over the members, `[E, Σr, Σ out]`; DoRA's magnitudes and base row norms `[E, Σ out]`.
struct StackedLowRank {
    a: Tensor,
    bt: Tensor,
    dora: Option<(Tensor, Tensor)>,
    scaling: f64,
    dropout: f64,
}

/// `experts[e]`: expert `e`'s members, their outputs stacked. `None` when they cannot run as
/// one grouped GEMM (bases or adapters that do not combine).
fn grouped(experts: &[Vec<&Linear>], x: &Tensor, rows: &ExpertRows, train: bool) -> Option<Tensor> {
    let all: Vec<&Linear> = experts.iter().flatten().copied().collect();
    let adapters = stacked_adapters(experts, train)?;
    let bias = fused_bias(&all)?;
    let e = experts.len() as i64;
    let stacked = match stacked_view(experts) {
        Some(w) => Stacked::Dense(w),
        None => match fused_weight(&all)? {
            BaseWeight::Dense(w) => Stacked::Dense(w.view([e, -1, w.size()[1]])),
            BaseWeight::Nf4(qs) => Stacked::Nf4(qs),
            // Experts' weights stay dense under `method.fp8` (`peft::quantize_fp8`).
            BaseWeight::Fp8(qs) => Stacked::Dense(BaseWeight::Fp8(qs).dense().view([e, -1, all[0].base.shape().1])),
        },
    };
    let product = |input: &Tensor| match &stacked {
        Stacked::Dense(w) => grouped_mm(input, &w.transpose(1, 2), &rows.offs),
        Stacked::Nf4(qs) => nf4_grouped_linear(input, qs, e, &rows.offs),
    };
    let base = product(x);
    let out = base.size()[1];
    let bias_rows = bias.map(|b| rows.per_row(&b.view([e, out])));
    let add_bias = |y: Tensor| match &bias_rows {
        Some(b) => y + b,
        None => y,
    };
    let Some(lr) = adapters else { return Some(add_bias(base)) };
    let dropping = train && lr.dropout > 0.0;
    let dropped = if dropping { x.dropout(lr.dropout, true) } else { x.shallow_clone() };
    let low = grouped_mm(&grouped_mm(&dropped, &lr.a.transpose(1, 2), &rows.offs), &lr.bt, &rows.offs) * lr.scaling;
    let Some((m, base_row_sq)) = &lr.dora else { return Some(add_bias(base + low)) };
    // DoRA, per expert as PEFT: m/‖W + s·BA‖ (per output row, detached) rescales the layer.
    let w = match &stacked {
        Stacked::Dense(w) => w.shallow_clone(),
        Stacked::Nf4(qs) => dequantize_stacked(qs).view([e, out, -1]),
    };
    let norm = dora_norm(&w, base_row_sq, &lr.a, &lr.bt.transpose(1, 2), lr.scaling).to_kind(w.kind());
    let scale = rows.per_row(&(m / norm));
    Some(if dropping {
        // With dropout active PEFT recomputes the base output on the dropped input.
        add_bias(base) + (&scale - 1.0) * product(&dropped) + scale * low
    } else {
        add_bias(scale * (base + low))
    })
}

/// The experts' base weights stacked: dense `[E, Σ out, in]`, or NF4 stacked on the output
/// dimension (dequantised where they are multiplied).
enum Stacked<'a> {
    Dense(Tensor),
    Nf4(Vec<&'a Nf4Weight>),
}

/// The experts' frozen dense weights as one `[E, Σ out, in]` view, without a copy, when each
/// expert's members lie one after the other in memory and the experts at one stride (as
/// [`expert_linears`] places them); `None` otherwise.
fn stacked_view(experts: &[Vec<&Linear>]) -> Option<Tensor> {
    let mut ws: Vec<Vec<&Tensor>> = Vec::with_capacity(experts.len());
    for members in experts {
        let mut here = Vec::with_capacity(members.len());
        for l in members {
            match &l.base.weight {
                Weight::Dense(w) if !w.requires_grad() && w.is_contiguous() && w.dim() == 2 => here.push(w),
                _ => return None,
            }
        }
        ws.push(here);
    }
    let w0 = ws[0][0];
    let (kind, device, cols) = (w0.kind(), w0.device(), w0.size()[1]);
    let elt = kind.elt_size_in_bytes() as i64;
    let ptr = |w: &Tensor| w.data_ptr() as i64;
    let rows: i64 = ws[0].iter().map(|w| w.size()[0]).sum();
    let step = match ws.get(1) {
        Some(next) => (ptr(next[0]) - ptr(w0)) / elt,
        None => rows * cols,
    };
    if step < rows * cols {
        return None;
    }
    for (e, members) in ws.iter().enumerate() {
        let mut at = ptr(w0) + e as i64 * step * elt;
        for (w, first) in members.iter().zip(&ws[0]) {
            if w.kind() != kind || w.device() != device || w.size() != first.size() || ptr(w) != at {
                return None;
            }
            at += w.numel() as i64 * elt;
        }
    }
    w0.f_as_strided([ws.len() as i64, rows, cols], [step, cols, 1], None::<i64>).ok()
}

/// `Some(None)`: no member of any expert has an active adapter. `Some(Some(..))`: every one
/// has a LoRA / DoRA adapter, alike across experts (ranks, scaling, dropout, DoRA or not; no
/// dropout while training when several members share the GEMM). `None`: anything else.
fn stacked_adapters(experts: &[Vec<&Linear>], train: bool) -> Option<Option<StackedLowRank>> {
    let members: Vec<Option<StackedFactors>> = (0..experts[0].len())
        .map(|m| member_factors(&experts.iter().map(|ms| ms[m]).collect::<Vec<_>>()))
        .collect::<Option<_>>()?;
    if members.iter().all(Option::is_none) {
        return Some(None);
    }
    // Some members adapted and others not: no common GEMM.
    let members: Vec<StackedFactors> = members.into_iter().collect::<Option<_>>()?;
    let p0 = &members[0];
    let alike = members.iter().all(|p| p.scaling == p0.scaling && p.dropout == p0.dropout && p.magnitude.is_some() == p0.magnitude.is_some());
    if !alike || (members.len() > 1 && train && p0.dropout > 0.0) {
        return None;
    }
    let cat = |parts: Vec<&Tensor>, dim: i64| if parts.len() == 1 { parts[0].shallow_clone() } else { Tensor::cat(&parts, dim) };
    let a = cat(members.iter().map(|p| &p.a).collect(), 1);
    let outs: Vec<i64> = members.iter().map(|p| p.b.size()[1]).collect();
    let total_out: i64 = outs.iter().sum();
    let mut before = 0;
    let bt_blocks: Vec<Tensor> = members
        .iter()
        .zip(&outs)
        .map(|(p, &out)| {
            let block = p.b.transpose(1, 2);
            // Block-diagonal: member m's B only on its own output columns.
            let padded = if members.len() == 1 { block } else { block.constant_pad_nd([before, total_out - before - out]) };
            before += out;
            padded
        })
        .collect();
    let bt = cat(bt_blocks.iter().collect(), 1);
    let dora = match p0.magnitude {
        Some(_) => Some((
            cat(members.iter().map(|p| p.magnitude.as_ref()).collect::<Option<_>>()?, 1),
            cat(members.iter().map(|p| p.base_row_sq.as_ref()).collect::<Option<_>>()?, 1),
        )),
        None => None,
    };
    Some(Some(StackedLowRank { a, bt, dora, scaling: p0.scaling, dropout: p0.dropout }))
}

/// The factors of one projection's experts (`linears[e]`: expert e's): the stacked leaves
/// themselves when the experts' adapters are their slices in expert order (`peft::stacked`: no
/// copy, one gradient per leaf), else stacked now from each expert's own factors (autograd
/// then splits the gradient back to them). `Some(None)`: no expert has an active adapter;
/// `None`: some have and some not, or their adapters differ, or have no low-rank factors.
fn member_factors(linears: &[&Linear]) -> Option<Option<StackedFactors>> {
    let active = active_adapters(linears);
    if active.is_empty() {
        return Some(None);
    }
    if active.len() < linears.len() {
        return None;
    }
    if let Some(leaves) = stacked_leaves(&active) {
        return Some(Some(leaves));
    }
    let parts: Vec<LowRank<'_>> = active.iter().map(|a| a.low_rank()).collect::<Option<_>>()?;
    // The grouped DoRA path needs every expert's base row norms.
    if parts[0].magnitude.is_some() != parts[0].base_row_sq.is_some() {
        return None;
    }
    StackedFactors::stack(&parts).map(Some)
}

/// Whether the grouped GEMMs take the adapters of one projection's experts (`linears[e]`:
/// expert e's) as the stacked leaves they are stored in (`peft::stacked`), with no copy and
/// one gradient per leaf, rather than stacking each expert's own factors per call.
pub fn adapters_run_stacked(linears: &[&Linear]) -> bool {
    let active = active_adapters(linears);
    active.len() == linears.len() && stacked_leaves(&active).is_some()
}

/// The enabled adapters of `linears`, in order (experts without one left out).
fn active_adapters<'a>(linears: &[&'a Linear]) -> Vec<&'a dyn Adapter> {
    linears.iter().filter(|l| l.adapter_enabled).filter_map(|l| l.adapter.as_deref()).collect()
}

/// The leaves of [`StackedFactors`] when `adapters[e]` is slice `e` of them for every expert
/// (all of them, in order); `None` otherwise.
fn stacked_leaves(adapters: &[&dyn Adapter]) -> Option<StackedFactors> {
    let first = adapters.first()?.expert_slice()?.factors;
    if first.experts() != adapters.len() as i64 || first.magnitude.is_some() != first.base_row_sq.is_some() {
        return None;
    }
    for (e, a) in adapters.iter().enumerate() {
        let slice = a.expert_slice()?;
        if slice.expert != e as i64 || !slice.factors.same_leaves(first) {
            return None;
        }
    }
    Some(first.shallow_clone())
}

/// One projection, each expert's [`Linear`] on its own rows: for adapters that cannot be
/// stacked (serve's row-routed ones, or some experts adapted and others not).
fn one_by_one(linears: &[&Linear], x: &Tensor, rows: &ExpertRows, train: bool) -> Tensor {
    let mut pieces = Vec::with_capacity(linears.len());
    let mut start = 0;
    for (lin, end) in linears.iter().zip(rows.ends()) {
        if end > start {
            pieces.push(lin.forward_t(&x.narrow(0, start, end - start), train));
        }
        start = end;
    }
    if pieces.is_empty() {
        return linears[0].forward_t(&x.narrow(0, 0, 0), train);
    }
    Tensor::cat(&pieces, 0)
}

/// Stacked expert weights `[E, out, in]` as one [`Linear`] per expert, each a view of its slice
/// (no copy): what the loader gives a mixture-of-experts layer, so that [`project`] finds them
/// adjacent. `splits` cuts each expert's rows into members (gate and up of `[E, 2I, H]`), the
/// result per member, then per expert.
pub fn expert_linears(stacked: &Tensor, splits: &[i64]) -> Vec<Vec<Linear>> {
    let experts = stacked.size()[0];
    let mut start = 0;
    splits
        .iter()
        .map(|&rows| {
            let member = (0..experts).map(|e| Linear::new(stacked.get(e).narrow(0, start, rows), None)).collect();
            start += rows;
            member
        })
        .collect()
}
