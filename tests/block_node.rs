//! The LoRA and DoRA block nodes with a hand-derived backward (`model::lora_block`,
//! `model::dora_block`: q/k/v and the gated MLP as C++ autograd nodes) against autograd's
//! composition of the same formulas (the fused projections, the per-group DoRA node and the
//! SwiGLU node, `CausalLm::set_block_nodes(false)`), in fp32 on the CPU: the loss and every
//! LoRA/DoRA gradient (A, B, magnitude) of a training step for every family and method (dense
//! and NF4 bases), with dropout, packed sequences and gradient checkpointing (MLP tiles too),
//! and each node's input gradient on its own, on row slices, and in bf16.

use crate::common::lora::{attach_with_random_b, lora_r4, zero_grads};
use crate::common::{fixture, max_diff, torch_rng_lock};
use crate::fused::{batch as padded_batch, model};
use ftx::data::{batch, Batch, TokenizedExample};
use ftx::model::attention::AttnMask;
use ftx::model::decoder::LoadOptions;
use ftx::model::CausalLm;
use ftx::peft::LoraSettings;
use ftx::train::step::{forward_backward, forward_backward_tiled, Checkpointing, StepPos};
use tch::{Device, Kind, Tensor};

const FAMILIES: [&str; 6] = ["llama3", "mistral", "qwen2", "qwen3", "gemma2", "phi4mini"];

/// Four sequences (9, 6, 11 and 4 tokens) packed into rows of 16: two rows of two examples
/// each, whose attention must not cross.
fn packed_batch() -> Batch {
    let exs: Vec<TokenizedExample> = [9usize, 6, 11, 4]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let ids: Vec<i64> = (0..n).map(|i| ((i * 37 + k * 101) % 440) as i64).collect();
            TokenizedExample { labels: ids.clone(), ids }
        })
        .collect();
    batch::pack(&exs.iter().collect::<Vec<_>>(), 16, 0)
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Plain,
    Checkpointed,
    /// Checkpointed with the MLP run on tiles of 5 rows (row slices of the batch).
    Tiled,
}

fn loss_and_grads(model: &CausalLm, named: &[(String, Tensor)], b: &Batch, mode: Mode) -> (f64, Vec<Tensor>) {
    zero_grads(named);
    let pos = StepPos { seed: 3, step: 1, micro: 0 };
    let denom = b.n_targets as f64;
    let loss = match mode {
        Mode::Plain => forward_backward(model, b, denom, pos, Checkpointing::Off),
        Mode::Checkpointed => forward_backward(model, b, denom, pos, Checkpointing::Layers),
        Mode::Tiled => forward_backward_tiled(model, b, denom, pos, Checkpointing::Layers, 5),
    };
    (loss, named.iter().map(|(_, t)| t.grad().copy()).collect())
}

/// `got` within `tol` of `want`, relative to `want`'s largest entry (at least 1e-3).
fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert!(got.defined() && want.defined(), "{what}: a gradient");
    let scale = want.abs().max().double_value(&[]).max(1e-3);
    let d = max_diff(got, want);
    assert!(d <= tol * scale, "{what}: differs by {d} (max {scale})");
}

#[test]
fn block_nodes_give_the_loss_and_every_gradient_of_autograd() {
    let _rng = torch_rng_lock();
    let batches = [("padded", padded_batch()), ("packed", packed_batch())];
    let runs = [("lora", 0.0), ("lora", 0.1), ("qlora", 0.0), ("dora", 0.0), ("dora", 0.1), ("qdora", 0.0), ("full", 0.0)];
    for family in FAMILIES {
        for (method, dropout) in runs {
            let (mut model, named) = if dropout > 0.0 {
                let mut model = CausalLm::load(&fixture(&format!("models/{family}")), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
                let named = attach_with_random_b(&mut model, &LoraSettings { dropout, ..lora_r4(method) }, 5);
                (model, named)
            } else {
                model(family, method)
            };
            // Where the nodes run: LoRA and DoRA, on dense and NF4 bases, without dropout (the
            // MLP node with SwiGLU, and with GeGLU for Gemma). Elsewhere both runs take autograd.
            let node = method != "full" && dropout == 0.0;
            for layer in &model.layers {
                assert_eq!(layer.attention().runs_block_node(Kind::Float, true), node, "{family}/{method}/{dropout}: q/k/v node");
                let mlp = layer.mlp().expect("a dense MLP");
                assert_eq!(mlp.runs_block_node(Kind::Float, true), node, "{family}/{method}/{dropout}: MLP node");
            }
            for (batch_name, b) in &batches {
                for mode in [Mode::Plain, Mode::Checkpointed, Mode::Tiled] {
                    let what = format!("{family}/{method}/dropout {dropout}/{batch_name}/{mode:?}");
                    model.set_block_nodes(true);
                    let (l_node, g_node) = loss_and_grads(&model, &named, b, mode);
                    model.set_block_nodes(false);
                    let (l_ref, g_ref) = loss_and_grads(&model, &named, b, mode);
                    assert!((l_node - l_ref).abs() <= 1e-5 * l_ref.abs(), "{what}: loss {l_node} vs {l_ref}");
                    for (((n, _), gn), gr) in named.iter().zip(&g_node).zip(&g_ref) {
                        assert_close(gn, gr, 1e-5, &format!("{what}: gradient of {n}"));
                    }
                }
            }
        }
    }
}

/// The layer-0 MLP's and attention half's output, input gradient and LoRA gradients for
/// `x`, with the nodes on or off.
fn layer0_outputs_and_grads(model: &mut CausalLm, named: &[(String, Tensor)], x0: &Tensor, g: &Tensor, on: bool) -> Vec<(String, Tensor)> {
    model.set_block_nodes(on);
    let layer = &model.layers[0];
    let (b, t) = (x0.size()[0], x0.size()[1]);
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], false);
    let inp = model.attn_inputs(&positions, |w| AttnMask::causal_with_offset(t, 0, w, Device::Cpu));
    let mut out = Vec::new();
    for half in ["mlp", "attention"] {
        zero_grads(named);
        let x = x0.copy().set_requires_grad(true);
        let y = match half {
            "mlp" => layer.mlp().expect("a dense MLP").forward(&x, true),
            _ => layer.attention_block(&x, &inp, None, true),
        };
        (&y * g).sum(Kind::Float).backward();
        out.push((format!("{half} output"), y.detach()));
        out.push((format!("{half} input gradient"), x.grad().copy()));
        let prefix = if half == "mlp" { "layers.0.mlp." } else { "layers.0.self_attn." };
        for (n, t) in named.iter().filter(|(n, _)| n.contains(prefix)) {
            out.push((format!("{half}: {n}"), t.grad().copy()));
        }
    }
    out
}

#[test]
fn block_nodes_give_the_input_gradient_of_autograd_in_fp32_and_bf16() {
    let _rng = torch_rng_lock();
    // fp32: every family with q/k/v biases (qwen2), q/k norms (qwen3), packed projections
    // (phi4mini), GeGLU (gemma2); bf16 (what GPUs train in) for llama3 and gemma2, against
    // autograd in bf16. LoRA and DoRA, each on a dense and an NF4 base.
    for (family, kind, tol) in [
        ("llama3", Kind::Float, 1e-5),
        ("qwen2", Kind::Float, 1e-5),
        ("qwen3", Kind::Float, 1e-5),
        ("phi4mini", Kind::Float, 1e-5),
        ("gemma2", Kind::Float, 1e-5),
        ("llama3", Kind::BFloat16, 3e-2),
        ("gemma2", Kind::BFloat16, 3e-2),
    ] {
        for method in ["lora", "qlora", "dora", "qdora"] {
            let mut model = CausalLm::load(&fixture(&format!("models/{family}")), LoadOptions { device: Device::Cpu, kind }).unwrap();
            let named = attach_with_random_b(&mut model, &lora_r4(method), 7);
            assert!(model.layers[0].mlp().unwrap().runs_block_node(kind, true), "{family}/{method}/{kind:?}: the MLP node runs");
            assert!(model.layers[0].attention().runs_block_node(kind, true), "{family}/{method}/{kind:?}: the q/k/v node runs");
            let hidden = model.config.hidden;
            let x0 = Tensor::randn([2, 7, hidden], (Kind::Float, Device::Cpu)).to_kind(kind);
            let g = Tensor::randn([2, 7, hidden], (Kind::Float, Device::Cpu)).to_kind(kind);
            let node = layer0_outputs_and_grads(&mut model, &named, &x0, &g, true);
            let reference = layer0_outputs_and_grads(&mut model, &named, &x0, &g, false);
            assert_eq!(node.len(), reference.len(), "{family}/{method}: the same gradients");
            assert!(node.len() > 4, "{family}/{method}: LoRA gradients of layer 0 compared");
            for ((n, got), (_, want)) in node.iter().zip(&reference) {
                let what = format!("{family}/{method}/{kind:?}: {n}");
                assert!(want.abs().max().double_value(&[]) > 0.0, "{what}: a gradient worth comparing");
                assert_close(&got.to_kind(Kind::Float), &want.to_kind(Kind::Float), tol, &what);
            }
        }
    }
}

#[test]
fn the_mlp_node_on_row_slices_gives_those_rows_of_the_whole() {
    // Long-context training runs the MLP on row slices (train::step's tiles): the node's
    // output for a slice is the slice of its output, and its input gradients add up the same.
    let _rng = torch_rng_lock();
    let (model, _named) = model("llama3", "lora");
    let mlp = model.layers[0].mlp().unwrap();
    assert!(mlp.runs_block_node(Kind::Float, true));
    let x = Tensor::randn([9, model.config.hidden], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let whole = mlp.forward(&x, true);
    let g = Tensor::randn_like(&whole);
    let dx_whole = Tensor::run_backward(&[(&whole * &g).sum(Kind::Float)], &[&x], false, false).pop().unwrap();
    let (rows, dx_rows): (Vec<Tensor>, Vec<Tensor>) = [(0, 4), (4, 5)]
        .iter()
        .map(|&(start, n)| {
            let y = mlp.forward(&x.narrow(0, start, n), true);
            let dx = Tensor::run_backward(&[(&y * g.narrow(0, start, n)).sum(Kind::Float)], &[&x], false, false).pop().unwrap();
            (y, dx)
        })
        .unzip();
    // Equal up to fp32 rounding (the GEMMs block fewer rows differently).
    assert_close(&Tensor::cat(&rows, 0), &whole, 1e-5, "rows of the output");
    let summed = dx_rows.iter().fold(Tensor::zeros_like(&dx_whole), |acc, d| acc + d);
    assert_close(&summed, &dx_whole, 1e-5, "input gradients of the slices, added up");
}

#[test]
fn bench_train_reports_the_block_nodes_and_ftx_block_node_0_turns_them_off() {
    // The A/B switch of the GPU benchmarks, end to end: the same binary and weights with the
    // nodes (the default) and without (`FTX_BLOCK_NODE=0`) give the same losses, for LoRA and
    // DoRA.
    for method in ["lora", "dora"] {
        let run = |switch: Option<&str>| -> serde_json::Value {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ftx"));
            cmd.args(["bench", "train", "--shape", "tiny", "--seq", "32", "--batch", "2", "--steps", "3", "--warmup", "1", "--device", "cpu", "--method", method]);
            match switch {
                Some(v) => cmd.env("FTX_BLOCK_NODE", v),
                None => cmd.env_remove("FTX_BLOCK_NODE"),
            };
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "ftx failed: {}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
        };
        let (on, off) = (run(None), run(Some("0")));
        assert_eq!(on["block_nodes"], true, "{method}: {on}");
        assert_eq!(off["block_nodes"], false, "{method}: {off}");
        for key in ["first_loss", "last_loss"] {
            let (a, b) = (on[key].as_f64().unwrap(), off[key].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{method}: {key}: {a} with the nodes, {b} without");
        }
    }
}
