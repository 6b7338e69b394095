//! The small adapters the engine, long-context, fused-kernel and distributed tests train, and
//! reading their gradients.

use ftx::model::CausalLm;
use ftx::peft::{self, LoraSettings};
use tch::{Device, Kind, Tensor};

/// LoRA of rank 4 (α = 8) on every projection, without dropout; `method` "dora" learns the
/// magnitude too, "qlora" stores the frozen base as NF4, "qdora" both (any other method: plain
/// LoRA).
pub fn lora_r4(method: &str) -> LoraSettings {
    LoraSettings {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["all-linear".into()],
        rslora: false,
        dora: matches!(method, "dora" | "qdora"),
        quantize_nf4: matches!(method, "qlora" | "qdora"),
        quantize_fp8: method == "fp8",
    }
}

/// Attaches `s`'s adapters (A drawn after seeding libtorch's generator with `seed`) and gives
/// every B values from N(0, 0.05²) — B starts at zero, and then no gradient reaches A (nor
/// DoRA's norm anything) — returning the trainable tensors. Draws from the global generator:
/// the caller holds [`super::torch_rng_lock`].
pub fn attach_with_random_b(model: &mut CausalLm, s: &LoraSettings, seed: i64) -> Vec<(String, Tensor)> {
    tch::manual_seed(seed);
    let named = peft::attach(model, s).unwrap();
    tch::no_grad(|| {
        for (n, t) in &named {
            if n.contains("lora_B") {
                let _ = t.shallow_clone().copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.05));
            }
        }
    });
    named
}

/// A copy of each tensor's gradient.
pub fn grads(named: &[(String, Tensor)]) -> Vec<Tensor> {
    named.iter().map(|(_, t)| t.grad().copy()).collect()
}

/// Zeroes every gradient there is.
pub fn zero_grads(named: &[(String, Tensor)]) {
    for (_, t) in named {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}
