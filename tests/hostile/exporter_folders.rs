//! Issue 13, item 5: an exporter's folders count against caps, a create is checked whole before
//! anything is made, a failed export leaves nothing behind, and the host's reads and writes for
//! the plugin count against its deadline.

use super::runs::lines;
use crate::common::fixture;
use crate::plugin_kinds::listing;
use crate::plugins::{ftx_in, ok, wasm};
use ftx::plugins::exporter::ExporterPlugin;
use ftx::plugins::{Limits, PluginError};
use std::path::Path;
use std::time::Duration;

/// The tiny Llama fixture copied to `dir/model`, its config.json naming the attack.
fn model_with_attack(dir: &Path, mode: &str, count: usize) -> std::path::PathBuf {
    let src = fixture("models/llama3");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["hostile"] = mode.into();
    config["hostile_count"] = count.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    model
}

/// `ftx export --format plugin` with the hostile exporter; returns the report it wrote.
fn export_attack(mode: &str, count: usize) -> (tempfile::TempDir, Vec<String>) {
    let (home, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let model = model_with_attack(d.path(), mode, count);
    let out = d.path().join("out");
    let plugin = wasm("hostile-exporter");
    let args = ["export", "--model", model.to_str().unwrap(), "--format", "plugin", "--plugin", plugin.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let stdout = ok(ftx_in(home.path(), &args));
    assert!(stdout.contains("plugin hostile_exporter wrote 1 file") && stdout.contains("plugin hostile_exporter: 1 call, "), "{stdout}");
    assert_eq!(listing(&out), ["report.txt"], "nothing but the report was made");
    let report = lines(&out.join("report.txt"));
    (d, report)
}

#[test]
fn creates_with_names_too_long_make_no_folders() {
    // The issue's attack: `d<i>/<name>` where opening the file fails; the folders were made
    // first, outside every cap (150,000 creates left 150,001 folders).
    let (_d, report) = export_attack("long-names", 2000);
    assert_eq!(report[..2], ["ok 0", "err 2000"]);
    assert!(report[2].contains("a file or folder name is at most 200 bytes (one here has 250)"), "{report:?}");
}

#[test]
fn paths_past_the_depth_cap_make_no_folders() {
    // The issue's attack: files 100 levels deep (2,000 of them left 202,001 folders).
    let (_d, report) = export_attack("deep", 200);
    assert_eq!(report[..2], ["ok 0", "err 200"]);
    assert!(report[2].contains("a path is at most 16 levels deep (this one has 102)"), "{report:?}");
}

fn small_tensors() -> Vec<(String, tch::Tensor)> {
    vec![("t".to_owned(), tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]))]
}

#[test]
fn the_folder_cap_stops_an_export_and_the_failed_export_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("new/out");
    // A generous time limit: this is about the cap, not the clock.
    let limits = Limits { call_timeout: Duration::from_secs(120), ..Limits::default() };
    let mut x = ExporterPlugin::load(&wasm("hostile-exporter"), limits).unwrap();
    // Files at w<i>/a/…/n/f: 15 new folders each, so the 667th (i = 666) would pass 10,000.
    let e = x.export_tensors("Hostile", r#"{"hostile": "wide", "hostile_count": 700}"#, small_tensors(), &out).unwrap_err();
    assert!(matches!(e, PluginError::Invalid { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("hostile_exporter") && msg.contains("create 666:") && msg.contains("at most 10000 folders per export (9990 made so far; this path needs 15 more)"), "{msg}");
    assert_eq!(listing(d.path()), Vec::<String>::new(), "the 666 files, their folders and the output folder are gone");
}

#[test]
fn the_hosts_reads_and_writes_count_against_the_exporters_deadline() {
    let d = tempfile::tempdir().unwrap();
    // 2,000 files created and finished: next to no compute of the plugin's own, but the host's
    // work for it (folders, opens, fsyncs, renames) is far more than 20 ms.
    let limits = Limits { call_timeout: Duration::from_millis(20), ..Limits::default() };
    let mut x = ExporterPlugin::load(&wasm("hostile-exporter"), limits).unwrap();
    let e = x.export_tensors("Hostile", r#"{"hostile": "host-heavy", "hostile_count": 2000}"#, small_tensors(), d.path()).unwrap_err();
    assert!(matches!(e, PluginError::Timeout { .. }) && e.to_string().contains("hostile_exporter"), "{e}");
    assert_eq!(listing(d.path()), Vec::<String>::new(), "the stopped export left nothing");
}
