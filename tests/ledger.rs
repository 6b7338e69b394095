//! The step ledger (`gpu::ledger`, `ftx bench train --ledger`): its counts of a tiny Llama's
//! LoRA step against counts made by hand from the model's shapes (a double-counted composite,
//! a missed node or a wrong byte rule changes them), and o_proj through the LoRA linear node
//! (`Attention::output`) against autograd's composition.

use crate::common::lora::zero_grads;
use crate::common::{max_diff, torch_rng_lock};
use crate::fused::{batch, model};
use ftx::plan::{ModelShape, Optimizer};
use ftx::recipes::bench::{prepare, BenchRun, BenchSettings};
use ftx::gpu::kernels;
use ftx::gpu::ledger::{self, Ledger, LedgerEntry, OpClass};
use ftx::model::attention::AttnMask;
use ftx::model::CausalLm;
use ftx::train::step::{forward_backward, Checkpointing, StepPos};
use tch::{Device, Kind, Tensor};

/// The ledger of one forward/backward pass on `b`, the fused kernels on their CPU references
/// (the path CUDA takes).
fn step_ledger(model: &CausalLm, b: &ftx::data::Batch) -> Ledger {
    let pos = StepPos { seed: 0, step: 0, micro: 0 };
    kernels::with_cpu_reference(|| ledger::record(|| forward_backward(model, b, b.n_targets as f64, pos, Checkpointing::Off)).expect("a ledger").1)
}

/// `ftx bench train`'s random model of the tiny Llama shape (hidden 256, intermediate 1024,
/// 8 query and 4 key/value heads of 32, tied embedding) cut to `layers`, LoRA r4 on every
/// projection, fp32, and its batch of 3 × 11 random tokens: freshly allocated weights, so
/// every fused kernel applies, as on a GPU.
fn tiny_run(layers: u64) -> BenchRun {
    // As `ftx bench train --shape tiny`.
    let mut shape = ModelShape::named("llama-3.2-1b").unwrap();
    (shape.name, shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.vocab) =
        ("tiny".into(), 256, 1024, layers, 8, 4, 32, 32000);
    let s = BenchSettings {
        shape,
        method: "lora".into(),
        seq: 11,
        batch: 3,
        steps: 1,
        warmup: 0,
        rank: 4,
        grad_checkpointing: Checkpointing::Off,
        device: Device::Cpu,
        kind: Kind::Float,
        peak_flops: None,
        memory_cap: None,
        fused: true,
        check_fused: false,
        fused_kernels: true,
        optimizer: Optimizer::Adamw,
        check_offload: false,
        target_modules: vec!["all-linear".into()],
        stacked_experts: true,
        recompute: Default::default(),
        saved_tensors: false,
        fp8: false,
    };
    prepare(&s).unwrap()
}

fn op(e: &LedgerEntry, name: &str) -> bool {
    e.op == name
}

#[test]
fn the_ledger_counts_a_tiny_llama_steps_kernels_and_bytes_as_computed_by_hand() {
    let _rng = torch_rng_lock();
    let BenchRun { model, batch: b, .. } = tiny_run(2);
    let l = step_ledger(&model, &b);
    let c = &model.config;
    let layers = c.layers as u64;
    // Tokens the layers see (padding included), widths, LoRA rank 4 on every projection.
    let n = b.input_ids.numel() as f64;
    let (h, i, r) = (c.hidden as f64, c.intermediate as f64, 4.0);
    let qkv = ((c.heads + 2 * c.kv_heads) * c.head_dim) as f64;
    let hq = (c.heads * c.head_dim) as f64;

    // GEMMs. Forward, per layer: q/k/v and o each x·Aᵀ, x·Wᵀ and += s·xa·Bᵀ (3 + 3), the MLP's
    // gate/up and down the same (6). Backward, per LoRA group: dB, dY·B, dA, dY·W and += dXA·A
    // (5 × 4), less layer 0's q/k/v input gradient (the norm of the frozen embedding needs
    // none: 2). The head (tied embedding, one chunk): the logits and the hidden state's gradient.
    let gemms = layers * (12 + 20) - 2 + 2;
    let (count, _, _) = l.total(|e| e.class == OpClass::Gemm);
    assert_eq!(count, gemms, "GEMMs counted once each: {:#?}", l.entries.iter().filter(|e| e.class == OpClass::Gemm).collect::<Vec<_>>());
    // No composite counted beside what it calls.
    assert!(!l.entries.iter().any(|e| e.class != OpClass::View && ["aten::linear", "aten::matmul", "aten::to", "aten::contiguous", "aten::scaled_dot_product_attention"].contains(&e.op.as_str())), "a composite op counted");
    // The MLP node's forward FLOPs: x·Aᵀ (2r), gate/up, += s·xa·Bᵀ, h·Aᵀ (r), down, += s·ha·Bᵀ.
    let mlp = 2.0 * n * (h * 2.0 * r + h * 2.0 * i + 2.0 * r * 2.0 * i + i * r + i * h + r * h);
    let (count, _, flops) = l.total(|e| e.class == OpClass::Gemm && e.node == "ftx::lora_mlp");
    assert_eq!(count, 6 * layers, "the MLP node's forward GEMMs");
    assert!((flops - layers as f64 * mlp).abs() < 1e-9 * flops, "MLP forward FLOPs {flops} vs {}", layers as f64 * mlp);
    // q/k/v's base GEMM among them, in the q/k/v node.
    let (_, _, flops) = l.total(|e| e.class == OpClass::Gemm && e.node == "ftx::lora_linear");
    let lin = 2.0 * n * ((h * 3.0 * r + h * qkv + 3.0 * r * qkv) + (hq * r + hq * h + r * h));
    assert!((flops - layers as f64 * lin).abs() < 1e-9 * flops, "q/k/v and o forward FLOPs {flops} vs {}", layers as f64 * lin);

    // The fused SwiGLU kernel (fp32): forward reads [g | u] (2i) and writes h (i), once in the
    // forward and once again in backward (h recomputed for the down adapter's A); backward
    // reads [g | u] and dh, writes d[g | u].
    let (count, bytes, _) = l.total(|e| op(e, "ftx::kernel::swiglu_forward"));
    assert_eq!((count, bytes), (2 * layers, 2.0 * layers as f64 * n * 3.0 * i * 4.0), "SwiGLU forward kernels");
    let (count, bytes, _) = l.total(|e| op(e, "ftx::kernel::swiglu_backward"));
    assert_eq!((count, bytes), (layers, layers as f64 * n * 5.0 * i * 4.0), "SwiGLU backward kernels");
    // The MLP half's residual add (the attention half's is inside the fused norm): two
    // [n, hidden] reads and one write per layer, forward; its backward passes the gradient on.
    // (Where the norm's kernel does not apply, the attention half's add is a second one.)
    let (count, bytes, _) = l.total(|e| op(e, "aten::add") && e.phase == "forward" && e.node == "-");
    assert_eq!((count, bytes), (layers, layers as f64 * 3.0 * n * h * 4.0), "residual adds: {:#?}", l.entries.iter().filter(|e| e.op == "aten::add").collect::<Vec<_>>());
    // RMSNorm as fused kernels: the first norm of each layer and the final one alone, the
    // second with the residual add.
    let (count, _, _) = l.total(|e| op(e, "ftx::kernel::rms_norm_forward"));
    assert_eq!(count, 2 * layers + 1, "RMSNorm forward kernels");
    let (count, _, _) = l.total(|e| op(e, "ftx::kernel::rms_norm_forward") && e.node == "ftx::add_rms_norm");
    assert_eq!(count, layers, "the second norm of each layer takes the residual add");
    // Backward: every norm but layer 0's first, whose input (the frozen embedding's output)
    // and weight need no gradient.
    let (count, _, _) = l.total(|e| op(e, "ftx::kernel::rms_norm_backward") && e.phase == "backward");
    assert_eq!(count, 2 * layers, "RMSNorm backward kernels");
    // The RMSNorm forward kernel with the residual add (fp32): reads x, r [n, h] and w [h],
    // writes x + r and y [n, h] and the per-row rstd (fp32).
    let (_, bytes, _) = l.total(|e| op(e, "ftx::kernel::rms_norm_forward") && e.node == "ftx::add_rms_norm");
    assert_eq!(bytes, layers as f64 * (4.0 * n * h * 4.0 + h * 4.0 + n * 4.0), "add + RMSNorm kernel bytes");
    // No full-width add in backward: the layer input's two gradients (the residual stream's and
    // its first norm's) are summed inside the norm's backward kernel (`RmsNorm::forward_passing`).
    let full_width_adds = l.total(|e| e.phase == "backward" && ["aten::add", "aten::add_"].contains(&e.op.as_str()) && e.bytes >= e.count as f64 * 3.0 * n * h * 4.0);
    assert_eq!(full_width_adds.0, 0, "full-width adds in backward: {:#?}", l.entries.iter().filter(|e| e.phase == "backward" && e.op.starts_with("aten::add")).collect::<Vec<_>>());
    // Backward work is attributed to the nodes' backward.
    let (count, _, _) = l.total(|e| e.class == OpClass::Gemm && e.node == "ftx::lora_mlp.backward" && e.phase == "backward");
    assert_eq!(count, 10 * layers, "the MLP node's backward GEMMs");
}

/// The attention half of layer 0 (output, input gradient, and the gradients of o_proj's
/// adapter) for `x0`, with the block nodes on or off.
fn attention_half(model: &mut CausalLm, named: &[(String, Tensor)], x0: &Tensor, g: &Tensor, on: bool) -> Vec<(String, Tensor)> {
    model.set_block_nodes(on);
    let layer = &model.layers[0];
    let (b, t) = (x0.size()[0], x0.size()[1]);
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], false);
    let inp = model.attn_inputs(&positions, |w| AttnMask::causal_with_offset(t, 0, w, Device::Cpu));
    zero_grads(named);
    let x = x0.copy().set_requires_grad(true);
    let y = layer.attention_block(&x, &inp, None, true);
    (&y * g).sum(Kind::Float).backward();
    let mut out = vec![("output".to_string(), y.detach()), ("input gradient".to_string(), x.grad().copy())];
    out.extend(named.iter().filter(|(n, _)| n.contains("layers.0.self_attn.o_proj")).map(|(n, t)| (n.clone(), t.grad().copy())));
    out
}

#[test]
fn o_proj_runs_as_the_lora_linear_node_with_autograds_gradients() {
    let _rng = torch_rng_lock();
    let (mut model, named) = model("llama3", "lora");
    assert!(model.layers.iter().all(|l| l.attention().runs_output_node(Kind::Float, true)), "o_proj takes the node");
    // The ledger sees it: q/k/v's and o_proj's nodes, 3 forward GEMMs each a layer (3 fewer
    // with o_proj through autograd).
    let l = step_ledger(&model, &batch());
    let (count, _, _) = l.total(|e| e.class == OpClass::Gemm && e.node == "ftx::lora_linear");
    assert_eq!(count, 6 * model.config.layers as u64, "forward GEMMs inside the LoRA linear nodes");
    // Against autograd's composition (the nodes off), fp32: output, input gradient, o_proj's
    // A and B gradients.
    let hidden = model.config.hidden;
    let x0 = Tensor::randn([2, 7, hidden], (Kind::Float, Device::Cpu));
    let g = Tensor::randn([2, 7, hidden], (Kind::Float, Device::Cpu));
    let node = attention_half(&mut model, &named, &x0, &g, true);
    let reference = attention_half(&mut model, &named, &x0, &g, false);
    assert_eq!(node.len(), 4, "output, input gradient, o_proj's lora_A and lora_B");
    for ((n, got), (_, want)) in node.iter().zip(&reference) {
        let scale = want.abs().max().double_value(&[]);
        assert!(scale > 0.0, "{n}: a gradient worth comparing");
        let d = max_diff(got, want);
        assert!(d <= 1e-5 * scale.max(1e-3), "{n}: node and autograd differ by {d} (max {scale})");
    }
}

#[test]
fn bench_train_ledger_prints_the_steps_kernels_priced_at_the_stated_rates() {
    // End to end: the tiny shape (4 layers) in bf16 on the CPU, one recorded step after one
    // warm-up step, forward, backward and the optimizer.
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ftx"));
        cmd.args(["bench", "train", "--shape", "tiny", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--device", "cpu", "--dtype", "bf16", "--ledger", "--ledger-kernel-floor-us", "0"]);
        cmd.args(extra).env_remove("FTX_BLOCK_NODE");
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "ftx failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("neither GEMM nor attention"), "the table on stderr");
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
    };
    let v = run(&[]);
    assert_eq!(v["fused_kernels"], true, "the fused kernels' CPU references ran");
    assert_eq!(v["block_nodes"], true);
    let ledger = &v["ledger"];
    // As in the hand count above, for 4 layers; the optimizer adds none.
    assert_eq!(ledger["classes"]["gemm"]["count"], 4 * 32, "{}", ledger["classes"]);
    let optimizer_kernels: u64 = ledger["ops"].as_array().unwrap().iter().filter(|o| o["phase"] == "optimizer").map(|o| o["count"].as_u64().unwrap()).sum();
    assert!(optimizer_kernels > 0, "the optimizer's kernels recorded");
    // Non-GEMM time is bytes at the bandwidth (no kernel floor here): half the bandwidth,
    // twice the time.
    let slow = run(&["--ledger-bandwidth-tbs", "1.5"]);
    for class in ["elementwise", "copy", "fused"] {
        let (a, b) = (ledger["classes"][class]["ms"].as_f64().unwrap(), slow["ledger"]["classes"][class]["ms"].as_f64().unwrap());
        let gib = ledger["classes"][class]["gib"].as_f64().unwrap();
        assert!(a > 0.0 && (b - 2.0 * a).abs() <= 1e-9 * b, "{class}: {a} ms at 3 TB/s, {b} ms at 1.5");
        assert!((a - gib * (1u64 << 30) as f64 / 3e12 * 1e3).abs() <= 1e-9 * a, "{class}: {gib} GiB at 3 TB/s");
    }
}

#[test]
fn the_norm_passing_the_residual_on_gives_the_steps_loss_and_every_gradient() {
    // The first norm of each layer passes the residual stream through its node, whose backward
    // kernel adds the stream's gradient (`RmsNorm::forward_passing`): the step through the fused
    // kernels (CPU references) against libtorch's ops and autograd's sum, fp32, every LoRA
    // gradient. (The fixture models' memory-mapped norm weights are not 16-byte aligned, so
    // the kernel tests' models keep the composite norm; these weights are fresh.)
    let _rng = torch_rng_lock();
    let BenchRun { model, mut opt, batch: b, .. } = tiny_run(3);
    // B away from PEFT's zeros, so that A's gradients are not zero both ways.
    tch::manual_seed(11);
    tch::no_grad(|| {
        for p in opt.params.iter().filter(|p| p.name.contains("lora_B")) {
            let _ = p.tensor.shallow_clone().copy_(&(Tensor::randn_like(&p.tensor) * 0.05));
        }
    });
    let pos = StepPos { seed: 0, step: 0, micro: 0 };
    let mut run = |through_kernels: bool| {
        opt.zero_grad();
        let step = || forward_backward(&model, &b, b.n_targets as f64, pos, Checkpointing::Off);
        let loss = if through_kernels { kernels::with_cpu_reference(step) } else { step() };
        (loss, opt.params.iter().map(|p| p.tensor.grad().copy()).collect::<Vec<_>>())
    };
    let (l_ker, g_ker) = run(true);
    let (l_ref, g_ref) = run(false);
    assert!((l_ker - l_ref).abs() <= 1e-5 * l_ref.abs(), "loss {l_ker} vs {l_ref}");
    assert!(g_ref.len() > 20, "every LoRA factor of 3 layers");
    for (i, (got, want)) in g_ker.iter().zip(&g_ref).enumerate() {
        let scale = want.abs().max().double_value(&[]);
        assert!(scale > 0.0, "gradient {i} worth comparing");
        let d = max_diff(got, want);
        assert!(d <= 1e-5 * scale, "gradient {i}: kernels and libtorch differ by {d} (max {scale})");
    }
}
