//! Hostile plugins against the sandbox (issue 13), each attack driven through the real CLI where
//! a user would meet it: a planted compiled component, host memory through tensor handles,
//! losses that cannot be differentiated, text aimed at the terminal, and smaller holes. The
//! attacks live in `tests/hostile/loss` (the `hostile-loss` component, its `attack` parameter
//! picking one), `tests/hostile/loss-metrics` (forged, huge, non-finite metrics; a spinning loss),
//! `tests/hostile/exporter` and `tests/hostile/filter`.

mod cache;
mod exporter_folders;
mod metrics;
mod runs;
mod time_budget;
mod loss_grad;
mod smaller;
mod tensors;
mod terminal;

use crate::common::fixture;
use std::path::{Path, PathBuf};
use std::process::Output;

/// `ftx train` on eight preference pairs of the tiny Llama fixture (LoRA, so DPO's reference is
/// the adapter-free model), with the loss plugin `plugin` and its `params` (TOML inline-table
/// body, e.g. `attack = 3`), for `steps` steps, under `home` as `$FTX_HOME`.
pub fn train_with(home: &Path, dir: &Path, plugin: &str, params: &str, steps: usize) -> Output {
    std::fs::create_dir_all(dir).unwrap();
    let data = crate::align::write_pairs(dir, 8);
    let cfg = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nvalidation_split = 0.0\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n[train]\nlr = 5e-3\nmax_steps = {steps}\nbatch_size = 2\nschedule = \"constant\"\noutput_dir = \"{}\"\n[[plugins]]\npath = \"{plugin}\"\nparams = {{ {params} }}\n",
        fixture("models/llama3").display(),
        data.display(),
        dir.join("out").display(),
    );
    let path = dir.join("ftx.toml");
    std::fs::write(&path, cfg).unwrap();
    crate::plugins::ftx_in(home, &["train", "--config", path.to_str().unwrap()])
}

/// The loss `ftx train` logged at `step` in `dir/out/metrics.jsonl`.
pub fn logged_loss(dir: &Path, step: u64) -> f64 {
    let text = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["step"] == step && v.get("loss").is_some())
        .unwrap_or_else(|| panic!("no loss at step {step} in {text}"))["loss"]
        .as_f64()
        .unwrap()
}

/// The hostile loss component, as a path string for a config.
pub fn hostile_loss() -> String {
    crate::plugins::wasm("hostile-loss").display().to_string()
}

/// stdout and stderr of a run, for assertion messages.
pub fn both(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A copy of the built plugin `name` under `dir`, as `<file name>`.
pub fn copy_plugin(name: &str, dir: &Path) -> PathBuf {
    let src = crate::plugins::wasm(name);
    let dest = dir.join(src.file_name().unwrap());
    std::fs::copy(&src, &dest).unwrap();
    dest
}

/// `ftx prep --quiet` (with `home` as `$FTX_HOME`) of `records` (written to `dir/in.jsonl`)
/// through the hostile filter component, into `dir/out`; `tail` is appended to the config after
/// the `[prep]` keys (more keys, or a `[prep.output]` table). Returns the run and `dir/out`.
pub fn prep_through_hostile_filter(home: &Path, dir: &Path, records: impl IntoIterator<Item = serde_json::Value>, tail: &str) -> (Output, PathBuf) {
    let text: String = records.into_iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("in.jsonl"), text).unwrap();
    let cfg = dir.join("prep.toml");
    let filter = crate::plugins::wasm("hostile-filter");
    std::fs::write(&cfg, format!("[prep]\ninputs = \"in.jsonl\"\nout = \"out\"\nstages = [\"plugins\"]\nplugins = [\"{}\"]\n{tail}", filter.display())).unwrap();
    (crate::plugins::ftx_in(home, &["prep", "--config", cfg.to_str().unwrap(), "--quiet"]), dir.join("out"))
}
