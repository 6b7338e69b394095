//! FSDP's prefetch and CPU offload on Gloo: with gradient checkpointing every layer's
//! all-gather is started a layer ahead (asynchronously), and with `cpu_offload` AdamW's state
//! lives and is updated in host memory; the runs still equal the single-process run with the
//! same global batch.

use crate::common::max_diff;
use crate::dist::{assert_same_run, config_text, ddp_command, ddp_equals_single_process, stderr};

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

/// The optimizer state of the newest checkpoint of the run in `dir`, by name (under FSDP
/// joined from the ranks' shards), sorted.
fn checkpointed_state(dir: &std::path::Path) -> Vec<(String, tch::Tensor)> {
    let (_, mut state, _) = ftx::train::checkpoint::latest(&dir.join("out")).unwrap().expect("a checkpoint");
    state.sort_by(|a, b| a.0.cmp(&b.0));
    state
}

/// `settings` trained on 2 ranks × batch 2 under DDP and under FSDP: the two folders.
fn ddp_and_fsdp(settings: &str) -> (tempfile::TempDir, tempfile::TempDir) {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (dir, strategy) in [(&dirs.0, "ddp"), (&dirs.1, "fsdp")] {
        let cfg = config_text(dir.path(), 24, &format!("method.kind=full {settings} train.batch_size=2 distributed.strategy={strategy}"));
        let o = ddp_command(dir.path(), &cfg, 2, &[]).output().unwrap();
        assert!(o.status.success(), "{strategy}: {}", stderr(&o));
    }
    dirs
}

#[test]
fn fsdp_adamw_8bit_equals_the_unsharded_8bit_optimizer_on_the_same_ranks() {
    // Tensors of ≥ 4096 values keep 8-bit moments quantised per block of 256 values: under
    // FSDP each starts on a block and every slice is whole blocks, so each rank quantises
    // blocks of the unsharded optimizer. The tiny Llama's embeddings (453 × 64) end a quarter
    // into a block; k/v (2048 values) keep fp32 moments. The reference is DDP on the same 2
    // ranks (the same summed gradients): against one process, whose gradients differ in the
    // last bits, a moment next to a quantisation boundary can round to another code, and the
    // weights then differ by ~1e-4 at a few elements under DDP as well. Then HFT, one layer
    // at a time.
    let opt = "train.optimizer=adamw-8bit train.max_steps=3 train.weight_decay=0.1";
    for settings in [opt.to_string(), format!("{opt} method.kind=hft method.hft_round_steps=1 train.grad_checkpointing=true")] {
        let (ddp, fsdp) = ddp_and_fsdp(&settings);
        assert_same_run(ddp.path(), fsdp.path(), true);
        // The joined shards of the last checkpoint are the unsharded optimizer's state: the
        // same names (codes and block scales for the 8-bit tensors), shapes and values — a
        // code may round to its neighbour where the two runs' moments differ in the last bits
        // (seen at one value in 10⁵), a misplaced block would change whole blocks.
        let (whole, sharded) = (checkpointed_state(ddp.path()), checkpointed_state(fsdp.path()));
        assert!(whole.iter().any(|(n, _)| n.ends_with(".absmax1")), "8-bit moments were saved");
        assert_eq!(whole.iter().map(|(n, t)| (n, t.size())).collect::<Vec<_>>(), sharded.iter().map(|(n, t)| (n, t.size())).collect::<Vec<_>>());
        for ((name, x), (_, y)) in whole.iter().zip(&sharded) {
            let d = max_diff(x, y);
            if name.ends_with(".state1") || name.ends_with(".state2") {
                let moved = x.to_kind(tch::Kind::Float).ne_tensor(&y.to_kind(tch::Kind::Float)).sum(tch::Kind::Int64).int64_value(&[]);
                assert!(d <= 1.0 && moved * 1000 <= x.numel() as i64, "{name}: {moved} codes differ, by up to {d}");
            } else {
                assert!(d <= 1e-5, "{name}: differs by {d}");
            }
        }
    }
}
