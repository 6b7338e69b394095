//! FSDP's prefetch and CPU offload on Gloo: with gradient checkpointing every layer's
//! all-gather is started a layer ahead (asynchronously), and with `cpu_offload` AdamW's state
//! lives and is updated in host memory; the runs still equal the single-process run with the
//! same global batch.

use crate::dist::{config_text, ddp_equals_single_process, stderr};

#[test]
fn fsdp_with_cpu_offload_and_prefetch_equals_one_process() {
    // Full fine-tuning on 3 ranks, one layer at a time (prefetched), validated at every step.
    let eval = "data.validation_split=0.25 train.eval_every=1 distributed.strategy=fsdp distributed.cpu_offload=true";
    ddp_equals_single_process(3, 1, 24, &format!("train.max_steps=2 train.grad_checkpointing=true {eval}"), true);
    // LoRA on 2 ranks with the whole model gathered a step, accumulating.
    ddp_equals_single_process(2, 2, 24, "train.max_steps=2 train.grad_accum=2 distributed.strategy=fsdp distributed.cpu_offload=true", false);
}

#[test]
fn cpu_offload_without_fsdp_is_refused_clearly() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_text(d.path(), 8, "train.max_steps=1 train.batch_size=1");
    let text = cfg.to_toml().replace("[distributed]\n", "[distributed]\ncpu_offload = true\n");
    assert!(text.contains("cpu_offload = true"), "{text}");
    let path = d.path().join("offload.toml");
    std::fs::write(&path, text).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ftx")).args(["train", "--config"]).arg(&path).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("distributed.cpu_offload = true") && stderr(&o).contains("strategy = \"fsdp\""), "{}", stderr(&o));
}
