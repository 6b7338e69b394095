//! `ftx eval`: perplexity and multiple-choice log-likelihoods equal what HF transformers and
//! PEFT compute (tests/fixtures/fx_eval.py), task metrics equal hand labels, the rubric judge
//! plugin grades through the eval run, and the CLI writes a report holding every model's
//! numbers, or names the bad file and line.

use crate::common::{fixture, json};
use crate::plugins::wasm;
use ftx::eval::generation::GenerationTask;
use ftx::eval::judging::Judge;
use ftx::eval::likelihood::{multiple_choice, pad_id, perplexity, prepare_perplexity};
use ftx::eval::run::load_model;
use ftx::eval::spec::{EvalSpec, GenerationSpec, JudgeSpec, Metric, ModelSpec, PerplexitySpec};
use ftx::eval::tasks::read_choice;
use ftx::eval::RunOptions;
use ftx::model::decoder::LoadOptions;
use ftx::plugins::judge_model::LlmFn;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind};

const CPU: LoadOptions = LoadOptions { device: Device::Cpu, kind: Kind::Float };

fn base() -> ModelSpec {
    ModelSpec { name: Some("base".into()), path: fixture("models/llama3"), adapter: None }
}

fn adapted() -> ModelSpec {
    ModelSpec { name: Some("adapter".into()), path: fixture("models/llama3"), adapter: Some(fixture("eval/adapter")) }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1.0)
}

#[test]
fn perplexity_is_exp_of_the_mean_nll_transformers_computes() {
    let exp = json("eval/expected.json");
    for m in [base(), adapted()] {
        let e = &exp[m.name.as_deref().unwrap()];
        let (model, tok) = load_model(&m, CPU).unwrap();
        let spec = PerplexitySpec { data: fixture("eval/heldout.jsonl"), format: ftx::data::DataFormat::Auto, max_seq_len: 256, batch_size: 3 };
        let data = prepare_perplexity(&tok, &spec, None).unwrap();
        let p = perplexity(&model, &data, spec.batch_size, pad_id(&tok), |_| {});
        assert_eq!(p.n_targets, e["n_targets"].as_i64().unwrap(), "{:?}", m.name);
        let nll = e["nll_sum"].as_f64().unwrap();
        assert!(close(p.nll_sum, nll, 1e-4), "{:?}: {} vs {nll}", m.name, p.nll_sum);
        let ppl = (nll / e["n_targets"].as_f64().unwrap()).exp();
        assert!(close(p.perplexity, ppl, 1e-3) && close(p.perplexity, e["perplexity"].as_f64().unwrap(), 1e-3), "{:?}: {} vs {ppl}", m.name, p.perplexity);
    }
}

#[test]
fn multiple_choice_logliks_and_accuracies_match_transformers() {
    let exp = json("eval/expected.json");
    let samples = read_choice(&fixture("eval/mc.jsonl"), None).unwrap();
    for m in [base(), adapted()] {
        let e = &exp[m.name.as_deref().unwrap()]["mc"];
        let (model, tok) = load_model(&m, CPU).unwrap();
        // 5 sequences a batch: batches cut across questions and pad rows of unequal length.
        let mut done = 0;
        let (scores, outcomes) = multiple_choice(&model, &tok, &samples, " ", 5, |n| done += n).unwrap();
        assert_eq!(done, samples.len());
        for (q, o) in outcomes.iter().enumerate() {
            let want: Vec<f64> = e["docs"][q]["loglik"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            for (got, want) in o.loglik.iter().zip(&want) {
                assert!((got - want).abs() < 2e-3, "{:?} question {q}: {:?} vs {want:?}", m.name, o.loglik);
            }
            assert_eq!(o.pred as u64, e["docs"][q]["pred"].as_u64().unwrap());
            assert_eq!(o.pred_norm as u64, e["docs"][q]["pred_norm"].as_u64().unwrap());
        }
        assert_eq!((scores.acc, scores.acc_norm), (e["acc"].as_f64().unwrap(), e["acc_norm"].as_f64().unwrap()), "{:?}", m.name);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn gen_spec(file: PathBuf, metrics: Vec<Metric>, schema: Option<PathBuf>) -> GenerationSpec {
    GenerationSpec { name: None, file, metrics, max_new_tokens: 4, temperature: 0.0, seed: 0, stop: Vec::new(), schema, chat: None }
}

#[test]
fn task_metrics_equal_hand_labels() {
    let d = tempfile::tempdir().unwrap();
    let file = write(
        d.path(),
        "calls.jsonl",
        concat!(
            r#"{"prompt": "timer 5", "reference": {"name": "set_timer", "arguments": {"minutes": 5}}}"#, "\n",
            r#"{"prompt": "weather Oslo", "reference": "{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\", \"day\": \"today\"}}"}"#, "\n",
            r#"{"prompt": "play jazz", "reference": {"name": "play", "arguments": {"genre": "jazz"}}}"#, "\n",
            r#"{"prompt": "nothing", "reference": {"name": "noop", "arguments": {}}}"#, "\n",
        ),
    );
    let schema = write(d.path(), "call.schema.json", r#"{"type": "object", "required": ["name", "arguments"], "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}}}"#);
    let metrics = vec![Metric::ExactMatch, Metric::JsonValid, Metric::JsonSchema, Metric::FunctionCall];
    let task = GenerationTask::load("calls".into(), gen_spec(file, metrics, Some(schema)), None).unwrap();
    let answers = [
        r#"{"name": "set_timer",  "arguments": {"minutes": 5}}"#.to_string(), // all right (a JSON reference: spacing aside)
        r#" {"arguments": {"day": "today", "city": "Oslo"}, "name": "weather"} "#.to_string(), // same call, other text than the string reference
        r#"{"name": "play", "arguments": {"genre": "rock"}}"#.to_string(), // right name, wrong argument
        r#"{"name": 7}"#.to_string(), // JSON, but no call and not the schema
    ];
    // Hand labels: exact_match, json_valid, json_schema, call_valid, call_name, call_arguments, call_exact.
    let labels = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ];
    let keys = ["exact_match", "json_valid", "json_schema", "call_valid", "call_name", "call_arguments", "call_exact"];
    let scores = task.score(&answers);
    for (i, (s, l)) in scores.iter().zip(labels).enumerate() {
        let got: Vec<f64> = keys.iter().map(|k| s[*k]).collect();
        assert_eq!(got, l, "sample {i}");
    }
    let mean = ftx::eval::generation::mean_metrics(&scores);
    assert_eq!((mean["exact_match"], mean["json_schema"], mean["call_exact"]), (0.25, 0.75, 0.5));
}

#[test]
fn json_schema_conformance_per_task_and_per_sample() {
    let d = tempfile::tempdir().unwrap();
    let file = write(
        d.path(),
        "people.jsonl",
        concat!(
            r#"{"prompt": "a person"}"#, "\n",
            r#"{"prompt": "a person"}"#, "\n",
            r#"{"prompt": "a person"}"#, "\n",
            r#"{"prompt": "a list", "schema": {"type": "array", "items": {"type": "integer"}, "minItems": 2}}"#, "\n",
            r#"{"prompt": "a list", "schema": {"type": "array", "items": {"type": "integer"}, "minItems": 2}}"#, "\n",
        ),
    );
    let schema = write(d.path(), "person.json", r#"{"type": "object", "required": ["age"], "properties": {"age": {"type": "integer", "minimum": 0}}}"#);
    let task = GenerationTask::load("p".into(), gen_spec(file.clone(), vec![Metric::JsonSchema], Some(schema)), None).unwrap();
    let answers: Vec<String> = ["{\"age\": 30}", "{\"age\": -1}", "```json\n{\"age\": 4}\n```", "[1, 2, 3]", "[1]"].map(String::from).to_vec();
    let got: Vec<f64> = task.score(&answers).iter().map(|s| s["json_schema"]).collect();
    assert_eq!(got, [1.0, 0.0, 1.0, 1.0, 0.0]);

    // A task asking for json_schema without one, or with a schema that is not one, is refused.
    let e = GenerationTask::load("p".into(), gen_spec(file, vec![Metric::JsonSchema], None), None).err().unwrap().to_string();
    assert!(e.contains("people.jsonl:1:") && e.contains("json_schema needs a schema"), "{e}");
    let bad = write(d.path(), "bad.jsonl", "{\"prompt\": \"x\", \"schema\": {\"type\": 5}}\n");
    let e = GenerationTask::load("b".into(), gen_spec(bad, vec![Metric::JsonSchema], None), None).err().unwrap().to_string();
    assert!(e.contains("bad.jsonl:1:") && e.contains("not a valid JSON Schema"), "{e}");
}

fn judge_spec() -> JudgeSpec {
    JudgeSpec { plugin: wasm("rubric-judge"), llm: "local:unused".into(), model: None, api_key_env: None, max_tokens: 32 }
}

#[test]
fn the_rubric_judge_grades_each_answer_in_an_eval_run() {
    // The judge's model is a stand-in that grades 9 when the response equals the reference and
    // 2 otherwise, and has no grade for "?": the rubric plugin turns its reply into n / 10.
    let llm: LlmFn = Box::new(|prompt: &str, _| {
        let after = prompt.split("judge the response against it):\n").nth(1).unwrap_or("");
        let reference = &after[..after.rfind("\n\nReply with").unwrap_or(after.len())];
        let matches = prompt.contains(&format!("RESPONSE:\n{reference}\n\nREFERENCE"));
        Ok(if reference == "?" { "I cannot tell.".into() } else if matches { "Score: 9. Right.".into() } else { "Score: 2. Wrong.".into() })
    });
    let d = tempfile::tempdir().unwrap();
    // The fixture model's greedy answers are fixed; references are set so that one matches.
    let (model, tok) = load_model(&base(), CPU).unwrap();
    let probe = GenerationTask::load("probe".into(), GenerationSpec { chat: Some(false), ..gen_spec(write(d.path(), "probe.jsonl", "{\"prompt\": \"Hello\"}\n"), vec![], None) }, None).unwrap();
    let greedy = probe.answer(&model, &tok, || {}).unwrap().remove(0);
    drop(model);
    let lines = [("Hello", greedy.as_str()), ("Hello", "something else"), ("Hello", "?")]
        .map(|(p, r)| serde_json::json!({"prompt": p, "reference": r}).to_string() + "\n")
        .concat();
    let file = write(d.path(), "judged.jsonl", &lines);
    let spec = EvalSpec {
        models: vec![base()],
        generation: vec![GenerationSpec { chat: Some(false), ..gen_spec(file, vec![Metric::Judge], None) }],
        judge: Some(judge_spec()),
        ..Default::default()
    };
    let judge = Judge::with_llm(&judge_spec(), llm).unwrap();
    let out = d.path().join("report");
    let r = ftx::eval::run_with_judge(&spec, &out, RunOptions { load: CPU, progress: false }, Some(judge)).unwrap();
    let t = &r.models[0].tasks[0];
    assert_eq!(t.judge_errors, 1);
    assert!((t.metrics["judge"] - 0.55).abs() < 1e-6, "{t:?}"); // (0.9 + 0.2) / 2 graded
    let samples: Vec<serde_json::Value> = std::fs::read_to_string(out.join("samples.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!((samples[0]["scores"]["judge"].as_f64().unwrap() - 0.9).abs() < 1e-6 && samples[0]["judge_rationale"] == "Score: 9. Right.", "{}", samples[0]);
    assert!(samples[2]["judge_error"].as_str().unwrap().contains("no grade"), "{}", samples[2]);
}

fn ftx(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ftx")).args(args).output().unwrap()
}

#[test]
fn the_cli_compares_base_and_adapter_in_one_report() {
    let d = tempfile::tempdir().unwrap();
    let gen = write(d.path(), "gen.jsonl", "{\"prompt\": \"Hello\", \"reference\": \"Hello\"}\n{\"prompt\": \"The cat\", \"reference\": \"{}\"}\n");
    let out = d.path().join("out");
    let (m, a, heldout, mc) = (fixture("models/llama3"), fixture("eval/adapter"), fixture("eval/heldout.jsonl"), fixture("eval/mc.jsonl"));
    let args = [
        "eval", "--model", m.to_str().unwrap(), "--adapter", a.to_str().unwrap(), "--perplexity", heldout.to_str().unwrap(),
        "--choice", mc.to_str().unwrap(), "--generation", gen.to_str().unwrap(), "--metrics", "exact_match,json_valid",
        "--max-new-tokens", "6", "--device", "cpu", "--out", out.to_str().unwrap(),
    ];
    let o = ftx(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(stdout.contains("llama3 + adapter") && stdout.contains("mc:acc_norm"), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let exp = json("eval/expected.json");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.starts_with("<!DOCTYPE html>"), "inline SVG charts");
    for (i, key) in ["base", "adapter"].iter().enumerate() {
        let m = &r["models"][i];
        let ppl = m["perplexity"]["perplexity"].as_f64().unwrap();
        assert!(close(ppl, exp[key]["perplexity"].as_f64().unwrap(), 1e-3), "{key}: {ppl}");
        let mc = m["tasks"].as_array().unwrap().iter().find(|t| t["task"] == "mc").unwrap();
        assert_eq!(mc["metrics"]["acc_norm"].as_f64(), exp[key]["mc"]["acc_norm"].as_f64(), "{key}");
        // The page shows each model's name and numbers.
        assert!(html.contains(m["name"].as_str().unwrap()), "{key}");
        assert!(html.contains(&format!("{ppl:.4}")), "{key}: perplexity {ppl:.4} in the page");
        assert!(html.contains(&format!("{:.1}%", mc["metrics"]["acc"].as_f64().unwrap() * 100.0)), "{key}");
    }
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 2 * (4 + 2), "per model: 4 questions and 2 answers");
}

#[test]
fn a_bad_task_file_is_named_with_its_line() {
    let d = tempfile::tempdir().unwrap();
    let m = fixture("models/llama3");
    let bad = write(d.path(), "bad_mc.jsonl", "{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 1}\n\n{\"context\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 5}\n");
    let o = ftx(&["eval", "--model", m.to_str().unwrap(), "--choice", bad.to_str().unwrap(), "--device", "cpu", "--out", d.path().join("o").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bad_mc.jsonl:3: \"gold\" is 5 but there are 2 choices"), "{err}");
    let toml = write(d.path(), "eval.toml", "[[models]]\npath = \"m\"\n[[choice]]\nfile = \"x.jsonl\"\nbatch = 3\n");
    let o = ftx(&["eval", "--tasks", toml.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("eval.toml:5:") && err.contains("batch"), "{err}");
}
