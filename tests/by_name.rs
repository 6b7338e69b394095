//! Plugins by name through the CLI: first-party losses with nothing installed (`--plugin dpo`,
//! `method.objective`), plugin folders by path, installed plugins by name even when a folder of
//! that name is in the working directory, and the message for a name that is nowhere.

use crate::align::write_pairs;
use crate::common::fixture;
use crate::plugins::wasm;
use std::path::Path;
use std::process::Output;

/// `ftx ARGS` run in `cwd` with its own `FTX_HOME`.
pub fn ftx_at(cwd: &Path, home: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ftx")).args(args).current_dir(cwd).env("FTX_HOME", home).output().unwrap()
}

/// stdout of a run that must succeed.
pub fn ok(o: Output) -> String {
    assert!(o.status.success(), "ftx failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// stderr of a run that must fail.
fn fails(o: Output) -> String {
    assert!(!o.status.success(), "ftx succeeded: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8(o.stderr).unwrap()
}

/// A preference config in `dir` (relative paths, as a user writes them), no plugin named.
fn pairs_config(dir: &Path) {
    write_pairs(dir, 12);
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"pairs.jsonl\"\nvalidation_split = 0.25\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n[train]\nlr = 5e-3\nmax_steps = 2\nbatch_size = 3\nschedule = \"constant\"\noutput_dir = \"out\"\n",
        fixture("models/llama3").display()
    );
    std::fs::write(dir.join("ftx.toml"), text).unwrap();
}

/// The keys of the metrics a run logged.
fn metric_keys(out: &Path) -> String {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap()
}

#[test]
fn first_party_losses_work_by_name_and_a_same_named_folder_here_does_not_shadow_them() {
    let (d, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    pairs_config(d.path());
    // A plugin crate folder called `dpo` beside the user (before: "Is a directory").
    std::fs::create_dir_all(d.path().join("dpo/src")).unwrap();
    let out = ok(ftx_at(d.path(), home.path(), &["--plugin", "dpo", "train", "--config", "ftx.toml", "--set", "train.output_dir=\"out-dpo\""]));
    // LoRA starts with B = 0: policy = reference, so DPO's first loss is ln 2.
    assert!(out.contains("train loss      0.6931 →"), "{out}");
    assert!(metric_keys(&d.path().join("out-dpo")).contains("plugin/dpo/rewards/margin"));
    // method.objective names the loss in the config.
    ok(ftx_at(d.path(), home.path(), &["train", "--config", "ftx.toml", "--set", "method.objective=orpo", "--set", "train.output_dir=\"out-orpo\""]));
    assert!(metric_keys(&d.path().join("out-orpo")).contains("plugin/orpo/log_odds_ratio"));
    // A name that is nowhere: what exists is listed, and the folder here is pointed at.
    std::fs::create_dir_all(d.path().join("nosuch")).unwrap();
    let e = fails(ftx_at(d.path(), home.path(), &["--plugin", "nosuch", "train", "--config", "ftx.toml"]));
    assert!(e.contains("plugin nosuch") && e.contains("Installed (") && e.contains("): none") && e.contains("First-party: dpo, "), "{e}");
    assert!(e.contains("orpo") && e.contains("kto") && e.contains("pass ./nosuch"), "{e}");
    // A folder given as a path must be a plugin folder.
    let e = fails(ftx_at(d.path(), home.path(), &["--plugin", "./dpo", "train", "--config", "ftx.toml"]));
    assert!(e.contains("./dpo is a folder without a plugin.toml"), "{e}");
    // Preference data and no loss: the message names the by-name ways.
    let e = fails(ftx_at(d.path(), home.path(), &["train", "--config", "ftx.toml"]));
    assert!(e.contains("method.objective = \"dpo\"") && e.contains("--plugin dpo"), "{e}");
}

#[test]
fn a_plugin_folder_works_by_path_and_an_installed_plugin_beats_a_same_named_folder_here() {
    let (d, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    pairs_config(d.path());
    // What `ftx plugin build my-dpo` leaves: my-dpo/dist/{my-dpo.wasm, plugin.toml}.
    let dist = d.path().join("my-dpo/dist");
    std::fs::create_dir_all(&dist).unwrap();
    std::fs::copy(wasm("dpo"), dist.join("my-dpo.wasm")).unwrap();
    let m = ftx::plugins::inspect::describe(&dist.join("my-dpo.wasm"), "0.1.0", Vec::new()).unwrap();
    std::fs::write(dist.join("plugin.toml"), m.to_toml()).unwrap();
    std::fs::create_dir_all(d.path().join("my-dpo/src")).unwrap();
    // By path: the folder, or the crate folder holding dist/.
    ok(ftx_at(d.path(), home.path(), &["--plugin", "my-dpo/dist", "train", "--config", "ftx.toml", "--set", "train.output_dir=\"out-dist\""]));
    assert!(metric_keys(&d.path().join("out-dist")).contains("plugin/my-dpo/rewards/margin"));
    ok(ftx_at(d.path(), home.path(), &["--plugin", "./my-dpo", "train", "--config", "ftx.toml", "--set", "train.output_dir=\"out-crate\""]));
    // The README's flow: install, then use by name, from the folder that holds the crate.
    ok(ftx_at(d.path(), home.path(), &["plugin", "install", "my-dpo/dist", "--allow-unsigned"]));
    let out = ok(ftx_at(d.path(), home.path(), &["--plugin", "my-dpo", "train", "--config", "ftx.toml", "--set", "train.output_dir=\"out-named\""]));
    assert!(out.contains("plugin my-dpo:"), "{out}");
    let list = ok(ftx_at(d.path(), home.path(), &["plugin", "list"]));
    assert!(list.contains("my-dpo") && list.contains("first-party (built in, by name): dpo, "), "{list}");
    let shown = ok(ftx_at(d.path(), home.path(), &["plugin", "inspect", "orpo"]));
    assert!(shown.contains("name = \"orpo\"") && shown.contains("kind = \"loss\"") && shown.contains("name = \"beta\""), "{shown}");
    // A component altered after it was installed is refused.
    std::fs::write(home.path().join("plugins/my-dpo/my-dpo.wasm"), b"\0asm tampered").unwrap();
    let e = fails(ftx_at(d.path(), home.path(), &["--plugin", "my-dpo", "train", "--config", "ftx.toml"]));
    assert!(e.contains("was modified"), "{e}");
}

#[test]
fn a_first_party_component_runs_from_the_binary_even_if_its_file_is_altered() {
    let (d, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    pairs_config(d.path());
    ok(ftx_at(d.path(), home.path(), &["--plugin", "dpo", "train", "--config", "ftx.toml"]));
    // Overwrite the placed file with another (valid) loss: the next run still runs dpo.
    let placed: Vec<_> = walk(&home.path().join("first-party")).into_iter().filter(|p| p.file_name().is_some_and(|n| n == "dpo.wasm")).collect();
    assert_eq!(placed.len(), 1, "{placed:?}");
    std::fs::write(&placed[0], std::fs::read(wasm("orpo")).unwrap()).unwrap();
    let out = ok(ftx_at(d.path(), home.path(), &["--plugin", "dpo", "train", "--config", "ftx.toml", "--set", "train.output_dir=\"out2\""]));
    assert!(out.contains("train loss      0.6931 →"), "{out}");
    assert!(metric_keys(&d.path().join("out2")).contains("plugin/dpo/rewards/margin"));
    assert_eq!(std::fs::read(&placed[0]).unwrap(), std::fs::read(wasm("dpo")).unwrap(), "the altered file is put back");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
