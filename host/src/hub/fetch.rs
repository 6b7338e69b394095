//! Resolution of Hub ids into the cache: the repository's revision through the Hub's file API
//! (`/api/{models,datasets}/{repo}/revision/{rev}`), then each file ftx needs through
//! `/{repo}/resolve/{commit}/{file}`.
//!
//! Downloads go through HF's own `hf-hub` crate (blocking, on ureq 2 like the rest of ftx): it
//! writes the standard cache layout (blobs named by ETag, relative snapshot links, refs),
//! sends the token, and resumes an interrupted transfer with an HTTP Range request from the
//! partial `blobs/<etag>.part` file — in-process (a few retries) and on the next run. (Python's
//! huggingface_hub names its partial files `.incomplete`: finished files are shared between
//! the two, half-finished ones are not.) What hf-hub leaves to its caller is done here: the
//! revision → commit lookup with errors that say what to do, choosing the files
//! (safetensors only, shards by their index), `HF_HUB_OFFLINE`, and the ref names
//! huggingface_hub writes.

use super::cache::{self, cached_snapshot};
use super::{HubEnv, HubError, HubRef, RepoKind};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Files of a checkpoint folder that ftx reads besides the weights. Tokenizer and chat
/// template files, and the two files of a PEFT adapter repository.
const CHECKPOINT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "adapter_config.json",
    "adapter_model.safetensors",
];

/// Resolutions done by this process, so the several readers of one checkpoint (config,
/// weights, tokenizer) ask the Hub once.
static RESOLVED: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

fn memo(key: String, resolve: impl FnOnce() -> Result<PathBuf, HubError>) -> Result<PathBuf, HubError> {
    if let Some(p) = RESOLVED.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).get(&key) {
        return Ok(p.clone());
    }
    let p = resolve()?;
    RESOLVED.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).insert(key, p.clone());
    Ok(p)
}

/// What the three resolvers share: `None` when `path` exists locally or `parse` finds no Hub
/// reference in it (the caller then uses `path` as it is, and its own "missing" error names
/// it); else the reference fetched by `fetch`, once per process (`what` keys the memo).
fn resolve_hub(
    path: &Path,
    what: &str,
    parse: impl FnOnce(&str) -> Option<HubRef>,
    fetch: fn(&HubEnv, &HubRef) -> Result<PathBuf, HubError>,
) -> Result<Option<PathBuf>, HubError> {
    if path.exists() {
        return Ok(None);
    }
    let Some(r) = path.to_str().and_then(parse) else { return Ok(None) };
    let env = HubEnv::from_env();
    memo(format!("{what} {} {}", env.endpoint, r.display()), || fetch(&env, &r)).map(Some)
}

/// The local folder of the checkpoint `path` names: `path` itself when it exists (or is not
/// shaped like a Hub id, so the caller's own "missing" error names it), else the snapshot of
/// `org/name[@revision]` in the Hub cache, downloaded first unless `HF_HUB_OFFLINE` is set.
pub fn resolve_model(path: &Path) -> Result<PathBuf, HubError> {
    Ok(resolve_hub(path, "checkpoint", HubRef::parse_model, fetch_checkpoint)?.unwrap_or_else(|| path.to_owned()))
}

/// One file of the checkpoint `path` names (`ftx plan` needs only `config.json`): `None` when
/// `path` is not a Hub id (it exists locally, or is not shaped like one).
pub fn resolve_model_file(path: &Path, file: &str) -> Result<Option<PathBuf>, HubError> {
    let parse = |s: &str| HubRef::parse_model(s).map(|r| HubRef { file: Some(file.to_owned()), ..r });
    resolve_hub(path, "file", parse, fetch_file)
}

/// The local path of the data file `path` names: `path` itself when it exists or is not a
/// `hf://` reference, else the file in the Hub cache (downloaded unless `HF_HUB_OFFLINE`).
pub fn resolve_data_file(path: &Path) -> Result<PathBuf, HubError> {
    Ok(resolve_hub(path, "file", HubRef::parse_file, fetch_file)?.unwrap_or_else(|| path.to_owned()))
}

/// A repository at a commit, as the Hub's revision API describes it.
struct RepoInfo {
    commit: String,
    files: BTreeSet<String>,
}

/// Why a request failed, from ureq's error.
enum Failure {
    /// The Hub answered with an error status; `code` is its `X-Error-Code` header.
    Status { status: u16, code: Option<String>, url: String, body: String },
    /// No answer (connection refused, DNS, TLS, a cut transfer after the retries).
    Transport(String),
    Io(std::io::Error),
    Other(String),
}

fn from_ureq(e: ureq::Error) -> Failure {
    match e {
        ureq::Error::Status(status, resp) => {
            let code = resp.header("x-error-code").map(str::to_owned);
            let url = resp.get_url().to_owned();
            let body: String = resp.into_string().unwrap_or_default().chars().take(300).collect();
            Failure::Status { status, code, url, body }
        }
        ureq::Error::Transport(t) => Failure::Transport(t.to_string()),
    }
}

fn from_api(e: ApiError) -> Failure {
    match e {
        ApiError::RequestError(e) => from_ureq(*e),
        ApiError::TooManyRetries(inner) => match from_api(*inner) {
            Failure::Transport(t) => Failure::Transport(format!("{t} (after retries; run again to resume the download)")),
            f => f,
        },
        ApiError::IoError(e) => Failure::Io(e),
        e => Failure::Other(e.to_string()),
    }
}

struct Client<'a> {
    env: &'a HubEnv,
    /// hf-hub's downloader.
    api: Api,
    /// For the revision API, which hf-hub's `info()` reaches only by branch name through its
    /// own private client.
    agent: ureq::Agent,
}

impl<'a> Client<'a> {
    fn new(env: &'a HubEnv) -> Result<Client<'a>, HubError> {
        let api = ApiBuilder::from_cache(hf_hub::Cache::new(env.cache.clone()))
            .with_endpoint(env.endpoint.clone())
            .with_token(env.token.clone())
            .with_progress(false)
            // A transfer cut mid-way is resumed from where it stopped, twice, before giving up.
            .with_retries(2)
            .with_user_agent("ftx", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| HubError::Http { id: env.endpoint.clone(), message: e.to_string() })?;
        let agent = ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .timeout_connect(std::time::Duration::from_secs(30))
            .timeout_read(std::time::Duration::from_secs(120))
            .user_agent(concat!("ftx/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client { env, api, agent })
    }

    /// The error a failed request about `r` (and `file`, for a download) becomes.
    fn error(&self, r: &HubRef, file: Option<&str>, f: Failure) -> HubError {
        let id = r.display();
        match f {
            Failure::Status { status, code, url, body } => {
                let code = code.as_deref().unwrap_or("");
                if code == "GatedRepo" || status == 403 || (status == 401 && code != "RepoNotFound") {
                    return HubError::Unauthorized {
                        id,
                        endpoint: self.env.endpoint.clone(),
                        status,
                        token_file: self.env.token_file.display().to_string(),
                    };
                }
                match (status, code, file) {
                    (404 | 401, "EntryNotFound", Some(f)) | (404, "", Some(f)) => HubError::MissingFile {
                        id,
                        file: f.to_owned(),
                        revision: r.revision.clone(),
                        hint: String::new(),
                    },
                    (404 | 401, _, _) => HubError::NotFound {
                        id,
                        endpoint: self.env.endpoint.clone(),
                        kind: r.kind.singular(),
                        repo: r.repo.clone(),
                        revision: r.revision.clone(),
                    },
                    _ => HubError::Http { id, message: format!("HTTP {status} from {url}: {}", body.trim()) },
                }
            }
            // Before the first answer the id may as well be a mistyped local path: say both.
            Failure::Transport(t) if file.is_none() => HubError::Http {
                id,
                message: format!(
                    "no such local file or folder, and the Hub at {} could not be reached ({t}); check the path, \
                     the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache only",
                    self.env.endpoint
                ),
            },
            Failure::Transport(t) => HubError::Http {
                id,
                message: format!("downloading {}: the Hub at {} could not be reached ({t})", file.unwrap_or(""), self.env.endpoint),
            },
            Failure::Io(e) => HubError::io(&self.env.cache, e),
            Failure::Other(m) => HubError::Http { id, message: m },
        }
    }

    /// The commit `r.revision` names and the files in it. `Ok(Err(_))` when the Hub could not
    /// be reached (the caller may fall back on the cache).
    fn info(&self, r: &HubRef) -> Result<Result<RepoInfo, HubError>, HubError> {
        let url = format!(
            "{}/api/{}/{}/revision/{}",
            self.env.endpoint,
            r.kind.plural(),
            r.repo,
            url::form_urlencoded::byte_serialize(r.revision.as_bytes()).collect::<String>()
        );
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.env.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match req.call() {
            Ok(resp) => resp,
            Err(e) => {
                return match from_ureq(e) {
                    t @ Failure::Transport(_) => Ok(Err(self.error(r, None, t))),
                    f => Err(self.error(r, None, f)),
                }
            }
        };
        let bad = |problem: String| HubError::Invalid { id: r.display(), problem };
        let v: serde_json::Value =
            serde_json::from_str(&resp.into_string().map_err(|e| bad(format!("unreadable answer from {url}: {e}")))?)
                .map_err(|e| bad(format!("{url} did not answer JSON: {e}")))?;
        let commit = v["sha"].as_str().filter(|c| cache::is_commit(c)).ok_or_else(|| bad(format!("{url} gave no commit \"sha\"")))?;
        let files = v["siblings"]
            .as_array()
            .map(|s| s.iter().filter_map(|f| f["rfilename"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        Ok(Ok(RepoInfo { commit: commit.to_owned(), files }))
    }

    /// `file` of `r` at `commit`, from the cache or downloaded into it.
    fn download(&self, r: &HubRef, commit: &str, file: &str) -> Result<PathBuf, HubError> {
        let local = cache::repo_folder(&self.env.cache, r.kind, &r.repo).join("snapshots").join(commit).join(file);
        if local.exists() {
            return Ok(local);
        }
        let kind = match r.kind {
            RepoKind::Model => hf_hub::RepoType::Model,
            RepoKind::Dataset => hf_hub::RepoType::Dataset,
        };
        let repo = self.api.repo(hf_hub::Repo::with_revision(r.repo.clone(), kind, commit.to_owned()));
        // Another process (a rank of the same run) holding the blob's lock is downloading it:
        // hf-hub gives up after 5 s, so wait for that download to land, up to an hour.
        let started = std::time::Instant::now();
        let path = loop {
            match repo.download_with_progress(file, Bar::default()) {
                Err(ApiError::LockAcquisition(lock)) if started.elapsed() < std::time::Duration::from_secs(3600) => {
                    if local.exists() {
                        break local;
                    }
                    tracing::info!(file, lock = %lock.display(), "another process is downloading this file; waiting");
                    std::thread::sleep(std::time::Duration::from_secs(2));
                }
                Err(e) => return Err(self.error(r, Some(file), from_api(e))),
                Ok(path) => break path,
            }
        };
        cache::remove_commit_ref(&self.env.cache, r, commit);
        Ok(path)
    }
}

/// A download's progress: an indicatif bar on a terminal (bytes, rate, ETA), a log line
/// otherwise.
#[derive(Default)]
struct Bar {
    bar: Option<indicatif::ProgressBar>,
}

impl hf_hub::api::Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        // hf-hub calls init again for each resumed attempt, then update() with the bytes
        // already on disk.
        if let Some(b) = &self.bar {
            b.set_position(0);
            return;
        }
        tracing::info!(file = filename, bytes = size, "downloading from the Hub");
        let bar = indicatif::ProgressBar::with_draw_target(Some(size as u64), indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {wide_bar} {bytes}/{total_bytes} · {bytes_per_sec} · ETA {eta}")
                .expect("template"),
        );
        bar.set_message(filename.to_owned());
        self.bar = Some(bar);
    }
    fn update(&mut self, size: usize) {
        if let Some(b) = &self.bar {
            b.inc(size as u64);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// What `cached` finds when the Hub could not be reached (huggingface_hub falls back on its
/// cache too), else the error saying the Hub is unreachable.
fn fall_back(env: &HubEnv, r: &HubRef, unreachable: HubError, cached: impl FnOnce() -> Result<PathBuf, HubError>) -> Result<PathBuf, HubError> {
    let path = cached().map_err(|_| unreachable)?;
    tracing::warn!(id = %r.display(), path = %path.display(), "the Hub at {} could not be reached; using the cache", env.endpoint);
    Ok(path)
}

fn offline_error(env: &HubEnv, r: &HubRef, what: String) -> HubError {
    HubError::Offline { id: r.display(), cache: env.cache.display().to_string(), repo: r.repo.clone(), what }
}

fn fetch_checkpoint(env: &HubEnv, r: &HubRef) -> Result<PathBuf, HubError> {
    let cached = || {
        cached_snapshot(&env.cache, r).filter(|d| d.join("config.json").exists() || d.join("adapter_config.json").exists()).ok_or_else(|| {
            offline_error(env, r, format!("snapshot of revision '{}' with a config.json (or an adapter_config.json)", r.revision))
        })
    };
    if env.offline {
        return cached();
    }
    let client = Client::new(env)?;
    let info = match client.info(r)? {
        Ok(info) => info,
        Err(unreachable) => return fall_back(env, r, unreachable, cached),
    };
    let missing = |file: &str, hint: String| HubError::MissingFile { id: r.display(), file: file.into(), revision: r.revision.clone(), hint };
    let has = |f: &str| info.files.contains(f);
    let adapter = has("adapter_config.json") && has("adapter_model.safetensors");
    if !has("config.json") && !adapter {
        return Err(missing("config.json", "; ftx reads Hugging Face transformers checkpoints (config.json, safetensors weights, tokenizer.json)".into()));
    }
    let mut files: Vec<String> = CHECKPOINT_FILES.iter().filter(|f| has(f)).map(|f| f.to_string()).collect();
    const INDEX: &str = "model.safetensors.index.json";
    if has(INDEX) {
        let index_path = client.download(r, &info.commit, INDEX)?;
        files.extend(shards_of(&index_path, r)?);
    } else if has("model.safetensors") {
        files.push("model.safetensors".into());
    } else if !adapter {
        let others: Vec<&String> =
            info.files.iter().filter(|f| [".bin", ".pth", ".pt", ".gguf", ".ckpt"].iter().any(|e| f.ends_with(e))).collect();
        let hint = if others.is_empty() {
            "; it has no weights ftx can read".to_owned()
        } else {
            format!(
                "; it has only {} — ftx reads safetensors weights (re-save them with transformers' save_pretrained, or pick a repository with model.safetensors)",
                others.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )
        };
        return Err(missing("model.safetensors", hint));
    }
    for f in &files {
        if !has(f) {
            return Err(missing(f, format!(" (named by {INDEX})")));
        }
        client.download(r, &info.commit, f)?;
    }
    cache::write_ref(&env.cache, r, &info.commit)?;
    Ok(cache::repo_folder(&env.cache, r.kind, &r.repo).join("snapshots").join(&info.commit))
}

/// The shard files a `model.safetensors.index.json` names, each once, sorted.
fn shards_of(index: &Path, r: &HubRef) -> Result<Vec<String>, HubError> {
    let text = std::fs::read_to_string(index).map_err(|e| HubError::io(index, e))?;
    let bad = |problem: String| HubError::Invalid { id: r.display(), problem: format!("{}: {problem}", index.display()) };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v["weight_map"].as_object().ok_or_else(|| bad("has no \"weight_map\" object".into()))?;
    let shards: BTreeSet<String> = map.values().filter_map(|s| s.as_str().map(str::to_owned)).collect();
    if let Some(s) = shards.iter().find(|s| s.contains("..") || s.starts_with('/') || !s.ends_with(".safetensors")) {
        return Err(bad(format!("names the shard '{s}', which is not a .safetensors file inside the repository")));
    }
    Ok(shards.into_iter().collect())
}

fn fetch_file(env: &HubEnv, r: &HubRef) -> Result<PathBuf, HubError> {
    let file = r.file.as_deref().expect("a file reference");
    let cached = || {
        cached_snapshot(&env.cache, r)
            .map(|d| d.join(file))
            .filter(|p| p.exists())
            .ok_or_else(|| offline_error(env, r, format!("{file} at revision '{}'", r.revision)))
    };
    if env.offline {
        return cached();
    }
    let client = Client::new(env)?;
    let info = match client.info(r)? {
        Ok(info) => info,
        Err(unreachable) => return fall_back(env, r, unreachable, cached),
    };
    if !info.files.contains(file) {
        let data: Vec<&str> = info
            .files
            .iter()
            .filter(|f| [".jsonl", ".json", ".parquet"].iter().any(|e| f.ends_with(e)))
            .take(8)
            .map(String::as_str)
            .collect();
        let hint = if data.is_empty() { String::new() } else { format!("; its data files include {}", data.join(", ")) };
        return Err(HubError::MissingFile { id: r.display(), file: file.into(), revision: r.revision.clone(), hint });
    }
    let path = client.download(r, &info.commit, file)?;
    cache::write_ref(&env.cache, r, &info.commit)?;
    Ok(path)
}
