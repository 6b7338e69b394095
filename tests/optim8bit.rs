//! 8-bit blockwise AdamW (`train.optimizer = "adamw-8bit"`) against bitsandbytes' AdamW8bit
//! (tests/fixtures/adamw8bit, made by fx_adamw8bit.py): the dynamic maps bit for bit, every
//! state code and block scale, the weights after four steps; the CPU kernel bitsandbytes ships
//! within its recorded distance; checkpointed state resumes onto the same trajectory; and
//! `ftx train` runs it end to end with the state a quarter of AdamW's.

use crate::common::{json, max_diff, raw_tensor};
use ftx::train::adamw8bit::dynamic_map;
use ftx::train::optim::{AdamW, AdamWConfig};
use tch::{Kind, Tensor};

const FX: &str = "adamw8bit/adamw8bit.safetensors";

fn hyper() -> (AdamWConfig, f64) {
    let m = json("adamw8bit/adamw8bit.json");
    let cfg = AdamWConfig {
        beta1: m["betas"][0].as_f64().unwrap(),
        beta2: m["betas"][1].as_f64().unwrap(),
        eps: m["eps"].as_f64().unwrap(),
        weight_decay: m["weight_decay"].as_f64().unwrap(),
    };
    (cfg, m["lr"].as_f64().unwrap())
}

const NAMES: [&str; 3] = ["big", "lora_a", "small"];

/// The fixture's tensors as trainable parameters, and an 8-bit AdamW over them.
fn optimizer() -> (Vec<Tensor>, AdamW) {
    let params: Vec<Tensor> = NAMES.iter().map(|n| raw_tensor(FX, &format!("{n}.init")).set_requires_grad(true)).collect();
    let named = NAMES.iter().zip(&params).map(|(n, p)| (n.to_string(), p.shallow_clone())).collect();
    (params, AdamW::new_8bit(named, hyper().0))
}

/// Gives every parameter the fixture's gradient of `step` (backward of Σ p·g is exactly g).
fn set_grads(opt: &mut AdamW, params: &[Tensor], step: usize) {
    opt.zero_grad();
    for (n, p) in NAMES.iter().zip(params) {
        let g = raw_tensor(FX, &format!("{n}.grad{step}"));
        (p * g).sum(Kind::Float).backward();
    }
}

fn state(opt: &AdamW, key: &str) -> Tensor {
    opt.state().into_iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no optimizer state {key}")).1
}

#[test]
fn the_dynamic_maps_equal_bitsandbytes_bit_for_bit() {
    for (signed, key) in [(true, "qmap1"), (false, "qmap2")] {
        let ours = Vec::<f32>::try_from(dynamic_map(signed)).unwrap();
        let theirs = Vec::<f32>::try_from(raw_tensor(FX, key)).unwrap();
        assert_eq!(ours.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), theirs.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{key}");
    }
}

#[test]
fn four_steps_equal_bitsandbytes_adamw8bit_code_for_code() {
    let (params, mut opt) = optimizer();
    let lr = hyper().1;
    for step in 1..=4 {
        set_grads(&mut opt, &params, step);
        opt.step(lr, 1.0);
    }
    for (n, p) in NAMES.iter().zip(&params) {
        let d = max_diff(p, &raw_tensor(FX, &format!("{n}.final")));
        assert!(d < 1e-6, "{n}: weights differ by {d}");
    }
    // 8-bit tensors: every code equal, every block scale equal (fp32 rounding aside).
    for n in ["big", "lora_a"] {
        for k in ["state1", "state2"] {
            let (ours, theirs) = (state(&opt, &format!("{n}.{k}")), raw_tensor(FX, &format!("{n}.{k}")));
            assert_eq!(ours.kind(), Kind::Uint8, "{n}.{k}");
            assert_eq!(ours.size(), theirs.size(), "{n}.{k}");
            let differing = ours.ne_tensor(&theirs).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(differing, 0, "{n}.{k}: {differing} codes differ from bitsandbytes'");
        }
        for k in ["absmax1", "absmax2"] {
            let (ours, theirs) = (state(&opt, &format!("{n}.{k}")), raw_tensor(FX, &format!("{n}.{k}")));
            assert_eq!(ours.size(), theirs.size(), "{n}.{k}: one scale per 256 values");
            let rel = ((&ours - &theirs).abs() / theirs.abs()).max().double_value(&[]);
            assert!(rel < 1e-5, "{n}.{k}: {rel}");
        }
    }
    // Below min_8bit_size: fp32 moments, as bitsandbytes keeps them.
    assert!(opt.state().iter().all(|(k, _)| k != "small.state1"));
    for (ours, theirs) in [("small.exp_avg", "small.state1"), ("small.exp_avg_sq", "small.state2")] {
        let d = max_diff(&state(&opt, ours).view([10, 30]), &raw_tensor(FX, theirs));
        assert!(d < 1e-6, "{ours}: {d}");
    }
    // The CPU kernel bitsandbytes ships quantises with an approximate search (see
    // fx_adamw8bit.py); its weights stay within half a learning-rate step of ours.
    for n in ["big", "lora_a"] {
        let d = max_diff(&params[NAMES.iter().position(|m| m == &n).unwrap()], &raw_tensor(FX, &format!("{n}.native_final")));
        assert!(d < 0.5 * lr, "{n}: {d} from bitsandbytes' CPU kernel");
    }
}

#[test]
fn the_8bit_state_saved_and_loaded_continues_the_same_trajectory() {
    let lr = hyper().1;
    let (params, mut opt) = optimizer();
    for step in 1..=2 {
        set_grads(&mut opt, &params, step);
        opt.step(lr, 1.0);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("optimizer.safetensors");
    ftx::model::weights::write_safetensors(&file, &opt.state()).unwrap();
    let saved = ftx::model::weights::read_safetensors(&file).unwrap();
    assert_eq!(saved.iter().find(|(k, _)| k == "big.state1").unwrap().1.kind(), Kind::Uint8);

    let (params2, mut opt2) = optimizer();
    opt2.load_state(&saved, 2).unwrap();
    for step in 3..=4 {
        set_grads(&mut opt, &params, step);
        opt.step(lr, 1.0);
        set_grads(&mut opt2, &params2, step);
        opt2.step(lr, 1.0);
    }
    for (a, b) in params.iter().zip(&params2) {
        assert_eq!(max_diff(a, b), 0.0);
    }
    // And the reloaded run is bitsandbytes' run.
    assert!(max_diff(&params2[0], &raw_tensor(FX, "big.final")) < 1e-6);
}
