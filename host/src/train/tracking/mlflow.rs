//! MLflow through its REST API (`/api/2.0/mlflow/…`), the way MLflow's own client talks to a
//! tracking server: the experiment by name (`MLFLOW_EXPERIMENT_NAME`, created when missing),
//! one run per training run (resumed runs continue the same MLflow run, recorded in
//! `<run>/mlflow_run.json`), the resolved config as params, metrics in batches, and the end
//! status (FINISHED, FAILED or KILLED).
//!
//! Requests go out on a thread of their own, so a slow server never holds up a step; a server
//! that cannot be reached gives one warning and the run goes on without it.
//!
//! Environment: `MLFLOW_TRACKING_URI` (an `http(s)://` server; required), `MLFLOW_EXPERIMENT_NAME`
//! (default `Default`), `MLFLOW_TRACKING_TOKEN` (sent as a bearer token).

use super::{RunStatus, Tracker};
use crate::train::TrainConfig;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Metrics are sent when this many are waiting, or [`FLUSH_EVERY`] after the last batch.
const BATCH: usize = 500;
const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// MLflow accepts at most 100 params per log-batch request, each value at most 500 characters
/// on older servers.
const PARAMS_PER_BATCH: usize = 100;
const PARAM_VALUE_MAX: usize = 500;
/// The file in a run's output folder that names its MLflow run (so a resume continues it).
const RUN_FILE: &str = "mlflow_run.json";

/// A run on an MLflow tracking server (or, after a failure, nothing).
pub struct MlflowRun {
    tx: Option<mpsc::Sender<Msg>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

enum Msg {
    Metrics(Vec<Value>),
    End(RunStatus),
}

impl MlflowRun {
    /// Opens the MLflow run of a training run writing into `out` (a new one, or for a resumed
    /// run the one it started), logging the resolved config as params. Errors only when the
    /// environment cannot work (no or a non-HTTP tracking URI); a server that does not answer
    /// gives a warning and a run that sends nothing.
    pub fn start(cfg: &TrainConfig, out: &Path, resume_step: usize) -> Result<MlflowRun, String> {
        let uri = std::env::var("MLFLOW_TRACKING_URI").unwrap_or_default();
        let uri = uri.trim().trim_end_matches('/').to_owned();
        if uri.is_empty() {
            return Err("train.report_to names mlflow: set MLFLOW_TRACKING_URI to the tracking server's address (e.g. http://127.0.0.1:5000, where `mlflow server` listens)".into());
        }
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            return Err(format!(
                "MLFLOW_TRACKING_URI={uri}: ftx reports to an MLflow tracking server over its REST API; start one (`mlflow server --backend-store-uri …`) and give its http(s):// address"
            ));
        }
        let mut client = Client {
            agent: ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(15)).build(),
            token: std::env::var("MLFLOW_TRACKING_TOKEN").ok().filter(|t| !t.is_empty()),
            run_id: String::new(),
            uri,
        };
        let experiment = std::env::var("MLFLOW_EXPERIMENT_NAME").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| "Default".into());
        if let Err(e) = client.open_run(cfg, out, resume_step, &experiment) {
            client.warn(&e);
            return Ok(MlflowRun { tx: None, worker: None });
        }
        tracing::info!(uri = %client.uri, run_id = %client.run_id, "MLflow run");
        let (tx, rx) = mpsc::channel();
        let worker = std::thread::Builder::new().name("ftx-mlflow".into()).spawn(move || client.serve(rx)).map_err(|e| format!("starting the MLflow thread: {e}"))?;
        Ok(MlflowRun { tx: Some(tx), worker: Some(worker) })
    }
}

impl Tracker for MlflowRun {
    fn log(&mut self, step: usize, values: &[(String, f64)]) {
        let Some(tx) = &self.tx else { return };
        let timestamp = now_ms();
        let metrics = values.iter().map(|(k, v)| json!({"key": k, "value": number(*v), "timestamp": timestamp, "step": step})).collect();
        if tx.send(Msg::Metrics(metrics)).is_err() {
            self.tx = None; // the worker gave up (it warned)
        }
    }

    fn finish(&mut self, status: RunStatus) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::End(status));
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for MlflowRun {
    fn drop(&mut self) {
        self.finish(RunStatus::Failed);
    }
}

/// A metric value as MLflow's JSON takes it: non-finite values as protobuf JSON spells them.
fn number(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else if v.is_nan() {
        json!("NaN")
    } else if v > 0.0 {
        json!("Infinity")
    } else {
        json!("-Infinity")
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

struct Client {
    agent: ureq::Agent,
    uri: String,
    token: Option<String>,
    run_id: String,
}

impl Client {
    fn call(&self, method: &str, api: &str, body: Option<&Value>, query: &[(&str, &str)]) -> Result<Value, CallError> {
        let mut req = self.agent.request(method, &format!("{}/api/2.0/mlflow/{api}", self.uri));
        for (k, v) in query {
            req = req.query(k, v);
        }
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => r.into_json::<Value>().map_err(|e| CallError::Other(format!("{api}: reading the answer: {e}"))),
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r.into_json().unwrap_or(Value::Null);
                let code_name = body["error_code"].as_str().unwrap_or("").to_owned();
                let message = body["message"].as_str().map_or(String::new(), |m| format!(": {m}"));
                Err(CallError::Status { code, error_code: code_name.clone(), text: format!("{api}: HTTP {code} {code_name}{message}") })
            }
            Err(e) => Err(CallError::Other(format!("{api}: {e}"))),
        }
    }

    fn post(&self, api: &str, body: &Value) -> Result<Value, String> {
        self.call("POST", api, Some(body), &[]).map_err(|e| e.to_string())
    }

    /// The experiment's id (created when missing), then the run: reopened when this is a
    /// resume of a run that has one, else created with the config as params.
    fn open_run(&mut self, cfg: &TrainConfig, out: &Path, resume_step: usize, experiment: &str) -> Result<(), String> {
        let run_file = out.join(RUN_FILE);
        if resume_step > 0 {
            if let Some(id) = std::fs::read_to_string(&run_file)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .filter(|v| v["tracking_uri"] == self.uri.as_str())
                .and_then(|v| v["run_id"].as_str().map(str::to_owned))
            {
                match self.call("POST", "runs/update", Some(&json!({"run_id": id, "status": "RUNNING"})), &[]) {
                    Ok(_) => {
                        self.run_id = id;
                        return Ok(());
                    }
                    Err(CallError::Status { code: 404, .. }) => {} // deleted on the server: a new run
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        let experiment_id = match self.call("GET", "experiments/get-by-name", None, &[("experiment_name", experiment)]) {
            Ok(v) => v["experiment"]["experiment_id"].as_str().ok_or("experiments/get-by-name: no experiment_id in the answer")?.to_owned(),
            Err(CallError::Status { error_code, .. }) if error_code == "RESOURCE_DOES_NOT_EXIST" => {
                let v = self.post("experiments/create", &json!({"name": experiment}))?;
                v["experiment_id"].as_str().ok_or("experiments/create: no experiment_id in the answer")?.to_owned()
            }
            Err(e) => return Err(e.to_string()),
        };
        let run_name = out.file_name().map_or_else(|| "ftx".to_owned(), |n| n.to_string_lossy().into_owned());
        let tags = json!([{"key": "mlflow.runName", "value": run_name}, {"key": "mlflow.source.name", "value": "ftx train"}, {"key": "ftx.output_dir", "value": out.display().to_string()}]);
        let v = self.post("runs/create", &json!({"experiment_id": experiment_id, "start_time": now_ms(), "run_name": run_name, "tags": tags}))?;
        self.run_id = v["run"]["info"]["run_id"].as_str().ok_or("runs/create: no run_id in the answer")?.to_owned();
        let record = json!({"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": self.run_id});
        crate::util::write_atomic(&run_file, record.to_string().as_bytes()).map_err(|e| format!("{}: {e}", run_file.display()))?;
        let params = params(cfg);
        for chunk in params.chunks(PARAMS_PER_BATCH) {
            self.post("runs/log-batch", &json!({"run_id": self.run_id, "params": chunk}))?;
        }
        Ok(())
    }

    /// The worker: sends metrics in batches until the run ends, then its status. The first
    /// failure warns and turns the worker into a sink.
    fn serve(self, rx: mpsc::Receiver<Msg>) {
        let mut pending: Vec<Value> = Vec::new();
        let mut last = Instant::now();
        let mut broken = false;
        let flush = |pending: &mut Vec<Value>, broken: &mut bool| {
            if !*broken && !pending.is_empty() {
                for chunk in pending.chunks(BATCH) {
                    if let Err(e) = self.post("runs/log-batch", &json!({"run_id": self.run_id, "metrics": chunk})) {
                        self.warn(&e);
                        *broken = true;
                        break;
                    }
                }
            }
            pending.clear();
        };
        let status = loop {
            match rx.recv_timeout(FLUSH_EVERY.saturating_sub(last.elapsed())) {
                Ok(Msg::Metrics(m)) => pending.extend(m),
                Ok(Msg::End(status)) => break status,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break RunStatus::Failed,
            }
            if pending.len() >= BATCH || last.elapsed() >= FLUSH_EVERY {
                flush(&mut pending, &mut broken);
                last = Instant::now();
            }
        };
        flush(&mut pending, &mut broken);
        if !broken {
            if let Err(e) = self.post("runs/update", &json!({"run_id": self.run_id, "status": status.mlflow_name(), "end_time": now_ms()})) {
                self.warn(&e);
            }
        }
    }

    fn warn(&self, e: &str) {
        eprintln!("ftx: warning: MLflow tracking at {} failed ({e}); the run goes on without MLflow (metrics.jsonl has every metric)", self.uri);
    }
}

/// The resolved config, flattened (`train.lr`, `plugins.0.path`), as MLflow params.
fn params(cfg: &TrainConfig) -> Vec<Value> {
    let table: toml::Table = cfg.to_toml().parse().expect("the resolved config parses");
    crate::train::checkpoint::flatten_toml(&table)
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                toml::Value::String(s) => s,
                v => v.to_string(),
            };
            json!({"key": k, "value": v.chars().take(PARAM_VALUE_MAX).collect::<String>()})
        })
        .collect()
}

/// A failed request: the server's answer (status and MLflow error code), or no answer.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{text}")]
    Status { code: u16, error_code: String, text: String },
    #[error("{0}")]
    Other(String),
}
