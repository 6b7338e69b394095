//! The FP8 frozen base (`method.fp8`, `--fp8`): weights quantised per row as computed by hand;
//! the LoRA block nodes over FP8 codes against the formula written out here (the input and
//! the output gradient quantised per row, the weight's row scales carried into the gradient),
//! in fp32 on the CPU — the same codes and scales the CUDA FP8 GEMM multiplies; a training step
//! and a whole `ftx train` run close to the dense base's; the planner's bytes by hand; clear
//! refusals.

use crate::common::lora::{attach_with_random_b, lora_r4};
use crate::common::{fixture, max_diff, metric_series, torch_rng_lock};
use crate::engine::write_chat_data;
use crate::mlp_recompute::train_config;
use ftx::model::decoder::LoadOptions;
use ftx::model::fp8::{quantize_rows, Fp8Weight};
use ftx::model::linear::{Linear, Weight};
use ftx::model::lora_block::projections;
use ftx::model::CausalLm;
use ftx::plan::{fp8_base_bytes, plan, Method, ModelShape, PlanRequest};
use ftx::train::step::{forward_backward, Checkpointing, StepPos};
use ftx::train::TrainConfig;
use tch::{Device, Kind, Tensor};

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

#[test]
fn fp8_weights_are_quantised_per_row_as_computed_by_hand() {
    // Row 0: amax 3 → ×448/3: 149.33 → 144 (e4m3 steps by 16 in [128, 256)), −74.67 → −72
    // (steps of 8 in [64, 128)), 3 → 448; scale 3/448. Row 1: amax 448 → ×1: 0.001 rounds up to
    // the smallest subnormal 2⁻⁹, −0.0009 (under half of it) to −0, 17 → 16 (a tie between 16
    // and 18 goes to the even mantissa). Row 2: zeros, scale 1.
    let w = Tensor::from_slice(&[1.0f32, -0.5, 0.0, 3.0, 448.0, 0.001, -0.0009, 17.0, 0.0, 0.0, 0.0, 0.0]).view([3, 4]);
    let q = Fp8Weight::quantize(&w, Kind::Float);
    assert_eq!(q.codes.kind(), Kind::Float8e4m3fn);
    assert_eq!(values(&q.codes), vec![144.0, -72.0, 0.0, 448.0, 448.0, 0.001953125, 0.0, 16.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(values(&q.scale), vec![3.0 / 448.0, 1.0, 1.0]);
    let back = values(&q.dequantize());
    let want = [144.0 * 3.0 / 448.0, -72.0 * 3.0 / 448.0, 0.0, 3.0, 448.0, 0.001953125, 0.0, 16.0];
    for (got, want) in back.iter().zip(want) {
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{back:?}");
    }
}

/// The fixture's layer-0 projections after attaching LoRA (random B) on an FP8 base.
fn fp8_model() -> (CausalLm, Vec<(String, Tensor)>) {
    let mut model = CausalLm::load(&fixture("models/llama3"), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let named = attach_with_random_b(&mut model, &lora_r4("fp8"), 7);
    (model, named)
}

/// `got` within 1e-5 of `want`, relative to `want`'s largest entry.
fn close(got: &Tensor, want: &Tensor, what: &str) {
    let scale = want.abs().max().double_value(&[]).max(1e-6);
    let d = max_diff(got, want);
    assert!(d <= 1e-5 * scale, "{what}: differs by {d} (max {scale})");
}

/// `deq(quantize_rows(v))`: what the FP8 GEMM sees of `v`.
fn seen(v: &Tensor) -> Tensor {
    let (q, s) = quantize_rows(v);
    q.to_kind(Kind::Float) * s.unsqueeze(1)
}

#[test]
fn the_fp8_lora_node_gives_its_formula_in_fp32() {
    let _rng = torch_rng_lock();
    let (model, _named) = fp8_model();
    let layer = &model.layers[0];
    let mlp = layer.mlp().unwrap();
    let lins: Vec<&Linear> = mlp.linears().into_iter().map(|(_, l)| l).collect();
    // gate/up (one group of two) and down, each through the LoRA linear node.
    for members in [vec![lins[0], lins[1]], vec![lins[2]]] {
        let fp8: Vec<&Fp8Weight> = members
            .iter()
            .map(|l| match &l.base.weight {
                Weight::Fp8(q) => q,
                _ => panic!("the projection's base is FP8"),
            })
            .collect();
        let width = fp8[0].shape().1;
        let x = (Tensor::randn([2, 5, width], (Kind::Float, Device::Cpu)) * 3.0).set_requires_grad(true);
        let y = projections(&members, &x, true).expect("the LoRA node runs on an FP8 base");
        let g = Tensor::randn(y.size(), (Kind::Float, Device::Cpu));
        (&y * &g).sum(Kind::Float).backward();

        // The formula: y = deq(q(x))·(codes·s_w)ᵀ + s·(x·Aᵀ)·Bᵀ; dx = deq(q(g·s_w))·codes + s·g·B·A.
        let codes = Tensor::cat(&fp8.iter().map(|w| w.codes.to_kind(Kind::Float)).collect::<Vec<_>>(), 0);
        let s_w = Tensor::cat(&fp8.iter().map(|w| w.scale.shallow_clone()).collect::<Vec<_>>(), 0);
        let x2 = x.detach().view([-1, width]);
        let g2 = g.view([-1, codes.size()[0]]);
        let (mut want_y, mut want_dx) = (seen(&x2).mm(&(&codes * s_w.unsqueeze(1)).tr()), seen(&(&g2 * s_w.unsqueeze(0))).mm(&codes));
        let mut offset = 0;
        for l in &members {
            let lr = l.adapter.as_ref().unwrap().low_rank().unwrap();
            let (a, b, s) = (lr.a.detach(), lr.b.detach(), lr.scaling);
            let rows = b.size()[0];
            let gm = g2.narrow(1, offset, rows);
            let xa = x2.mm(&a.tr());
            let lora_y = xa.mm(&b.tr()) * s;
            want_y = Tensor::cat(&[want_y.narrow(1, 0, offset), want_y.narrow(1, offset, rows) + lora_y, want_y.narrow(1, offset + rows, want_y.size()[1] - offset - rows)], 1);
            let dxa = gm.mm(&b) * s;
            want_dx = want_dx + dxa.mm(&a);
            close(&lr.a.grad(), &dxa.tr().mm(&x2), "A's gradient");
            close(&lr.b.grad(), &(gm.tr().mm(&xa) * s), "B's gradient");
            offset += rows;
        }
        close(&y.detach().view([-1, codes.size()[0]]), &want_y, "forward");
        close(&x.grad().view([-1, width]), &want_dx, "input gradient");
        // The comparison tells quantised operands from plain ones: e4m3 moves x by far more than
        // the tolerance.
        assert!(max_diff(&seen(&x2), &x2) > 1e-3 * x2.abs().max().double_value(&[]));
    }
}

#[test]
fn a_dora_step_on_an_fp8_base_is_close_to_the_dense_one() {
    // DoRA's nodes dequantise the FP8 base (its row norms need the weight); the magnitude
    // starts at the dequantised rows' norms, so the step differs from the dense one only by
    // the quantisation.
    let _rng = torch_rng_lock();
    let b = crate::fused::batch();
    let step = |fp8: bool| {
        let mut model = CausalLm::load(&fixture("models/llama3"), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
        let s = ftx::peft::LoraSettings { quantize_fp8: fp8, ..lora_r4("dora") };
        let named = attach_with_random_b(&mut model, &s, 9);
        let loss = forward_backward(&model, &b, b.n_targets as f64, StepPos { seed: 1, step: 1, micro: 0 }, Checkpointing::Off);
        let grad_norm: f64 = named.iter().map(|(_, t)| t.grad().norm().double_value(&[]).powi(2)).sum::<f64>().sqrt();
        (loss, grad_norm)
    };
    let ((l8, g8), (l, g)) = (step(true), step(false));
    // e4m3 rounds each weight by up to 2⁻⁴ of itself: the tiny model's loss moves by about 1%.
    assert!((l8 - l).abs() <= 0.03 * l && l8 != l, "loss {l8} on the FP8 base, {l} on the dense one");
    assert!((g8 - g).abs() <= 0.05 * g, "gradient norm {g8} on the FP8 base, {g} on the dense one");
}

#[test]
fn ftx_train_with_fp8_follows_the_dense_loss_curve_recomputes_exactly_and_saves_a_peft_adapter() {
    let _rng = torch_rng_lock();
    let run = |fp8: bool, recompute: bool| {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("ftx.toml");
        std::fs::write(&cfg_path, train_config(dir.path(), "").to_toml()).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ftx"));
        cmd.args(["train", "--config"]).arg(&cfg_path);
        if fp8 {
            cmd.arg("--fp8");
        }
        if recompute {
            cmd.args(["--recompute", "mlp"]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "ftx train (fp8 {fp8}) failed: {}", String::from_utf8_lossy(&out.stderr));
        let written = std::fs::read_to_string(dir.path().join("out/config.toml")).unwrap();
        assert_eq!(written.contains("fp8 = true"), fp8, "the resolved config records the option:\n{written}");
        // The adapter is PEFT's, whatever the base was stored in.
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/final/adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["r"], 4);
        (metric_series(&dir.path().join("out"), "loss"), dir)
    };
    let ((fp8, _d1), (dense, _d2)) = (run(true, false), run(false, false));
    assert_eq!(fp8.len(), 4);
    assert_eq!(fp8.len(), dense.len());
    let mut moved = false;
    for ((step, a), (_, b)) in fp8.iter().zip(&dense) {
        // e4m3 keeps 3 mantissa bits: per-row quantisation moves the loss by well under 2%.
        assert!((a - b).abs() <= 0.02 * b.abs(), "step {step}: loss {a} on the FP8 base, {b} on the dense one");
        moved |= a != b;
    }
    assert!(moved, "the FP8 run computed in FP8 (its losses differ from the dense run's)");
    // With selective MLP recompute the node quantises gate/up's input again in backward: the
    // same codes, so the same curve.
    let (recomputed, _d3) = run(true, true);
    for ((step, a), (_, b)) in recomputed.iter().zip(&fp8) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "step {step}: loss {a} with --recompute mlp, {b} without");
    }
}

#[test]
fn fp8_is_refused_where_there_is_no_frozen_base_to_store() {
    for (kind, says) in [("qlora", "NF4"), ("full", "full fine-tuning")] {
        let dir = tempfile::tempdir().unwrap();
        let data = write_chat_data(dir.path(), 4);
        let text = format!("[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n[method]\nkind = \"{kind}\"\nfp8 = true\n", fixture("models/llama3").display(), data.display());
        let err = TrainConfig::parse(&text, &[]).err().unwrap_or_else(|| panic!("{kind}: fp8 accepted"));
        assert!(err.contains("method.fp8") && err.contains(says), "{kind}: {err}");
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ftx")).args(["bench", "train", "--shape", "tiny", "--method", "qlora", "--fp8", "--device", "cpu"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--fp8"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_planner_counts_one_byte_a_weight_and_a_scale_a_row_for_fp8() {
    // llama-3.2-1b: per layer q, o 2048×2048, k, v 2048×512, gate, up, down 2048×8192:
    // weights 2·4,194,304 + 2·1,048,576 + 3·16,777,216 = 60,817,408; output rows
    // 2048 + 512 + 512 + 2048 + 8192 + 8192 + 2048 = 23,552 → 4 bytes each. ×16 layers; the
    // rest (tied embedding 262,668,288 and the norms 16·4096 + 2048) stays bf16.
    let shape = ModelShape::named("llama-3.2-1b").unwrap();
    let layer = 60_817_408 + 4 * 23_552;
    let rest = 262_668_288 + 16 * 4096 + 2048;
    assert_eq!(fp8_base_bytes(&shape), 16 * layer + 2 * rest);
    let mut req = PlanRequest::new(shape, Method::Lora);
    let dense = plan(&req).weights;
    req.fp8_base = true;
    let fp8 = plan(&req);
    assert_eq!(dense - fp8.weights, 16 * (60_817_408 - 4 * 23_552));
    assert!(fp8.to_string().contains("lora r=16 on an FP8 base"), "{fp8}");
}
