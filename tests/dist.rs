//! Training beyond one process (libtorch's c10d, Gloo on the CPU): the collectives on 2 and 3
//! ranks against their closed forms, refused set-ups, DDP and FSDP runs against the
//! single-process run with the same global batch, and a rank killed mid-run then resumed on
//! another number of ranks.

use crate::common::{fixture, max_diff, metric_series, torch_rng_lock};
use ftx::model::decoder::LoadOptions;
use ftx::model::{CausalLm, ModelConfig};
use ftx::plan::{plan, Method, ModelShape, PlanRequest};
use ftx::recipes::train;
use ftx::train::fsdp;
use ftx::train::TrainConfig;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tch::{Kind, Tensor};

const FTX: &str = env!("CARGO_BIN_EXE_ftx");

/// A port nothing listens on now (the OS's pick).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `ftx dist-check` on `n` ranks and returns each rank's JSON line, by rank.
fn dist_check(n: usize) -> Vec<serde_json::Value> {
    let port = free_port().to_string();
    let o = Command::new(FTX).args(["dist-check", "--nproc-per-node", &n.to_string(), "--master-port", &port]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
    lines.sort_by_key(|v| v["rank"].as_u64());
    assert_eq!(lines.len(), n, "one line per rank");
    lines
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn gloo_collectives_on_2_and_3_ranks_give_the_hand_computed_values() {
    // Rank r contributes [r+1, 2(r+1)] to the sum, r to max/min, [10r, 10r+1, 10r+2] to the
    // broadcast from the last rank, [r, -r] to the gather, [100r + j] to the reduce-scatter.
    let two = dist_check(2);
    for (r, v) in two.iter().enumerate() {
        assert_eq!(v["world_size"], 2);
        assert_eq!(floats(&v["all_reduce_sum"]), [3.0, 6.0]); // 1+2, 2+4
        assert_eq!(v["all_reduce_max"], 1.0);
        assert_eq!(v["all_reduce_min"], 0.0);
        assert_eq!(floats(&v["broadcast"]), [10.0, 11.0, 12.0]);
        assert_eq!(floats(&v["all_gather"]), [0.0, 0.0, 1.0, -1.0]);
        // inputs [0,1,2,3] and [100,101,102,103]: rank 0 gets [100, 102], rank 1 [104, 106]
        assert_eq!(floats(&v["reduce_scatter"]), if r == 0 { [100.0, 102.0] } else { [104.0, 106.0] });
        // Gradients reduced by DDP's reducer, two buckets launched by the backward pass itself.
        assert_eq!(floats(&v["overlap_grads"]), [18.0, 9.0, 6.0]); // (1+2)·[6, 3, 2]
        assert_eq!(v["overlap_early"], 2);
    }
    let three = dist_check(3);
    let scatter = [[300.0, 303.0], [306.0, 309.0], [312.0, 315.0]]; // 0+100+200 + 3j
    for (r, v) in three.iter().enumerate() {
        assert_eq!(v["rank"], r);
        assert_eq!(floats(&v["all_reduce_sum"]), [6.0, 12.0]);
        assert_eq!(v["all_reduce_max"], 2.0);
        assert_eq!(v["all_reduce_min"], 0.0);
        assert_eq!(floats(&v["broadcast"]), [20.0, 21.0, 22.0]);
        assert_eq!(floats(&v["all_gather"]), [0.0, 0.0, 1.0, -1.0, 2.0, -2.0]);
        assert_eq!(floats(&v["reduce_scatter"]), scatter[r]);
        assert_eq!(floats(&v["overlap_grads"]), [36.0, 18.0, 12.0]); // (1+2+3)·[6, 3, 2]
        assert_eq!(v["overlap_early"], 2);
    }
}

#[test]
fn bad_setups_are_refused_with_a_clear_message() {
    // The environment (torchrun) and the flags disagree on the world size.
    let port = free_port().to_string();
    let o = Command::new(FTX)
        .args(["dist-check", "--nproc-per-node", "2"])
        .envs([("RANK", "0"), ("WORLD_SIZE", "3"), ("LOCAL_WORLD_SIZE", "3"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("WORLD_SIZE=3") && stderr(&o).contains("--nproc-per-node 2"), "{}", stderr(&o));

    // The rendezvous port is taken.
    let held = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let o = Command::new(FTX).args(["dist-check", "--nproc-per-node", "2", "--master-port", &port]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&format!("rendezvous port {port}")) && stderr(&o).contains("--master-port"), "{}", stderr(&o));
    drop(held);

    // A rank whose store never answers gives up after the timeout, naming itself and the address.
    let port = free_port().to_string();
    let o = Command::new(FTX)
        .args(["dist-check", "--timeout-s", "2"])
        .envs([("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let want = format!("rank 1: could not join the rendezvous at 127.0.0.1:{port} within 2s");
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));

    // NCCL asked for a CPU run.
    let d = tempfile::tempdir().unwrap();
    let cfg = config_text(d.path(), 8, "distributed.backend=nccl");
    let o = ddp_command(d.path(), &cfg, 1, &[]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("distributed.backend = \"nccl\" cannot carry tensors on Cpu"), "{}", stderr(&o));
}

// ---- DDP training ----

fn write_chats(dir: &Path, n: usize) -> PathBuf {
    let cities = ["Paris", "Berlin", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Quito"];
    let lines: String = (0..n)
        .map(|i| {
            let c = cities[(i * 5 + i / 4) % cities.len()];
            let rec = serde_json::json!({"messages": [
                {"role": "user", "content": format!("Weather in {c}{}?", " now".repeat(i % 3))},
                {"role": "assistant", "content": format!("{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{c}\"}}}}")},
            ]});
            rec.to_string() + "\n"
        })
        .collect();
    let p = dir.join("train.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

/// A tiny-llama run's config text; `extra` are `--set` style overrides.
pub(crate) fn config_text(dir: &Path, records: usize, extra: &str) -> TrainConfig {
    let data = write_chats(dir, records);
    let text = format!(
        "[model]\npath = \"{}\"\ndtype = \"fp32\"\ndevice = \"cpu\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n\
         [method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n[train]\nlr = 1e-3\nschedule = \"constant\"\noutput_dir = \"{}\"\n\
         [distributed]\ntimeout_s = 60\n",
        fixture("models/llama3").display(),
        data.display(),
        dir.join("out").display()
    );
    let overrides: Vec<String> = extra.split_whitespace().map(str::to_owned).collect();
    TrainConfig::parse(&text, &overrides).unwrap()
}

fn final_tensors(dir: &Path, full: bool) -> Vec<(String, Tensor)> {
    let file = if full { "model.safetensors" } else { "adapter_model.safetensors" };
    let mut v = Tensor::read_safetensors(dir.join("out/final").join(file)).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `ftx train --nproc-per-node n` on the config written into `dir`.
pub(crate) fn ddp_command(dir: &Path, cfg: &TrainConfig, n: usize, set: &[&str]) -> Command {
    let path = dir.join("ftx.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let mut c = Command::new(FTX);
    c.args(["train", "--config"]).arg(&path).args(["--nproc-per-node", &n.to_string(), "--master-port", &free_port().to_string()]);
    for s in set {
        c.args(["--set", s]);
    }
    c
}

/// Losses and every trainable tensor of two runs agree within fp32 rounding.
pub(crate) fn assert_same_run(reference: &Path, ddp: &Path, full: bool) {
    for key in ["loss", "eval_loss"] {
        let (a, b) = (metric_series(&reference.join("out"), key), metric_series(&ddp.join("out"), key));
        assert!(key != "loss" || !a.is_empty());
        assert_eq!(a.len(), b.len(), "{key}: {a:?} vs {b:?}");
        for ((s1, l1), (s2, l2)) in a.iter().zip(&b) {
            assert_eq!(s1, s2);
            assert!((l1 - l2).abs() <= 1e-5, "step {s1}: single-process {key} {l1}, DDP {l2}");
        }
    }
    let (ta, tb) = (final_tensors(reference, full), final_tensors(ddp, full));
    assert_eq!(ta.len(), tb.len());
    for ((n1, x), (n2, y)) in ta.iter().zip(&tb) {
        assert_eq!(n1, n2);
        let d = max_diff(x, y);
        assert!(d <= 1e-5, "{n1}: differs by {d}");
    }
}

/// Trains `ranks` × batch `b` with DDP and one process with batch `ranks·b`, and compares.
/// Returns both runs' folders (the single process's first).
pub(crate) fn ddp_equals_single_process(ranks: usize, b: usize, records: usize, settings: &str, full: bool) -> (tempfile::TempDir, tempfile::TempDir) {
    let method = if full { "method.kind=full" } else { "method.kind=lora" };
    let single = tempfile::tempdir().unwrap();
    {
        let _rng = torch_rng_lock();
        train(&config_text(single.path(), records, &format!("{method} {settings} train.batch_size={}", ranks * b))).unwrap();
    }
    let multi = tempfile::tempdir().unwrap();
    let cfg = config_text(multi.path(), records, &format!("{method} {settings} train.batch_size={b}"));
    let o = ddp_command(multi.path(), &cfg, ranks, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    if settings.contains("validation_split") {
        assert!(metric_series(&single.path().join("out"), "eval_loss").len() >= 2, "the runs were validated");
    }
    assert_same_run(single.path(), multi.path(), full);
    (single, multi)
}

#[test]
fn ddp_lora_on_2_ranks_with_packing_and_accumulation_equals_one_process() {
    ddp_equals_single_process(2, 2, 40, "train.max_steps=3 train.grad_accum=2 data.packing=true data.max_seq_len=48", false);
}

#[test]
fn ddp_lora_on_3_ranks_equals_one_process_through_a_short_last_batch() {
    // 43 records in global batches of 6: the 8th holds one, so two ranks sit that step out.
    ddp_equals_single_process(3, 2, 43, "train.max_steps=8", false);
}

#[test]
fn ddp_hft_and_checkpointed_lora_equal_one_process() {
    // HFT switches the trained half every step; the ranks must agree on it.
    ddp_equals_single_process(2, 2, 24, "train.max_steps=2 method.hft_round_steps=1 method.kind=hft", true);
    ddp_equals_single_process(2, 2, 24, "train.max_steps=2 train.grad_checkpointing=true", false);
}

#[test]
fn ddp_full_fine_tuning_on_2_and_3_ranks_equals_one_process() {
    // With a validation split scored across the ranks (at start, step 1 and the end).
    let eval = "data.validation_split=0.25 train.eval_every=1";
    ddp_equals_single_process(2, 2, 24, &format!("train.max_steps=2 train.grad_accum=2 {eval}"), true);
    ddp_equals_single_process(3, 1, 24, &format!("train.max_steps=2 {eval}"), true);
}

/// As [`ddp_equals_single_process`] on 2 ranks × 2, with buckets small enough that every
/// tensor has its own: the ranks' logs must show buckets all-reduced by the backward pass
/// itself (before it ended), and the run must still equal one process.
fn overlapped_equals_single_process(settings: &str, full: bool) {
    let method = if full { "method.kind=full" } else { "method.kind=lora" };
    let single = tempfile::tempdir().unwrap();
    {
        let _rng = torch_rng_lock();
        train(&config_text(single.path(), 24, &format!("{method} {settings} train.batch_size=4"))).unwrap();
    }
    let multi = tempfile::tempdir().unwrap();
    let cfg = config_text(multi.path(), 24, &format!("{method} {settings} train.batch_size=2 distributed.bucket_mib=0.0001"));
    let o = ddp_command(multi.path(), &cfg, 2, &[]).args(["--log", "info"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let line = err.lines().find(|l| l.contains("all-reduced while the backward pass ran")).unwrap_or_else(|| panic!("no overlap line: {err}"));
    let field = |k: &str| -> usize { line.split(&format!("{k}=")).nth(1).and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()).unwrap().parse().unwrap() };
    let (early, buckets) = (field("early"), field("buckets"));
    assert!(early > 0 && early <= buckets, "{line}");
    if full {
        // The root's tensors (embeddings, norm, head) wait for the end of the backward.
        assert!(early < buckets, "{line}");
    }
    assert_same_run(single.path(), multi.path(), full);
}

#[test]
fn ddp_all_reduces_buckets_during_the_backward_and_still_equals_one_process() {
    overlapped_equals_single_process("train.max_steps=2 train.grad_accum=2", false);
    overlapped_equals_single_process("train.max_steps=2 train.grad_checkpointing=true", true);
}

/// The process ids of `parent`'s children whose environment holds `RANK=<rank>`.
fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid = stat.rsplit(')').next().and_then(|s| s.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|kv| kv == format!("RANK={rank}").as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Trains one process with global batch 6 as the reference; then `first` = (ranks, batch) with
/// `strategy`, one rank killed after the step-4 checkpoint; then the same command resumed on
/// `second` (the same global batch), which must land on the reference's trajectory.
fn killed_and_resumed(strategy: &str, first: (usize, usize), second: (usize, usize)) {
    let settings = format!("train.max_steps=10 train.save_every=4 train.keep_last=5 distributed.strategy={strategy}");
    // The reference: one process, global batch 6.
    let single = tempfile::tempdir().unwrap();
    {
        let _rng = torch_rng_lock();
        train(&config_text(single.path(), 40, &format!("{settings} train.batch_size=6"))).unwrap();
    }
    let cut = tempfile::tempdir().unwrap();
    let cfg = config_text(cut.path(), 40, &format!("{settings} train.batch_size={}", first.1));
    let launcher = ddp_command(cut.path(), &cfg, first.0, &[])
        .env("FTX_STEP_DELAY_MS", "200")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ckpt = cut.path().join("out/checkpoints/step-0000004");
    let t0 = std::time::Instant::now();
    while !ckpt.join("state.json").exists() {
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let victim = rank_pid(launcher.id(), 1).expect("rank 1 is a child of the launcher");
    let survivor = rank_pid(launcher.id(), 0).expect("rank 0 is a child of the launcher");
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let out = launcher.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("rank 1 was killed by signal 9"), "{}", stderr(&out));
    // The launcher returns only once every rank is gone.
    assert!(!Path::new(&format!("/proc/{survivor}")).exists(), "rank 0 still runs");
    assert!(metric_series(&cut.path().join("out"), "loss").len() < 10, "the run stopped early");
    // The checkpoint is whole: its state and optimizer tensors read back.
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 4);
    if strategy == "fsdp" {
        // One optimizer shard per rank, besides the layout and rank 0's adapter.
        for r in 0..first.0 {
            let shard = ckpt.join(format!("optimizer-shard-{r:05}-of-{:05}.safetensors", first.0));
            assert!(!Tensor::read_safetensors(&shard).unwrap().is_empty(), "{}", shard.display());
        }
        assert!(ckpt.join("shards.json").exists() && ckpt.join("adapter/adapter_model.safetensors").exists());
        assert!(!ckpt.join("optimizer.safetensors").exists());
    } else {
        assert!(!Tensor::read_safetensors(ckpt.join("optimizer.safetensors")).unwrap().is_empty());
    }

    // The same command resumes on the other number of ranks (the same global batch) onto the same trajectory.
    let batch = format!("train.batch_size={}", second.1);
    let o = ddp_command(cut.path(), &cfg, second.0, &[&batch]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from the checkpoint at step"), "{}", stderr(&o));
    assert_same_run(single.path(), cut.path(), false);
}

#[test]
fn a_killed_rank_stops_the_run_and_the_same_command_resumes_on_2_or_3_ranks() {
    // 2 ranks × 3, rank 1 killed; resumed on 3 ranks × 2.
    killed_and_resumed("ddp", (2, 3), (3, 2));
}

// ---- FSDP ----

#[test]
fn fsdp_lora_on_2_ranks_with_packing_and_accumulation_equals_one_process() {
    ddp_equals_single_process(2, 2, 40, "distributed.strategy=fsdp train.max_steps=3 train.grad_accum=2 data.packing=true data.max_seq_len=48", false);
}

#[test]
fn fsdp_lora_on_3_ranks_equals_one_process_through_a_short_last_batch() {
    // 43 records in global batches of 6: in the 8th step two ranks have no example, yet take
    // part in every layer's gather and reduce-scatter (checkpointing: one layer at a time).
    ddp_equals_single_process(3, 2, 43, "distributed.strategy=fsdp train.max_steps=8 train.grad_checkpointing=true", false);
}

#[test]
fn fsdp_qlora_and_dora_on_2_ranks_equal_one_process() {
    // QLoRA: the NF4 projections are sharded (codes and scales) and gathered per step like the rest.
    ddp_equals_single_process(2, 2, 24, "distributed.strategy=fsdp train.max_steps=2 method.kind=qlora", false);
    ddp_equals_single_process(2, 2, 24, "distributed.strategy=fsdp train.max_steps=2 method.kind=dora train.grad_checkpointing=true", false);
}

#[test]
fn fsdp_full_fine_tuning_on_2_and_3_ranks_equals_one_process() {
    let eval = "data.validation_split=0.25 train.eval_every=1 distributed.strategy=fsdp";
    ddp_equals_single_process(2, 2, 24, &format!("train.max_steps=2 train.grad_accum=2 {eval}"), true);
    ddp_equals_single_process(3, 1, 24, &format!("train.max_steps=2 train.grad_checkpointing=true {eval}"), true);
}

#[test]
fn fsdp_saved_on_3_ranks_with_one_killed_resumes_on_2_onto_the_same_trajectory() {
    // 3 ranks × 2, rank 1 killed after the step-4 checkpoint; resumed on 2 ranks × 3.
    killed_and_resumed("fsdp", (3, 2), (2, 3));
}

#[test]
fn fsdp_hft_on_2_and_3_ranks_equals_one_process() {
    // HFT switches the trained half every step: on every rank's slices the frozen half keeps
    // its values and moments and takes no weight decay, as in one process. Whole model
    // gathered a step (2 ranks), then one layer at a time (3 ranks).
    let hft = "distributed.strategy=fsdp method.kind=hft method.hft_round_steps=1 train.max_steps=3 train.weight_decay=0.1";
    ddp_equals_single_process(2, 2, 24, hft, true);
    ddp_equals_single_process(3, 1, 24, &format!("{hft} train.grad_checkpointing=true"), true);
}

#[test]
fn ctrl_c_to_the_launcher_stops_every_rank_after_the_same_step_and_the_run_resumes() {
    let settings = "train.max_steps=8 train.save_every=0";
    let single = tempfile::tempdir().unwrap();
    {
        let _rng = torch_rng_lock();
        train(&config_text(single.path(), 24, &format!("{settings} train.batch_size=4"))).unwrap();
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = config_text(d.path(), 24, &format!("{settings} train.batch_size=2"));
    let launcher = ddp_command(d.path(), &cfg, 2, &[]).env("FTX_STEP_DELAY_MS", "300").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let metrics = d.path().join("out/metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.is_empty()) {
        assert!(t0.elapsed().as_secs() < 300, "the run never logged a step");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let ranks: Vec<u32> = (0..2).map(|r| rank_pid(launcher.id(), r).expect("a rank of the launcher")).collect();
    // As a terminal's Ctrl-C does: the launcher's process group (the ranks have their own).
    unsafe { libc::kill(launcher.id() as i32, libc::SIGINT) };
    let out = launcher.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    for pid in ranks {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "rank process {pid} outlived the launcher");
    }
    // The ranks stopped after the same step: rank 0 logged it and checkpointed it (save_every = 0:
    // the only checkpoint is the one the signal asked for).
    let stopped_at = metric_series(&d.path().join("out"), "loss").last().unwrap().0 as usize;
    assert!(stopped_at < 8, "the run stopped early");
    let ckpts: Vec<usize> = ftx::train::checkpoint::list(&d.path().join("out")).into_iter().map(|(s, _)| s).collect();
    assert_eq!(ckpts, vec![stopped_at]);
    let err = stderr(&out);
    assert!(err.contains(&format!("after step {stopped_at} of 8")) && err.contains("--nproc-per-node 2"), "rank 0 prints the command: {err}");
    // The same command resumes onto the single-process trajectory.
    let o = ddp_command(d.path(), &cfg, 2, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("resuming from the checkpoint at step {stopped_at}")), "{}", stderr(&o));
    assert_same_run(single.path(), d.path(), false);
}

#[test]
fn without_the_launcher_the_surviving_ranks_name_the_lost_one() {
    // As under torchrun: the ranks started directly with its variables, rank 2 killed.
    let d = tempfile::tempdir().unwrap();
    let cfg = config_text(d.path(), 24, "train.max_steps=50 train.batch_size=1");
    let path = d.path().join("ftx.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let port = free_port().to_string();
    let ranks: Vec<std::process::Child> = (0..3)
        .map(|r| {
            Command::new(FTX)
                .args(["train", "--config"])
                .arg(&path)
                .envs([("RANK", r.to_string()), ("LOCAL_RANK", r.to_string()), ("WORLD_SIZE", "3".into())])
                .envs([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port), ("FTX_STEP_DELAY_MS", "100")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let metrics = d.path().join("out/metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.is_empty()) {
        assert!(t0.elapsed().as_secs() < 300, "the run never logged a step");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut ranks = ranks.into_iter();
    let (r0, r1, mut r2) = (ranks.next().unwrap(), ranks.next().unwrap(), ranks.next().unwrap());
    r2.kill().unwrap();
    r2.wait().unwrap();
    for (rank, child) in [(0, r0), (1, r1)] {
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "rank {rank} kept running");
        let err = stderr(&out);
        assert!(err.contains(&format!("rank {rank}: ")) && err.contains("lost rank(s) 2"), "rank {rank}: {err}");
    }
}

#[test]
fn two_launchers_in_torchruns_multi_node_shape_make_one_run_of_4_ranks() {
    let port = free_port().to_string();
    let node = |i: &str| {
        Command::new(FTX)
            .args(["dist-check", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", i, "--master-port", &port])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (second, first) = (node("1"), node("0"));
    let mut lines = Vec::new();
    for n in [first, second] {
        let o = n.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        lines.extend(String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()));
    }
    let mut ranks: Vec<u64> = lines.iter().map(|v| v["rank"].as_u64().unwrap()).collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1, 2, 3]);
    for v in &lines {
        assert_eq!(v["world_size"], 4);
        assert_eq!(floats(&v["all_reduce_sum"]), [10.0, 20.0]); // 1+2+3+4
    }
}

// ---- FSDP's per-rank state against `ftx plan` ----

/// A tiny bf16 model of `shape` with the trainable tensors of `method`.
fn tiny(shape: &ModelShape, method: Method) -> (CausalLm, Vec<(String, Tensor)>) {
    let config = ModelConfig::from_json(shape.to_hf_config(), std::path::Path::new("tiny/config.json")).unwrap();
    let mut model = CausalLm::random(config, LoadOptions { device: tch::Device::Cpu, kind: Kind::BFloat16 }, 0).unwrap();
    let trainable = match method {
        Method::Full => model.named_tensors(),
        _ => {
            ftx::peft::attach(&mut model, &crate::common::lora::lora_r4(method.name())).unwrap()
        }
    };
    (model, trainable)
}

#[test]
fn the_sharded_state_a_rank_holds_is_what_plan_counts() {
    // Draws from libtorch's global generator: hold the lock, so tests comparing dropout
    // masks across runs in other threads see no draws of ours in between.
    let _rng = torch_rng_lock();
    let shape = ModelShape {
        name: "tiny".into(),
        hidden: 64,
        intermediate: 96,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        vocab: 120,
        tied_embeddings: false,
        qkv_bias: false,
        qk_norm: false,
        layout: Default::default(),
    };
    for method in [Method::Full, Method::Lora, Method::Dora, Method::Qlora] {
        let (mut model, trainable) = tiny(&shape, method);
        let specs = fsdp::group_specs(&model, trainable, false);
        // QLoRA's NF4 projections (packed codes, absmax codes and scales) are sharded too.
        let nf4: u64 = model
            .linears_mut()
            .into_iter()
            .filter_map(|(_, l)| match &l.base.weight {
                ftx::model::linear::Weight::Nf4(q) => Some(q.packed.numel() + q.absmax_codes.numel() + 4 * q.absmax_scales.numel()),
                ftx::model::linear::Weight::Dense(_) | ftx::model::linear::Weight::Fp8(_) => None,
            })
            .sum::<usize>() as u64;
        assert_eq!(nf4 > 0, method == Method::Qlora);
        let frozen_bytes = |kind: Kind| -> u64 { specs.iter().filter(|g| !g.trainable && g.kind == kind).map(|g| g.span() as u64 * kind.elt_size_in_bytes() as u64).sum() };
        if method == Method::Qlora {
            // The layers' byte groups are the packed and absmax codes; the scales are fp32.
            let scales: u64 = model.linears_mut().into_iter().filter_map(|(_, l)| match &l.base.weight {
                ftx::model::linear::Weight::Nf4(q) => Some(4 * q.absmax_scales.numel() as u64),
                ftx::model::linear::Weight::Dense(_) | ftx::model::linear::Weight::Fp8(_) => None,
            }).sum();
            assert_eq!(frozen_bytes(Kind::Uint8) + scales, nf4, "every NF4 byte is in a sharded group");
        }
        let mut req = PlanRequest::new(shape.clone(), method);
        req.lora_rank = 4;
        let p = plan(&req);
        for world in [1usize, 2, 3] {
            let held = fsdp::per_rank_state_bytes(&specs, world);
            let planned = p.state_per_gpu(world as u64);
            // Each group pads its last slice to a whole one: at most world − 1 elements of
            // at most 16 bytes (bf16 value and gradient, fp32 master and moments) per group.
            let padding = (specs.len() * (world - 1) * 16) as u64 + 1;
            assert!(held.abs_diff(planned) <= padding, "{method:?} on {world}: a rank holds {held} bytes, plan says {planned}");
            if world == 1 {
                assert_eq!(held, planned, "{method:?}: one rank holds everything");
            }
        }
    }
}
