//! `ftx prep` end to end: a messy mixed-format folder, the accounting, byte-identical
//! re-runs, and memory that does not grow with the input.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn ftx(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ftx")).args(args).output().unwrap()
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A Parquet file with one UTF-8 column `text` (also used by tests/hub.rs).
pub(crate) fn write_parquet(path: &Path, rows: &[&str]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::writer::SerializedFileWriter;
    let schema = std::sync::Arc::new(parquet::schema::parser::parse_message_type("message m { REQUIRED BYTE_ARRAY text (UTF8); }").unwrap());
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, Default::default()).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    let values: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(*r)).collect();
    col.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

const LONG: &str = "The quarterly report shows steady growth in every region, with the strongest gains in the northern offices and a small decline in the south";

/// The messy folder: 21 records in six files of five formats, one file ftx does not read.
fn messy_folder(dir: &Path) {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("more")).unwrap();
    let alpaca = [
        format!(r#"{{"instruction":"Summarise the report","input":"","output":"{LONG}."}}"#),
        r#"{"instruction":"Who do I contact?","output":"Write to jane.doe@example.com or call +44 20 7946 0958."}"#.to_string(),
        "{not json".to_string(),
        r#"{"instruction":"Tell me a secret","output":"I'm sorry, but I can't share that."}"#.to_string(),
        String::new(),
        format!(r#"{{"instruction":"Summarise the report","input":"","output":"{}."}}"#, LONG.replace("steady", "solid")),
        r#"{"instruction":"Pay me","output":"Card 4111 1111 1111 1111, not 4111 1111 1111 1112, on 2023-10-12."}"#.to_string(),
        r#"{"prompt":"Best fruit?","chosen":"Apples are crisp and sweet.","rejected":"Rocks."}"#.to_string(),
    ];
    std::fs::write(data.join("a.jsonl"), alpaca.join("\n") + "\n").unwrap();
    std::fs::write(
        data.join("b.json"),
        r#"[{"conversations":[{"from":"human","value":"Hi there, how are you today?"},{"from":"gpt","value":"Very well, thank you for asking!"}]},
 {"messages":[{"role":"user","content":"ping"},{"role":"assistant","content":"pong"},{"role":"user","content":"again"},{"role":"assistant","content":"pong"}]},
 {"messages":[{"role":"user","content":"no answer"}]}]"#,
    )
    .unwrap();
    std::fs::write(
        data.join("more/c.csv"),
        "instruction,output\n\"What is 2+2?\",\"It is 4, as any calculator will tell you.\"\nWhat is my IBAN?,Your IBAN is DE89 3704 0044 0532 0130 00 at the bank.\nbroken row\n",
    )
    .unwrap();
    std::fs::write(data.join("more/d.txt"), "A line of raw text about the weather in spring.\n\nAnother line, from 192.168.1.20 by admin.\nA LINE OF RAW TEXT ABOUT THE  WEATHER IN SPRING.\n").unwrap();
    write_parquet(&data.join("e.parquet"), &["Parquet rows are read as text records too.", "Heute ist das Wetter in Berlin sonnig und sehr warm, sagt der Wetterbericht."]);
    std::fs::write(data.join("notes.bin"), [0u8, 1, 2]).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(data.join("a.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, b"{\"text\":\"bad \xff bytes here\"}\n").unwrap();
    std::fs::write(
        dir.join("prep.toml"),
        r#"[prep]
inputs = ["data"]
out = "out"
stages = ["filter", "pii", "dedup"]
chunk_size = 4

[prep.filter]
languages = ["eng"]
min_language_confidence = 0.8

[prep.dedup]
shingle_size = 3
threshold = 0.5

[prep.split]
train = 0.6
validation = 0.2
test = 0.2
seed = 3
"#,
    )
    .unwrap();
}

#[test]
fn a_messy_folder_becomes_clean_splits_rejects_and_a_report_that_adds_up() {
    let d = tempfile::tempdir().unwrap();
    messy_folder(d.path());
    let cfg = d.path().join("prep.toml");
    let o = ftx(&["prep", "--config", cfg.to_str().unwrap(), "--quiet"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("adds up"), "{stdout}");
    let out = d.path().join("out");
    let kept: Vec<Value> = ["train", "validation", "test"].iter().flat_map(|s| jsonl(&out.join(format!("{s}.jsonl")))).collect();
    let rejects = jsonl(&out.join("rejects.jsonl"));
    // a.jsonl 8 records (one blank line is none) + b.json 3 + c.csv 3 + d.txt 3 + e.parquet 2
    assert_eq!(kept.len() + rejects.len(), 19);
    let why = |r: &Value| format!("{}/{} {}:{}", r["stage"].as_str().unwrap(), r["reason"].as_str().unwrap(), r["source"].as_str().unwrap().rsplit('/').next().unwrap(), r["line"]);
    let mut got: Vec<String> = rejects.iter().map(why).collect();
    got.sort();
    let mut want = vec![
        "ingest/malformed_json a.jsonl:3",
        "filter/refusal a.jsonl:4",
        "dedup/near_duplicate a.jsonl:6",
        "filter/broken_utf8 a.jsonl:9",
        "filter/duplicate_turn b.json:2",
        "ingest/bad_record b.json:3",
        "ingest/unreadable c.csv:4",
        "dedup/exact_duplicate d.txt:4",
        "filter/language e.parquet:2",
    ];
    want.sort();
    assert_eq!(got, want);
    let near = rejects.iter().find(|r| r["reason"] == "near_duplicate").unwrap();
    assert_eq!(near["duplicate_of"]["line"], 1);
    assert!(near["duplicate_of"]["source"].as_str().unwrap().ends_with("a.jsonl"));
    assert!(rejects.iter().find(|r| r["reason"] == "malformed_json").unwrap()["record"] == "{not json");

    let all = serde_json::to_string(&kept).unwrap();
    for secret in ["jane.doe@example.com", "7946 0958", "4111 1111 1111 1111", "DE89 3704", "192.168.1.20"] {
        assert!(!all.contains(secret), "{secret} left in the output");
    }
    for kept_text in ["<EMAIL>", "<PHONE>", "<CREDIT_CARD>", "<IBAN>", "<IP_ADDRESS>", "4111 1111 1111 1112", "2023-10-12", "Apples are crisp"] {
        assert!(all.contains(kept_text), "{kept_text} missing from the output");
    }

    let report = json(&out.join("report.json"));
    assert_eq!(report["input_records"], 19);
    assert_eq!(report["output_records"], 10);
    assert_eq!(report["rejected_records"], 9);
    let stages: Vec<(String, u64, u64)> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["stage"].as_str().unwrap().to_owned(), s["in"].as_u64().unwrap(), s["out"].as_u64().unwrap()))
        .collect();
    let want: Vec<(String, u64, u64)> = [("ingest", 19, 16), ("filter", 16, 12), ("pii", 12, 12), ("dedup", 12, 10), ("format", 10, 10)]
        .iter()
        .map(|(s, i, o)| (s.to_string(), *i, *o))
        .collect();
    assert_eq!(stages, want);
    assert_eq!(report["pii_entities"]["EMAIL"], 1);
    assert_eq!(report["pii_entities"]["CREDIT_CARD"], 1);
    assert_eq!(report["pii_records_changed"], 4);
    let manifest = json(&out.join("manifest.json"));
    let inputs = manifest["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 5, "notes.bin is skipped");
    let a = inputs.iter().find(|i| i["path"].as_str().unwrap().ends_with("a.jsonl")).unwrap();
    assert_eq!(a["sha256"].as_str().unwrap(), ftx::util::sha256_file(&d.path().join("data/a.jsonl")).unwrap());
    assert_eq!(a["records"], 8);
    for o in manifest["outputs"].as_array().unwrap() {
        let f = out.join(o["file"].as_str().unwrap());
        assert_eq!(o["sha256"].as_str().unwrap(), ftx::util::sha256_file(&f).unwrap());
    }
}

#[test]
fn a_rerun_writes_byte_identical_outputs_whatever_the_thread_count() {
    let d = tempfile::tempdir().unwrap();
    messy_folder(d.path());
    let cfg = d.path().join("prep.toml");
    let files = ["train.jsonl", "validation.jsonl", "test.jsonl", "rejects.jsonl", "report.json", "manifest.json"];
    let read = || files.map(|f| std::fs::read(d.path().join("out").join(f)).unwrap());
    let run = |threads: &str| assert!(ftx(&["prep", "--config", cfg.to_str().unwrap(), "--quiet", "--threads", threads]).status.success());
    run("1");
    let one = read();
    run("2");
    let two = read();
    run("2");
    let again = read();
    for (i, f) in files.iter().enumerate() {
        assert!(two[i] == again[i], "{f} differs between two identical runs");
        // The manifest records the thread count (it is part of the config); nothing else does.
        if *f != "manifest.json" {
            assert!(one[i] == two[i], "{f} differs between 1 and 2 threads");
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(d.path().join("out")).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty());
}

#[test]
fn accounting_adds_up_on_a_generated_corpus_with_every_kind_of_reject() {
    use ftx::data::prep::{self, bench::Corpus, split::{format_record, OutputFormat}};
    let d = tempfile::tempdir().unwrap();
    let mut text = String::new();
    let mut corpus = Corpus::new(5);
    for i in 0..3000 {
        if i % 97 == 0 {
            text.push_str("{broken\n");
        } else if i % 101 == 0 {
            text.push_str("{\"instruction\":\"q\",\"output\":\"As an AI language model, I cannot.\"}\n");
        } else {
            text.push_str(&serde_json::to_string(&format_record(&corpus.next_record().example, OutputFormat::Auto).unwrap()).unwrap());
            text.push('\n');
        }
    }
    std::fs::write(d.path().join("c.jsonl"), text).unwrap();
    let mut cfg = prep::PrepConfig::parse("[prep]\ninputs = \"c.jsonl\"\nchunk_size = 100\n[prep.output]\nformat = \"sharegpt\"\n").unwrap();
    cfg.inputs = vec![d.path().join("c.jsonl").display().to_string()];
    cfg.out = d.path().join("out");
    let r = prep::run(&cfg, false).unwrap().report;
    assert_eq!(r.input_records, 3000);
    let rejects = std::fs::read_to_string(d.path().join("out/rejects.jsonl")).unwrap().lines().count() as u64;
    let written: u64 = ["train", "validation", "test"].iter().map(|s| std::fs::read_to_string(d.path().join(format!("out/{s}.jsonl"))).unwrap().lines().count() as u64).sum();
    assert_eq!(r.input_records, written + rejects);
    assert_eq!((r.output_records, r.rejected_records), (written, rejects));
    assert!(r.balanced());
    let by = |stage: &str| r.stages.iter().find(|s| s.stage == stage).unwrap().clone();
    assert_eq!(by("ingest").reasons["malformed_json"], 31); // i = 0, 97, …, 2910
    assert_eq!(by("filter").reasons["refusal"], 29); // multiples of 101 below 3000 that are not of 97
    assert!(by("dedup").rejected > 100, "the corpus plants about 10 % duplicates");
    assert!(r.pii_entities["EMAIL"] > 10);
    for w in r.stages.windows(2) {
        assert_eq!(w[0].out, w[1].input);
        assert_eq!(w[0].input, w[0].out + w[0].rejected);
    }
}

#[test]
fn memory_does_not_grow_with_the_input() {
    // Two runs, 1 record and ~60 MB: the peak resident memory of the second may exceed the
    // first's by far less than the input (the chunks in flight, not the file).
    let d = tempfile::tempdir().unwrap();
    let line = format!(r#"{{"instruction":"Describe item {{}}","output":"{}"}}"#, "lorem ipsum dolor sit amet ".repeat(8));
    let big: String = (0..250_000).map(|i| line.replace("{}", &i.to_string()) + "\n").collect();
    let input_mb = big.len() as u64 >> 20;
    assert!(input_mb >= 55, "{input_mb} MB");
    std::fs::write(d.path().join("big.jsonl"), &big).unwrap();
    drop(big);
    std::fs::write(d.path().join("small.jsonl"), line.replace("{}", "0") + "\n").unwrap();
    let peak = |name: &str| {
        let cfg = d.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, format!("[prep]\ninputs = \"{name}.jsonl\"\nout = \"out-{name}\"\nstages = [\"filter\"]\nchunk_size = 512\n")).unwrap();
        let o = ftx(&["prep", "--config", cfg.to_str().unwrap(), "--quiet"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        json(&d.path().join(format!("out-{name}/timing.json")))["peak_rss_bytes"].as_u64().unwrap() >> 20
    };
    let (small, large) = (peak("small"), peak("big"));
    assert!(large < small + input_mb / 3, "peak {large} MB on {input_mb} MB of input, {small} MB on one record");
}

#[test]
fn config_mistakes_are_messages() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("prep.toml");
    std::fs::write(&cfg, "[prep]\ninputs = [\"x\"]\n[prep.pii]\nmdoe = \"mask\"\n").unwrap();
    let o = ftx(&["prep", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("unknown field `mdoe`") && err.contains("did you mean `mode`"), "{err}");
    std::fs::write(&cfg, "[prep]\ninputs = [\"missing-folder\"]\n").unwrap();
    let err = String::from_utf8_lossy(&ftx(&["prep", "--config", cfg.to_str().unwrap()]).stderr).into_owned();
    assert!(err.contains("missing-folder: no such file or folder"), "{err}");
}

#[test]
fn data_filter_plugins_run_as_a_stage_and_every_record_is_accounted_for() {
    use ftx::data::prep;
    let d = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..40 {
        let output = match i % 10 {
            3 => "I'm sorry, but I can't assist with that request.".to_owned(),
            7 => "panic".to_owned(),
            _ => format!("Here is a useful answer number {i} with enough words."),
        };
        text.push_str(&serde_json::json!({"instruction": format!("Question {i}?"), "output": output}).to_string());
        text.push('\n');
    }
    std::fs::write(d.path().join("c.jsonl"), text).unwrap();
    // A sandboxed refusal filter, then the hostile filter built natively (it panics only on a
    // record that is exactly "panic", which these records never are as wholes).
    let text = format!(
        "[prep]\ninputs = \"c.jsonl\"\nstages = [\"plugins\"]\nplugins = [\"{}\", \"{}\"]\n[prep.output]\nformat = \"alpaca\"\n",
        crate::plugins::wasm("refusal").display(),
        crate::plugins::native("hostile-filter").display()
    );
    let mut cfg = prep::PrepConfig::parse(&text).unwrap();
    cfg.inputs = vec![d.path().join("c.jsonl").display().to_string()];
    cfg.out = d.path().join("out");
    let r = prep::run(&cfg, false).unwrap().report;
    assert_eq!(r.input_records, 40);
    let stage = r.stages.iter().find(|s| s.stage == "plugin").unwrap().clone();
    assert_eq!(stage.reasons["plugin_drop"], 4, "{stage:?}");
    assert_eq!(stage.reasons.get("plugin_error").copied().unwrap_or(0), 0, "the hostile filter panics only on a record that is exactly \"panic\"");
    assert_eq!(r.output_records + r.rejected_records, 40);
    let rejects: Vec<Value> = jsonl(&d.path().join("out/rejects.jsonl"));
    assert!(rejects.iter().all(|j| j["stage"] == "plugin" && j["detail"].as_str().unwrap().starts_with("refusal:")), "{rejects:?}");
}

/// The labelled PII benchmark (`ftx prep --pii-bench`): ftx holds the issue's targets on it,
/// per entity type, and the corpus it writes says exactly where each planted value is.
#[test]
fn pii_bench_scores_meet_the_targets_per_entity_type() {
    let d = tempfile::tempdir().unwrap();
    let o = ftx(&["prep", "--pii-bench", d.path().to_str().unwrap(), "--bench-records", "3000", "--bench-seed", "11"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = jsonl(&d.path().join("pii_bench.jsonl"));
    assert_eq!(records.len(), 3000);
    for r in &records {
        let text: Vec<char> = r["text"].as_str().unwrap().chars().collect();
        for s in r["spans"].as_array().unwrap() {
            let (a, b) = (s["start"].as_u64().unwrap() as usize, s["end"].as_u64().unwrap() as usize);
            assert_eq!(text[a..b].iter().collect::<String>(), s["value"].as_str().unwrap());
        }
    }
    let scores = json(&d.path().join("ftx_scores.json"));
    let pattern = ["EMAIL", "PHONE", "IP_ADDRESS", "CREDIT_CARD", "IBAN", "US_SSN", "MAC_ADDRESS", "DATE_OF_BIRTH", "PASSPORT", "NATIONAL_ID"];
    for e in pattern.iter().chain(&["PERSON", "ADDRESS"]) {
        let q = &scores[*e];
        assert!(q["planted"].as_u64().unwrap() >= 50, "{e}: too few planted to judge: {q}");
        let target = if pattern.contains(e) { 0.98 } else { 0.9 };
        let (recall, precision) = (q["recall"].as_f64().unwrap(), q["precision"].as_f64().unwrap());
        assert!(recall >= target && precision >= target, "{e}: recall {recall} precision {precision} below {target}: {q}");
    }
}

/// Names, addresses, dates of birth and IPv6 forms are scrubbed by a real `ftx prep` run, the
/// lookalikes beside them are kept, and every record is accounted for.
#[test]
fn prep_scrubs_names_addresses_and_ipv6_and_keeps_lookalikes() {
    let d = tempfile::tempdir().unwrap();
    let lines = [
        r#"{"instruction":"Who called?","output":"Hi Will, Dr. Okafor called from fe80::1%eth0 about 77 W. Elm St., Apt 5B, Springfield, IL 62704."}"#,
        r#"{"instruction":"Patient?","output":"Born on 14 March 1987; the visit was on 2024-03-14. Note 168-0.4446."}"#,
        r#"{"instruction":"Next?","output":"Will you send the Bill Payment form in May? Version 10.0.19045.2965 is fine."}"#,
        "not json",
    ];
    std::fs::write(d.path().join("in.jsonl"), lines.join("\n") + "\n").unwrap();
    std::fs::write(d.path().join("prep.toml"), "[prep]\ninputs = [\"in.jsonl\"]\nout = \"out\"\nstages = [\"pii\"]\n[prep.split]\ntrain = 1.0\nvalidation = 0.0\ntest = 0.0\n").unwrap();
    let o = ftx(&["prep", "--config", d.path().join("prep.toml").to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out: Vec<String> = jsonl(&d.path().join("out/train.jsonl")).iter().map(|r| r["output"].as_str().unwrap().to_owned()).collect();
    assert_eq!(out[0], "Hi <PERSON>, Dr. <PERSON> called from <IP_ADDRESS> about <ADDRESS>.");
    assert_eq!(out[1], "Born on <DATE_OF_BIRTH>; the visit was on 2024-03-14. Note 168-0.4446.");
    assert_eq!(out[2], "Will you send the Bill Payment form in May? Version 10.0.19045.2965 is fine.");
    let report = json(&d.path().join("out/report.json"));
    assert_eq!((report["input_records"].as_u64(), report["output_records"].as_u64(), report["rejected_records"].as_u64()), (Some(4), Some(3), Some(1)));
    assert_eq!(report["pii_entities"]["PERSON"], 2);
}
