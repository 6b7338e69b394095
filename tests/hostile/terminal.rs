//! Issue 13, item 7: what a plugin says reaches the terminal escaped and cut to size, and so do
//! the drop reasons it gives.

use super::{both, hostile_loss, prep_through_hostile_filter, train_with};

#[test]
fn a_20_mb_error_full_of_escape_sequences_reaches_stderr_escaped_and_cut() {
    let _rng = crate::common::torch_rng_lock();
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = train_with(home.path(), work.path(), &hostile_loss(), "attack = 6, bytes = 20000000", 1);
    assert_eq!(run.status.code(), Some(1), "{}", both(&run));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.stderr.len() < 8 << 10, "stderr holds {} bytes", run.stderr.len());
    assert!(!run.stderr.iter().any(|&b| b == 0x1b || b == b'\r'), "a raw control byte reached the terminal: {err:?}");
    // The plugin's words are there, escaped, on the host's error line, with what was cut.
    assert!(err.contains("plugin hostile_loss: compute: \\u{1b}[2J\\u{1b}[H\\rFAKE: ftx: training finished OK\\nxxx"), "{err}");
    assert!(err.contains(&format!("… ({} more bytes)", 20_000_000 - 1024)), "{err}");
    assert!(!err.lines().any(|l| l.starts_with("FAKE")), "{err}");
}

#[test]
fn drop_reasons_are_escaped_and_cut_to_the_documented_size() {
    let d = tempfile::tempdir().unwrap();
    let records = (0..6).map(|i| {
        let output = if i % 3 == 1 { "long-reason".to_owned() } else { format!("An ordinary answer {i}.") };
        serde_json::json!({"instruction": format!("Question {i}?"), "output": output})
    });
    let (run, out) = prep_through_hostile_filter(d.path(), d.path(), records, "[prep.output]\nformat = \"alpaca\"\n");
    assert!(run.status.success(), "{}", both(&run));
    let rejects: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("rejects.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    for r in &rejects {
        let detail = r["detail"].as_str().unwrap();
        // "hostile_filter: " + 1024 bytes of the reason + the note of what was cut.
        assert!(detail.starts_with("hostile_filter: \\u{1b}[31m"), "{detail}");
        assert!(detail.ends_with(&format!("… ({} more bytes)", 100_000 - 1024)), "{detail}");
        assert!(detail.len() < 1200 && !detail.chars().any(char::is_control), "{detail}");
    }
}
