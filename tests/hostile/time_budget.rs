//! Issue 13, item 6: every plugin has a time budget for the whole run, a plugin that runs out of
//! time is not retried record by record, and the run's summary gives each plugin's share.

use super::runs::{hostile_loss_run, lines};
use crate::common::torch_rng_lock;
use crate::plugins::{fails, ftx_in, ok, wasm};
use ftx::plugins::filter::{FilterPlugin, Verdict};
use ftx::plugins::{Limits, PluginError};
use serde_json::Value;
use std::time::Duration;

#[test]
fn a_loss_plugin_that_spins_is_stopped_by_its_run_budget() {
    let (home, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Spinning forever, under its 5 s call limit but over a 0.3 s budget for the run.
    let cfg = hostile_loss_run(d.path(), 3, "spin = 1", "time_budget_s = 0.3", "");
    let e = fails(ftx_in(home.path(), &["train", "--config", cfg.to_str().unwrap()]));
    assert!(e.contains("plugin hostile_loss_metrics: compute") && e.contains("used up its time budget of 0.3 s for this run"), "{e}");
    assert!(e.contains("time_budget_s"), "says what to raise: {e}");
}

#[test]
fn the_train_summary_gives_each_plugins_calls_and_share_of_the_run() {
    let _rng = torch_rng_lock();
    let (home, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = hostile_loss_run(d.path(), 3, "", "", "");
    let stdout = ok(ftx_in(home.path(), &["train", "--config", cfg.to_str().unwrap()]));
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("out/manifest.json")).unwrap()).unwrap();
    // describe, validation before and after (batches of 3 pairs, 2 examples each), 3 steps.
    let batches = manifest["validation_examples"].as_u64().unwrap().div_ceil(6);
    let calls = 1 + 2 * batches + 3;
    let line = stdout.lines().find(|l| l.starts_with("plugin hostile_loss_metrics: ")).unwrap_or_else(|| panic!("no plugin line in {stdout}"));
    assert!(line.starts_with(&format!("plugin hostile_loss_metrics: {calls} calls, ")) && line.contains("% of the run; budget 600 s)"), "{line}");
    let recorded = &manifest["report"]["plugins"][0];
    assert_eq!((recorded["plugin"].as_str(), recorded["calls"].as_u64(), recorded["budget_seconds"].as_f64()), (Some("hostile_loss_metrics"), Some(calls), Some(600.0)), "{manifest}");
    let seconds = recorded["seconds"].as_f64().unwrap();
    assert!(seconds > 0.0 && seconds < manifest["report"]["seconds"].as_f64().unwrap(), "{recorded}");
}

fn records(texts: &[&str]) -> Vec<(u64, String)> {
    texts.iter().enumerate().map(|(i, t)| (i as u64, format!("\"{t}\""))).collect()
}

#[test]
fn a_filter_that_times_out_is_not_retried_record_by_record() {
    let limits = Limits { call_timeout: Duration::from_millis(100), ..Limits::default() };
    let mut f = FilterPlugin::load(&wasm("hostile-filter"), limits).unwrap();
    // The batch call times out: each record gets that error; none is sent again on its own
    // (which would cost the time limit once per record).
    let out = f.filter(&records(&["hostile-hang", "fine", "fine", "fine", "fine"]));
    assert_eq!(out.len(), 5);
    for r in &out {
        let e = r.as_ref().unwrap_err();
        assert!(matches!(e, PluginError::Timeout { .. }) && e.to_string().contains("filter(records 0..=4)"), "{out:?}");
    }
    // A batch that traps is retried record by record, until a record times out: the records
    // after it are not run.
    let out = f.filter(&records(&["panic", "hostile-hang", "fine"]));
    assert!(out[0].as_ref().unwrap_err().to_string().contains("filter(record 0) trapped"), "{out:?}");
    for r in &out[1..] {
        let e = r.as_ref().unwrap_err();
        assert!(matches!(e, PluginError::Timeout { .. }) && e.to_string().contains("filter(record 1)"), "{out:?}");
    }
    assert_eq!(f.filter(&records(&["fine"]))[0].as_ref().unwrap(), &Verdict::Keep, "the plugin works again");
}

#[test]
fn prep_stops_a_hanging_filter_at_its_run_budget_and_accounts_for_every_record() {
    let (home, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // 300 records: a batch of 256 (it hangs) and one of 44. The 5 s call limit would cost 5 s
    // per batch (and, retried record by record, 5 s per record); the 0.3 s budget ends it.
    let records = (0..300).map(|i| {
        let t = if i == 1 { "hostile-hang".to_owned() } else { format!("an ordinary record, number {i}") };
        serde_json::json!({ "text": t })
    });
    let (run, _) = super::prep_through_hostile_filter(home.path(), d.path(), records, "plugin_time_budget_s = 0.3\n");
    let stdout = ok(run);
    assert!(stdout.contains("plugin hostile_filter: 1 call, ") && stdout.contains("budget 0.3 s)"), "{stdout}");
    let rejects = lines(&d.path().join("out/rejects.jsonl"));
    assert_eq!(rejects.len(), 300, "every record accounted for");
    for r in &rejects {
        let v: Value = serde_json::from_str(r).unwrap();
        assert_eq!((v["stage"].as_str(), v["reason"].as_str()), (Some("plugin"), Some("plugin_error")), "{r}");
        assert!(v["detail"].as_str().unwrap().contains("plugin hostile_filter: filter(records ") && v["detail"].as_str().unwrap().contains("time budget of 0.3 s"), "{r}");
    }
    let timing: Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("out/timing.json")).unwrap()).unwrap();
    assert_eq!((timing["plugins"][0]["plugin"].as_str(), timing["plugins"][0]["calls"].as_u64()), (Some("hostile_filter"), Some(1)), "{timing}");
}
