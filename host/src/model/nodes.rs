//! The Rust side of the C++ autograd nodes (nf4_linear.cpp, swiglu.cpp, dora_linear.cpp,
//! sliced_sdpa.cpp; the LoRA block nodes of lora_block.cpp are `model::lora_block`'s,
//! compiled by host/build.rs against libtorch's headers): each saves less for backward than
//! plain autograd would and recomputes the rest. Without the shim (a libtorch without headers) each falls back
//! to plain autograd ops with the same results.

use super::nf4::Nf4Weight;
use tch::Tensor;

/// NF4 weights stacked on the output dimension, dequantised into one dense tensor in their
/// compute dtype, `[Σ out, in]`.
pub fn dequantize_stacked(qs: &[&Nf4Weight]) -> Tensor {
    let (kind, cols) = (qs[0].compute_kind(), qs[0].shape().1);
    let rows: i64 = qs.iter().map(|q| q.shape().0).sum();
    let out = Tensor::empty([rows, cols], (kind, qs[0].packed.device()));
    let mut offset = 0;
    for q in qs {
        q.dequantize_into(&out.narrow(0, offset, q.shape().0));
        offset += q.shape().0;
    }
    out
}

/// `x Wᵀ + b` for NF4 weights stacked on the output dimension. Through the C++ shim's node
/// (nf4_linear.cpp), which keeps only the NF4 bytes and dequantises again in backward — the
/// dequantised weight, the size of the bf16 layer, is not kept from forward to backward; else
/// (a weight not in whole 64-blocks, or no shim) through the dequantised weight.
pub fn nf4_linear(x: &Tensor, qs: &[&Nf4Weight], bias: Option<&Tensor>) -> Tensor {
    #[cfg(ftx_torch_shim)]
    {
        if let Some(q) = Nf4Stack::of(qs, x.kind()) {
            let y = shim::nf4_linear(x, &q.packed, &q.absmax, &q.table, q.rows, q.cols);
            return match bias {
                Some(b) => y + b,
                None => y,
            };
        }
    }
    x.linear(&dequantize_stacked(qs), bias)
}

/// [`super::grouped_mm::grouped_mm`] of the sorted rows `x [N, in]` with NF4 weights stacked on
/// the output dimension in `groups` equal blocks (a mixture-of-experts layer's experts, each
/// expert's members one after the other): `y[rows of g] = x[rows of g] · W_gᵀ`, `offs` the
/// groups' cumulative row ends (int32). Through the shim's node, which keeps only the NF4
/// bytes and dequantises again in backward; else (no shim, widths off the 16-byte grid, a
/// device without `_grouped_mm`) through the dequantised weight, which autograd then keeps.
pub fn nf4_grouped_linear(x: &Tensor, qs: &[&Nf4Weight], groups: i64, offs: &Tensor) -> Tensor {
    let rows: i64 = qs.iter().map(|q| q.shape().0).sum();
    #[cfg(ftx_torch_shim)]
    {
        let align = 16 / x.kind().elt_size_in_bytes() as i64;
        let whole = (rows / groups) % align == 0 && qs[0].shape().1 % align == 0;
        let device = matches!(x.device(), tch::Device::Cpu | tch::Device::Cuda(_));
        if whole && device && x.dim() == 2 {
            if let Some(q) = Nf4Stack::of(qs, x.kind()) {
                return shim::nf4_grouped_linear(x, &q, offs, groups);
            }
        }
    }
    let w = dequantize_stacked(qs);
    super::grouped_mm::grouped_mm(x, &w.view([groups, rows / groups, -1]).transpose(1, 2), offs)
}

/// NF4 weights stacked on the output dimension as the shim's nodes take them: bytes, fp32
/// block absmaxes, the byte table, and the stacked shape.
#[cfg(ftx_torch_shim)]
pub(super) struct Nf4Stack {
    pub(super) packed: Tensor,
    pub(super) absmax: Tensor,
    pub(super) table: Tensor,
    pub(super) rows: i64,
    pub(super) cols: i64,
}

#[cfg(ftx_torch_shim)]
impl Nf4Stack {
    /// `None` when a weight is not in whole 64-blocks or computes in another dtype than `kind`.
    pub(super) fn of(qs: &[&Nf4Weight], kind: tch::Kind) -> Option<Nf4Stack> {
        let whole_blocks = qs.iter().all(|q| (q.shape().0 * q.shape().1) % ftx_kernels::nf4::NF4_BLOCK as i64 == 0);
        if !whole_blocks || qs.iter().any(|q| q.compute_kind() != kind) {
            return None;
        }
        let stack = |f: &dyn Fn(&Nf4Weight) -> Tensor| match qs {
            [q] => f(q),
            _ => Tensor::cat(&qs.iter().map(|q| f(q)).collect::<Vec<_>>(), 0),
        };
        Some(Nf4Stack {
            packed: stack(&|q| q.packed.shallow_clone()),
            absmax: stack(&|q| q.absmax()),
            table: qs[0].pair_table().shallow_clone(),
            rows: qs.iter().map(|q| q.shape().0).sum(),
            cols: qs[0].shape().1,
        })
    }
}

/// DoRA's `(m / norm) ⊙ (x Wᵀ + s · xa Bᵀ)` (no bias) for a frozen base `w` (`[out, in]`;
/// when `nf4` is given, its dequantisation, used for the forward only) through the shim's node
/// (dora_linear.cpp): the scale goes into the GEMMs' weights, so nothing token-sized is
/// computed or kept besides the output, from which m's gradient comes. `None` where the node
/// does not apply (no shim, a trainable base, dtypes that differ): the caller then writes the
/// formula out in autograd ops.
#[allow(clippy::too_many_arguments)]
pub fn dora_linear(x: &Tensor, w: &Tensor, nf4: Option<&[&Nf4Weight]>, xa: &Tensor, b: &Tensor, m: &Tensor, norm: &Tensor, s: f64) -> Option<Tensor> {
    #[cfg(ftx_torch_shim)]
    {
        let kind = w.kind();
        if w.requires_grad() || [x, xa, b, m, norm].iter().any(|t| t.kind() != kind) {
            return None;
        }
        let stack = match nf4 {
            Some(qs) => Some(Nf4Stack::of(qs, kind)?),
            None => None,
        };
        Some(shim::dora_linear(x, w, stack.as_ref(), xa, b, m, norm, s))
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let _ = (x, w, nf4, xa, b, m, norm, s);
        None
    }
}

/// `h = silu(g) · u` for `gu = [g | u]` (the fused gate/up output), and with `a` also
/// `xa = h Aᵀ` (the down projection's LoRA A), as one autograd node that saves only `gu` (and
/// `a`). Its elementwise work each way is one fused kernel where `gpu::kernels` is active for
/// `gu` (CUDA), else libtorch's ops. Without the C++ shim (a libtorch without headers), plain
/// autograd ops.
pub fn swiglu(gu: &Tensor, a: Option<&Tensor>) -> (Tensor, Option<Tensor>) {
    #[cfg(ftx_torch_shim)]
    {
        shim::swiglu(gu, a, crate::gpu::kernels::active_for(gu))
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let half = gu.size().last().copied().expect("gu has a last dimension") / 2;
        let h = gu.narrow(-1, 0, half).silu() * gu.narrow(-1, half, half);
        let xa = a.map(|a| h.linear::<Tensor>(a, None));
        (h, xa)
    }
}

/// [`swiglu`] with its elementwise work through the fused kernels on any device where `gu`
/// fits them (float32 or bf16, whole 16-byte vectors): on the CPU, their reference versions —
/// what the tests hold to the libtorch path. Without the C++ shim, plain autograd ops.
pub fn swiglu_through_kernels(gu: &Tensor, a: Option<&Tensor>) -> (Tensor, Option<Tensor>) {
    #[cfg(ftx_torch_shim)]
    {
        shim::swiglu(gu, a, true)
    }
    #[cfg(not(ftx_torch_shim))]
    {
        swiglu(gu, a)
    }
}

/// Causal scaled-dot-product attention of `q [B, H, T, D]` over `k`, `v` `[B, KVH, T, D]`
/// (grouped when `H > KVH`), as `Tensor::scaled_dot_product_attention` computes it, but as one
/// autograd node (sliced_sdpa.cpp) whose backward runs over slices of `kv_per_slice` key/value
/// heads and their query heads: one slice's transient buffers at a time instead of every
/// head's (flash attention's fp32 dq accumulator and GQA-expanded dk/dv), for one more
/// attention forward pass in backward. Without the C++ shim, libtorch's SDPA as it is.
pub fn causal_sdpa_sliced_backward(q: &Tensor, k: &Tensor, v: &Tensor, scale: Option<f64>, kv_per_slice: i64) -> Tensor {
    #[cfg(ftx_torch_shim)]
    {
        shim::sliced_sdpa(q, k, v, scale, kv_per_slice)
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let _ = kv_per_slice;
        Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, scale, q.size()[1] != k.size()[1])
    }
}

#[cfg(ftx_torch_shim)]
mod shim {
    use std::ffi::{c_char, c_void, CStr};
    use tch::Tensor;

    extern "C" {
        fn ftx_nf4_linear(x: *const c_void, packed: *const c_void, absmax: *const c_void, table: *const c_void, rows: i64, cols: i64, y: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
        fn ftx_dora_linear(x: *const c_void, w: *const c_void, xa: *const c_void, b: *const c_void, m: *const c_void, norm: *const c_void, s: f64, packed: *const c_void, absmax: *const c_void, table: *const c_void, rows: i64, cols: i64, y: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
        fn ftx_nf4_grouped_linear(x: *const c_void, packed: *const c_void, absmax: *const c_void, table: *const c_void, offs: *const c_void, rows: i64, cols: i64, groups: i64, y: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
        fn ftx_swiglu(gu: *const c_void, a: *const c_void, kernels: i32, h: *mut *mut c_void, xa: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
        fn ftx_sliced_sdpa(q: *const c_void, k: *const c_void, v: *const c_void, scale: f64, has_scale: i32, kv_per_slice: i64, out: *mut *mut c_void, err: *mut c_char, err_len: i32) -> i32;
    }

    /// See [`super::causal_sdpa_sliced_backward`].
    pub fn sliced_sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: Option<f64>, kv_per_slice: i64) -> Tensor {
        let mut out: *mut c_void = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
        // SAFETY: as in `swiglu`: live tch tensors in, one new heap tensor out.
        let rc = unsafe {
            ftx_sliced_sdpa(ptr(q), ptr(k), ptr(v), scale.unwrap_or(0.0), scale.is_some() as i32, kv_per_slice, &mut out, err.as_mut_ptr(), err.len() as i32)
        };
        if rc != 0 {
            // Shapes come from the attention that also runs them through libtorch's SDPA; an
            // error here is a bug, as a failing tensor op panics in tch.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            panic!("sliced SDPA: {msg}");
        }
        unsafe { Tensor::from_ptr(out as *mut _) }
    }

    /// With `kernels`, through the fused kernels (the CPU reference versions for host tensors).
    pub fn swiglu(gu: &Tensor, a: Option<&Tensor>, kernels: bool) -> (Tensor, Option<Tensor>) {
        if kernels {
            crate::gpu::kernels::register();
        }
        let mut h: *mut c_void = std::ptr::null_mut();
        let mut xa: *mut c_void = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        let a_ptr = a.map_or(std::ptr::null(), |a| a.as_ptr() as *const c_void);
        // SAFETY: the pointers are live tch tensors (at::Tensor*); on success the shim hands
        // back new heap tensors that tch then owns and frees.
        let rc = unsafe { ftx_swiglu(gu.as_ptr() as *const c_void, a_ptr, kernels as i32, &mut h, &mut xa, err.as_mut_ptr(), err.len() as i32) };
        if rc != 0 {
            // libtorch errors here are shape or device bugs, as a failing tensor op panics in tch.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            panic!("swiglu: {msg}");
        }
        let h = unsafe { Tensor::from_ptr(h as *mut _) };
        let xa = (!xa.is_null()).then(|| unsafe { Tensor::from_ptr(xa as *mut _) });
        (h, xa)
    }

    /// See [`super::dora_linear`]; `nf4`: the weight's NF4 form, kept instead of `w`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dora_linear(x: &Tensor, w: &Tensor, nf4: Option<&super::Nf4Stack>, xa: &Tensor, b: &Tensor, m: &Tensor, norm: &Tensor, s: f64) -> Tensor {
        let mut y: *mut c_void = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
        let (packed, absmax, table, rows, cols) = match nf4 {
            Some(q) => (ptr(&q.packed), ptr(&q.absmax), ptr(&q.table), q.rows, q.cols),
            None => (std::ptr::null(), std::ptr::null(), std::ptr::null(), 0, 0),
        };
        // SAFETY: as in `swiglu`: live tch tensors (or null for no NF4 form) in, one new heap
        // tensor out.
        let rc = unsafe { ftx_dora_linear(ptr(x), ptr(w), ptr(xa), ptr(b), ptr(m), ptr(norm), s, packed, absmax, table, rows, cols, &mut y, err.as_mut_ptr(), err.len() as i32) };
        if rc != 0 {
            // Shapes are checked by the callers; an error here is a bug, as a failing tensor op
            // panics in tch.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            panic!("DoRA linear: {msg}");
        }
        unsafe { Tensor::from_ptr(y as *mut _) }
    }

    pub(super) fn nf4_grouped_linear(x: &Tensor, q: &super::Nf4Stack, offs: &Tensor, groups: i64) -> Tensor {
        let mut y: *mut c_void = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
        // SAFETY: as in `swiglu`: live tch tensors in, one new heap tensor out.
        let rc = unsafe { ftx_nf4_grouped_linear(ptr(x), ptr(&q.packed), ptr(&q.absmax), ptr(&q.table), ptr(offs), q.rows, q.cols, groups, &mut y, err.as_mut_ptr(), err.len() as i32) };
        if rc != 0 {
            // Shapes are checked by the caller; an error here is a bug, as a failing tensor op
            // panics in tch.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            panic!("NF4 grouped linear: {msg}");
        }
        unsafe { Tensor::from_ptr(y as *mut _) }
    }

    pub fn nf4_linear(x: &Tensor, packed: &Tensor, absmax: &Tensor, table: &Tensor, rows: i64, cols: i64) -> Tensor {
        let mut y: *mut c_void = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        let ptr = |t: &Tensor| t.as_ptr() as *const c_void;
        // SAFETY: as in `swiglu`: live tch tensors in, one new heap tensor out.
        let rc = unsafe { ftx_nf4_linear(ptr(x), ptr(packed), ptr(absmax), ptr(table), rows, cols, &mut y, err.as_mut_ptr(), err.len() as i32) };
        if rc != 0 {
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            panic!("NF4 linear: {msg}");
        }
        unsafe { Tensor::from_ptr(y as *mut _) }
    }
}
