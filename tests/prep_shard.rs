//! `ftx prep --shard K/N` and `--reduce`: four shards (run in any order, one through a
//! Slurm array's variables, one through a Kubernetes index, one killed and run again) joined
//! by the reduce give byte-identical splits, rejects and report to the one-process run, and
//! every record is accounted for.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn ftx(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftx"));
    c.args(args);
    for k in ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX"] {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    c.output().unwrap()
}

fn ok(o: std::process::Output) -> String {
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Two input files: generated records with planted PII, exact and near duplicates (which
/// land in different shards), broken lines and refusals; and a plain-text file.
fn corpus(dir: &Path) {
    use ftx::data::prep::{bench::Corpus, split::{format_record, OutputFormat}};
    let mut corpus = Corpus::new(9);
    let mut text = String::new();
    for i in 0..1200 {
        if i % 89 == 0 {
            text.push_str("{broken\n");
        } else if i % 151 == 0 {
            text.push_str("{\"instruction\":\"q\",\"output\":\"As an AI language model, I cannot.\"}\n");
        } else {
            text.push_str(&serde_json::to_string(&format_record(&corpus.next_record().example, OutputFormat::Auto).unwrap()).unwrap());
            text.push('\n');
        }
    }
    std::fs::write(dir.join("a.jsonl"), text).unwrap();
    let lines: Vec<String> = (0..300).map(|i| format!("Line {} of the notes says the meeting moved to room {} on floor {}.", i % 120, i % 120, i % 3)).collect();
    std::fs::write(dir.join("b.txt"), lines.join("\n")).unwrap();
    std::fs::write(
        dir.join("prep.toml"),
        "[prep]\ninputs = [\"a.jsonl\", \"b.txt\"]\nout = \"one\"\nchunk_size = 64\n[prep.filter]\nlanguages = []\n[prep.split]\nstratify = \"source\"\n",
    )
    .unwrap();
}

const FILES: [&str; 5] = ["train.jsonl", "validation.jsonl", "test.jsonl", "rejects.jsonl", "report.json"];

#[test]
fn four_shards_and_a_reduce_equal_the_one_process_run() {
    let d = tempfile::tempdir().unwrap();
    corpus(d.path());
    let cfg = d.path().join("prep.toml");
    let cfg = cfg.to_str().unwrap();
    ok(ftx(&["prep", "--config", cfg, "--quiet"], &[]));
    let sharded = d.path().join("sharded");
    let out = sharded.to_str().unwrap();

    // Shards in any order, under any scheduler: a Slurm array numbered from 1, a Kubernetes
    // indexed job, plain arguments.
    ok(ftx(&["prep", "--config", cfg, "--out", out, "--quiet", "--shard", "auto"], &[("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_MIN", "1"), ("SLURM_ARRAY_TASK_COUNT", "4")]));
    ok(ftx(&["prep", "--config", cfg, "--out", out, "--quiet", "--shard", "auto/4"], &[("JOB_COMPLETION_INDEX", "1")]));
    ok(ftx(&["prep", "--config", cfg, "--out", out, "--quiet", "--shard", "0/4"], &[]));
    // Shard 2 was killed before it finished: temporary files and no marker.
    let two = sharded.join("shards/00002-of-00004");
    std::fs::create_dir_all(&two).unwrap();
    std::fs::write(two.join(".records.jsonl.tmp-999999"), "{\"source\":0,\"line\":3").unwrap();
    let o = ftx(&["prep", "--config", cfg, "--out", out, "--reduce"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("did not finish") && err.contains("00002-of-00004"), "{err}");
    assert!(!sharded.join("train.jsonl").exists(), "a failed reduce writes no splits");
    // Re-run alone, it replaces what the killed run left.
    ok(ftx(&["prep", "--config", cfg, "--out", out, "--quiet", "--shard", "2/4"], &[]));
    assert!(!two.join(".records.jsonl.tmp-999999").exists());

    let printed = ok(ftx(&["prep", "--config", cfg, "--out", out, "--reduce", sharded.join("shards").to_str().unwrap()], &[]));
    assert!(printed.contains("dedup"), "{printed}");
    for f in FILES {
        let one = std::fs::read(d.path().join("one").join(f)).unwrap();
        let joined = std::fs::read(sharded.join(f)).unwrap();
        assert!(one == joined, "{f} differs between the one-process run and the reduce of four shards");
    }

    // Nothing is lost: every shard took a share, the shares add up to the input, and the
    // input is what was written plus what was rejected.
    let report = json(&sharded.join("report.json"));
    let mut shard_inputs = 0;
    for k in 0..4 {
        let m = json(&sharded.join(format!("shards/{k:05}-of-00004/shard.json")));
        let n = m["report"]["input_records"].as_u64().unwrap();
        assert!(n > 200, "shard {k} took {n} of 1500 records");
        shard_inputs += n;
        assert!(sharded.join(format!("shards/{k:05}-of-00004/signatures.bin")).metadata().unwrap().len() > 0);
    }
    assert_eq!(shard_inputs, 1500);
    assert_eq!(report["input_records"], 1500);
    assert_eq!(report["output_records"].as_u64().unwrap() + report["rejected_records"].as_u64().unwrap(), 1500);
    let dedup = report["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "dedup").unwrap();
    assert!(dedup["reasons"]["near_duplicate"].as_u64().unwrap() > 0 && dedup["reasons"]["exact_duplicate"].as_u64().unwrap() >= 180, "{dedup}");
}

#[test]
fn sharding_refuses_what_it_cannot_join() {
    let d = tempfile::tempdir().unwrap();
    corpus(d.path());
    let cfg = d.path().join("prep.toml");
    let cfg = cfg.to_str().unwrap();
    let out = d.path().join("s");
    let out = out.to_str().unwrap();
    // A stage after dedup would run on records the reduce may still drop.
    let late = d.path().join("late.toml");
    std::fs::write(&late, "[prep]\ninputs = [\"a.jsonl\"]\nstages = [\"dedup\", \"pii\"]\n").unwrap();
    let err = String::from_utf8_lossy(&ftx(&["prep", "--config", late.to_str().unwrap(), "--out", out, "--shard", "0/2"], &[]).stderr).into_owned();
    assert!(err.contains("needs \"dedup\" last") && err.contains("move [\"pii\"] before"), "{err}");
    let err = String::from_utf8_lossy(&ftx(&["prep", "--config", cfg, "--out", out, "--shard", "auto"], &[]).stderr).into_owned();
    assert!(err.contains("SLURM_ARRAY_TASK_COUNT"), "{err}");
    // A missing shard and a shard run with another config are named.
    ok(ftx(&["prep", "--config", cfg, "--out", out, "--quiet", "--shard", "0/2"], &[]));
    let err = String::from_utf8_lossy(&ftx(&["prep", "--config", cfg, "--out", out, "--reduce"], &[]).stderr).into_owned();
    assert!(err.contains("shards missing: 1/2"), "{err}");
    std::fs::write(d.path().join("other.toml"), std::fs::read_to_string(cfg).unwrap().replace("stratify = \"source\"", "stratify = \"none\"")).unwrap();
    ok(ftx(&["prep", "--config", d.path().join("other.toml").to_str().unwrap(), "--out", out, "--quiet", "--shard", "1/2"], &[]));
    let err = String::from_utf8_lossy(&ftx(&["prep", "--config", cfg, "--out", out, "--reduce"], &[]).stderr).into_owned();
    assert!(err.contains("00001-of-00002") && err.contains("another prep config"), "{err}");
}
