//! DoRA inside the block nodes (issue 15): the attention's q/k/v projections (and o_proj, as
//! one projection) and the whole gated MLP (gate/up → SwiGLU or GeGLU → down) as autograd
//! nodes of the C++ shim
//! (dora_block.cpp) when every projection of the group has a DoRA adapter — the DoRA
//! counterparts of [`super::lora_block`]'s nodes, under the same conditions (a frozen dense or
//! NF4 base, no active dropout, one scaling per group, everything in the input's dtype).
//!
//! Each projection computes PEFT's `m/‖W + s·BA‖ ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b` (the norm per
//! output row, detached; the bias outside the scaling), the norm from [`dora_norm`] without
//! forming `BA`. The column scale is folded into the GEMMs' weights, so the forward and the
//! input/A/B gradients are the LoRA node's GEMMs; DoRA adds one token-sized pass in backward,
//! m's gradient from the node's output. What autograd's composition (the per-group DoRA node
//! of [`super::fused`], the `x Aᵀ` GEMM and the SwiGLU node) runs besides: a full-width add
//! per group for the input gradient (base + adapter), and the MLP keeps the down projection's
//! input `act(g)·u`, which the node recomputes. See README "LoRA block nodes".
//!
//! `FTX_BLOCK_NODE=0` and [`super::decoder::CausalLm::set_block_nodes`] switch these off with
//! the LoRA nodes.

use super::fused::dora_norm;
use super::linear::Linear;
use super::lora_block::{frozen_group, Group};
use super::Activation;
use tch::{Kind, Tensor};

/// A DoRA projection group as the nodes take it: the LoRA group, the concatenated magnitudes
/// `[Σout]` (trainable) and the base's squared row norms (fp32).
#[cfg_attr(not(ftx_torch_shim), allow(dead_code))]
struct DoraGroup<'a> {
    group: Group<'a>,
    magnitude: Tensor,
    base_row_sq: Tensor,
}

impl DoraGroup<'_> {
    /// `‖W + s·BA‖` per output row (detached) in `kind`; NF4 weights are dequantised for it.
    #[cfg_attr(not(ftx_torch_shim), allow(dead_code))]
    fn norm(&self, kind: Kind) -> Tensor {
        let g = &self.group;
        dora_norm(&g.base.dense(), &self.base_row_sq, &g.a, &g.b, g.scaling).to_kind(kind)
    }
}

/// The DoRA group of `members` when the nodes apply to it for inputs of dtype `kind`.
fn dora_group<'a>(members: &[&'a Linear], kind: Kind, train: bool) -> Option<DoraGroup<'a>> {
    let (group, dora) = frozen_group(members, kind, train)?;
    let (magnitude, base_row_sq) = dora?;
    (magnitude.kind() == kind).then_some(DoraGroup { group, magnitude, base_row_sq })
}

/// True when [`gated_mlp`] runs these DoRA projections as one node for inputs of dtype `kind`.
pub fn mlp_node_applies(gate_up: &[&Linear], down: &Linear, kind: Kind, train: bool) -> bool {
    dora_group(gate_up, kind, train).is_some() && dora_group(&[down], kind, train).is_some()
}

/// True when [`projections`] runs the DoRA `members` as one node for inputs of dtype `kind`.
pub fn projection_node_applies(members: &[&Linear], kind: Kind, train: bool) -> bool {
    dora_group(members, kind, train).is_some()
}

/// `down(act(g)·u)` with `[g | u]` the outputs of `gate_up` for `x [.., hidden]`, every
/// projection DoRA, through the DoRA MLP node, or `None` where it does not apply. Rows are
/// independent, as in [`super::lora_block::gated_mlp`].
pub fn gated_mlp(gate_up: &[&Linear], down: &Linear, act: Activation, x: &Tensor, train: bool) -> Option<Tensor> {
    let (gu, d) = (dora_group(gate_up, x.kind(), train)?, dora_group(&[down], x.kind(), train)?);
    shim::dora_mlp(x, &gu, &d, act == Activation::GeluTanh, crate::gpu::kernels::active_for(x))
}

/// The DoRA members' outputs concatenated on the last dimension (as
/// [`super::fused::fused_forward`] gives them) through the DoRA projections node, or `None`
/// where it does not apply.
pub fn projections(members: &[&Linear], x: &Tensor, train: bool) -> Option<Tensor> {
    let g = dora_group(members, x.kind(), train)?;
    shim::dora_projections(x, &g)
}

#[cfg(ftx_torch_shim)]
mod shim {
    use super::super::lora_block::shim::{ptr, take, FrozenWeight, Held};
    use super::DoraGroup;
    use std::ffi::{c_char, c_void};
    use tch::Tensor;

    extern "C" {
        #[allow(clippy::too_many_arguments)]
        fn ftx_dora_projections(x: *const c_void, base: *const FrozenWeight, a: *const c_void, b: *const c_void, m: *const c_void, norm: *const c_void, s: f64, y: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
        #[allow(clippy::too_many_arguments)]
        fn ftx_dora_mlp(
            x: *const c_void,
            gate_up: *const FrozenWeight,
            a_gu: *const c_void,
            b_gu: *const c_void,
            m_gu: *const c_void,
            norm_gu: *const c_void,
            s_gu: f64,
            down: *const FrozenWeight,
            a_d: *const c_void,
            b_d: *const c_void,
            m_d: *const c_void,
            norm_d: *const c_void,
            s_d: f64,
            gelu: i32,
            kernels: i32,
            y: *mut *mut c_void,
            err: *mut c_char,
            err_len: i32,
        ) -> i32;
    }

    pub(super) fn dora_projections(x: &Tensor, g: &DoraGroup<'_>) -> Option<Tensor> {
        let held = Held::of_base(&g.group.base, x.kind())?;
        let base = held.frozen(g.group.bias.as_ref());
        let norm = g.norm(x.kind());
        let mut y: *mut c_void = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        // SAFETY: live tch tensors (at::Tensor*) and a FrozenWeight pointing at tensors `held`
        // and `g` keep alive; one new heap tensor out.
        let rc = unsafe { ftx_dora_projections(ptr(x), &base, ptr(&g.group.a), ptr(&g.group.b), ptr(&g.magnitude), ptr(&norm), g.group.scaling, &mut y, err.as_mut_ptr(), err.len() as i32) };
        Some(take(rc, y, &err, "DoRA projections node"))
    }

    /// `gelu`: GeGLU (tanh-approximated GELU) instead of SwiGLU.
    pub(super) fn dora_mlp(x: &Tensor, gate_up: &DoraGroup<'_>, down: &DoraGroup<'_>, gelu: bool, kernels: bool) -> Option<Tensor> {
        if kernels {
            crate::gpu::kernels::register();
        }
        let (held_gu, held_d) = (Held::of_base(&gate_up.group.base, x.kind())?, Held::of_base(&down.group.base, x.kind())?);
        let (gu, d) = (held_gu.frozen(gate_up.group.bias.as_ref()), held_d.frozen(down.group.bias.as_ref()));
        let (norm_gu, norm_d) = (gate_up.norm(x.kind()), down.norm(x.kind()));
        let mut y: *mut c_void = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        let (g, dn) = (&gate_up.group, &down.group);
        // SAFETY: as in `dora_projections`.
        let rc = unsafe {
            ftx_dora_mlp(
                ptr(x),
                &gu,
                ptr(&g.a),
                ptr(&g.b),
                ptr(&gate_up.magnitude),
                ptr(&norm_gu),
                g.scaling,
                &d,
                ptr(&dn.a),
                ptr(&dn.b),
                ptr(&down.magnitude),
                ptr(&norm_d),
                dn.scaling,
                gelu as i32,
                kernels as i32,
                &mut y,
                err.as_mut_ptr(),
                err.len() as i32,
            )
        };
        Some(take(rc, y, &err, "DoRA MLP node"))
    }
}

/// Without the shim [`dora_group`] never forms, so these are never reached.
#[cfg(not(ftx_torch_shim))]
mod shim {
    use super::DoraGroup;
    use tch::Tensor;

    pub(super) fn dora_projections(_x: &Tensor, _g: &DoraGroup<'_>) -> Option<Tensor> {
        None
    }

    pub(super) fn dora_mlp(_x: &Tensor, _gate_up: &DoraGroup<'_>, _down: &DoraGroup<'_>, _gelu: bool, _kernels: bool) -> Option<Tensor> {
        None
    }
}
