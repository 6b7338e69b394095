//! What the hostile tests share: a tiny preference run through `ftx train` with the hostile loss
//! plugin (tests/hostile/loss-metrics), and the lines of the files runs write.

use crate::common::fixture;
use crate::plugins::wasm;
use std::path::{Path, PathBuf};

/// Preference pairs (24, the same as the preference-training tests) in `dir/pairs.jsonl`.
fn write_pairs(dir: &Path) -> PathBuf {
    let cities = ["Paris", "Berlin", "Rome", "Oslo", "Lima", "Cairo"];
    let mut text = String::new();
    for i in 0..24 {
        let c = cities[i % cities.len()];
        let rec = serde_json::json!({"prompt": format!("What is the weather in {c}?"), "chosen": format!("Sunny in {c}."), "rejected": "I cannot help with that."});
        text.push_str(&rec.to_string());
        text.push('\n');
    }
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

/// Writes `dir/ftx.toml`: a LoRA preference run of `steps` steps on the tiny Llama fixture (a
/// quarter of the pairs held out, 3 pairs a batch) with the hostile loss, its `params` (a TOML
/// inline table's inside) and `plugin_keys` (more lines of its `[[plugins]]` table), and
/// `train_keys` (more lines of `[train]`). Outputs go to `dir/out`.
pub fn hostile_loss_run(dir: &Path, steps: usize, params: &str, plugin_keys: &str, train_keys: &str) -> PathBuf {
    let data = write_pairs(dir);
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nvalidation_split = 0.25\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n\
         [train]\nlr = 5e-3\nmax_steps = {steps}\nbatch_size = 3\nschedule = \"constant\"\noutput_dir = \"{}\"\n{train_keys}\n\
         [[plugins]]\npath = \"{}\"\nparams = {{ {params} }}\n{plugin_keys}\n",
        fixture("models/llama3").display(),
        data.display(),
        dir.join("out").display(),
        wasm("hostile-loss-metrics").display(),
    );
    let p = dir.join("ftx.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The lines of a text file.
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).lines().map(str::to_owned).collect()
}
