//! Export: adapters that HF PEFT wrote load into ftx and give PEFT's loss; the merged
//! checkpoint ftx writes loads as a plain model and gives the same loss.

use crate::common::{fixture, json};
use crate::peft_parity::{fixture_batch, loss_of};
use ftx::model::decoder::LoadOptions;
use ftx::model::CausalLm;
use tch::{Device, Kind};

const CPU32: LoadOptions = LoadOptions { device: Device::Cpu, kind: Kind::Float };

#[test]
fn peft_adapters_load_and_merged_exports_reproduce_peft_loss() {
    let b = fixture_batch();
    for variant in ["lora", "rslora", "dora"] {
        // The adapter PEFT saved after one step, and the loss PEFT measured with it.
        let want = json(&format!("peft/{variant}_llama3.json"))["loss1"].as_f64().unwrap();
        let adapter = fixture(&format!("peft/adapters/{variant}_llama3"));
        let mut model = CausalLm::load(&fixture("models/llama3"), CPU32).unwrap();
        ftx::peft::load_adapter(&mut model, &adapter).unwrap();
        let got = loss_of(&model, &b);
        assert!((got - want).abs() < 1e-4, "{variant}: ftx with PEFT's adapter {got} vs PEFT {want}");

        let out = tempfile::tempdir().unwrap();
        ftx::export::export_merged(&fixture("models/llama3"), &adapter, out.path(), Kind::Float).unwrap();
        let merged = CausalLm::load(out.path(), CPU32).unwrap();
        let got = loss_of(&merged, &b);
        assert!((got - want).abs() < 1e-4, "{variant}: merged checkpoint {got} vs PEFT {want}");
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], "float32");
        assert!(out.path().join("tokenizer.json").exists());
    }
}

#[test]
fn a_bf16_merged_export_stays_close() {
    let b = fixture_batch();
    let want = json("peft/lora_llama3.json")["loss1"].as_f64().unwrap();
    let out = tempfile::tempdir().unwrap();
    ftx::export::export_merged(&fixture("models/llama3"), &fixture("peft/adapters/lora_llama3"), out.path(), Kind::BFloat16).unwrap();
    let tensors = tch::Tensor::read_safetensors(out.path().join("model.safetensors")).unwrap();
    assert!(tensors.iter().all(|(_, t)| t.kind() == Kind::BFloat16));
    let merged = CausalLm::load(out.path(), CPU32).unwrap();
    let got = loss_of(&merged, &b);
    assert!((got - want).abs() < 0.05, "bf16 merged {got} vs fp32 PEFT {want}");
}
