//! Cross-entropy of the LM head without materialising the full-vocabulary logits.
//!
//! The logits of a 128k-token vocabulary dominate a small model's activation memory (at
//! batch 8 × seq 2048 they are 8 GiB in fp32, plus their bf16 copy and gradient). Here the
//! rows that carry a target are taken in chunks; each chunk's logits are made, turned into
//! its loss and its gradient `(softmax − onehot) / denom`, pushed through the head weight,
//! and dropped. Autograd then receives the gradient of the hidden state through the
//! surrogate `sum(h · g)` (and `sum(W · g_W)` when the head trains), whose gradient is
//! exactly the one the full computation would give.
//!
//! On CUDA (with the fused kernels on, `train.fused_kernels`) each chunk's loss and gradient
//! come from one kernel ([`crate::gpu::cross_entropy`]) that writes the gradient over the
//! chunk's logits; elsewhere libtorch's composite ops compute the same values.

use crate::gpu::cross_entropy::{self, CeGradient};
use crate::model::CausalLm;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Kind, Reduction, Tensor};

/// Logit elements (rows × vocabulary) per chunk: 64 Mi, a 256 MiB fp32 block (≈ 520 rows of a
/// 128k vocabulary: still a full-speed GEMM).
pub const CHUNK_ELEMS: i64 = 1 << 26;

/// Summed cross-entropy (fp32 softmax, as transformers computes it) of the head on
/// `hidden [B, T, H]` (the last layer's output, before the final norm) against `targets
/// [B, T]` (-100 = no target). With `backward`, the gradient of `loss / denom` is
/// accumulated into every tensor that requires it. Returns the summed loss.
pub fn head_ce(model: &CausalLm, hidden: &Tensor, targets: &Tensor, denom: f64, backward: bool) -> f64 {
    head_ce_chunked(model, hidden, targets, denom, backward, CHUNK_ELEMS)
}

/// [`head_ce`] with chunks of at most `chunk_elems` logits (4× that when the head weight
/// trains), at least one row each.
pub fn head_ce_chunked(model: &CausalLm, hidden: &Tensor, targets: &Tensor, denom: f64, backward: bool, chunk_elems: i64) -> f64 {
    head_ce_inner(model, hidden, targets, denom, backward, chunk_elems, None)
}

/// [`head_ce`] with backward, `extra` (a scalar already scaled as the step wants it, e.g. the
/// router's load-balancing loss) back-propagated in the same pass. Returns the summed
/// cross-entropy, `extra` not included.
pub fn head_ce_plus(model: &CausalLm, hidden: &Tensor, targets: &Tensor, denom: f64, extra: &Tensor) -> f64 {
    head_ce_inner(model, hidden, targets, denom, true, CHUNK_ELEMS, Some(extra))
}

fn head_ce_inner(model: &CausalLm, hidden: &Tensor, targets: &Tensor, denom: f64, backward: bool, chunk_elems: i64, extra: Option<&Tensor>) -> f64 {
    let _ledger = crate::gpu::ledger::scope("ftx::head_loss");
    let plus = |t: Tensor| match extra {
        Some(e) => t + e,
        None => t,
    };
    let weight = match &model.lm_head {
        None => model.embed_tokens.shallow_clone(),
        // A head with an adapter trains through autograd like any other layer.
        Some(head) if head.adapter.is_some() && head.adapter_enabled => {
            let loss = ce_sum(&model.head(hidden), targets);
            if backward {
                plus(&loss / denom).backward();
            }
            return loss.double_value(&[]);
        }
        Some(head) => head.base.dense_weight(),
    };
    let cap = model.config.final_logit_softcap;
    let h = model.norm.forward(hidden);
    let width = h.size()[2];
    let flat = h.view([-1, width]);
    let rows = targets.view([-1]).ne(-100).nonzero().squeeze_dim(1);
    if rows.numel() == 0 {
        // Nothing to score; still give every input a (zero) gradient, as the full loss would.
        if backward && hidden.requires_grad() {
            plus(hidden.sum(Kind::Float) * 0.0).backward();
        }
        return 0.0;
    }
    let picked = flat.index_select(0, &rows);
    let picked_targets = targets.view([-1]).index_select(0, &rows);
    let vocab = weight.size()[0];
    let weight_trains = backward && weight.requires_grad();
    // A training head weight takes a full-size fp32 gradient update per chunk: fewer, larger
    // chunks there.
    let chunk_elems = if weight_trains { chunk_elems * 4 } else { chunk_elems };
    let chunk = (chunk_elems / vocab).max(1);
    let (loss, grad_h, grad_w) = tch::no_grad(|| {
        let w = weight.detach();
        let x = picked.detach();
        let mut loss = Tensor::zeros([], (Kind::Float, x.device()));
        let mut grad_h = if backward { Some(x.zeros_like()) } else { None };
        let mut grad_w = if weight_trains { Some(w.zeros_like().to_kind(Kind::Float)) } else { None };
        let n = x.size()[0];
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let xc = x.narrow(0, start, len);
            let tc = picked_targets.narrow(0, start, len);
            let z = xc.matmul(&w.tr());
            // One kernel where it fits: the fp32 loss per row and the gradient, written over
            // the logits. It fails only before it writes anything (arguments, launch), so the
            // composite can still take the chunk.
            let fused = cross_entropy::fits(&z).then(|| {
                let gradient = if backward { CeGradient::InPlace } else { CeGradient::None };
                cross_entropy::cross_entropy(&z, &tc, cap, 1.0, gradient).inspect_err(|e| {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!("fused cross-entropy kernel failed, using libtorch's ops instead: {e}");
                    }
                })
            });
            let g = match fused {
                Some(Ok(row_loss)) => {
                    let _ = loss.g_add_(&row_loss.sum(Kind::Float));
                    backward.then_some(z)
                }
                _ => composite_chunk(z, &tc.unsqueeze(1), cap, backward, &mut loss),
            };
            if let (Some(gh), Some(g)) = (grad_h.as_mut(), g) {
                gh.narrow(0, start, len).copy_(&(g.matmul(&w) / denom));
                if let Some(gw) = grad_w.as_mut() {
                    let _ = gw.g_add_(&(g.tr().matmul(&xc).to_kind(Kind::Float) / denom));
                }
            }
            start += len;
        }
        (loss, grad_h, grad_w)
    });
    if let Some(gh) = grad_h {
        let mut surrogate = plus((&picked * gh).sum(Kind::Float));
        if let Some(gw) = grad_w {
            surrogate += (&weight * gw.to_kind(weight.kind())).sum(Kind::Float);
        }
        if surrogate.requires_grad() {
            surrogate.backward();
        }
    }
    loss.double_value(&[])
}

/// One chunk's loss (added to `loss`) and, with `backward`, its gradient `softmax − onehot` in
/// the logits' type, through libtorch's ops: one pass from the logits `z` to fp32
/// log-probabilities (as transformers upcasts the logits), one more to the gradient.
/// Soft-capped logits (Gemma 2: z' = c·tanh(z/c)) scale that gradient by dz'/dz = 1 − tanh².
pub(crate) fn composite_chunk(z: Tensor, tc: &Tensor, cap: Option<f64>, backward: bool, loss: &mut Tensor) -> Option<Tensor> {
    let (len, vocab, kind) = (z.size()[0], z.size()[1], z.kind());
    let (logits, cap_slope) = match cap {
        Some(c) => {
            let t = (z / c).tanh();
            (&t * c, Some(-(&t * &t) + 1.0))
        }
        None => (z, None),
    };
    let device = logits.device();
    let logp = logits.log_softmax(1, Kind::Float);
    drop(logits);
    let target_logp = logp.gather(1, tc, false);
    let _ = loss.g_sub_(&target_logp.sum(Kind::Float));
    if !backward {
        return None;
    }
    // d loss / d logits = softmax − onehot; the target entries made in fp32.
    let g = Tensor::empty([len, vocab], (kind, device));
    let _ = logp.exp_out(&g);
    drop(logp);
    let _ = g.shallow_clone().scatter_(1, tc, &(target_logp.exp() - 1.0).to_kind(kind));
    Some(match &cap_slope {
        Some(slope) => g * slope,
        None => g,
    })
}

/// Summed cross-entropy (fp32) of `logits [B, T, V]` against `targets [B, T]`.
pub fn ce_sum(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = logits.size()[2];
    logits.to_kind(Kind::Float).view([-1, v]).cross_entropy_loss::<Tensor>(&targets.view([-1]), None, Reduction::Sum, -100, 0.0)
}
