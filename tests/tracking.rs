//! Experiment tracking through the CLI: `--report-to tensorboard` event files read back with
//! TensorBoard's own EventAccumulator hold every metric of metrics.jsonl; `--report-to mlflow`
//! sends a loopback MLflow server the config as params, every metric, and the end status; a
//! server that is down costs one warning, not the run.

use crate::common::{metric_series, metrics_lines};
use crate::resume::{tiny_config, train_command, write_config, Running, FTX};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

/// (key, step) → value of every metric in metrics.jsonl.
fn jsonl_points(dir: &Path) -> BTreeMap<(String, u64), f64> {
    let mut out = BTreeMap::new();
    for line in metrics_lines(&dir.join("out")) {
        let step = line["step"].as_u64().unwrap();
        for (k, v) in line.as_object().unwrap() {
            if k != "step" {
                out.insert((k.clone(), step), ftx::train::metrics::read_number(v).unwrap());
            }
        }
    }
    out
}

const READ_EVENTS: &str = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0})
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
"#;

#[test]
fn tensorboard_event_files_hold_every_metric_of_metrics_jsonl() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_config(d.path(), 24, "train.max_steps=6 data.validation_split=0.25 train.eval_every=2");
    let path = write_config(d.path(), &cfg);
    let o = Command::new(FTX).args(["train", "--config"]).arg(&path).args(["--report-to", "tensorboard"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_tensorboard_holds_metrics_jsonl(d.path(), &["loss", "lr", "grad_norm", "tokens_per_s", "eval_loss", "eval_ppl"]);
}

/// Reads `dir/out/tensorboard` with TensorBoard's EventAccumulator and checks that it holds
/// exactly metrics.jsonl's metrics (among them `keys`), at the same steps.
fn assert_tensorboard_holds_metrics_jsonl(dir: &Path, keys: &[&str]) {
    let events = dir.join("out/tensorboard");
    let files: Vec<_> = std::fs::read_dir(&events).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(files.len() == 1 && files[0].starts_with("events.out.tfevents."), "{files:?}");
    let o = Command::new(crate::gguf::python()).arg("-c").arg(READ_EVENTS).arg(&events).output().expect("python (see tests/env.sh)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let scalars: BTreeMap<String, Vec<(u64, f64)>> = serde_json::from_slice(&o.stdout).unwrap();
    let mut read = BTreeMap::new();
    for (tag, points) in &scalars {
        for (step, v) in points {
            assert!(read.insert((tag.clone(), *step), *v).is_none(), "{tag} step {step} twice");
        }
    }
    let expected = jsonl_points(dir);
    for key in keys {
        assert!(expected.keys().any(|(k, _)| k == key), "metrics.jsonl has {key}");
    }
    assert_eq!(read.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "the same metrics at the same steps");
    for (k, v) in &expected {
        // TensorBoard scalars are f32 (compared as f32: serde_json's f64 parsing may be off by
        // an ulp).
        assert_eq!(read[k] as f32, *v as f32, "{k:?}");
    }
}

#[test]
fn an_rl_run_reports_its_rewards_to_tensorboard() {
    let d = tempfile::tempdir().unwrap();
    let prompts: String = ["Say something.", "Write a word.", "Answer me."].iter().map(|p| serde_json::json!({"prompt": p, "reference": "yes"}).to_string() + "\n").collect();
    std::fs::write(d.path().join("prompts.jsonl"), prompts).unwrap();
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n\
         [train]\nlr = 1e-2\nmax_steps = 3\nreport_to = \"tensorboard\"\noutput_dir = \"{}\"\n\
         [rl]\nalgorithm = \"grpo\"\nprompts_per_step = 2\ngroup_size = 2\nmax_new_tokens = 3\n\
         [[plugins]]\npath = \"{}\"\n[[plugins]]\npath = \"{}\"\n",
        crate::common::fixture("models/llama3").display(),
        d.path().join("prompts.jsonl").display(),
        d.path().join("out").display(),
        crate::plugins::wasm("grpo").display(),
        crate::plugins::wasm("regex-match").display(),
    );
    {
        let _rng = crate::common::torch_rng_lock();
        ftx::recipes::train(&ftx::train::TrainConfig::parse(&text, &[]).unwrap()).unwrap();
    }
    assert_tensorboard_holds_metrics_jsonl(d.path(), &["loss", "reward", "reward_std", "kl", "completion_length", "plugin/grpo/kl", "reward/regex_match"]);
}

/// The loopback MLflow server: its port and the file it records requests in.
struct MlflowServer {
    child: std::process::Child,
    port: u16,
    record: std::path::PathBuf,
}

impl MlflowServer {
    fn start(dir: &Path) -> MlflowServer {
        let record = dir.join("mlflow_requests.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mlflow_server.py");
        let mut child = Command::new(crate::gguf::python()).arg(script).arg(&record).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        MlflowServer { port: line.trim().parse().unwrap(), child, record }
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.record).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn mlflow_gets_the_config_as_params_every_metric_and_the_end_status() {
    let d = tempfile::tempdir().unwrap();
    let server = MlflowServer::start(d.path());
    let cfg = tiny_config(d.path(), 24, "train.max_steps=5 data.validation_split=0.25 train.eval_every=2");
    let path = write_config(d.path(), &cfg);
    let o = Command::new(FTX)
        .args(["train", "--config"])
        .arg(&path)
        .args(["--report-to", "mlflow"])
        .env("MLFLOW_TRACKING_URI", format!("http://127.0.0.1:{}", server.port))
        .env("MLFLOW_EXPERIMENT_NAME", "ftx-tests")
        .env("MLFLOW_TRACKING_TOKEN", "s3cret")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("warning"), "{err}");
    let reqs = server.requests();
    let api = |r: &serde_json::Value| r["path"].as_str().unwrap().trim_start_matches("/api/2.0/mlflow/").to_owned();
    assert!(reqs.iter().all(|r| r["authorization"] == "Bearer s3cret"), "every request carries the token");
    // The experiment is looked up by name, created when missing; one run.
    assert_eq!(api(&reqs[0]), "experiments/get-by-name");
    assert_eq!(reqs[0]["query"]["experiment_name"], "ftx-tests");
    assert_eq!((api(&reqs[1]), &reqs[1]["body"]["name"]), ("experiments/create".into(), &serde_json::json!("ftx-tests")));
    assert_eq!(api(&reqs[2]), "runs/create");
    let run_id = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(d.path().join("out/mlflow_run.json")).unwrap()).unwrap()["run_id"].clone();
    // Params: the resolved config, flattened.
    let params: BTreeMap<String, String> = reqs
        .iter()
        .filter(|r| api(r) == "runs/log-batch")
        .flat_map(|r| r["body"]["params"].as_array().cloned().unwrap_or_default())
        .map(|p| (p["key"].as_str().unwrap().to_owned(), p["value"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(params["train.lr"], "0.001");
    assert_eq!(params["method.rank"], "4");
    assert_eq!(params["model.path"], cfg.model.path.display().to_string());
    assert_eq!(params["train.max_steps"], "5");
    // Metrics: exactly metrics.jsonl's, under its names and steps.
    let mut sent = BTreeMap::new();
    for r in reqs.iter().filter(|r| api(r) == "runs/log-batch") {
        assert_eq!(r["body"]["run_id"], run_id);
        for m in r["body"]["metrics"].as_array().cloned().unwrap_or_default() {
            let key = (m["key"].as_str().unwrap().to_owned(), m["step"].as_u64().unwrap());
            assert!(sent.insert(key.clone(), m["value"].as_f64().unwrap()).is_none(), "{key:?} sent twice");
        }
    }
    let expected = jsonl_points(d.path());
    assert!(expected.keys().any(|(k, _)| k == "eval_loss") && expected.len() > 20);
    assert_eq!(sent, expected);
    // The run ends FINISHED, last.
    let last = reqs.last().unwrap();
    assert_eq!((api(last), &last["body"]["status"], &last["body"]["run_id"]), ("runs/update".into(), &serde_json::json!("FINISHED"), &run_id));
}

#[test]
fn a_tracking_server_that_is_down_warns_once_and_training_goes_on() {
    let d = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = tiny_config(d.path(), 8, "train.max_steps=3 train.report_to=mlflow");
    let path = write_config(d.path(), &cfg);
    let o = Command::new(FTX).args(["train", "--config"]).arg(&path).env("MLFLOW_TRACKING_URI", format!("http://127.0.0.1:{port}")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("MLflow tracking at").count(), 1, "one warning: {err}");
    assert!(err.contains("the run goes on without MLflow"), "{err}");
    assert!(d.path().join("out/final/adapter_model.safetensors").exists());
    assert_eq!(metrics_lines(&d.path().join("out")).len(), 3);
    // Without a tracking URI the run does not start.
    let o = Command::new(FTX).args(["train", "--config"]).arg(&path).env_remove("MLFLOW_TRACKING_URI").arg("--out").arg(d.path().join("b")).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("set MLFLOW_TRACKING_URI"));
}

#[test]
fn an_interrupted_run_ends_killed_in_mlflow_and_its_resume_continues_the_same_run() {
    let d = tempfile::tempdir().unwrap();
    let server = MlflowServer::start(d.path());
    let cfg = write_config(d.path(), &tiny_config(d.path(), 16, "train.max_steps=8 train.report_to=mlflow"));
    let env = [("MLFLOW_TRACKING_URI", format!("http://127.0.0.1:{}", server.port))];
    let mut cmd = train_command(d.path(), &cfg, 300);
    cmd.envs(env.clone());
    let mut run = Running::start(cmd);
    let dir = d.path().to_path_buf();
    run.wait_for("a logged step", |_| !metric_series(&dir.join("out"), "loss").is_empty());
    run.signal(libc::SIGINT);
    let (status, err) = run.finish();
    assert_eq!(status.code(), Some(130), "{err}");
    let api = |r: &serde_json::Value| r["path"].as_str().unwrap().trim_start_matches("/api/2.0/mlflow/").to_owned();
    let reqs = server.requests();
    let last = reqs.last().unwrap();
    assert_eq!((api(last), &last["body"]["status"]), ("runs/update".into(), &serde_json::json!("KILLED")), "{reqs:#?}");
    let run_id = last["body"]["run_id"].clone();

    let o = Command::new(FTX).current_dir(d.path()).args(["train", "--config"]).arg(&cfg).envs(env).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let later = &server.requests()[reqs.len()..];
    assert_eq!((api(&later[0]), &later[0]["body"]["status"], &later[0]["body"]["run_id"]), ("runs/update".into(), &serde_json::json!("RUNNING"), &run_id));
    assert!(later.iter().all(|r| api(r) != "runs/create" && r["body"]["run_id"] == run_id), "the same MLflow run: {later:#?}");
    let end = later.last().unwrap();
    assert_eq!((api(end), &end["body"]["status"]), ("runs/update".into(), &serde_json::json!("FINISHED")));
}
