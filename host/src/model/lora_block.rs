//! LoRA blocks with a hand-derived backward (issue 15): the attention's q/k/v projections and
//! the whole gated MLP (gate/up → SwiGLU, or Gemma's GeGLU → down), each adapted projection a
//! frozen base plus LoRA, as autograd nodes of the C++ shim (lora_block.cpp). Forward: the
//! adapter's up-projection accumulates into the base GEMM's output with the scale as addmm's
//! alpha. Backward: each input gradient is one GEMM accumulated into by the adapter's
//! (`dX = dY·W + s·dY·B·A` in one buffer), A's and B's gradients are small GEMMs, and the
//! activation's one elementwise pass each way is all that is not a GEMM — no separate scale,
//! add or cast passes, which autograd's composition of the same formulas runs
//! ([`super::fused`]). The nodes save what that composition with the SwiGLU node saves (the
//! input, the `x·Aᵀ` products, the gate/up output) and recompute `act(g)·u`.
//!
//! Where they apply ([`gated_mlp`], [`projections`]; `Mlp` and `Attention` call them, with
//! fused projections): every projection of the group has a plain LoRA adapter (DoRA has its
//! own block nodes under the same conditions, `super::dora_block`) of one scaling, without active dropout (PEFT drops the adapter's input
//! only; with dropout > 0 while training the layer keeps the autograd path), on a frozen base —
//! dense, NF4 (QLoRA, dequantised inside the node each way) or FP8 (`method.fp8`: the base
//! GEMMs on FP8 tensor cores, lora_block.h) — with frozen or no biases, all
//! in the input's dtype. Full fine-tuning (a trainable base) keeps autograd. Without the C++ shim (a libtorch without headers) they never apply.
//!
//! `FTX_BLOCK_NODE=0` in the environment switches them off for a whole run (read once), for
//! A/B benchmarks of the same binary; [`super::decoder::CausalLm::set_block_nodes`] does so per
//! model (the tests' reference).

use super::fused::{fused_adapters, fused_bias, fused_weight};
use super::linear::{BaseWeight, Linear};
use super::Activation;
use tch::{Kind, Tensor};

/// Whether models run their LoRA blocks through the nodes unless told otherwise: true, except
/// with `FTX_BLOCK_NODE=0` in the environment (read on the first call).
pub fn enabled_by_default() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FTX_BLOCK_NODE").map_or(true, |v| v.trim() != "0"))
}

/// A projection group (one projection, or q/k/v or gate/up fused) as the nodes take it: the
/// frozen stacked base and bias, A stacked `[Σr, in]`, B block-diagonal `[Σout, Σr]`.
#[cfg_attr(not(ftx_torch_shim), allow(dead_code))]
pub(super) struct Group<'a> {
    pub(super) base: BaseWeight<'a>,
    pub(super) bias: Option<Tensor>,
    pub(super) a: Tensor,
    pub(super) b: Tensor,
    pub(super) scaling: f64,
}

/// The group of `members` when the nodes apply to it for inputs of dtype `kind` (see the
/// module's docs), else `None`.
fn group<'a>(members: &[&'a Linear], kind: Kind, train: bool) -> Option<Group<'a>> {
    frozen_group(members, kind, train).and_then(|(g, dora)| dora.is_none().then_some(g))
}

/// The group of `members` when every member has an adapter of one kind (LoRA or DoRA) and
/// the block nodes' other conditions hold (see the module's docs), with DoRA's concatenated
/// magnitudes and base row norms; the DoRA block nodes (`super::dora_block`) take the DoRA
/// ones.
pub(super) fn frozen_group<'a>(members: &[&'a Linear], kind: Kind, train: bool) -> Option<(Group<'a>, Option<(Tensor, Tensor)>)> {
    if !cfg!(ftx_torch_shim) {
        return None;
    }
    let adapters = fused_adapters(members, train)??;
    if adapters.a.kind() != kind || adapters.b.kind() != kind {
        return None;
    }
    let bias = fused_bias(members)?;
    if bias.as_ref().is_some_and(|b| b.requires_grad() || b.kind() != kind) {
        return None;
    }
    let base = fused_weight(members)?;
    match &base {
        BaseWeight::Dense(w) if w.requires_grad() || w.kind() != kind => return None,
        BaseWeight::Nf4(qs) if qs.iter().any(|q| q.compute_kind() != kind || (q.shape().0 * q.shape().1) % ftx_kernels::nf4::NF4_BLOCK as i64 != 0) => return None,
        // On CUDA the rowwise-scaled FP8 GEMM writes bf16 only; other dtypes dequantise (autograd).
        BaseWeight::Fp8(qs) if qs.iter().any(|q| q.compute_kind() != kind || (kind != Kind::BFloat16 && q.codes.device().is_cuda())) => return None,
        _ => {}
    }
    Some((Group { base, bias, a: adapters.a, b: adapters.b, scaling: adapters.scaling }, adapters.dora))
}

/// True when [`gated_mlp`] runs these projections as one node for inputs of dtype `kind`.
pub fn mlp_node_applies(gate_up: &[&Linear], down: &Linear, kind: Kind, train: bool) -> bool {
    group(gate_up, kind, train).is_some() && group(&[down], kind, train).is_some()
}

/// True when [`projections`] runs `members` as one node for inputs of dtype `kind`.
pub fn projection_node_applies(members: &[&Linear], kind: Kind, train: bool) -> bool {
    group(members, kind, train).is_some()
}

/// `down(act(g)·u)` with `[g | u]` the outputs of `gate_up` (gate and up, or one packed
/// projection) for `x [.., hidden]`, through the LoRA MLP node, or `None` where it does not
/// apply (the caller then runs the MLP as before). Rows are independent: any row slice of a
/// batch gives those rows of the whole batch's output. `recompute`: the node keeps only `x` and
/// the `x·Aᵀ` products and runs gate/up again in backward (selective recompute,
/// `train.recompute = "mlp"`) instead of keeping their output.
pub fn gated_mlp(gate_up: &[&Linear], down: &Linear, act: Activation, x: &Tensor, train: bool, recompute: bool) -> Option<Tensor> {
    let (gu, d) = (group(gate_up, x.kind(), train)?, group(&[down], x.kind(), train)?);
    shim::lora_mlp(x, &gu, &d, act == Activation::GeluTanh, crate::gpu::kernels::active_for(x), recompute)
}

/// The members' outputs concatenated on the last dimension (as [`super::fused::fused_forward`]
/// gives them) through the LoRA linear node, or `None` where it does not apply.
pub fn projections(members: &[&Linear], x: &Tensor, train: bool) -> Option<Tensor> {
    let g = group(members, x.kind(), train)?;
    shim::lora_linear(x, &g)
}

/// The shim's calls; its frozen-weight plumbing is shared with the DoRA block nodes
/// (`super::dora_block`).
#[cfg(ftx_torch_shim)]
pub(super) mod shim {
    use super::super::nodes::Nf4Stack;
    use super::Group;
    use super::BaseWeight;
    use std::ffi::{c_char, c_void, CStr};
    use std::ptr::null;
    use tch::Tensor;

    /// A frozen base weight as lora_block.h's `FtxFrozenWeight` takes it (same layout).
    #[repr(C)]
    pub(in crate::model) struct FrozenWeight {
        w: *const c_void,
        packed: *const c_void,
        absmax: *const c_void,
        table: *const c_void,
        rows: i64,
        cols: i64,
        bias: *const c_void,
        w8: *const c_void,
        w8_scale: *const c_void,
    }

    extern "C" {
        fn ftx_lora_linear(x: *const c_void, base: *const FrozenWeight, a: *const c_void, b: *const c_void, s: f64, y: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
        #[allow(clippy::too_many_arguments)]
        fn ftx_lora_mlp(x: *const c_void, gate_up: *const FrozenWeight, a_gu: *const c_void, b_gu: *const c_void, s_gu: f64, down: *const FrozenWeight, a_d: *const c_void, b_d: *const c_void, s_d: f64, gelu: i32, kernels: i32, recompute: i32, y: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
    }

    /// `t` as the `at::Tensor*` the shim takes.
    pub(in crate::model) fn ptr(t: &Tensor) -> *const c_void {
        t.as_ptr() as *const c_void
    }

    /// The tensors a [`FrozenWeight`] points at, kept alive while the shim reads them.
    pub(in crate::model) enum Held {
        Dense(Tensor),
        Nf4(Nf4Stack),
        /// FP8 codes `[rows, cols]` and their row scales.
        Fp8(Tensor, Tensor),
    }

    impl Held {
        /// `None` for NF4 weights the shim cannot take (not in whole 64-blocks).
        fn of(g: &Group<'_>, kind: tch::Kind) -> Option<Held> {
            Held::of_base(&g.base, kind)
        }

        /// `None` for NF4 weights the shim cannot take (not in whole 64-blocks).
        pub(in crate::model) fn of_base(base: &BaseWeight<'_>, kind: tch::Kind) -> Option<Held> {
            Some(match base {
                BaseWeight::Dense(w) => Held::Dense(w.shallow_clone()),
                BaseWeight::Nf4(qs) => Held::Nf4(Nf4Stack::of(qs, kind)?),
                BaseWeight::Fp8(qs) => {
                    let (codes, scale) = crate::model::fused::stacked_fp8(qs);
                    Held::Fp8(codes, scale)
                }
            })
        }

        /// The weight as the shim reads it, with `bias` (kept alive by the caller).
        pub(in crate::model) fn frozen(&self, bias: Option<&Tensor>) -> FrozenWeight {
            let bias = bias.map_or(null(), ptr);
            match self {
                Held::Dense(w) => FrozenWeight { w: ptr(w), packed: null(), absmax: null(), table: null(), rows: 0, cols: 0, bias, w8: null(), w8_scale: null() },
                Held::Nf4(q) => FrozenWeight { w: null(), packed: ptr(&q.packed), absmax: ptr(&q.absmax), table: ptr(&q.table), rows: q.rows, cols: q.cols, bias, w8: null(), w8_scale: null() },
                Held::Fp8(codes, scale) => FrozenWeight { w: null(), packed: null(), absmax: null(), table: null(), rows: 0, cols: 0, bias, w8: ptr(codes), w8_scale: ptr(scale) },
            }
        }
    }

    /// The new tensor the shim handed back, or a panic with its message: shapes and dtypes are
    /// checked before the call, so an error here is a bug, as a failing tensor op panics in tch.
    pub(in crate::model) fn take(rc: i32, y: *mut c_void, err: &[c_char], what: &str) -> Tensor {
        if rc != 0 {
            // SAFETY: the shim wrote a NUL-terminated message into `err`.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            panic!("{what}: {msg}");
        }
        // SAFETY: on success `y` is a new heap at::Tensor that tch now owns and frees.
        unsafe { Tensor::from_ptr(y as *mut _) }
    }

    pub(super) fn lora_linear(x: &Tensor, g: &Group<'_>) -> Option<Tensor> {
        let held = Held::of(g, x.kind())?;
        let base = held.frozen(g.bias.as_ref());
        let mut y: *mut c_void = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        // SAFETY: live tch tensors (at::Tensor*) and a FrozenWeight pointing at tensors `held`
        // and `g` keep alive; one new heap tensor out.
        let rc = unsafe { ftx_lora_linear(ptr(x), &base, ptr(&g.a), ptr(&g.b), g.scaling, &mut y, err.as_mut_ptr(), err.len() as i32) };
        Some(take(rc, y, &err, "LoRA linear node"))
    }

    /// `gelu`: GeGLU (tanh-approximated GELU) instead of SwiGLU; `recompute`: gate/up's output
    /// recomputed in backward instead of kept.
    pub(super) fn lora_mlp(x: &Tensor, gate_up: &Group<'_>, down: &Group<'_>, gelu: bool, kernels: bool, recompute: bool) -> Option<Tensor> {
        if kernels {
            crate::gpu::kernels::register();
        }
        let (held_gu, held_d) = (Held::of(gate_up, x.kind())?, Held::of(down, x.kind())?);
        let (gu, d) = (held_gu.frozen(gate_up.bias.as_ref()), held_d.frozen(down.bias.as_ref()));
        let mut y: *mut c_void = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        // SAFETY: as in `lora_linear`.
        let rc = unsafe {
            ftx_lora_mlp(ptr(x), &gu, ptr(&gate_up.a), ptr(&gate_up.b), gate_up.scaling, &d, ptr(&down.a), ptr(&down.b), down.scaling, gelu as i32, kernels as i32, recompute as i32, &mut y, err.as_mut_ptr(), err.len() as i32)
        };
        Some(take(rc, y, &err, "LoRA MLP node"))
    }
}

/// Without the shim [`group`] never forms, so these are never reached.
#[cfg(not(ftx_torch_shim))]
mod shim {
    use super::Group;
    use tch::Tensor;

    pub(super) fn lora_linear(_x: &Tensor, _g: &Group<'_>) -> Option<Tensor> {
        None
    }

    pub(super) fn lora_mlp(_x: &Tensor, _gate_up: &Group<'_>, _down: &Group<'_>, _gelu: bool, _kernels: bool, _recompute: bool) -> Option<Tensor> {
        None
    }
}
