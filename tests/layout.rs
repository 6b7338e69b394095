//! The house's floors: no module of host/src reaches up to one that uses it. The check is
//! tools/import_graph.py (every `crate::` path resolved to the file defining the item; circles
//! among files and among top-level modules fail it).

use std::process::Command;

#[test]
fn the_import_graph_has_no_circles() {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/import_graph.py");
    let out = Command::new(crate::gguf::python()).arg(&script).output().expect("running python (see tests/env.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", text, String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("no circles"), "{text}");
}
