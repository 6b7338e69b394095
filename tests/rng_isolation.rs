//! Loading an adapter from a file draws nothing from libtorch's process-wide generator (LoRA,
//! DoRA, over an NF4 base, MoE experts), so a seeded run's random stream — dropout masks a
//! checkpointed recompute must draw again — is the same with or without a load in between.

use crate::common::{all_tensors, fixture, max_diff, torch_rng_lock};
use ftx::model::decoder::LoadOptions;
use ftx::model::CausalLm;
use ftx::peft;
use tch::{Device, Kind, Tensor};

/// The first number libtorch's global generator gives after being seeded and then running `f`.
fn next_draw_after(f: impl FnOnce()) -> f64 {
    tch::manual_seed(11);
    f();
    Tensor::rand([1], (Kind::Double, Device::Cpu)).double_value(&[0])
}

fn model(family: &str) -> CausalLm {
    CausalLm::load(&fixture(&format!("models/{family}")), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap()
}

#[test]
fn loading_an_adapter_draws_nothing_from_the_global_generator() {
    let _rng = torch_rng_lock();
    let untouched = next_draw_after(|| {});
    // The probe sees a draw: attaching fresh adapters (Kaiming-uniform A) moves the stream,
    // as loading did before it allocated zeros to fill.
    let mut fresh = model("llama3");
    let s = peft::read_adapter_config(&fixture("peft/adapters/lora_llama3")).unwrap();
    assert_ne!(next_draw_after(|| drop(peft::attach(&mut fresh, &s).unwrap())), untouched, "attach must draw for this probe to mean anything");
    for (family, adapter, nf4) in [("llama3", "lora_llama3", false), ("llama3", "dora_llama3", false), ("llama3", "lora_llama3", true), ("mixtral", "lora_mixtral", false)] {
        let dir = fixture(&format!("peft/adapters/{adapter}"));
        let mut m = model(family);
        let s = peft::LoraSettings { quantize_nf4: nf4, ..peft::read_adapter_config(&dir).unwrap() };
        assert_eq!(next_draw_after(|| peft::load_adapter_with(&mut m, &dir, &s).unwrap()), untouched, "{adapter} (NF4 base: {nf4}) drew from the global generator");
        // And the adapter holds the file's weights (every tensor of the file, none left zero).
        let file = all_tensors(&format!("peft/adapters/{adapter}/adapter_model.safetensors"));
        let loaded = peft::adapter_tensors(&mut m);
        assert_eq!(loaded.len(), file.len(), "{adapter}");
        for (name, t) in &loaded {
            let (_, want) = file.iter().find(|(n, _)| n.replace(".default", "") == *name).unwrap_or_else(|| panic!("{adapter}: {name} not in the file"));
            assert_eq!(max_diff(t, want), 0.0, "{adapter}: {name}");
        }
    }
}
