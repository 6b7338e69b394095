//! Long-context training memory: checkpointed segments (only every k-th layer input kept, the
//! others recomputed in backward) give the loss and every gradient of the plain step, and a
//! QLoRA model built layer by layer (each layer quantised as soon as it exists) is the model
//! that quantising a whole bf16 one gives.

use crate::common::lora::{attach_with_random_b, grads, lora_r4, zero_grads};
use crate::common::{max_diff, torch_rng_lock};
use ftx::data::{batch, TokenizedExample};
use ftx::model::decoder::LoadOptions;
use ftx::model::linear::Weight;
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
    // (padded), tiled above 5 in tiles of 3 (several, the last short). Segments of 2 (the
    // last layer alone), 3 and all 5 layers.
    for (dropout, tilings) in [(0.1, vec![(1 << 20, 1 << 20)]), (0.0, vec![(5, 3), (1 << 20, 1 << 20)])] {
        let (model, named) = lora_model(dropout);
        let l0 = forward_backward_with(&model, &b, denom, pos, plain);
        let g0 = grads(&named);
        for checkpointing in [Checkpointing::Layers, Checkpointing::Offload] {
            for &(above, rows) in &tilings {
                for segment in [2, 3, 5] {
                    zero_grads(&named);
                    let opts = StepOptions { checkpointing, mlp_tile: above, mlp_tile_rows: rows, segment: Some(segment) };
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
