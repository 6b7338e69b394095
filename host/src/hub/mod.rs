//! Hugging Face Hub ids: `org/name`, `org/name@revision` for checkpoints and
//! `hf://datasets/org/name[@revision]/path/file.jsonl` for data files, resolved into the
//! standard huggingface_hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`), so Python's
//! huggingface_hub and ftx share one cache; and [`push`], the upload of a run's output with a
//! generated model card ([`card`]).
//!
//! A local path that exists always wins over a Hub id. On the floor of `util` and `paths`:
//! the model and data readers call [`resolve_model`] and [`resolve_data_file`] where they open
//! a folder or a file, so every command takes an id wherever it takes a path.

mod cache;
pub mod card;
mod fetch;
pub mod push;

pub use fetch::{resolve_data_file, resolve_model, resolve_model_file};

use std::path::PathBuf;

/// The public Hub, unless `HF_ENDPOINT` names another.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// What can go wrong resolving an id or pushing to the Hub. Each variant names the id and
/// says what to do.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The id is neither a local path nor a repository (or revision) on the Hub.
    #[error(
        "{id}: no such local file or folder, and the Hub at {endpoint} has no {kind} repository '{repo}' at revision '{revision}'; \
         give the path of a local file or folder, or check the id's spelling and revision (a private repository needs HF_TOKEN)"
    )]
    NotFound { id: String, endpoint: String, kind: &'static str, repo: String, revision: String },
    /// The repository is gated or private and the request had no (or a refused) token.
    #[error(
        "{id}: the Hub at {endpoint} refused access (HTTP {status}): the repository is gated or private; \
         set HF_TOKEN (or log in with `huggingface-cli login`, which writes {token_file}) with a token that may read it, \
         and accept the model's terms on its page"
    )]
    Unauthorized { id: String, endpoint: String, status: u16, token_file: String },
    /// A push without a token.
    #[error(
        "{id}: pushing needs a Hub token with write access: set HF_TOKEN, or log in with `huggingface-cli login` (which writes {token_file})"
    )]
    NoToken { id: String, token_file: String },
    /// A file ftx needs is not in the repository.
    #[error("{id}: the repository has no {file} at revision {revision}{hint}")]
    MissingFile { id: String, file: String, revision: String, hint: String },
    /// `HF_HUB_OFFLINE` is set and the cache lacks what is needed.
    #[error(
        "{id}: no such local file or folder, and with HF_HUB_OFFLINE set only the Hub cache is read: {cache} has no {what}; \
         run once without HF_HUB_OFFLINE (or `huggingface-cli download {repo}`) to fill the cache"
    )]
    Offline { id: String, cache: String, repo: String, what: String },
    /// The Hub answered something else, or could not be reached.
    #[error("{id}: {message}")]
    Http { id: String, message: String },
    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// Something read is not what it should be (a bad id, index or payload).
    #[error("{id}: {problem}")]
    Invalid { id: String, problem: String },
}

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HubError::Io { path: path.into(), source }
    }
}

/// Which kind of Hub repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The word the Hub's API paths use (`models`, `datasets`).
    pub fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
    fn singular(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// A parsed Hub reference: a repository at a revision, and for data a file in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub kind: RepoKind,
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit; `main` when not given.
    pub revision: String,
    /// The path of a file inside the repository (data references).
    pub file: Option<String>,
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with(['.', '-'])
        && !s.contains("..")
        && !s.contains("--")
}

fn valid_revision(s: &str) -> bool {
    !s.is_empty() && !s.contains("..") && s.chars().all(|c| c.is_ascii_graphic() && c != '\\')
}

impl HubRef {
    /// `org/name` or `org/name@revision`: a model repository. `None` when `s` is not shaped
    /// like one (an absolute path, a path of three parts, a name with spaces, …).
    pub fn parse_model(s: &str) -> Option<HubRef> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if valid_revision(rev) => (r, rev),
            Some(_) => return None,
            None => (s, "main"),
        };
        let (org, name) = repo.split_once('/')?;
        (valid_segment(org) && valid_segment(name)).then(|| HubRef {
            kind: RepoKind::Model,
            repo: repo.to_owned(),
            revision: revision.to_owned(),
            file: None,
        })
    }

    /// `hf://datasets/org/name[@revision]/path/file` (huggingface_hub's HfFileSystem form; also
    /// `hf://org/name/...` for a file of a model repository).
    pub fn parse_file(s: &str) -> Option<HubRef> {
        let rest = s.strip_prefix("hf://")?;
        let (kind, rest) = match rest.strip_prefix("datasets/") {
            Some(r) => (RepoKind::Dataset, r),
            None => (RepoKind::Model, rest.strip_prefix("models/").unwrap_or(rest)),
        };
        let mut parts = rest.splitn(3, '/');
        let (org, name_rev, file) = (parts.next()?, parts.next()?, parts.next()?);
        let (name, revision) = match name_rev.split_once('@') {
            Some((n, r)) if valid_revision(r) => (n, r),
            Some(_) => return None,
            None => (name_rev, "main"),
        };
        let file_ok = !file.is_empty() && !file.starts_with('/') && file.split('/').all(|p| !p.is_empty() && p != "..");
        (valid_segment(org) && valid_segment(name) && file_ok).then(|| HubRef {
            kind,
            repo: format!("{org}/{name}"),
            revision: revision.to_owned(),
            file: Some(file.to_owned()),
        })
    }

    /// The id as the user wrote it (`org/name@rev`, `hf://datasets/org/name/file`).
    pub fn display(&self) -> String {
        let rev = if self.revision == "main" { String::new() } else { format!("@{}", self.revision) };
        match (&self.file, self.kind) {
            (None, _) => format!("{}{rev}", self.repo),
            (Some(f), RepoKind::Dataset) => format!("hf://datasets/{}{rev}/{f}", self.repo),
            (Some(f), RepoKind::Model) => format!("hf://{}{rev}/{f}", self.repo),
        }
    }
}

/// Where the Hub is and who we are to it, read from the environment the way huggingface_hub
/// reads it: `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN` (else the token file
/// `huggingface-cli login` writes, `$HF_TOKEN_PATH` or `$HF_HOME/token`), `HF_HUB_OFFLINE`.
#[derive(Debug, Clone)]
pub struct HubEnv {
    /// Base URL, without a trailing slash.
    pub endpoint: String,
    /// The hub cache: `models--org--name/{blobs,snapshots,refs}` folders.
    pub cache: PathBuf,
    pub token: Option<String>,
    /// Where a token would be read from (named in errors).
    pub token_file: PathBuf,
    /// Resolve from the cache only.
    pub offline: bool,
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

impl HubEnv {
    /// Reads the environment.
    pub fn from_env() -> HubEnv {
        let home = env_nonempty("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let xdg = env_nonempty("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| ".".into()).join(".cache")
            });
            xdg.join("huggingface")
        });
        let cache = env_nonempty("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let token_file = env_nonempty("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| home.join("token"));
        let token = env_nonempty("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(&token_file).ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
        });
        let offline = env_nonempty("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"));
        let endpoint = env_nonempty("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into()).trim_end_matches('/').to_owned();
        HubEnv { endpoint, cache, token, token_file, offline }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_parse_and_paths_do_not() {
        let r = HubRef::parse_model("Qwen/Qwen2.5-0.5B@v1.0").unwrap();
        assert_eq!((r.repo.as_str(), r.revision.as_str()), ("Qwen/Qwen2.5-0.5B", "v1.0"));
        assert_eq!(HubRef::parse_model("meta-llama/Llama-3.2-1B").unwrap().revision, "main");
        for not_an_id in ["/abs/path", "runs/sft/final", "./x/y", "../a/b", "a b/c", "org/", "gpt2", "a/b@", "x/.hidden"] {
            assert_eq!(HubRef::parse_model(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn data_references_parse_like_hf_file_system() {
        let r = HubRef::parse_file("hf://datasets/org/chat@abc123/data/train-00000.parquet").unwrap();
        assert_eq!(r.kind, RepoKind::Dataset);
        assert_eq!((r.repo.as_str(), r.revision.as_str()), ("org/chat", "abc123"));
        assert_eq!(r.file.as_deref(), Some("data/train-00000.parquet"));
        assert_eq!(r.display(), "hf://datasets/org/chat@abc123/data/train-00000.parquet");
        assert_eq!(HubRef::parse_file("hf://datasets/org/chat/train.jsonl").unwrap().revision, "main");
        assert_eq!(HubRef::parse_file("hf://datasets/org/chat"), None);
        assert_eq!(HubRef::parse_file("hf://datasets/org/chat/../x.jsonl"), None);
        assert_eq!(HubRef::parse_file("data/train.jsonl"), None);
    }
}
