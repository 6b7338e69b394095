//! Fused projections (q/k/v and gate/up as one GEMM each, their LoRA factors stacked, the
//! SwiGLU as one autograd node): the same loss and every gradient as each projection on its
//! own, for every family (llama, mistral, qwen2 with q/k/v biases, qwen3 with q/k norms,
//! gemma2, and Phi-4-mini's packed projections, where only the SwiGLU node switches) and
//! method (LoRA, DoRA, QLoRA, full fine-tuning), in fp32.

use crate::common::lora::{attach_with_random_b, lora_r4};
use crate::common::{fixture, max_diff, torch_rng_lock};
use ftx::data::{batch, TokenizedExample};
use ftx::model::decoder::LoadOptions;
use ftx::model::fused::fused_forward;
use ftx::model::nodes::nf4_linear;
use ftx::model::nf4::Nf4Weight;
use ftx::model::linear::Weight;
use ftx::model::CausalLm;
use ftx::train::optim::{AdamW, AdamWConfig};
use ftx::train::step::{forward_backward, Checkpointing, StepPos};
use tch::{Device, Kind, Tensor};

const FAMILIES: [&str; 6] = ["llama3", "mistral", "qwen2", "qwen3", "gemma2", "phi4mini"];

/// The fixture model of `family` (fp32) with its trainable tensors: every tensor for "full",
/// else adapters of `method` ([`lora_r4`], A seeded with 5, B random).
pub(crate) fn model(family: &str, method: &str) -> (CausalLm, Vec<(String, Tensor)>) {
    let mut model = CausalLm::load(&fixture(&format!("models/{family}")), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    if method == "full" {
        let named = model.named_tensors().into_iter().map(|(n, t)| (n, t.set_requires_grad(true))).collect();
        return (model, named);
    }
    let named = attach_with_random_b(&mut model, &lora_r4(method), 5);
    (model, named)
}

/// Three sequences (9, 6 and 11 tokens, every one a target), padded.
pub(crate) fn batch() -> ftx::data::Batch {
    let exs: Vec<TokenizedExample> = [9usize, 6, 11]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let ids: Vec<i64> = (0..n).map(|i| ((i * 31 + k * 97) % 440) as i64).collect();
            TokenizedExample { labels: ids.clone(), ids }
        })
        .collect();
    batch::pad(&exs.iter().collect::<Vec<_>>(), 0)
}

/// Loss and every trainable tensor's gradient of one forward/backward pass.
fn loss_and_grads(model: &CausalLm, named: &[(String, Tensor)], b: &ftx::data::Batch, mode: Checkpointing) -> (f64, Vec<Tensor>) {
    for (_, t) in named {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let loss = forward_backward(model, b, b.n_targets as f64, StepPos { seed: 0, step: 0, micro: 0 }, mode);
    (loss, named.iter().map(|(_, t)| t.grad().copy()).collect())
}

#[test]
fn fused_projections_give_the_loss_and_every_gradient_of_separate_ones() {
    let _rng = torch_rng_lock();
    let b = batch();
    for family in FAMILIES {
        for method in ["lora", "dora", "qlora", "full"] {
            let (mut model, named) = model(family, method);
            let layer = &model.layers[0];
            let x = Tensor::randn([2, 3, model.config.hidden], (Kind::Float, Device::Cpu));
            let (a, m) = (layer.attention(), layer.mlp().expect("a dense MLP"));
            // The test means something only if the fused path runs (packed projections are one
            // GEMM as stored).
            let packed = family.starts_with("phi");
            assert_eq!(a.split_qkv().is_none() && m.split_gate_up().is_none(), packed, "{family}: packed projections");
            if let (Some(qkv), Some(gu)) = (a.split_qkv(), m.split_gate_up()) {
                assert!(fused_forward(&qkv, &x, true).is_some(), "{family}/{method}: q/k/v fuse");
                assert!(fused_forward(&gu, &x, true).is_some(), "{family}/{method}: gate/up fuse");
            }
            for mode in [Checkpointing::Off, Checkpointing::Layers] {
                model.set_fused_projections(true);
                let (l_fused, g_fused) = loss_and_grads(&model, &named, &b, mode);
                model.set_fused_projections(false);
                let (l_sep, g_sep) = loss_and_grads(&model, &named, &b, mode);
                assert!((l_fused - l_sep).abs() <= 1e-5 * l_sep.abs(), "{family}/{method}/{mode:?}: loss {l_fused} vs {l_sep}");
                for (((n, _), gf), gs) in named.iter().zip(&g_fused).zip(&g_sep) {
                    assert!(gs.defined() && gf.defined(), "{family}/{method}: {n} has a gradient");
                    let scale = gs.abs().max().double_value(&[]).max(1e-3);
                    let d = max_diff(gf, gs);
                    assert!(d <= 1e-5 * scale, "{family}/{method}/{mode:?}: gradient of {n} differs by {d} (max {scale})");
                }
            }
        }
    }
}

#[test]
fn loaded_projections_share_one_stacked_weight() {
    // The loader stacks q/k/v and gate/up so the fused GEMM reads them without a copy.
    for family in FAMILIES {
        let model = CausalLm::load(&fixture(&format!("models/{family}")), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
        let dense = |w: &Weight| match w {
            Weight::Dense(t) => t.shallow_clone(),
            Weight::Nf4(_) | Weight::Fp8(_) => panic!("dense at load"),
        };
        if family.starts_with("phi") {
            continue; // stored packed: one weight each already
        }
        for l in &model.layers {
            let [q, k, v] = l.attention().split_qkv().expect("split q/k/v").map(|p| dense(&p.base.weight));
            assert_eq!(k.data_ptr() as usize, q.data_ptr() as usize + 4 * q.numel(), "{family}: k follows q");
            assert_eq!(v.data_ptr() as usize, k.data_ptr() as usize + 4 * k.numel(), "{family}: v follows k");
            let [g, u] = l.mlp().expect("a dense MLP").split_gate_up().expect("split gate/up").map(|p| dense(&p.base.weight));
            assert_eq!(u.data_ptr() as usize, g.data_ptr() as usize + 4 * g.numel(), "{family}: up follows gate");
        }
    }
}

#[test]
fn fused_adamw_equals_the_update_written_out() {
    // Tensors of one dtype share flat buffers, updated by libtorch's fused AdamW kernel; a
    // second dtype among the parameters keeps them per tensor, on the op-by-op update (torch's
    // single-tensor AdamW). Same bf16 weights, gradients, clipping scale and decay.
    let _rng = torch_rng_lock();
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    tch::manual_seed(0);
    let w0 = Tensor::randn([64, 48], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let (fused_w, plain_w) = (w0.copy().set_requires_grad(true), w0.copy().set_requires_grad(true));
    let other_dtype = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut fused = AdamW::new(vec![("w".into(), fused_w.shallow_clone())], cfg);
    let mut plain = AdamW::new(vec![("w".into(), plain_w.shallow_clone()), ("other".into(), other_dtype)], cfg);
    for _ in 0..3 {
        let g = Tensor::randn([64, 48], (Kind::Float, Device::Cpu));
        for w in [&fused_w, &plain_w] {
            (w.to_kind(Kind::Float) * &g).sum(Kind::Float).backward();
        }
        fused.step(1e-2, 0.5);
        plain.step(1e-2, 0.5);
        fused.zero_grad();
        plain.zero_grad();
    }
    let (f, p) = (fused.params[0].value(), plain.params[0].value());
    let moved = max_diff(p, &w0);
    assert!(moved > 1e-2, "the updates moved the weights ({moved})");
    let d = max_diff(f, p);
    assert!(d < 1e-6, "fused and written-out AdamW differ by {d}");
    assert_eq!(max_diff(&fused_w, &f.to_kind(Kind::BFloat16)), 0.0, "the bf16 weights are their masters rounded");
}

#[test]
fn nf4_linear_node_equals_autograd_through_the_dequantised_weight() {
    // The node keeps only the NF4 bytes and dequantises again in backward; its output and input
    // gradient must be those of the plain GEMM on the dequantised weight, for one weight and for
    // two stacked (a fused group).
    let _rng = torch_rng_lock();
    tch::manual_seed(11);
    let opts = (Kind::Float, Device::Cpu);
    let q1 = Nf4Weight::quantize(&(Tensor::randn([96, 128], opts) * 0.02), Kind::Float);
    let q2 = Nf4Weight::quantize(&(Tensor::randn([32, 128], opts) * 0.02), Kind::Float);
    let x0 = Tensor::randn([2, 5, 128], opts);
    for qs in [vec![&q1], vec![&q1, &q2]] {
        let rows: i64 = qs.iter().map(|q| q.shape().0).sum();
        let bias = Tensor::randn([rows], opts);
        let g = Tensor::randn([2, 5, rows], opts);
        let x = x0.copy().set_requires_grad(true);
        let y = nf4_linear(&x, &qs, Some(&bias));
        (&y * &g).sum(Kind::Float).backward();
        let dense = Tensor::cat(&qs.iter().map(|q| q.dequantize()).collect::<Vec<_>>(), 0);
        let x_ref = x0.copy().set_requires_grad(true);
        let y_ref = x_ref.linear(&dense, Some(&bias));
        (&y_ref * &g).sum(Kind::Float).backward();
        assert!(max_diff(&y, &y_ref) < 1e-6, "{} weight(s): output differs by {}", qs.len(), max_diff(&y, &y_ref));
        let (dx, dx_ref) = (x.grad(), x_ref.grad());
        assert!(dx_ref.abs().max().double_value(&[]) > 0.1, "a gradient worth comparing");
        assert!(max_diff(&dx, &dx_ref) < 1e-6, "{} weight(s): input gradient differs by {}", qs.len(), max_diff(&dx, &dx_ref));
    }
}

#[test]
fn nf4_dequantises_straight_into_bf16_as_the_fp32_values_rounded() {
    // The product with the block scale is computed in fp32 and rounded once, on the store.
    let _rng = torch_rng_lock();
    tch::manual_seed(12);
    let w = Tensor::randn([64, 192], (Kind::Float, Device::Cpu)) * 0.02;
    let (q32, q16) = (Nf4Weight::quantize(&w, Kind::Float), Nf4Weight::quantize(&w, Kind::BFloat16));
    let (d32, d16) = (q32.dequantize(), q16.dequantize());
    assert_eq!(d16.kind(), Kind::BFloat16);
    assert_eq!(max_diff(&d16, &d32.to_kind(Kind::BFloat16)), 0.0, "bf16 dequantisation is the fp32 one rounded");
    let rel = (&d32 - &w).norm().double_value(&[]) / w.norm().double_value(&[]);
    assert!(rel < 0.2, "NF4 is near the weight (relative error {rel})");
}
