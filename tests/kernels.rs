//! The fused kernels (ftx-kernels: RMSNorm with the residual add, RoPE, SwiGLU) on the CPU:
//! their reference versions, run through the same C++ autograd nodes and kernel table the CUDA
//! versions run through, against libtorch's composite ops and autograd — fp32 to 1e-5, bf16 to
//! 2⁻⁵ of the largest magnitude (libtorch rounds its intermediates to bf16, the kernels once) —
//! and the model with the kernels wired in against the model without, every family and method.
//! The CUDA versions are held to these references by `ftx bench kernels` on a GPU.

use crate::common::torch_rng_lock;
use ftx::gpu::kernels;
use ftx::model::attention::{apply_rope, Rope};
use ftx::model::nodes::{swiglu, swiglu_through_kernels};
use ftx::model::RopeScaling;
use ftx::recipes::bench_kernels::normalised_error;
use tch::{Device, Kind, Tensor};

const KINDS: [(Kind, f64); 2] = [(Kind::Float, 1e-5), (Kind::BFloat16, 1.0 / 32.0)];

fn leaf(shape: &[i64], kind: Kind, scale: f64, shift: f64) -> Tensor {
    (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * scale + shift).to_kind(kind).set_requires_grad(true)
}

/// Σ outᵢ · cotᵢ back-propagated; the leaves' gradients.
fn grads(outs: &[Tensor], cots: &[Tensor], leaves: &[&Tensor]) -> Vec<Tensor> {
    outs.iter().zip(cots).map(|(o, c)| (o.to_kind(Kind::Float) * c).sum(Kind::Float)).reduce(|a, b| a + b).unwrap().backward();
    leaves.iter().map(|l| l.grad()).collect()
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let e = normalised_error(a, b);
    assert!(e <= tol, "{what}: normalised error {e:.3e} over {tol:.1e}");
}

fn cots(shapes: &[Vec<i64>]) -> Vec<Tensor> {
    shapes.iter().map(|s| Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu))).collect()
}

#[test]
fn rms_norm_with_the_residual_add_equals_libtorch_and_autograd() {
    let _g = torch_rng_lock();
    tch::manual_seed(11);
    for (kind, tol) in KINDS {
        let (shape, n) = (vec![3i64, 5, 64], 64);
        let c = cots(&[shape.clone(), shape.clone()]);
        let (x, r, w) = (leaf(&shape, kind, 1.0, 0.0), leaf(&shape, kind, 1.0, 0.0), leaf(&[n], kind, 0.1, 1.0));
        let (sum, y) = kernels::rms_norm(&x, Some(&r), &w, 1e-5, 0.0);
        let sum = sum.expect("the sum is returned with a residual");
        let fused = grads(&[sum.shallow_clone(), y.shallow_clone()], &c, &[&x, &r, &w]);
        let (x2, r2, w2) = (x.detach().set_requires_grad(true), r.detach().set_requires_grad(true), w.detach().set_requires_grad(true));
        let sum2 = &x2 + &r2;
        let y2 = sum2.rms_norm([n].as_slice(), Some(&w2), 1e-5);
        let reference = grads(&[sum2.shallow_clone(), y2.shallow_clone()], &c, &[&x2, &r2, &w2]);
        assert_close(&format!("{kind:?} sum"), &sum, &sum2, tol);
        assert_close(&format!("{kind:?} y"), &y, &y2, tol);
        for (name, (a, b)) in ["dx", "dr", "dw"].iter().zip(fused.iter().zip(&reference)) {
            assert_close(&format!("{kind:?} {name}"), a, b, tol);
        }
    }
}

#[test]
fn rms_norm_of_one_plus_w_without_residual_equals_gemmas_fp32_formula_and_its_gradients() {
    let _g = torch_rng_lock();
    tch::manual_seed(12);
    for (kind, tol) in KINDS {
        let (shape, n) = (vec![4i64, 7, 32], 32);
        let c = cots(&[shape.clone()]);
        let (x, w) = (leaf(&shape, kind, 2.0, 0.5), leaf(&[n], kind, 0.2, 0.0));
        let (none, y) = kernels::rms_norm(&x, None, &w, 1e-6, 1.0);
        assert!(none.is_none());
        let fused = grads(&[y.shallow_clone()], &c, &[&x, &w]);
        let (x2, w2) = (x.detach().set_requires_grad(true), w.detach().set_requires_grad(true));
        let y2 = x2.to_kind(Kind::Float).rms_norm([n].as_slice(), Some(&(w2.to_kind(Kind::Float) + 1.0)), 1e-6).to_kind(kind);
        let reference = grads(&[y2.shallow_clone()], &c, &[&x2, &w2]);
        assert_close(&format!("{kind:?} y"), &y, &y2, tol);
        assert_close(&format!("{kind:?} dx"), &fused[0], &reference[0], tol);
        assert_close(&format!("{kind:?} dw"), &fused[1], &reference[1], tol);
    }
}

#[test]
fn rope_of_strided_q_and_k_equals_the_composite_with_full_and_partial_rotary() {
    let _g = torch_rng_lock();
    tch::manual_seed(13);
    let (b, t, heads, kv, hd) = (2i64, 6, 4, 2, 16);
    for (kind, tol) in KINDS {
        for rot in [hd, hd / 2] {
            // q and k as the model has them: views of one fused q/k/v output (strided rows).
            let y = leaf(&[b, t, (heads + 2 * kv) * hd], kind, 1.0, 0.0);
            let positions = Tensor::arange_start(3, 3 + t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], false);
            let (cos, sin) = Rope::new(rot, 10_000.0, &RopeScaling::None, Device::Cpu).cos_sin(&positions, kind);
            let c = cots(&[vec![b, t, heads, hd], vec![b, t, kv, hd]]);
            let split = |y: &Tensor| (y.narrow(-1, 0, heads * hd).view([b, t, heads, hd]), y.narrow(-1, heads * hd, kv * hd).view([b, t, kv, hd]));
            let (q, k) = split(&y);
            let (qr, kr) = kernels::rope(&q, &k, &cos.squeeze_dim(1), &sin.squeeze_dim(1));
            assert_eq!(qr.size(), [b, t, heads, hd]);
            let fused = grads(&[qr.shallow_clone(), kr.shallow_clone()], &c, &[&y]);
            let y2 = y.detach().set_requires_grad(true);
            let (q2, k2) = split(&y2);
            // The first `rot` dimensions rotate, the rest pass through.
            let composite = |x: &Tensor| {
                let turned = apply_rope(&x.narrow(3, 0, rot).transpose(1, 2), &cos, &sin).transpose(1, 2);
                Tensor::cat(&[turned, x.narrow(3, rot, hd - rot)], 3)
            };
            let (qc, kc) = (composite(&q2), composite(&k2));
            let reference = grads(&[qc.shallow_clone(), kc.shallow_clone()], &c, &[&y2]);
            let what = format!("{kind:?} rot {rot}");
            assert_close(&format!("{what} q"), &qr, &qc, tol);
            assert_close(&format!("{what} k"), &kr, &kc, tol);
            assert_close(&format!("{what} dy"), &fused[0], &reference[0], tol);
        }
    }
}

#[test]
fn swiglu_through_the_kernels_equals_the_libtorch_node_with_and_without_lora_a() {
    let _g = torch_rng_lock();
    tch::manual_seed(14);
    let (b, t, inner, rank) = (2i64, 5, 24, 4);
    for (kind, tol) in KINDS {
        for with_a in [false, true] {
            let gu = leaf(&[b, t, 2 * inner], kind, 2.0, 0.0);
            let a = leaf(&[rank, inner], kind, 0.3, 0.0);
            let mut shapes = vec![vec![b, t, inner]];
            if with_a {
                shapes.push(vec![b, t, rank]);
            }
            let c = cots(&shapes);
            let run = |through_kernels: bool| {
                let (gu, a) = (gu.detach().set_requires_grad(true), a.detach().set_requires_grad(true));
                let a_in = with_a.then_some(&a);
                let (h, xa) = if through_kernels { swiglu_through_kernels(&gu, a_in) } else { swiglu(&gu, a_in) };
                let mut outs = vec![h];
                outs.extend(xa);
                let g = grads(&outs, &c, &[&gu]);
                let da = if with_a { Some(a.grad()) } else { None };
                (outs, g, da)
            };
            let (fo, fg, fda) = run(true);
            let (lo, lg, lda) = run(false);
            let what = format!("{kind:?} with A {with_a}");
            for (i, (x, y)) in fo.iter().zip(&lo).enumerate() {
                assert_close(&format!("{what} out{i}"), x, y, tol);
            }
            assert_close(&format!("{what} dgu"), &fg[0], &lg[0], tol);
            if let (Some(x), Some(y)) = (fda, lda) {
                assert_close(&format!("{what} da"), &x, &y, tol);
            }
        }
    }
}

/// Loss and every trainable gradient of a fixture model, the kernels' paths taken (their CPU
/// reference versions) or not.
fn loss_and_grads(family: &str, method: &str, through_kernels: bool) -> (f64, Vec<(String, Tensor)>) {
    use ftx::train::step::{forward_backward, Checkpointing, StepPos};
    let (model, named) = crate::fused::model(family, method);
    let b = crate::fused::batch();
    let pos = StepPos { seed: 0, step: 0, micro: 0 };
    let step = || forward_backward(&model, &b, b.n_targets as f64, pos, Checkpointing::Off);
    let loss = if through_kernels { kernels::with_cpu_reference(step) } else { step() };
    (loss, named.iter().map(|(n, t)| (n.clone(), t.grad())).collect())
}

#[test]
fn the_model_with_the_kernels_wired_in_gives_the_loss_and_every_gradient_of_the_model_without() {
    let _g = torch_rng_lock();
    // llama3: the plain pre-norm block; qwen3: q/k norms before the rotary kernel; gemma2: its
    // sandwich block and 1 + w norms; mistral for its sliding-window masks.
    for family in ["llama3", "qwen3", "gemma2", "mistral"] {
        for method in ["lora", "full"] {
            let (l_ref, g_ref) = loss_and_grads(family, method, false);
            let (l_ker, g_ker) = loss_and_grads(family, method, true);
            assert!((l_ref - l_ker).abs() <= 1e-5 * l_ref.abs().max(1.0), "{family}/{method}: loss {l_ker} vs {l_ref}");
            for ((name, a), (_, b)) in g_ker.iter().zip(&g_ref) {
                assert!(a.defined() == b.defined(), "{family}/{method}: {name} has a gradient one way only");
                if b.defined() {
                    let e = normalised_error(a, b);
                    assert!(e <= 1e-5, "{family}/{method}: {name} gradient off by {e:.2e}");
                }
            }
        }
    }
}

#[test]
fn bench_kernels_on_the_cpu_checks_every_kernel_each_type_and_prints_a_json_line_each() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftx"))
        .args(["bench", "kernels", "--device", "cpu", "--shape", "tiny", "--seq", "8", "--batch", "2", "--iters", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let all: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // The FP8 quantisation's lines: the CPU reference against libtorch's composition, bit for
    // bit, at each width with and without the column factor (16 rows: batch × seq).
    let (fp8, lines): (Vec<_>, Vec<_>) = all.into_iter().partition(|v| v["kernel"] == "fp8_quantize_rows");
    let mut fp8_seen: Vec<String> = fp8.iter().map(|v| format!("{} {}", v["shape"], v["col_scale"])).collect();
    fp8_seen.sort();
    assert_eq!(fp8_seen, ["[16,16384] false", "[16,16384] true", "[16,2048] false", "[16,2048] true", "[16,8192] false", "[16,8192] true"]);
    for v in &fp8 {
        assert!(v["pass"] == true && v["q_mismatches"] == 0 && v["scale_mismatches"] == 0 && v["skipped"].is_null(), "{v}");
        assert!(v["kernel_gb_s"].as_f64().unwrap() > 0.0 && v["composition_gb_s"].as_f64().unwrap() > 0.0, "{v}");
    }
    let mut seen: Vec<String> = lines.iter().map(|v| format!("{} {}", v["kernel"].as_str().unwrap(), v["dtype"].as_str().unwrap())).collect();
    seen.sort();
    assert_eq!(seen, ["cross_entropy bf16", "cross_entropy fp32", "rms_norm_residual bf16", "rms_norm_residual fp32", "rope_qk bf16", "rope_qk fp32", "swiglu bf16", "swiglu fp32"]);
    for v in &lines {
        assert_eq!(v["pass"], true, "{v}");
        let (err, tol) = (v["max_err_vs_libtorch"].as_f64().unwrap(), v["tolerance_vs_libtorch"].as_f64().unwrap());
        assert!(err <= tol, "{v}");
        // Every output and input gradient is compared (outputs, then gradients of the leaves).
        assert!(v["err_vs_libtorch"].as_array().unwrap().iter().any(|e| e[0].as_str().unwrap().starts_with("grad")), "{v}");
    }
}

#[test]
fn bench_train_compare_kernels_prints_the_run_with_and_without_them() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftx"))
        .args(["bench", "train", "--shape", "tiny", "--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--device", "cpu", "--compare-kernels"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0]["system"], "ftx");
    assert_eq!(lines[1]["system"], "ftx (no fused kernels)");
    // On the CPU the kernels never run; the same weights give the same first loss either way.
    assert!(lines.iter().all(|l| l["fused_kernels"] == false), "{stdout}");
    let (a, b) = (lines[0]["first_loss"].as_f64().unwrap(), lines[1]["first_loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-6 * a, "{a} vs {b}");
}
