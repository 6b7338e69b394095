//! The command line's consistency (issue 18, "Consistency and polish"), through the binary:
//! `--plugin`/`--grant` only where used, file errors that name their key once, `--set` with a
//! single path, `--out x.gguf`, colour only on a terminal, `plan`'s last newline, and
//! `train.optimizer = "adamw-8bit"` end to end.

use crate::common::{fixture, metric_series};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ftx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ftx")).args(args).env_remove("NO_COLOR").output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A small chat dataset and an ftx.toml training the tiny Llama fixture on it; returns the
/// config's path. `extra` is appended to `[train]`.
fn write_run(dir: &Path, extra: &str) -> PathBuf {
    let mut lines = String::new();
    for (i, city) in ["Paris", "Berlin", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi"].iter().cycle().take(24).enumerate() {
        let rec = serde_json::json!({"messages": [
            {"role": "user", "content": format!("Weather in {city}, day {}?", i % 5)},
            {"role": "assistant", "content": format!("{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{city}\"}}}}")},
        ]});
        lines.push_str(&rec.to_string());
        lines.push('\n');
    }
    std::fs::write(dir.join("train.jsonl"), lines).unwrap();
    let cfg = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"train.jsonl\"\nmax_seq_len = 64\n[method]\nkind = \"full\"\n[train]\nlr = 1e-3\nschedule = \"constant\"\nbatch_size = 4\nseed = 3\noutput_dir = \"{}\"\n{extra}\n",
        fixture("models/llama3").display(),
        dir.join("out").display()
    );
    let p = dir.join("ftx.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

#[test]
fn plugin_and_grant_show_only_on_train_and_the_global_form_still_works() {
    let train_help = text(&ftx(&["train", "--help"]).stdout);
    assert!(train_help.contains("--plugin") && train_help.contains("--grant"), "{train_help}");
    for cmd in ["eval", "plan", "generate", "doctor", "merge"] {
        let help = text(&ftx(&[cmd, "--help"]).stdout);
        assert!(!help.contains("--plugin <PATH>") && !help.contains("--grant"), "`ftx {cmd} --help` lists --plugin/--grant:\n{help}");
    }
    // Given before a command that does not load plugins: refused, not silently ignored.
    let o = ftx(&["--plugin", "orpo.wasm", "doctor"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("apply to `ftx train` only"), "{}", text(&o.stderr));
    // The README's form (`ftx --plugin P --grant G train …`) and the local one both reach the
    // run: its resolved config lists the plugin with the grant.
    for global in [true, false] {
        let d = tempfile::tempdir().unwrap();
        let cfg = write_run(d.path(), "max_steps = 1");
        let (cfg, plugin) = (cfg.to_str().unwrap(), ["--plugin", "no-such.wasm", "--grant", "clock"]);
        let args: Vec<&str> = if global { [&plugin[..], &["train", "--config", cfg][..]].concat() } else { [&["train", "--config", cfg][..], &plugin[..]].concat() };
        let o = ftx(&args);
        assert!(!text(&o.stderr).contains("unexpected argument"), "{args:?}: {}", text(&o.stderr));
        let resolved = std::fs::read_to_string(d.path().join("out/config.toml")).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&o.stderr)));
        let plugins = &resolved[resolved.find("[[plugins]]").unwrap_or_else(|| panic!("{args:?}: no [[plugins]] in\n{resolved}"))..];
        assert!(plugins.contains("no-such.wasm") && plugins.contains("clock"), "{args:?}: {plugins}");
    }
}

#[test]
fn a_missing_data_file_names_its_key_once_and_set_takes_a_single_path() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_run(d.path(), "max_steps = 1");
    // `--set data.train=x.jsonl` (the shell drops the quotes of "x.jsonl") is one path, as in the file.
    for set in ["data.train=missing.jsonl", "data.train=\"missing.jsonl\""] {
        let o = ftx(&["train", "--config", cfg.to_str().unwrap(), "--set", set]);
        let err = text(&o.stderr);
        assert!(!o.status.success());
        assert!(err.starts_with("error: data.train: missing.jsonl: "), "{set}: {err}");
        assert_eq!(err.matches("os error 2").count(), 1, "the OS message is repeated: {err}");
    }
    let o = ftx(&["train", "--config", cfg.to_str().unwrap(), "--set", "data.validation=gone.jsonl"]);
    assert!(text(&o.stderr).starts_with("error: data.validation: gone.jsonl: "), "{}", text(&o.stderr));
    let o = ftx(&["train", "--config", cfg.to_str().unwrap(), "--set", "model.path=/no/such/model"]);
    assert!(text(&o.stderr).starts_with("error: model.path: /no/such/model: "), "{}", text(&o.stderr));
}

#[test]
fn out_x_gguf_writes_the_file_with_its_modelfile_beside_it_and_no_colour_off_a_terminal() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("export/model.gguf");
    let model = fixture("models/llama3");
    // q4_k_m on 64-wide rows logs a warning (fallback types): stderr is a pipe here.
    let o = ftx(&["--log", "warn", "export", "--model", model.to_str().unwrap(), "--quant", "q4_k_m", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(out.is_file(), "--out x.gguf must be the GGUF file itself");
    assert!(d.path().join("export/Modelfile").is_file());
    assert!(!out.join("Modelfile").exists());
    let err = text(&o.stderr);
    assert!(err.contains("WARN") && !err.contains('\u{1b}'), "colour codes in piped stderr: {err:?}");
    // A merged checkpoint is a folder: a .gguf name for it is refused with what to do.
    let o = ftx(&["export", "--model", model.to_str().unwrap(), "--format", "merged", "--out", d.path().join("m.gguf").to_str().unwrap()]);
    assert!(!o.status.success() && text(&o.stderr).contains("--format gguf"), "{}", text(&o.stderr));
}

#[test]
fn plan_ends_with_a_newline() {
    let o = ftx(&["plan", "--model", "llama-3.2-1b", "--method", "lora", "--optimizer", "adamw-8bit"]);
    assert!(o.status.success());
    let out = text(&o.stdout);
    assert!(out.ends_with('\n') && !out.ends_with("\n\n"), "{out:?}");
}

/// Moment bytes in a checkpoint's optimizer.safetensors (everything but the fp32 masters),
/// and whether any moment is 8-bit.
fn moment_bytes(run: &Path) -> (i64, bool) {
    let ckpts = run.join("out/checkpoints");
    let last = std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().path()).max().expect("a checkpoint");
    let tensors = tch::Tensor::read_safetensors(last.join("optimizer.safetensors")).unwrap();
    let moments = tensors.iter().filter(|(k, _)| !k.ends_with(".master"));
    let bytes = moments.clone().map(|(_, t)| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64).sum();
    (bytes, moments.clone().any(|(k, t)| k.ends_with(".state1") && t.kind() == tch::Kind::Uint8))
}

#[test]
fn train_with_adamw_8bit_runs_end_to_end_with_a_quarter_of_the_state() {
    let _rng = crate::common::torch_rng_lock();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = "max_steps = 4\nsave_every = 4";
    for (dir, opt) in [(&a, "adamw"), (&b, "adamw-8bit")] {
        let cfg = write_run(dir.path(), &format!("{steps}\noptimizer = \"{opt}\""));
        let o = ftx(&["train", "--config", cfg.to_str().unwrap()]);
        assert!(o.status.success(), "{opt}: {}", text(&o.stderr));
    }
    let ((full, full_8bit), (small, small_8bit)) = (moment_bytes(a.path()), moment_bytes(b.path()));
    assert!(!full_8bit && small_8bit);
    // The tiny model's big tensors (embeddings, MLP) go to 2 bytes + 8 per 256 values; its
    // norms stay fp32: well under a third of AdamW's 8 bytes per value.
    assert!((small as f64) < 0.33 * full as f64, "8-bit moments {small} B vs fp32 {full} B");
    // The same run, within the quantisation's error: the loss falls alike.
    let losses = |run: &Path| -> Vec<f64> { metric_series(&run.join("out"), "loss").into_iter().map(|(_, l)| l).collect() };
    let (la, lb) = (losses(a.path()), losses(b.path()));
    assert_eq!(la.len(), 4);
    assert_eq!(lb.len(), 4);
    assert!(lb[3] < lb[0], "{lb:?}");
    assert!((la[3] - lb[3]).abs() < 0.05 * la[3], "adamw {la:?} vs adamw-8bit {lb:?}");
    let o = ftx(&["train", "--config", write_run(a.path(), "optimizer = \"sgd\"").to_str().unwrap()]);
    assert!(text(&o.stderr).contains("train.optimizer = \"sgd\" is not one of adamw, adamw-8bit"), "{}", text(&o.stderr));
}

/// One `<text>` element of an SVG: its box (left, top, right, bottom), estimated from its
/// position, anchor and font size with a realistic sans-serif width of 0.6 em per character.
fn text_boxes(svg: &str) -> Vec<(String, [f64; 4])> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        Some(tag[at..].split('"').next()?.to_owned())
    };
    let mut out = Vec::new();
    for piece in svg.split("<text").skip(1) {
        let (tag, rest) = piece.split_once('>').unwrap();
        let content = rest.split("</text>").next().unwrap().trim().to_owned();
        if content.is_empty() || attr(tag, "transform").is_some() {
            continue; // nothing drawn, or the rotated y-axis title (alone on its side)
        }
        let num = |n: &str| attr(tag, n).map(|v| v.trim_end_matches("px").parse::<f64>().unwrap());
        let (x, y, size) = (num("x").unwrap(), num("y").unwrap(), num("font-size").unwrap_or(12.0));
        let w = content.chars().count() as f64 * 0.6 * size;
        let left = match attr(tag, "text-anchor").as_deref() {
            Some("middle") => x - w / 2.0,
            Some("end") => x - w,
            _ => x,
        };
        // dy="0.76em" hangs the text below y; without it y is the baseline.
        let dy = attr(tag, "dy").and_then(|d| d.strip_suffix("em").map(|e| e.parse::<f64>().unwrap())).unwrap_or(0.0);
        let top = y + (dy - 0.76) * size;
        out.push((content, [left, top, left + w, top + size]));
    }
    out
}

fn overlap(a: &[f64; 4], b: &[f64; 4]) -> bool {
    a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]
}

#[test]
fn the_eval_report_wraps_long_answers_and_its_chart_labels_do_not_overlap() {
    let d = tempfile::tempdir().unwrap();
    // A task name long enough that six "task: metric" labels crowd an 800-pixel chart.
    let long = format!("{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{}\"}}}}", "Llanfairpwllgwyngyll".repeat(12));
    let rec = serde_json::json!({"prompt": "Call the weather function", "reference": long});
    let gen = d.path().join("function-calling-requests.jsonl");
    std::fs::write(&gen, format!("{rec}\n{rec}\n")).unwrap();
    let out = d.path().join("report");
    let (m, a, mc) = (fixture("models/llama3"), fixture("eval/adapter"), fixture("eval/mc.jsonl"));
    let o = ftx(&[
        "eval", "--model", m.to_str().unwrap(), "--adapter", a.to_str().unwrap(), "--choice", mc.to_str().unwrap(),
        "--generation", gen.to_str().unwrap(), "--metrics", "exact_match,json_valid,function_call",
        "--max-new-tokens", "4", "--device", "cpu", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    // The long reference sits in a cell of the fixed-layout samples table, whose text cells
    // wrap anywhere (the string has no space to break at).
    let samples = &html[html.find("<table class=\"samples\">").expect("a samples table")..];
    let cell = format!("<td class=\"text\">{}</td>", long.replace('"', "&quot;"));
    assert!(samples.contains(&cell), "the long reference is not in a text cell");
    let css = &html[html.find("<style>").unwrap()..html.find("</style>").unwrap()];
    let rule = |sel: &str| css.lines().find(|l| l.starts_with(sel)).unwrap_or_else(|| panic!("no CSS rule {sel}")).to_owned();
    let text_rule = rule("td.text {");
    assert!(text_rule.contains("white-space: pre-wrap") && text_rule.contains("overflow-wrap: anywhere"), "{text_rule}");
    assert!(rule("table.samples {").contains("table-layout: fixed"));
    // Every chart: no two labels (axis ticks, group labels, legend, title) overlap.
    let charts: Vec<&str> = html.split("<svg").skip(1).map(|s| s.split("</svg>").next().unwrap()).collect();
    assert_eq!(charts.len(), 1, "one task-metrics chart (no perplexity asked)");
    let boxes = text_boxes(charts[0]);
    let labels: Vec<&str> = boxes.iter().map(|(t, _)| t.as_str()).collect();
    assert!(labels.contains(&"function-calling-requests: exact_match") && labels.contains(&"llama3 + adapter"), "{labels:?}");
    for (i, (ta, a)) in boxes.iter().enumerate() {
        for (tb, b) in &boxes[i + 1..] {
            assert!(!overlap(a, b), "`{ta}` {a:?} overlaps `{tb}` {b:?}");
        }
    }
}

/// A short demo's figures: every loss and validation loss its two training runs logged, and
/// the held-out scores before and after, as printed to full precision in its files.
fn demo_figures(threads: &str, kernels: &str, extra: &[&str]) -> Vec<String> {
    let d = tempfile::tempdir().unwrap();
    let short = ["--steps", "3", "--pretrain-steps", "3", "--heldout", "4", "--orpo-steps", "0"];
    let o = Command::new(env!("CARGO_BIN_EXE_ftx"))
        .args(["demo", "--out", d.path().to_str().unwrap()])
        .args(short)
        .args(extra)
        .env("OMP_NUM_THREADS", threads)
        .env("ATEN_CPU_CAPABILITY", kernels)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mut figures = Vec::new();
    for run in ["pretrain", "lora"] {
        for line in std::fs::read_to_string(d.path().join(run).join("metrics.jsonl")).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            figures.extend(["loss", "eval_loss"].iter().filter_map(|k| v.get(*k)).map(|x| format!("{run} step {}: {x}", v["step"])));
        }
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join("report.json")).unwrap()).unwrap();
    figures.push(format!("before {} after {}", report["before"], report["after"]));
    figures
}

#[test]
fn the_demo_prints_the_same_figures_whatever_the_threads_and_cpu_kernels() {
    let _rng = crate::common::torch_rng_lock();
    // As on two machines: another thread count, other vector kernels (scalar vs AVX-512).
    let one = demo_figures("1", "avx512", &[]);
    let other = demo_figures("2", "default", &[]);
    assert!(one.len() > 6, "{one:?}");
    assert_eq!(one, other, "the pinned demo's figures depend on the machine");
    // The control: unpinned, the same two set-ups do differ, so the pins are what holds them.
    let (a, b) = (demo_figures("1", "avx512", &["--all-cores"]), demo_figures("2", "default", &["--all-cores"]));
    assert_ne!(a, b, "unpinned runs agree: this test no longer tells pinned from unpinned");
}
