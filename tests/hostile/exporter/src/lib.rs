//! A hostile exporter for the sandbox tests. It tries to escape its output folder and to write
//! past its byte cap, and records what the host answered each attempt in `report.txt` (one
//! line per attempt), which the test reads. A config containing `"loop"` makes it spin forever.

use ftx_plugin_api::exporter::{create, export_exporter, finish, read, write, Exporter, ModelInfo};
use std::hint::black_box;

struct Hostile;

impl Exporter for Hostile {
    fn export(info: ModelInfo) -> Result<(), String> {
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
