//! Issue 13, item 4: a plugin's metrics cannot forge the host's keys, cannot grow the metrics file
//! without bound, and non-finite values survive a resume (all through `ftx train`).

use super::runs::{hostile_loss_run, lines};
use crate::common::torch_rng_lock;
use crate::plugins::{fails, ftx_in, ok};
use serde_json::Value;

const NS: &str = "plugin/hostile_loss_metrics";

#[test]
fn metrics_named_like_the_hosts_keys_stay_in_the_plugins_namespace() {
    let _rng = torch_rng_lock();
    let (home, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = hostile_loss_run(d.path(), 3, "forge = 1", "", "");
    ok(ftx_in(home.path(), &["train", "--config", cfg.to_str().unwrap()]));
    let lines = lines(&d.path().join("out/metrics.jsonl"));
    assert_eq!(lines.len(), 5, "validation at 0, steps 1–3, validation at 3: {lines:#?}");
    let mut steps = Vec::new();
    for line in &lines {
        // One `step` key and at most one `loss` per line: JSON readers take the last of
        // duplicates, which is how the forged values won.
        for key in ["\"step\":", "\"loss\":", "\"lr\":", "\"grad_norm\":", "\"eval_loss\":"] {
            assert!(line.matches(key).count() <= 1, "{key} twice in {line}");
        }
        let v: Value = serde_json::from_str(line).unwrap();
        steps.push(v["step"].as_u64().unwrap());
        let train_line = v.get("loss").is_some();
        let ns = if train_line { NS.to_owned() } else { format!("eval/{NS}") };
        assert_eq!(v[format!("{ns}/step")], 999_999.0, "{line}");
        assert_eq!(v[format!("{ns}/loss")], 0.0, "{line}");
        assert_eq!(v[format!("{ns}/eval_loss")], 0.0, "{line}");
        if train_line {
            // The host's values: the honest loss (−log σ of a margin: positive), the configured lr.
            assert!(v["loss"].as_f64().unwrap() > 1e-3, "{line}");
            assert_eq!(v["lr"], 5e-3, "{line}");
            assert_eq!(v[format!("{NS}/lr")], 123.0, "{line}");
            assert!(v["grad_norm"].as_f64().unwrap() > 0.0, "{line}");
        } else {
            assert!(v["eval_loss"].as_f64().unwrap() > 1e-3, "{line}");
        }
    }
    assert_eq!(steps, [0, 1, 2, 3, 3]);
}

#[test]
fn too_many_metrics_or_too_long_names_stop_the_run_naming_the_plugin_and_the_cap() {
    let _rng = torch_rng_lock();
    let home = tempfile::tempdir().unwrap();
    // 100 metrics of 10-byte names; then one of 8000 bytes (the run: 4000 of 8000).
    for (params, want) in [("huge = 100, name_bytes = 10", "reported 101 metrics; a call may report at most 64"), ("huge = 1", "(8000 bytes); a metric name is 1 to 64 bytes")] {
        let d = tempfile::tempdir().unwrap();
        let cfg = hostile_loss_run(d.path(), 3, params, "", "");
        let e = fails(ftx_in(home.path(), &["train", "--config", cfg.to_str().unwrap()]));
        assert!(e.contains("plugin hostile_loss_metrics: compute") && e.contains(want), "{params}: {e}");
        assert!(e.len() < 4000, "the message is bounded, not the names: {} bytes", e.len());
        let log = d.path().join("out/metrics.jsonl");
        let size = std::fs::metadata(&log).map_or(0, |m| m.len());
        assert_eq!(size, 0, "{params}: nothing logged from a refused call");
    }
}

#[test]
fn non_finite_metrics_are_written_as_such_and_a_resume_keeps_every_line() {
    let _rng = torch_rng_lock();
    let (home, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = hostile_loss_run(d.path(), 4, "nonfinite = 1", "", "save_every = 2");
    let run = || ftx_in(home.path(), &["train", "--config", cfg.to_str().unwrap()]);
    ok(run());
    let path = d.path().join("out/metrics.jsonl");
    let first = lines(&path);
    assert_eq!(first.len(), 6, "validation at 0, steps 1–4, validation at 4: {first:#?}");
    for line in &first {
        let v: Value = serde_json::from_str(line).unwrap();
        let ns = if v.get("loss").is_some() { NS.to_owned() } else { format!("eval/{NS}") };
        assert_eq!((&v[format!("{ns}/nan")], &v[format!("{ns}/inf")], &v[format!("{ns}/ninf")]), (&Value::from("NaN"), &Value::from("inf"), &Value::from("-inf")), "{line}");
        assert_eq!(v[format!("{ns}/one")], 1.0, "{line}");
    }
    // Continued to 5 steps, the run resumes from its last checkpoint (step 4): every line stays
    // as it was, and step 5 and the final validation follow.
    let out = ftx_in(home.path(), &["train", "--config", cfg.to_str().unwrap(), "--set", "train.max_steps=5"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from the checkpoint at step 4"), "{}", String::from_utf8_lossy(&out.stderr));
    ok(out);
    let second = lines(&path);
    assert_eq!(second.len(), 8, "{second:#?}");
    assert_eq!(second[..6], first[..], "earlier lines kept verbatim");
    let last: Value = serde_json::from_str(&second[7]).unwrap();
    assert_eq!((last["step"].as_u64(), &last[format!("eval/{NS}/nan")]), (Some(5), &Value::from("NaN")));
}
