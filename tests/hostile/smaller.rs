//! Issue 13, item 8: a filter's short verdict list is reported (once), and `ftx plugin verify`
//! checks a single signed component file.

use super::{both, copy_plugin, prep_through_hostile_filter};
use crate::plugins::{fails, ftx_in, ok};

#[test]
fn a_filter_returning_one_verdict_too_few_is_reported_once_and_every_record_is_accounted_for() {
    let d = tempfile::tempdir().unwrap();
    // 300 records: two batches (256 + 44), each holding a record that makes the filter drop a verdict.
    let records = (0..300).map(|i| {
        let output = if i == 5 || i == 290 { "short-verdicts".to_owned() } else { format!("An ordinary answer {i}.") };
        serde_json::json!({"instruction": format!("Question {i}?"), "output": output})
    });
    let (run, out) = prep_through_hostile_filter(d.path(), d.path(), records, "[prep.output]\nformat = \"alpaca\"\n");
    let text = both(&run);
    assert!(run.status.success(), "{text}");
    assert_eq!(text.matches(" verdicts for ").count(), 1, "{text}");
    assert_eq!(text.matches("one record at a time").count(), 1, "said once, not per batch: {text}");
    assert!(text.contains("plugin hostile_filter: filter(records "), "{text}");
    // Record by record, the filter keeps everything: all 300 records come out.
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["output_records"], 300, "{report}");
}

#[test]
fn plugin_verify_checks_a_single_signed_component_file() {
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (h, w) = (home.path(), work.path());
    let dpo = copy_plugin("dpo", w);
    let f = dpo.to_str().unwrap();
    let e = fails(ftx_in(h, &["plugin", "verify", f]));
    assert!(e.contains("plugin dpo") && e.contains("not signed"), "{e}");
    assert!(ok(ftx_in(h, &["plugin", "verify", f, "--allow-unsigned"])).contains("UNSIGNED"));

    let key = w.join("publisher");
    ok(ftx_in(h, &["plugin", "keygen", key.to_str().unwrap()]));
    ok(ftx_in(h, &["plugin", "sign", f, "--key", key.with_extension("secret").to_str().unwrap()]));
    let e = fails(ftx_in(h, &["plugin", "verify", f]));
    assert!(e.contains("does not match any trusted key"), "{e}");
    std::fs::create_dir_all(h.join("trusted-keys")).unwrap();
    std::fs::copy(key.with_extension("pub"), h.join("trusted-keys/publisher.pub")).unwrap();
    let out = ok(ftx_in(h, &["plugin", "verify", f]));
    assert!(out.contains("dpo") && out.contains("(loss)") && out.contains("signature ok (trusted key)"), "{out}");

    // One byte changed: the signature no longer covers the file.
    let mut bytes = std::fs::read(&dpo).unwrap();
    bytes[300] ^= 0xff;
    std::fs::write(&dpo, bytes).unwrap();
    let e = fails(ftx_in(h, &["plugin", "verify", f]));
    assert!(e.contains("plugin dpo") && e.contains("does not match any trusted key"), "{e}");
    let e = fails(ftx_in(h, &["plugin", "verify", w.join("nope.wasm").to_str().unwrap()]));
    assert!(e.contains("nope.wasm: no such plugin folder or file"), "{e}");
}
