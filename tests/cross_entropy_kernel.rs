//! The fused cross-entropy kernel of the LM head (ftx-kernels, `cross_entropy`) on the CPU:
//! its reference version through the same entry point the CUDA kernel takes, against libtorch's
//! autograd of `cross_entropy` on the float32-upcast logits — loss per row to 1e-5 (float32
//! arithmetic on the same values either way), gradient to 1e-5 in float32 and to 2⁻⁷ of the
//! largest magnitude in bf16 (both round each element once) — plain and soft-capped, with
//! ignored rows, strided rows and a vocabulary that is not a whole number of 16-byte vectors;
//! and the chunked head loss with the kernel wired in against the head loss without it. The
//! CUDA kernel is held to this reference by `ftx bench kernels` on a GPU.

use crate::common::torch_rng_lock;
use ftx::gpu::cross_entropy::{self, CeGradient};
use ftx::gpu::kernels;
use ftx::recipes::bench_cross_entropy::autograd_reference;
use ftx::recipes::bench_kernels::normalised_error;
use tch::{Device, Kind, Tensor};

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let e = normalised_error(a, b);
    assert!(e <= tol, "{what}: normalised error {e:.3e} over {tol:.1e}");
}

#[test]
fn fused_cross_entropy_equals_libtorch_autograd_plain_and_soft_capped_with_ignored_rows() {
    let _g = torch_rng_lock();
    tch::manual_seed(31);
    let (rows, vocab, width) = (6i64, 37, 40);
    let targets = Tensor::from_slice(&[3i64, -100, 36, 0, -100, 17]);
    let ignored = [1usize, 4];
    for (kind, grad_tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 1.0 / 128.0)] {
        for cap in [None, Some(5.0)] {
            let what = format!("{kind:?} softcap {cap:?}");
            // Rows 40 elements apart, 37 of them logits: strided rows, a scalar tail.
            let wide = (Tensor::randn([rows, width], (Kind::Float, Device::Cpu)) * 4.0).to_kind(kind);
            let z = wide.narrow(1, 0, vocab);
            let (ref_loss, ref_grad) = autograd_reference(&z, &targets, cap);
            let scale = 0.25;
            let out_wide = Tensor::zeros([rows, width], (kind, Device::Cpu));
            let out = out_wide.narrow(1, 0, vocab);
            let loss = cross_entropy::cross_entropy(&z, &targets, cap, scale, CeGradient::Into(&out)).unwrap();
            assert_eq!(loss.size(), [rows]);
            assert_eq!(loss.kind(), Kind::Float);
            assert_close(&format!("{what} loss"), &loss, &ref_loss, 1e-5);
            assert_close(&format!("{what} grad"), &out, &(ref_grad.to_kind(Kind::Float) * scale), grad_tol);
            for r in ignored {
                assert_eq!(loss.double_value(&[r as i64]), 0.0, "{what}: ignored row {r} has a loss");
                assert_eq!(out.get(r as i64).abs().max().double_value(&[]), 0.0, "{what}: ignored row {r} has a gradient");
            }
            // In place over the logits: the same gradient, bit for bit, and the columns past the
            // logits untouched.
            let inplace_wide = wide.copy();
            let inplace = inplace_wide.narrow(1, 0, vocab);
            let loss2 = cross_entropy::cross_entropy(&inplace, &targets, cap, scale, CeGradient::InPlace).unwrap();
            assert!(loss2.equal(&loss) && inplace.equal(&out), "{what}: in place differs from a separate output");
            assert!(inplace_wide.narrow(1, vocab, width - vocab).equal(&wide.narrow(1, vocab, width - vocab)), "{what}: wrote past the row");
            // The loss alone.
            let loss3 = cross_entropy::cross_entropy(&z, &targets, cap, scale, CeGradient::None).unwrap();
            assert!(loss3.equal(&loss), "{what}: the loss alone differs");
        }
    }
}

#[test]
fn fused_cross_entropy_rejects_what_it_cannot_take_with_a_reason() {
    let z = Tensor::zeros([3, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[0i64, 1, 2]);
    let err = |r: Result<Tensor, ftx_kernels::KernelError>| r.unwrap_err().to_string();
    let half = z.to_kind(Kind::Half);
    assert!(err(cross_entropy::cross_entropy(&half, &t, None, 1.0, CeGradient::None)).contains("float32 or bf16"));
    assert!(err(cross_entropy::cross_entropy(&z, &t.narrow(0, 0, 2), None, 1.0, CeGradient::None)).contains("targets of shape [2]"));
    let wrong = Tensor::zeros([3, 9], (Kind::Float, Device::Cpu));
    assert!(err(cross_entropy::cross_entropy(&z, &t, None, 1.0, CeGradient::Into(&wrong))).contains("does not match"));
    assert!(err(cross_entropy::cross_entropy(&z.tr(), &Tensor::from_slice(&[0i64; 8]), None, 1.0, CeGradient::None)).contains("not contiguous"));
}

/// Loss, the hidden state's gradient and every weight's gradient (full fine-tuning: the head
/// trains) of the chunked head loss on a fixture model, the kernel's path taken or not.
fn head_loss(family: &str, through_kernel: bool, hidden: &Tensor, targets: &Tensor) -> (f64, Tensor, Vec<(String, Tensor)>) {
    use ftx::model::decoder::LoadOptions;
    use ftx::model::CausalLm;
    let model = CausalLm::load(&crate::common::fixture(&format!("models/{family}")), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let named: Vec<(String, Tensor)> = model.named_tensors().into_iter().map(|(n, t)| (n, t.set_requires_grad(true))).collect();
    let vocab = model.config.vocab;
    let h = hidden.detach().set_requires_grad(true);
    // Chunks of 4 rows (the head trains: 4 × `vocab` logits): several chunks and a short last one.
    let run = || ftx::train::head_loss::head_ce_chunked(&model, &h, targets, 9.0, true, vocab);
    let loss = if through_kernel { kernels::with_cpu_reference(run) } else { run() };
    (loss, h.grad(), named.iter().map(|(n, t)| (n.clone(), t.grad())).collect())
}

#[test]
fn the_head_loss_through_the_kernel_gives_the_loss_and_gradients_of_the_composite() {
    let _g = torch_rng_lock();
    // The kernel's path is taken on CPU tensors inside with_cpu_reference (else this compares
    // the composite with itself).
    assert!(kernels::with_cpu_reference(|| cross_entropy::fits(&Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)))));
    assert!(!cross_entropy::fits(&Tensor::zeros([2, 8], (Kind::Float, Device::Cpu))));
    tch::manual_seed(32);
    let hidden = Tensor::randn([2, 7, 64], (Kind::Float, Device::Cpu));
    let targets = Tensor::from_slice(&[5i64, 9, -100, 400, 17, 0, 3, -100, -100, 88, 1, 2, 450, 7]).view([2, 7]);
    // llama3: a tied head (the embedding trains through it); gemma2: an untied head with
    // final-logit soft-capping (8.0).
    for family in ["llama3", "gemma2"] {
        let (l_ref, h_ref, g_ref) = head_loss(family, false, &hidden, &targets);
        let (l_ker, h_ker, g_ker) = head_loss(family, true, &hidden, &targets);
        assert!((l_ref - l_ker).abs() <= 1e-5 * l_ref.abs().max(1.0), "{family}: loss {l_ker} vs {l_ref}");
        assert_close(&format!("{family} hidden gradient"), &h_ker, &h_ref, 1e-5);
        let mut compared = 0;
        for ((name, a), (_, b)) in g_ker.iter().zip(&g_ref) {
            assert_eq!(a.defined(), b.defined(), "{family}: {name} has a gradient one way only");
            if b.defined() {
                assert_close(&format!("{family} {name}"), a, b, 1e-5);
                compared += 1;
            }
        }
        assert!(compared >= 2, "{family}: the head's and the final norm's gradients are compared ({compared})");
    }
}
