//! Hugging Face Hub ids through the CLI, against a loopback imitation of the Hub
//! (tests/fake_hub.py): models and data by id, revisions, the shared cache layout, offline
//! use, clear 404/401 errors, a cut download resumed, and `ftx push` with its model card.
//! The reference for "the same model" is always the local fixture folder the repository was
//! published from: generation by id must give the ids generation from the folder gives.

use crate::common::fixture;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const TOKEN: &str = "hf_loopback_secret";

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// The fake Hub, running for one test; killed on drop.
struct FakeHub {
    child: Child,
    root: tempfile::TempDir,
    url: String,
}

impl FakeHub {
    fn start(settings: Value) -> FakeHub {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("hub.json"), settings.to_string()).unwrap();
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fake_hub.py");
        let mut child = Command::new("python3").arg(script).arg(root.path()).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("port ").unwrap_or_else(|| panic!("fake hub said {line:?}"));
        FakeHub { child, url: format!("http://127.0.0.1:{port}"), root }
    }

    /// Publishes `files` as a new commit of `repo` (`kind` "models" or "datasets") and points
    /// each of `refs` at it; returns the commit hash.
    fn publish(&self, kind: &str, repo: &str, refs: &[&str], files: &[(String, Vec<u8>)]) -> String {
        let mut h = Sha256::new();
        h.update(repo.as_bytes());
        for (n, b) in files {
            h.update(n.as_bytes());
            h.update(b);
        }
        let commit: String = h.finalize().iter().map(|x| format!("{x:02x}")).collect::<String>()[..40].to_owned();
        let dir = self.root.path().join(kind).join(repo);
        for (name, bytes) in files {
            let p = dir.join("commits").join(&commit).join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        let refs_path = dir.join("refs.json");
        let mut all: Value = std::fs::read_to_string(&refs_path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(json!({}));
        for r in refs {
            all[*r] = json!(commit);
        }
        std::fs::write(refs_path, all.to_string()).unwrap();
        commit
    }

    /// Every request the Hub has seen.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(self.root.path().join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The downloads (GETs of a `resolve` URL, size probes left out) of files ending in `file`.
    fn downloads(&self, file: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r["method"] == "GET" && r["path"].as_str().is_some_and(|p| p.contains("/resolve/") && p.ends_with(file)))
            .filter(|r| r["range"] != "bytes=0-0")
            .collect()
    }

    /// A file of `repo` (a model repository) at its `main`.
    fn file_at_main(&self, repo: &str, file: &str) -> Vec<u8> {
        let dir = self.root.path().join("models").join(repo);
        let refs: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("refs.json")).unwrap()).unwrap();
        std::fs::read(dir.join("commits").join(refs["main"].as_str().unwrap()).join(file)).unwrap_or_else(|e| panic!("{repo}: {file}: {e}"))
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fixture checkpoint's files (not its expected/ outputs).
fn checkpoint_files(family: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fixture(&format!("models/{family}"));
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_str().unwrap().to_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

/// `ftx ARGS` in `cwd` with the Hub at `hub` and the cache in `home`; no token, proxy or
/// offline setting leaks in from the caller's environment.
fn ftx_env(hub: &str, home: &Path, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftx"));
    c.args(args).current_dir(cwd).env("HF_ENDPOINT", hub).env("HF_HOME", home);
    for k in ["HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "ftx failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn fails(o: Output) -> String {
    assert!(!o.status.success(), "ftx should have failed:\n{}", String::from_utf8_lossy(&o.stdout));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Greedy token ids of a short continuation: the same model gives the same ids.
fn gen_args(model: &str) -> Vec<String> {
    ["generate", "--model", model, "--prompt", "The capital of France", "--max-new-tokens", "6", "--ids", "--device", "cpu"]
        .map(str::to_owned)
        .to_vec()
}

fn generate(hub: &str, home: &Path, model: &str, env: &[(&str, &str)]) -> String {
    let args = gen_args(model);
    ok(ftx_env(hub, home, home, &args.iter().map(String::as_str).collect::<Vec<_>>(), env))
}

fn chat_data(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| json!({"messages": [{"role": "user", "content": format!("What is {i} plus one?")}, {"role": "assistant", "content": format!("{}", i + 1)}]}).to_string() + "\n")
        .collect::<String>()
        .into_bytes()
}

fn train_config(dir: &Path, model: &str, data: &str) -> PathBuf {
    let p = dir.join("ftx.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\npath = \"{model}\"\ndevice = \"cpu\"\n[data]\ntrain = \"{data}\"\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n\
             [train]\nlr = 1e-3\nmax_steps = 2\nbatch_size = 2\nschedule = \"constant\"\noutput_dir = \"{}\"\n",
            dir.join("run").display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn a_model_and_its_data_by_hub_id_train_and_generate_through_the_shared_cache() {
    let hub = FakeHub::start(json!({"token": TOKEN}));
    let mut files = checkpoint_files("llama3");
    // A PyTorch pickle beside the safetensors: never fetched.
    files.push(("pytorch_model.bin".into(), b"not for ftx".to_vec()));
    let commit = hub.publish("models", "org/tiny-llama", &["main"], &files);
    let data = chat_data(12);
    hub.publish("datasets", "org/chat", &["main"], &[("data/train.jsonl".into(), data.clone())]);

    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let cfg = train_config(h, "org/tiny-llama", "hf://datasets/org/chat/data/train.jsonl");
    ok(ftx_env(&hub.url, h, h, &["train", "--config", cfg.to_str().unwrap()], &[]));

    // huggingface_hub's layout: refs/main names the commit; snapshot files link into blobs/
    // named by ETag (the content's sha256 here); datasets beside models.
    let repo = h.join("hub/models--org--tiny-llama");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), commit);
    let snapshot = repo.join("snapshots").join(&commit);
    for (name, bytes) in &files {
        let p = snapshot.join(name);
        if name.ends_with(".bin") {
            assert!(!p.exists(), "{name} was fetched");
            continue;
        }
        let link = std::fs::read_link(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(link, Path::new("../../blobs").join(sha256(bytes)), "{name}");
        assert_eq!(&std::fs::read(&p).unwrap(), bytes, "{name}");
    }
    assert!(hub.downloads("pytorch_model.bin").is_empty());
    assert!(!repo.join(format!("refs/{commit}")).exists(), "no ref named by a commit (huggingface_hub writes none)");
    let data_file = h.join("hub/datasets--org--chat/snapshots").join(std::fs::read_to_string(h.join("hub/datasets--org--chat/refs/main")).unwrap()).join("data/train.jsonl");
    assert_eq!(std::fs::read(&data_file).unwrap(), data);

    // The run records the ids, and the data's hash.
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(h.join("run/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["model"], "org/tiny-llama");
    assert_eq!(manifest["inputs"][0]["path"], "hf://datasets/org/chat/data/train.jsonl");
    assert_eq!(manifest["inputs"][0]["sha256"], sha256(&data).as_str());
    let adapter: Value = serde_json::from_str(&std::fs::read_to_string(h.join("run/final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(adapter["base_model_name_or_path"], "org/tiny-llama");

    // Generation by id gives what generation from the published folder gives, and downloads
    // nothing again.
    let before = hub.downloads("").len();
    let by_id = generate(&hub.url, h, "org/tiny-llama", &[]);
    assert_eq!(hub.downloads("").len(), before, "the cache was not used");
    let local = generate(&hub.url, h, fixture("models/llama3").to_str().unwrap(), &[]);
    assert_eq!(by_id, local);
    assert!(!by_id.trim().is_empty());

    // `ftx prep` reads the same file by reference.
    std::fs::write(h.join("prep.toml"), "[prep]\ninputs = [\"hf://datasets/org/chat/data/train.jsonl\"]\nout = \"prepped\"\n").unwrap();
    ok(ftx_env(&hub.url, h, h, &["prep", "--config", "prep.toml", "--quiet"], &[]));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(h.join("prepped/report.json")).unwrap()).unwrap();
    assert_eq!(report["input_records"], 12, "{report}");

    // Served by id with the run's adapter: named after the repository.
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ftx"));
    serve.args(["serve", "--model", "org/tiny-llama", "--adapter", "tuned=run/final", "--device", "cpu", "--port", "0"]);
    serve.current_dir(h).env("HF_ENDPOINT", &hub.url).env("HF_HOME", h).env_remove("HF_TOKEN").stderr(Stdio::piped());
    let mut child = serve.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.split("listening on http://").nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_owned));
    let models = addr.as_ref().map(|a| ureq::get(&format!("http://{a}/v1/models")).call().map(|r| r.into_string().unwrap()));
    let completion = addr.as_ref().map(|a| {
        ureq::post(&format!("http://{a}/v1/completions"))
            .send_json(json!({"model": "tuned", "prompt": "The capital of France", "max_tokens": 4}))
            .map(|r| r.into_json::<Value>().unwrap())
    });
    let _ = child.kill();
    let _ = child.wait();
    let models = models.expect("ftx serve did not start").unwrap();
    assert!(models.contains("\"tiny-llama\"") && models.contains("\"tuned\""), "{models}");
    assert!(completion.unwrap().unwrap()["choices"][0]["text"].is_string());

    // The same model and data from Parquet, at a pinned dataset revision.
    let rows: Vec<String> = (0..10).map(|i| format!("Record {i} of a text corpus about rivers and hills.")).collect();
    let pq = h.join("rows.parquet");
    crate::prep::write_parquet(&pq, &rows.iter().map(String::as_str).collect::<Vec<_>>());
    let pq_commit = hub.publish("datasets", "org/corpus", &["v1"], &[("train.parquet".into(), std::fs::read(&pq).unwrap())]);
    let pq_dir = h.join("pq");
    std::fs::create_dir_all(&pq_dir).unwrap();
    let cfg = train_config(&pq_dir, "org/tiny-llama", &format!("hf://datasets/org/corpus@{pq_commit}/train.parquet"));
    ok(ftx_env(&hub.url, h, h, &["train", "--config", cfg.to_str().unwrap()], &[]));
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(pq_dir.join("run/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["records"], 10);
}

#[test]
fn revisions_pin_the_checkpoint_and_sharded_weights_come_by_their_index() {
    let hub = FakeHub::start(json!({"token": TOKEN}));
    // v1: the Qwen2 fixture (three shards and an index); main, later: the Mistral fixture.
    let v1 = hub.publish("models", "org/m", &["main", "v1"], &checkpoint_files("qwen2"));
    hub.publish("models", "org/m", &["main"], &checkpoint_files("mistral"));
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let qwen2 = generate(&hub.url, h, fixture("models/qwen2").to_str().unwrap(), &[]);
    let mistral = generate(&hub.url, h, fixture("models/mistral").to_str().unwrap(), &[]);
    assert_ne!(qwen2, mistral);
    assert_eq!(generate(&hub.url, h, "org/m@v1", &[]), qwen2);
    assert_eq!(generate(&hub.url, h, &format!("org/m@{v1}"), &[]), qwen2);
    assert_eq!(generate(&hub.url, h, "org/m", &[]), mistral);
    let snapshot = h.join("hub/models--org--m/snapshots").join(&v1);
    let index: Value = serde_json::from_str(&std::fs::read_to_string(snapshot.join("model.safetensors.index.json")).unwrap()).unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(shards.len(), 3);
    for s in shards {
        assert!(snapshot.join(s).is_file(), "{s}");
    }
    assert_eq!(std::fs::read_to_string(h.join("hub/models--org--m/refs/v1")).unwrap(), v1);

    // `ftx plan` by id fetches only config.json.
    let other = tempfile::tempdir().unwrap();
    let plan = ok(ftx_env(&hub.url, other.path(), other.path(), &["plan", "--model", "org/m@v1"], &[]));
    assert!(plan.contains("org/m@v1"), "{plan}");
    let fetched: Vec<PathBuf> = std::fs::read_dir(other.path().join("hub/models--org--m/snapshots").join(&v1)).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(fetched, vec![other.path().join("hub/models--org--m/snapshots").join(&v1).join("config.json")]);
}

/// Lays `files` out as huggingface_hub does: blobs by hash, snapshot links, a ref.
fn lay_out_cache_by_hand(hub_cache: &Path, repo_folder: &str, revision: &str, commit: &str, files: &[(String, Vec<u8>)]) {
    let repo = hub_cache.join(repo_folder);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join(revision), commit).unwrap();
    for (name, bytes) in files {
        let blob = sha256(bytes);
        std::fs::write(repo.join("blobs").join(&blob), bytes).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), repo.join("snapshots").join(commit).join(name)).unwrap();
    }
}

#[test]
fn offline_resolves_from_a_cache_laid_out_by_hand_and_says_what_is_missing() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let commit = "1234567890abcdef1234567890abcdef12345678";
    // HF_HUB_CACHE moves the cache away from HF_HOME/hub, as in huggingface_hub.
    let cache = h.join("elsewhere");
    lay_out_cache_by_hand(&cache, "models--org--hand", "main", commit, &checkpoint_files("llama3"));
    // Nothing listens on the discard port: any request would fail.
    let dead = "http://127.0.0.1:9";
    let env = [("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", cache.to_str().unwrap())];
    let local = generate(dead, h, fixture("models/llama3").to_str().unwrap(), &[]);
    assert_eq!(generate(dead, h, "org/hand", &env), local);
    assert_eq!(generate(dead, h, &format!("org/hand@{commit}"), &env), local);

    let args = gen_args("org/absent");
    let err = fails(ftx_env(dead, h, h, &args.iter().map(String::as_str).collect::<Vec<_>>(), &env));
    assert!(err.contains("org/absent: no such local file or folder, and with HF_HUB_OFFLINE set only the Hub cache is read"), "{err}");
    assert!(err.contains(cache.to_str().unwrap()), "{err}");
    // Online with the Hub unreachable: the cached revision is used, a missing one is an error
    // that names the endpoint.
    assert_eq!(generate(dead, h, "org/hand", &[("HF_HUB_CACHE", cache.to_str().unwrap())]), local);
    let err = fails(ftx_env(dead, h, h, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
    assert!(err.contains("org/absent: no such local file or folder, and the Hub at http://127.0.0.1:9 could not be reached"), "{err}");
}

#[test]
fn missing_repositories_revisions_files_and_gated_access_are_clear_errors() {
    let hub = FakeHub::start(json!({"token": TOKEN, "gated": ["org/gated"]}));
    hub.publish("models", "org/tiny", &["main"], &checkpoint_files("llama3"));
    hub.publish("models", "org/gated", &["main"], &checkpoint_files("llama3"));
    hub.publish("models", "org/pickles", &["main"], &[("config.json".into(), b"{}".to_vec()), ("pytorch_model.bin".into(), b"x".to_vec())]);
    hub.publish("datasets", "org/chat", &["main"], &[("train.jsonl".into(), chat_data(4))]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let run = |model: &str, env: &[(&str, &str)]| {
        let args = gen_args(model);
        ftx_env(&hub.url, h, h, &args.iter().map(String::as_str).collect::<Vec<_>>(), env)
    };
    let err = fails(run("org/nope", &[]));
    assert!(err.contains("org/nope: no such local file or folder, and the Hub at"), "{err}");
    assert!(err.contains("has no model repository 'org/nope' at revision 'main'"), "{err}");
    let err = fails(run("org/tiny@nobranch", &[]));
    assert!(err.contains("has no model repository 'org/tiny' at revision 'nobranch'"), "{err}");
    let err = fails(run("org/pickles", &[]));
    assert!(err.contains("has only pytorch_model.bin"), "{err}");
    assert!(err.contains("ftx reads safetensors weights"), "{err}");

    let err = fails(run("org/gated", &[]));
    assert!(err.contains("refused access (HTTP 401)"), "{err}");
    assert!(err.contains("set HF_TOKEN"), "{err}");
    assert!(hub.requests().iter().any(|r| r["path"].as_str().unwrap().contains("/org/gated/resolve/") && r["auth"] == false));
    let wrong = fails(run("org/gated", &[("HF_TOKEN", "hf_wrong")]));
    assert!(wrong.contains("refused access"), "{wrong}");
    assert_eq!(run("org/tiny", &[]).status.code(), Some(0));
    // The token from HF_TOKEN, or from the file `huggingface-cli login` writes.
    let with_env = ok(run("org/gated", &[("HF_TOKEN", TOKEN)]));
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("token"), format!("{TOKEN}\n")).unwrap();
    let args = gen_args("org/gated");
    let with_file = ok(ftx_env(&hub.url, other.path(), other.path(), &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
    assert_eq!(with_env, with_file);

    let cfg = train_config(h, "org/tiny", "hf://datasets/org/chat/missing.jsonl");
    let err = fails(ftx_env(&hub.url, h, h, &["train", "--config", cfg.to_str().unwrap()], &[]));
    assert!(err.contains("the repository has no missing.jsonl at revision main; its data files include train.jsonl"), "{err}");
}

#[test]
fn a_cut_download_resumes_where_it_stopped() {
    let hub = FakeHub::start(json!({"token": TOKEN, "cut_once": ["model.safetensors"]}));
    let files = checkpoint_files("llama3");
    hub.publish("models", "org/cut", &["main"], &files);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // A partial tokenizer.json left by an earlier run, as hf-hub leaves it.
    let tok = &files.iter().find(|(n, _)| n == "tokenizer.json").unwrap().1;
    let blobs = h.join("hub/models--org--cut/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{}.part", sha256(tok))), &tok[..1000]).unwrap();

    let by_id = generate(&hub.url, h, "org/cut", &[]);
    assert_eq!(by_id, generate(&hub.url, h, fixture("models/llama3").to_str().unwrap(), &[]));
    let weights = &files.iter().find(|(n, _)| n == "model.safetensors").unwrap().1;
    let gets: Vec<Option<String>> = hub.downloads("model.safetensors").iter().map(|r| r["range"].as_str().map(str::to_owned)).collect();
    let half = weights.len() / 2;
    assert_eq!(gets, vec![Some("bytes=0-".to_owned()), Some(format!("bytes={half}-"))], "cut at {half} of {}", weights.len());
    let tok_gets: Vec<Value> = hub.downloads("tokenizer.json").iter().map(|r| r["range"].clone()).collect();
    assert_eq!(tok_gets, vec![json!("bytes=1000-")]);
    assert_eq!(std::fs::read(blobs.join(sha256(weights))).unwrap(), *weights);
    assert_eq!(std::fs::read(blobs.join(sha256(tok))).unwrap(), *tok);
    let leftovers: Vec<String> = std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| n.ends_with(".part")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Splits a model card into its YAML front-matter and body.
fn card(readme: &[u8]) -> (String, String) {
    let text = String::from_utf8(readme.to_vec()).unwrap();
    let rest = text.strip_prefix("---\n").expect("front-matter first");
    let (front, body) = rest.split_once("---\n").unwrap();
    (front.to_owned(), body.to_owned())
}

#[test]
fn push_uploads_adapter_and_gguf_with_a_model_card_from_the_run() {
    // Tiny thresholds so the adapter goes through LFS, in parts.
    let hub = FakeHub::start(json!({"token": TOKEN, "lfs_threshold": 4096, "chunk_size": 16384}));
    hub.publish("models", "org/tiny-llama", &["main"], &checkpoint_files("llama3"));
    let data = chat_data(12);
    hub.publish("datasets", "org/chat", &["main"], &[("train.jsonl".into(), data.clone())]);
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let cfg = train_config(h, "org/tiny-llama", "hf://datasets/org/chat/train.jsonl");
    ok(ftx_env(&hub.url, h, h, &["train", "--config", cfg.to_str().unwrap()], &[]));
    ok(ftx_env(
        &hub.url,
        h,
        h,
        &["eval", "--model", "org/tiny-llama", "--adapter", "run/final", "--perplexity", "hf://datasets/org/chat/train.jsonl", "--out", "run/eval", "--device", "cpu"],
        &[],
    ));
    let token = [("HF_TOKEN", TOKEN)];

    let err = fails(ftx_env(&hub.url, h, h, &["push", "me/tuned", "--path", "run"], &[]));
    assert!(err.contains("pushing needs a Hub token with write access: set HF_TOKEN"), "{err}");
    let out = ok(ftx_env(&hub.url, h, h, &["push", "me/tuned", "--path", "run", "--private"], &token));
    assert!(out.contains("pushed 3 files to me/tuned"), "{out}");

    let adapter = std::fs::read(h.join("run/final/adapter_model.safetensors")).unwrap();
    assert!(adapter.len() > 16384, "the adapter is uploaded in parts");
    assert_eq!(hub.file_at_main("me/tuned", "adapter_model.safetensors"), adapter);
    assert_eq!(hub.file_at_main("me/tuned", "adapter_config.json"), std::fs::read(h.join("run/final/adapter_config.json")).unwrap());
    let commits: Vec<Value> = std::fs::read_to_string(hub.root.path().join("models/me/tuned/commits.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(commits[0]["files"], json!({"adapter_config.json": "regular", "adapter_model.safetensors": "lfs", "README.md": "regular"}));
    assert!(hub.requests().iter().any(|r| r["path"].as_str().unwrap().starts_with("/lfs-part/")));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(hub.root.path().join("models/me/tuned/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["private"], true);

    let readme = hub.file_at_main("me/tuned", "README.md");
    // huggingface_hub reads the front-matter as the Hub would.
    std::fs::write(h.join("card.md"), &readme).unwrap();
    let meta: Value = serde_json::from_str(&huggingface_hub(&hub, h, &["card", "-", h.join("card.md").to_str().unwrap()])).unwrap();
    assert_eq!(meta["base_model"], "org/tiny-llama");
    assert_eq!(meta["library_name"], "peft");
    assert_eq!(meta["tags"], json!(["ftx", "lora", "base_model:org/tiny-llama"]));
    assert_eq!(meta["datasets"], json!(["org/chat"]));
    assert_eq!(meta["ftx_training_data"], json!([{"path": "hf://datasets/org/chat/train.jsonl", "sha256": sha256(&data)}]));
    let (front, body) = card(&readme);
    assert!(front.starts_with("base_model: \"org/tiny-llama\"\nlibrary_name: peft\ntags:\n- \"ftx\"\n- \"lora\"\n"), "{front}");
    assert!(front.contains("datasets:\n- \"org/chat\"\n"), "{front}");
    assert!(front.contains(&format!("- path: \"hf://datasets/org/chat/train.jsonl\"\n  sha256: \"{}\"\n", sha256(&data))), "{front}");
    assert!(body.contains(&format!("| `hf://datasets/org/chat/train.jsonl` | `{}` |", sha256(&data))), "{body}");
    let config = std::fs::read_to_string(h.join("run/config.toml")).unwrap();
    assert!(body.contains(&format!("```toml\n{}\n```", config.trim_end())), "{body}");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(h.join("run/manifest.json")).unwrap()).unwrap();
    assert!(body.contains(&format!("2 steps on {} tokens", manifest["report"]["tokens"])), "{body}");
    // The eval table: one row a model, perplexity as report.json has it.
    let eval: Value = serde_json::from_str(&std::fs::read_to_string(h.join("run/eval/report.json")).unwrap()).unwrap();
    let models = eval["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for m in models {
        let row = format!("| {} | {:.4} |", m["name"].as_str().unwrap(), m["perplexity"]["perplexity"].as_f64().unwrap());
        assert!(body.contains(&row), "{row} not in\n{body}");
    }

    // Pushing again: the repository and the LFS object exist, a new commit is made.
    let again = hub.requests().len();
    ok(ftx_env(&hub.url, h, h, &["push", "me/tuned", "--path", "run/final", "--message", "again"], &token));
    let new: Vec<Value> = hub.requests()[again..].to_vec();
    assert!(!new.iter().any(|r| r["path"].as_str().unwrap().starts_with("/lfs-")), "the LFS object was uploaded twice");

    // A merged export, pushed, comes back by id as the same model.
    ok(ftx_env(&hub.url, h, h, &["export", "--model", "org/tiny-llama", "--adapter", "run/final", "--format", "merged", "--dtype", "fp32", "--out", "merged"], &[]));
    ok(ftx_env(&hub.url, h, h, &["push", "me/merged", "--path", "merged"], &token));
    let (front, _) = card(&hub.file_at_main("me/merged", "README.md"));
    assert!(front.starts_with("base_model: \"org/tiny-llama\"\nlibrary_name: transformers\n"), "{front}");
    assert!(front.contains(&sha256(&data)), "{front}");
    let pushed: Vec<String> = std::fs::read_dir(hub.root.path().join("models/me/merged/commits")).unwrap()
        .flat_map(|c| std::fs::read_dir(c.unwrap().path()).unwrap().map(|f| f.unwrap().file_name().into_string().unwrap()))
        .collect();
    assert!(pushed.contains(&"model.safetensors".to_owned()) && pushed.contains(&"tokenizer.json".to_owned()), "{pushed:?}");
    assert!(!pushed.contains(&"ftx-manifest.json".to_owned()), "the export manifest holds local paths");
    let fresh = tempfile::tempdir().unwrap();
    assert_eq!(generate(&hub.url, fresh.path(), "me/merged", &[]), generate(&hub.url, h, h.join("merged").to_str().unwrap(), &[]));

    // A GGUF export of the adapter on the Hub base: the card finds the run through the
    // export's manifest.
    ok(ftx_env(&hub.url, h, h, &["export", "--model", "org/tiny-llama", "--adapter", "run/final", "--format", "gguf", "--out", "gguf"], &[]));
    let gguf = std::fs::read_dir(h.join("gguf")).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "gguf")).unwrap();
    let name = gguf.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(name.starts_with("tiny-llama"), "{name}");
    let err = fails(ftx_env(&hub.url, h, h, &["push", "me/tuned-gguf", "--path", gguf.to_str().unwrap(), "--kind", "adapter"], &token));
    assert!(err.contains("--kind adapter, but"), "{err}");
    ok(ftx_env(&hub.url, h, h, &["push", "me/tuned-gguf", "--path", gguf.to_str().unwrap(), "--revision", "q"], &token));
    let dir = hub.root.path().join("models/me/tuned-gguf");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("refs.json")).unwrap()).unwrap();
    let at_q = dir.join("commits").join(refs["q"].as_str().unwrap());
    assert_eq!(std::fs::read(at_q.join(&name)).unwrap(), std::fs::read(&gguf).unwrap());
    assert!(at_q.join("Modelfile").is_file());
    let (front, body) = card(&std::fs::read(at_q.join("README.md")).unwrap());
    assert!(front.starts_with("base_model: \"org/tiny-llama\"\ntags:\n- \"ftx\"\n- \"lora\"\n- \"gguf\"\n"), "{front}");
    assert!(body.contains(&sha256(&data)), "{body}");
}

/// huggingface_hub, the Python client (tests/env.sh installs it), run with the loopback Hub.
fn huggingface_hub(hub: &FakeHub, home: &Path, args: &[&str]) -> String {
    const SCRIPT: &str = r#"
import json, os, sys
from huggingface_hub import HfApi, hf_hub_download, scan_cache_dir, try_to_load_from_cache
mode, repo, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "download":
    for f in rest:
        hf_hub_download(repo, f)
elif mode == "read":
    out = {f: try_to_load_from_cache(repo, f) for f in rest}
    scan = scan_cache_dir()
    out["_repos"] = [{"id": r.repo_id, "refs": sorted(ref for rev in r.revisions for ref in rev.refs),
                      "files": sum(len(rev.files) for rev in r.revisions)} for r in scan.repos]
    out["_warnings"] = [str(w) for w in scan.warnings]
    print(json.dumps(out))
elif mode == "card":
    from huggingface_hub import ModelCard
    print(json.dumps(ModelCard.load(rest[0]).data.to_dict()))
elif mode == "upload":
    api = HfApi(token=os.environ["HF_TOKEN"])
    api.create_repo(repo, exist_ok=True)
    print(api.upload_folder(repo_id=repo, folder_path=rest[0]))
"#;
    let python = crate::gguf::python();
    let mut c = Command::new(&python);
    c.arg("-c").arg(SCRIPT).args(args).env("HF_ENDPOINT", &hub.url).env("HF_HOME", home).env("HF_TOKEN", TOKEN);
    // The LFS protocol ftx speaks, not Xet storage; no telemetry.
    c.env("HF_HUB_DISABLE_XET", "1").env("HF_HUB_DISABLE_TELEMETRY", "1");
    for k in ["HF_HUB_OFFLINE", "HF_HUB_CACHE", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        c.env_remove(k);
    }
    let o = c.output().unwrap_or_else(|e| panic!("{}: {e} (run tests/env.sh, which installs huggingface_hub)", python.display()));
    assert!(o.status.success(), "huggingface_hub {args:?}:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn huggingface_hub_and_ftx_share_one_cache_and_the_loopback_hub_takes_its_uploads() {
    let hub = FakeHub::start(json!({"token": TOKEN, "lfs_threshold": 4096, "chunk_size": 16384}));
    let files = checkpoint_files("llama3");
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    let a = tempfile::tempdir().unwrap();
    let local = generate(&hub.url, a.path(), fixture("models/llama3").to_str().unwrap(), &[]);

    // Python downloads, ftx reads offline.
    hub.publish("models", "org/by-python", &["main"], &files);
    huggingface_hub(&hub, a.path(), &[&["download", "org/by-python"][..], &names].concat());
    assert_eq!(generate("http://127.0.0.1:9", a.path(), "org/by-python", &[("HF_HUB_OFFLINE", "1")]), local);

    // ftx downloads, Python finds every file and sees a clean cache.
    hub.publish("models", "org/by-ftx", &["main"], &files);
    let b = tempfile::tempdir().unwrap();
    assert_eq!(generate(&hub.url, b.path(), "org/by-ftx", &[]), local);
    let seen: Value = serde_json::from_str(&huggingface_hub(&hub, b.path(), &[&["read", "org/by-ftx"][..], &names].concat())).unwrap();
    for (name, bytes) in &files {
        let p = seen[name.as_str()].as_str().unwrap_or_else(|| panic!("huggingface_hub does not find {name}: {seen}"));
        assert_eq!(&std::fs::read(p).unwrap(), bytes, "{name}");
    }
    assert_eq!(seen["_repos"], json!([{"id": "org/by-ftx", "refs": ["main"], "files": files.len()}]));
    assert_eq!(seen["_warnings"], json!([]));

    // The loopback Hub's upload side takes huggingface_hub's own uploads (inline, LFS in parts),
    // so what ftx push is tested against is what the Python client speaks.
    let up = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..40_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(up.path().join("small.txt"), "hello").unwrap();
    std::fs::write(up.path().join("big.bin"), &big).unwrap();
    huggingface_hub(&hub, a.path(), &["upload", "me/py", up.path().to_str().unwrap()]);
    let commits = std::fs::read_to_string(hub.root.path().join("models/me/py/commits.jsonl")).unwrap();
    let last: Value = serde_json::from_str(commits.lines().last().unwrap()).unwrap();
    assert_eq!(last["files"], json!({"big.bin": "lfs", "small.txt": "regular"}));
    assert_eq!(hub.file_at_main("me/py", "big.bin"), big);
    assert!(hub.requests().iter().any(|r| r["path"].as_str().unwrap().starts_with("/lfs-part/")));
}

#[test]
fn an_adapter_by_hub_id_generates_what_its_local_folder_generates() {
    let hub = FakeHub::start(json!({"token": TOKEN}));
    hub.publish("models", "org/tiny-llama", &["main"], &checkpoint_files("llama3"));
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    std::fs::write(h.join("train.jsonl"), chat_data(8)).unwrap();
    let cfg = train_config(h, "org/tiny-llama", "train.jsonl");
    ok(ftx_env(&hub.url, h, h, &["train", "--config", cfg.to_str().unwrap()], &[]));
    // The run's final/ folder, published as an adapter repository (no config.json, no weights
    // of a whole model).
    let final_dir = h.join("run/final");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&final_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_str().unwrap().to_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    assert!(files.iter().any(|(n, _)| n == "adapter_model.safetensors"), "{:?}", files.iter().map(|f| &f.0).collect::<Vec<_>>());
    hub.publish("models", "org/adapter", &["main", "v1"], &files);

    let with = |adapter: &str| {
        let mut args = gen_args("org/tiny-llama");
        args.extend(["--adapter".to_owned(), adapter.to_owned()]);
        ok(ftx_env(&hub.url, h, h, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]))
    };
    let local = with(final_dir.to_str().unwrap());
    assert!(!local.trim().is_empty());
    assert_eq!(with("org/adapter"), local);
    assert_eq!(with("org/adapter@v1"), local);
    let snapshot = h.join("hub/models--org--adapter/snapshots");
    assert!(snapshot.read_dir().unwrap().next().is_some(), "the adapter is in the shared cache");
    // Offline, from the cache alone.
    let mut args = gen_args("org/tiny-llama");
    args.extend(["--adapter".to_owned(), "org/adapter".to_owned()]);
    let offline = ok(ftx_env(&hub.url, h, h, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[("HF_HUB_OFFLINE", "1")]));
    assert_eq!(offline, local);
    // A missing adapter repository says so.
    let mut args = gen_args("org/tiny-llama");
    args.extend(["--adapter".to_owned(), "org/no-such-adapter".to_owned()]);
    let err = fails(ftx_env(&hub.url, h, h, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]));
    assert!(err.contains("org/no-such-adapter"), "{err}");
}
