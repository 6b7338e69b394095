//! Ctrl-C and resume through the CLI: SIGINT finishes the step, writes a checkpoint, prints the
//! command that resumes and exits 130; that command continues onto the uninterrupted run's
//! losses and weights; a second SIGINT stops at once; a resume under another config names the
//! keys that differ; a finished run says it is finished. No test times anything: each waits
//! for what the run writes (FTX_STEP_DELAY_MS only slows the steps so a signal lands mid-run).

use crate::common::{fixture, max_diff, metric_series, torch_rng_lock};
use ftx::recipes::train;
use ftx::train::TrainConfig;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

pub const FTX: &str = env!("CARGO_BIN_EXE_ftx");

/// A tiny LoRA run on the llama3 fixture with `n` chat records, into `dir/out`; `extra` are
/// `--set` overrides separated by spaces.
pub fn tiny_config(dir: &Path, n: usize, extra: &str) -> TrainConfig {
    let cities = ["Paris", "Berlin", "Rome", "Oslo", "Lima", "Cairo", "Tokyo"];
    let lines: String = (0..n)
        .map(|i| {
            let c = cities[(i * 5 + i / 2) % cities.len()];
            let rec = serde_json::json!({"messages": [
                {"role": "user", "content": format!("Weather in {c}{}?", " now".repeat(i % 3))},
                {"role": "assistant", "content": format!("{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"{c}\"}}}}")},
            ]});
            rec.to_string() + "\n"
        })
        .collect();
    let data = dir.join("train.jsonl");
    std::fs::write(&data, lines).unwrap();
    let text = format!(
        "[model]\npath = \"{}\"\ndevice = \"cpu\"\n[data]\ntrain = \"{}\"\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n\
         [train]\nlr = 1e-3\nbatch_size = 2\nschedule = \"constant\"\noutput_dir = \"{}\"\n",
        fixture("models/llama3").display(),
        data.display(),
        dir.join("out").display()
    );
    let overrides: Vec<String> = extra.split_whitespace().map(str::to_owned).collect();
    TrainConfig::parse(&text, &overrides).unwrap()
}

/// Writes `cfg` as `dir/ftx.toml`.
pub fn write_config(dir: &Path, cfg: &TrainConfig) -> PathBuf {
    let p = dir.join("ftx.toml");
    std::fs::write(&p, cfg.to_toml()).unwrap();
    p
}

fn adapter(dir: &Path) -> Vec<(String, tch::Tensor)> {
    let mut v = tch::Tensor::read_safetensors(dir.join("out/final/adapter_model.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A running `ftx train` whose stderr is collected as it comes.
pub struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Running {
    pub fn start(mut cmd: Command) -> Running {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running { child, stderr, reader }
    }

    /// Waits until `done` holds (the run's own progress is the clock; a generous cap only
    /// keeps a broken run from hanging the suite).
    pub fn wait_for(&mut self, what: &str, mut done: impl FnMut(&str) -> bool) {
        for _ in 0..60_000 {
            if done(&self.stderr.lock().unwrap()) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the run ended ({status}) before {what}: {}", self.stderr.lock().unwrap());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("never saw {what}");
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().unwrap();
        self.reader.join().unwrap();
        let err = self.stderr.lock().unwrap().clone();
        (status, err)
    }
}

pub fn train_command(dir: &Path, config: &Path, delay_ms: u64) -> Command {
    let mut c = Command::new(FTX);
    c.current_dir(dir).args(["train", "--config"]).arg(config).env("FTX_STEP_DELAY_MS", delay_ms.to_string());
    c
}

/// The command printed after "to resume, run (in DIR):", and DIR.
fn printed_resume_command(stderr: &str) -> (String, PathBuf) {
    let (_, tail) = stderr.split_once("to resume, run (in ").unwrap_or_else(|| panic!("no resume command in: {stderr}"));
    let (dir, rest) = tail.split_once("):\n").unwrap();
    (rest.lines().next().unwrap().trim().to_owned(), PathBuf::from(dir))
}

#[test]
fn ctrl_c_checkpoints_the_step_and_the_printed_command_resumes_onto_the_uninterrupted_run() {
    let settings = "train.max_steps=10 method.dropout=0.1 train.schedule=cosine train.warmup_steps=2";
    let whole = tempfile::tempdir().unwrap();
    {
        let _rng = torch_rng_lock();
        train(&tiny_config(whole.path(), 32, settings)).unwrap();
    }
    let reference = metric_series(&whole.path().join("out"), "loss");
    assert_eq!(reference.len(), 10);

    let cut = tempfile::tempdir().unwrap();
    let cfg = write_config(cut.path(), &tiny_config(cut.path(), 32, settings));
    let mut run = Running::start(train_command(cut.path(), &cfg, 300));
    let dir = cut.path().to_path_buf();
    run.wait_for("a logged step", |_| !metric_series(&dir.join("out"), "loss").is_empty());
    run.signal(libc::SIGINT);
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(130), "Ctrl-C exits with 130: {stderr}");
    let logged = metric_series(&cut.path().join("out"), "loss");
    let stopped_at = logged.last().unwrap().0 as usize;
    assert!(stopped_at < 10, "the run stopped early: {logged:?}");
    assert!(stderr.contains(&format!("after step {stopped_at} of 10")), "{stderr}");
    // The checkpoint of the step it stopped after, named in the message, is whole.
    let ckpt = cut.path().join(format!("out/checkpoints/step-{stopped_at:07}"));
    assert!(stderr.contains(&ckpt.display().to_string()), "{stderr}");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], stopped_at);
    assert!(!cut.path().join("out/final").exists(), "no final weights for a stopped run");

    // The printed command, run where it says, finishes the run on the uninterrupted trajectory.
    let (command, cwd) = printed_resume_command(&stderr);
    assert_eq!(cwd, cut.path().canonicalize().unwrap());
    let o = Command::new("sh").arg("-c").arg(&command).current_dir(&cwd).output().unwrap();
    let resumed_err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{command}: {resumed_err}");
    assert!(resumed_err.contains(&format!("resuming from the checkpoint at step {stopped_at}")), "{resumed_err}");
    assert_eq!(metric_series(&cut.path().join("out"), "loss"), reference, "the resumed run's losses are the uninterrupted run's");
    for ((n, a), (_, b)) in adapter(whole.path()).iter().zip(&adapter(cut.path())) {
        assert_eq!(max_diff(a, b), 0.0, "{n}");
    }
}

#[test]
fn a_second_ctrl_c_stops_at_once() {
    let d = tempfile::tempdir().unwrap();
    // Checkpoints every 20 steps: none is due when the signals come.
    let cfg = write_config(d.path(), &tiny_config(d.path(), 16, "train.max_steps=40 train.save_every=20"));
    let mut run = Running::start(train_command(d.path(), &cfg, 2000));
    let dir = d.path().to_path_buf();
    run.wait_for("a logged step", |_| !metric_series(&dir.join("out"), "loss").is_empty());
    run.signal(libc::SIGINT);
    run.wait_for("the first signal's notice", |e| e.contains("stopping after this step"));
    run.signal(libc::SIGINT);
    let (status, stderr) = run.finish();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopped at once"), "{stderr}");
    assert!(!stderr.contains("to resume, run"), "the second signal does not wait for the step: {stderr}");
    assert!(ftx::train::checkpoint::list(&d.path().join("out")).is_empty(), "no checkpoint was written: {stderr}");
}

#[test]
fn a_resume_under_another_config_names_the_keys_that_differ() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_config(d.path(), 8, "train.max_steps=3");
    {
        let _rng = torch_rng_lock();
        train(&cfg).unwrap();
    }
    let path = write_config(d.path(), &cfg);
    let before = std::fs::read_to_string(d.path().join("out/config.toml")).unwrap();
    let o = Command::new(FTX).args(["train", "--config"]).arg(&path).args(["--set", "train.lr=0.005", "--set", "method.rank=8"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("another configuration"), "{err}");
    assert!(err.contains("method.rank: 4 → 8") && err.contains("train.lr: 0.001 → 0.005"), "{err}");
    assert!(!err.contains("train.max_steps") && !err.contains("model.path"), "only the keys that differ: {err}");
    assert!(err.contains("--out DIR"), "{err}");
    assert_eq!(std::fs::read_to_string(d.path().join("out/config.toml")).unwrap(), before, "a refused resume leaves the run as it was");
    // Checkpoints of an older ftx hold no config: the run's config.toml stands in for it.
    for (_, ckpt) in ftx::train::checkpoint::list(&d.path().join("out")) {
        std::fs::remove_file(ckpt.join("config.toml")).unwrap();
    }
    let o = Command::new(FTX).args(["train", "--config"]).arg(&path).args(["--set", "train.lr=0.005"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("train.lr: 0.001 → 0.005"), "{err}");
    // Keys that only decide when to save or report do not block a resume.
    let o = Command::new(FTX).args(["train", "--config"]).arg(&path).args(["--set", "train.keep_last=5", "--set", "train.max_steps=4"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("train.max_steps changed since the checkpoint at step 3 (3 → 4)") && err.contains("resuming from the checkpoint at step 3"), "{err}");
    assert_eq!(metric_series(&d.path().join("out"), "loss").len(), 4);
}

#[test]
fn running_a_finished_run_again_says_it_is_finished_and_how_to_train_more() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_config(d.path(), 8, "train.max_steps=3");
    {
        let _rng = torch_rng_lock();
        train(&cfg).unwrap();
    }
    let path = write_config(d.path(), &cfg);
    let metrics_before = std::fs::read_to_string(d.path().join("out/metrics.jsonl")).unwrap();
    let o = Command::new(FTX).args(["train", "--config"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("holds a finished run: all 3 steps are done"), "{err}");
    assert!(err.contains("--set train.max_steps=6") && err.contains("--out DIR"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).is_empty(), "no training report: nothing was trained");
    assert_eq!(std::fs::read_to_string(d.path().join("out/metrics.jsonl")).unwrap(), metrics_before, "nothing was run again");
    // `--out` starts a new run beside it.
    let o = Command::new(FTX).args(["train", "--config"]).arg(&path).arg("--out").arg(d.path().join("second")).args(["--set", "train.max_steps=1"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.path().join("second/final/adapter_model.safetensors").exists());
}

#[test]
fn checkpoints_are_on_by_default_about_ten_a_run_and_the_newest_k_are_kept() {
    let _rng = torch_rng_lock();
    let steps = |keep: usize| {
        let d = tempfile::tempdir().unwrap();
        train(&tiny_config(d.path(), 8, &format!("train.max_steps=25 train.keep_last={keep}"))).unwrap();
        ftx::train::checkpoint::list(&d.path().join("out")).into_iter().map(|(s, _)| s).collect::<Vec<usize>>()
    };
    // Every ⌈25 / 10⌉ = 3 steps, and the final step.
    assert_eq!(steps(20), vec![3, 6, 9, 12, 15, 18, 21, 24, 25]);
    assert_eq!(steps(2), vec![24, 25]);
}
