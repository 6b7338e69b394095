//! Long-context training memory: checkpointed segments (only every k-th layer input kept, the
//! others recomputed in backward) give the loss and every gradient of the plain step (with the
//! MLP in tiles and the attention's backward in head slices too), attention back-propagated in
//! slices of heads gives the whole backward's gradients, and a
//! QLoRA model built layer by layer (each layer quantised as soon as it exists) is the model
//! that quantising a whole bf16 one gives.

use crate::common::lora::{attach_with_random_b, grads, lora_r4, zero_grads};
use crate::common::{max_diff, torch_rng_lock};
use ftx::data::{batch, TokenizedExample};
use ftx::model::decoder::LoadOptions;
use ftx::model::linear::Weight;
use ftx::model::nodes::causal_sdpa_sliced_backward;
use ftx::model::{CausalLm, ModelConfig};
use ftx::peft::{self, LoraSettings};
use ftx::plan::ModelShape;
use ftx::train::step::{forward_backward_with, Checkpointing, StepOptions, StepPos};
use tch::{Device, Kind, Tensor};

/// A five-layer Llama small enough for seconds on a CPU.
fn shape() -> ModelShape {
    let mut s = ModelShape::named("llama-3.2-1b").unwrap();
    (s.name, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab) = ("five".into(), 64, 128, 5, 4, 2, 16, 300);
    s
}

fn config() -> ModelConfig {
    ModelConfig::from_json(shape().to_hf_config(), std::path::Path::new("five")).unwrap()
}

fn lora(dropout: f64, nf4: bool) -> LoraSettings {
    LoraSettings { dropout, ..lora_r4(if nf4 { "qlora" } else { "lora" }) }
}

/// The five-layer model with LoRA r4 on every projection (B random, so every adapter tensor
/// gets a gradient).
fn lora_model(dropout: f64) -> (CausalLm, Vec<(String, Tensor)>) {
    let mut model = CausalLm::random(config(), LoadOptions { device: Device::Cpu, kind: Kind::Float }, 5).unwrap();
    let named = attach_with_random_b(&mut model, &lora(dropout, false), 3);
    (model, named)
}

#[test]
fn checkpointed_segments_give_the_loss_and_every_gradient_of_the_plain_step() {
    let _rng = torch_rng_lock();
    let rows: Vec<TokenizedExample> = [11usize, 8]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let ids: Vec<i64> = (0..n).map(|i| ((i * 37 + k * 101) % 300) as i64).collect();
            TokenizedExample { labels: ids.clone(), ids }
        })
        .collect();
    let b = batch::pad(&rows.iter().collect::<Vec<_>>(), 0);
    let pos = StepPos { seed: 4, step: 2, micro: 1 };
    let denom = b.n_targets as f64;
    let plain = StepOptions::new(Checkpointing::Off);
    // With dropout (the recomputed segment inputs must draw the forward pass's masks) the MLP
    // untiled, as the plain step runs it; without dropout also in tiles: 2 × 11 tokens
    // (padded), tiled above 5 in tiles of 3 (several, the last short), the attention's backward
    // in head slices or in one call. Segments of 2 (the last layer alone), 3 and all 5 layers.
    let whole = (1 << 20, 1 << 20, i64::MAX);
    for (dropout, tilings) in [(0.1, vec![whole]), (0.0, vec![(5, 3, 0), (5, 3, i64::MAX), whole])] {
        let (model, named) = lora_model(dropout);
        let l0 = forward_backward_with(&model, &b, denom, pos, plain);
        let g0 = grads(&named);
        for checkpointing in [Checkpointing::Layers, Checkpointing::Offload] {
            for &(above, rows, attn_slice) in &tilings {
                for segment in [2, 3, 5] {
                    zero_grads(&named);
                    let opts = StepOptions { checkpointing, mlp_tile: above, mlp_tile_rows: rows, attn_slice, segment: Some(segment) };
                    let l = forward_backward_with(&model, &b, denom, pos, opts);
                    assert!((l - l0).abs() < 1e-5 * l0.abs(), "dropout {dropout} {opts:?}: loss {l} vs {l0}");
                    for ((n, _), (a, c)) in named.iter().zip(g0.iter().zip(&grads(&named))) {
                        assert!(max_diff(a, c) < 1e-5, "dropout {dropout} {opts:?} {n}: {}", max_diff(a, c));
                    }
                }
            }
        }
        if dropout > 0.0 {
            // The check can fail: another step's dropout masks change the loss and gradients
            // by far more than the tolerances above.
            zero_grads(&named);
            let l3 = forward_backward_with(&model, &b, denom, StepPos { step: 3, ..pos }, plain);
            let worst = g0.iter().zip(&grads(&named)).map(|(a, c)| max_diff(a, c)).fold(0.0, f64::max);
            assert!((l3 - l0).abs() > 1e-4 * l0.abs() && worst > 1e-3, "dropout must matter for this test to see a wrong mask: loss {l3} vs {l0}, gradients up to {worst}");
        }
    }
}

#[test]
fn attention_back_propagated_in_head_slices_gives_the_whole_backwards_gradients() {
    let _rng = torch_rng_lock();
    let opts = (Kind::Float, Device::Cpu);
    // Grouped (6 query heads over 3 key/value heads) in slices of 1 and 2 key/value heads (the
    // last slice short), and plain multi-head in slices of 3 of 4; q, k, v laid out as the
    // attention makes them ([B, T, H, D] memory under a [B, H, T, D] view); both scales.
    for (heads, kv_heads, per) in [(6, 3, 1), (6, 3, 2), (4, 4, 3)] {
        for scale in [None, Some(0.3)] {
            tch::manual_seed(11);
            let (b, t, d) = (2, 7, 8);
            let leaf = |h: i64| Tensor::randn([b, t, h, d], opts).set_requires_grad(true);
            let (q, k, v) = (leaf(heads), leaf(kv_heads), leaf(kv_heads));
            let dout = Tensor::randn([b, heads, t, d], opts);
            let view = |x: &Tensor| x.transpose(1, 2);
            let run = |sliced: bool| {
                for x in [&q, &k, &v] {
                    let mut g = x.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
                let out = if sliced {
                    causal_sdpa_sliced_backward(&view(&q), &view(&k), &view(&v), scale, per)
                } else {
                    Tensor::scaled_dot_product_attention::<Tensor>(&view(&q), &view(&k), &view(&v), None, 0.0, true, scale, heads != kv_heads)
                };
                (&out * &dout).sum(Kind::Double).backward();
                (out.detach(), [q.grad().copy(), k.grad().copy(), v.grad().copy()])
            };
            let (want, want_grads) = run(false);
            let (got, got_grads) = run(true);
            let what = format!("{heads} heads over {kv_heads}, {per} per slice, scale {scale:?}");
            assert!(max_diff(&got, &want) <= 1e-7, "{what}: the forward pass is libtorch's own SDPA ({})", max_diff(&got, &want));
            for (name, (a, c)) in ["q", "k", "v"].iter().zip(want_grads.iter().zip(&got_grads)) {
                // The gradients matter: each is far from zero.
                assert!(c.abs().max().double_value(&[]) > 1e-2, "{what}: d{name} is all but zero");
                assert!(max_diff(a, c) <= 1e-6, "{what}: d{name} differs by {}", max_diff(a, c));
            }
        }
    }
}

#[test]
fn a_qlora_model_built_layer_by_layer_is_the_one_quantised_whole() {
    let _rng = torch_rng_lock();
    let opts = LoadOptions { device: Device::Cpu, kind: Kind::Float };
    let mut whole = CausalLm::random(config(), opts, 7).unwrap();
    let mut layered = CausalLm::random_with(config(), opts, 7, &mut |layer| peft::quantize_layer_nf4(layer, Kind::Float)).unwrap();
    // Built layer by layer, every projection is NF4 before the adapters come.
    let projections = layered.linears_mut().len();
    assert_eq!(projections, 5 * 7);
    for (name, lin) in layered.linears_mut() {
        assert!(matches!(lin.base.weight, Weight::Nf4(_)), "{name} is not NF4");
    }
    tch::manual_seed(1);
    let a = peft::attach(&mut whole, &lora(0.0, true)).unwrap();
    tch::manual_seed(1);
    let b = peft::attach(&mut layered, &lora(0.0, true)).unwrap();
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(max_diff(x, y), 0.0, "adapter {n}");
    }
    let mut dense = Vec::new();
    for (name, lin) in whole.linears_mut() {
        dense.push((name, lin.base.dense_weight()));
    }
    for ((name, w), (_, lin)) in dense.iter().zip(layered.linears_mut()) {
        assert_eq!(max_diff(w, &lin.base.dense_weight()), 0.0, "{name}");
    }
    let ids = Tensor::from_slice(&[1i64, 5, 9, 200, 3, 17]).view([1, 6]);
    assert_eq!(max_diff(&whole.forward(&ids, None), &layered.forward(&ids, None)), 0.0);
}
