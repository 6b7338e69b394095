//! A hostile exporter for the sandbox tests. It tries to escape its output folder and to write
//! past its byte cap, and records what the host answered each attempt in `report.txt` (one
//! line per attempt), which the test reads. A config containing `"loop"` makes it spin forever.
//! A config with `"hostile": "<mode>"` (and `"hostile_count": N`) runs one folder attack instead:
//! - `long-names`: N creates of `d<i>/<250 bytes>` (a name too long for the file system);
//! - `deep`: N files at `d<i>/a/a/…/f`, 100 levels deep, each finished;
//! - `wide`: files at `w<i>/a/b/…/n/f` (15 new folders each), finished, until the host refuses
//!   one (then the export fails with the host's words);
//! - `host-heavy`: N files `h/f<i>` created and finished: little compute of its own, much of
//!   the host's.
//!
//! The first two, and `host-heavy`, end with `report.txt`: `ok <n>`, `err <n>` and the first
//! error the host gave.

use ftx_plugin_api::exporter::{create, export_exporter, finish, read, write, Exporter, ModelInfo};
use std::hint::black_box;

struct Hostile;

/// The text after `"key":` (and any spaces) in the config.
fn value_of<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    let rest = config.split(&format!("\"{key}\"")).nth(1)?;
    Some(rest.trim_start().strip_prefix(':')?.trim_start())
}

/// The string value of `"key": "…"` in the config text.
fn text_of<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    value_of(config, key)?.strip_prefix('"')?.split('"').next()
}

/// The number value of `"key": N` in the config text.
fn number_of(config: &str, key: &str) -> Option<usize> {
    value_of(config, key)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Runs a folder attack; `Ok(report lines)`, or the export's error.
fn folder_attack(mode: &str, n: usize) -> Result<Vec<String>, String> {
    let (mut ok, mut errors) = (0usize, Vec::new());
    let mut tally = |r: Result<(), String>| match r {
        Ok(()) => ok += 1,
        Err(e) => errors.push(e),
    };
    match mode {
        "long-names" => (0..n).for_each(|i| tally(create(&format!("d{i}/{}", "n".repeat(250))).map(drop))),
        "deep" => (0..n).for_each(|i| tally(create(&format!("d{i}/{}f", "a/".repeat(100))).and_then(finish))),
        "wide" => {
            for i in 0..n {
                create(&format!("w{i}/a/b/c/d/e/f/g/h/i/j/k/l/m/n/f")).and_then(finish).map_err(|e| format!("create {i}: {e}"))?;
            }
        }
        "host-heavy" => (0..n).for_each(|i| tally(create(&format!("h/f{i}")).and_then(finish))),
        other => return Err(format!("unknown attack {other}")),
    }
    Ok(vec![format!("ok {ok}"), format!("err {}", errors.len()), format!("first error: {:?}", errors.first())])
}

impl Exporter for Hostile {
    fn export(info: ModelInfo) -> Result<(), String> {
        if let Some(mode) = text_of(&info.config, "hostile") {
            let report = folder_attack(mode, number_of(&info.config, "hostile_count").unwrap_or(1))?;
            let r = create("report.txt")?;
            write(r, report.join("\n").as_bytes())?;
            return finish(r);
        }
        if info.config.contains("\"loop\"") {
            loop {
                black_box(0);
            }
        }
        let mut report = Vec::new();
        for path in ["../escape.txt", "/etc/x", "a/../../escape.txt", "link/x.txt", "", "./x"] {
            report.push(format!("create {path:?}: {:?}", create(path)));
        }
        // Past the byte cap: 1 MiB at a time into a file it never finishes.
        let big = create("big.bin")?;
        let chunk = vec![7u8; 1 << 20];
        let capped = (0..64).find_map(|i| write(big, &chunk).err().map(|e| format!("write {i}: {e}")));
        report.push(format!("cap: {capped:?}"));
        report.push(format!("write to a bad handle: {:?}", write(big + 1000, b"x")));
        report.push(format!("read an unknown tensor: {:?}", read("no.such.tensor", 0, 8)));
        report.push(format!("read too much: {:?}", read(&info.tensors[0].name, 0, 1 << 30).map(|b| b.len())));
        let done = create("done.txt")?;
        finish(done)?;
        report.push(format!("finish twice: {:?}", finish(done)));
        let r = create("report.txt")?;
        write(r, report.join("\n").as_bytes())?;
        finish(r)
    }
}

export_exporter!(Hostile);
