//! One GEMM over groups of rows, each group with its own weight: what a mixture-of-experts
//! layer runs per projection once its (token, expert) assignments are sorted by expert, instead
//! of one small GEMM per expert.
//!
//! libtorch's `_grouped_mm` does the work (on CUDA sm90+ bf16 one CUTLASS grouped kernel; on
//! other GPUs, on the CPU and in fp32 libtorch's own per-group loop), with autograd for both
//! operands. It wants row strides of 16-byte multiples (and 16-byte aligned data on CUDA):
//! operands that are not laid out so are copied into padded buffers first. Where libtorch has
//! no `_grouped_mm` for the dtype or device, [`grouped_mm_loop`] computes the same per group.

use tch::{Device, Kind, Tensor};

/// `y[rows of group g] = x[rows of group g] · w[g]` for `x [N, in]` whose rows are sorted by
/// group, `w [G, in, out]` (any strides) and `offs` (int32 `[G]`, on `x`'s device) the
/// cumulative row ends of the groups (`offs[G-1] = N`; an empty group repeats the previous
/// end). Returns `[N, out]`; gradients flow to `x` and `w`.
pub fn grouped_mm(x: &Tensor, w: &Tensor, offs: &Tensor) -> Tensor {
    if supported(x, w) {
        // An output width off the 16-byte grid is padded and cut back, so that the output's
        // gradient, which backward hands to `_grouped_mm` again, has whole 16-byte rows too.
        let out = w.size()[2];
        let padded = round_up(out.max(1), alignment(w));
        let wa = if padded == out { aligned_weights(w) } else { w.constant_pad_nd([0, padded - out]) };
        match aligned_rows(x).f_internal_grouped_mm(&wa, Some(offs), None, None) {
            Ok(y) if padded == out => return y,
            Ok(y) => return y.narrow(1, 0, out),
            Err(e) => tracing::debug!("_grouped_mm refused {:?} x {:?} ({e}); per-group GEMMs instead", x.size(), w.size()),
        }
    }
    grouped_mm_loop(x, w, offs)
}

/// [`grouped_mm`] as one GEMM per non-empty group (the group ends read back to the host): for
/// dtypes and devices without `_grouped_mm`.
pub fn grouped_mm_loop(x: &Tensor, w: &Tensor, offs: &Tensor) -> Tensor {
    let ends = Vec::<i64>::try_from(offs.to_device(Device::Cpu).to_kind(Kind::Int64)).expect("group ends are integers");
    let mut pieces = Vec::with_capacity(ends.len());
    let mut start = 0;
    for (g, &end) in ends.iter().enumerate() {
        if end > start {
            pieces.push(x.narrow(0, start, end - start).matmul(&w.get(g as i64)));
        }
        start = end;
    }
    if pieces.is_empty() {
        // No rows (offs ends at N = 0): an empty product, still in the graph.
        return x.narrow(0, 0, 0).matmul(&w.get(0));
    }
    Tensor::cat(&pieces, 0)
}

/// Whether libtorch's `_grouped_mm` takes these operands: a float dtype it knows, the same for
/// both, on the CPU or CUDA.
fn supported(x: &Tensor, w: &Tensor) -> bool {
    let kind = x.kind();
    matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half)
        && w.kind() == kind
        && x.dim() == 2
        && w.dim() == 3
        && x.device() == w.device()
        && matches!(x.device(), Device::Cpu | Device::Cuda(_))
}

/// Elements per 16 bytes.
fn alignment(t: &Tensor) -> i64 {
    16 / t.kind().elt_size_in_bytes() as i64
}

/// Whether `t`'s data starts on a 16-byte boundary (what the CUDA kernel reads with; libtorch
/// does not check it on the CPU).
fn aligned_start(t: &Tensor) -> bool {
    !t.device().is_cuda() || (t.data_ptr() as usize).is_multiple_of(16)
}

/// `n` rounded up to a multiple of `to`.
fn round_up(n: i64, to: i64) -> i64 {
    (n + to - 1) / to * to
}

/// `x [N, K]` row-major with a row stride of whole 16 bytes: itself when it is, else a copy
/// into a buffer whose rows are padded to that (a view of its first `K` columns).
fn aligned_rows(x: &Tensor) -> Tensor {
    let (a, k) = (alignment(x), x.size()[1]);
    let st = x.stride();
    if st[1] == 1 && st[0] >= k.max(1) && st[0] % a == 0 && aligned_start(x) {
        return x.shallow_clone();
    }
    let padded = round_up(k.max(1), a);
    if padded == k { x.contiguous() } else { x.constant_pad_nd([0, padded - k]).narrow(1, 0, k) }
}

/// `w [G, K, N]` (`N` a whole number of 16 bytes) whose last two dimensions are row- or
/// column-major with a 16-byte multiple as the other stride: itself when it is, else a
/// row-major copy.
fn aligned_weights(w: &Tensor) -> Tensor {
    let a = alignment(w);
    let (s, st) = (w.size(), w.stride());
    let (k, n) = (s[1], s[2]);
    let row_major = st[2] == 1 && st[1] >= n.max(1) && st[1] % a == 0;
    let col_major = st[1] == 1 && st[2] >= k.max(1) && st[2] % a == 0;
    if (row_major || col_major) && aligned_start(w) {
        return w.shallow_clone();
    }
    w.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values (no draw from libtorch's global generator, which other tests share).
    fn values(shape: &[i64], phase: f64, kind: Kind) -> Tensor {
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.37 + phase).sin().reshape(shape).to_kind(kind)
    }

    /// The reference: one plain matmul per group, written out.
    fn per_group(x: &Tensor, w: &Tensor, ends: &[i64]) -> Tensor {
        let mut start = 0;
        let mut rows = Vec::new();
        for (g, &end) in ends.iter().enumerate() {
            for r in start..end {
                rows.push(x.get(r).unsqueeze(0).matmul(&w.get(g as i64)));
            }
            start = end;
        }
        Tensor::cat(&rows, 0)
    }

    /// Values and gradients (of `x` and `w`, through `Σ y ⊙ c` for a fixed `c`) of `f`.
    fn with_grads(f: impl Fn(&Tensor, &Tensor) -> Tensor, x: &Tensor, w: &Tensor) -> (Tensor, Tensor, Tensor) {
        let x = x.detach().set_requires_grad(true);
        let w = w.detach().set_requires_grad(true);
        let y = f(&x, &w);
        let c = values(&y.size(), 0.9, y.kind());
        (&y * &c).sum(y.kind()).backward();
        (y.detach(), x.grad(), w.grad())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
    }

    #[test]
    fn grouped_mm_matches_a_matmul_per_group_in_values_and_gradients_empty_groups_included() {
        // Groups 0, 2 and 5 are empty (the first and the last included); (in, out) = (8, 12)
        // is aligned for fp32, (5, 3) is not and goes through the padded copies.
        let ends = [0i64, 3, 3, 7, 11, 11];
        for (inp, out) in [(8, 12), (5, 3)] {
            let x = values(&[11, inp], 0.1, Kind::Float);
            let w = values(&[6, inp, out], 0.5, Kind::Float);
            let offs = Tensor::from_slice(&ends.map(|e| e as i32));
            // libtorch's own `_grouped_mm` takes fp32 on the CPU: CI runs that path, not the loop.
            if inp == 8 {
                assert!(x.f_internal_grouped_mm(&w, Some(&offs), None, None).is_ok());
            }
            let (y, gx, gw) = with_grads(|x, w| grouped_mm(x, w, &offs), &x, &w);
            let (y0, gx0, gw0) = with_grads(|x, w| per_group(x, w, &ends), &x, &w);
            assert_eq!(y.size(), [11, out]);
            for (what, a, b) in [("values", &y, &y0), ("x's gradient", &gx, &gx0), ("w's gradient", &gw, &gw0)] {
                assert!(max_diff(a, b) <= 1e-5, "({inp}, {out}): {what} off by {}", max_diff(a, b));
            }
            // Empty groups get a zero gradient, not whatever was in memory.
            for g in [0, 2, 5] {
                assert_eq!(gw.get(g).abs().max().double_value(&[]), 0.0, "group {g}");
            }
            // w laid out [G, out, in] and transposed (how the experts store theirs): no copy needed.
            let wt = w.transpose(1, 2).contiguous().transpose(1, 2);
            assert!(max_diff(&grouped_mm(&x, &wt, &offs), &y0) <= 1e-5);
            // The loop (dtypes without `_grouped_mm`) computes the same.
            let (yl, gxl, gwl) = with_grads(|x, w| grouped_mm_loop(x, w, &offs), &x, &w);
            for (what, a, b) in [("values", &yl, &y0), ("x's gradient", &gxl, &gx0), ("w's gradient", &gwl, &gw0)] {
                assert!(max_diff(a, b) <= 1e-5, "loop ({inp}, {out}): {what} off by {}", max_diff(a, b));
            }
        }
        // fp64 has no `_grouped_mm`: the loop answers.
        let x = values(&[11, 4], 0.1, Kind::Double);
        let w = values(&[6, 4, 2], 0.5, Kind::Double);
        let offs = Tensor::from_slice(&ends.map(|e| e as i32));
        assert!(max_diff(&grouped_mm(&x, &w, &offs), &per_group(&x, &w, &ends)) <= 1e-12);
        // No rows at all.
        let none = Tensor::from_slice(&[0i32, 0]);
        assert_eq!(grouped_mm(&values(&[0, 4], 0.0, Kind::Float), &values(&[2, 4, 8], 0.0, Kind::Float), &none).size(), [0, 8]);
    }
}
