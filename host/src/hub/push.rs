//! Uploads to a Hub repository through the Hub's commit API, as huggingface_hub's
//! `create_commit` does: create the repository if it is absent (`/api/repos/create`), ask
//! which files go through Git LFS (`/api/models/{repo}/preupload/{rev}`), upload those to the
//! storage the LFS batch API (`/{repo}.git/info/lfs/objects/batch`) names — one PUT, or the
//! multipart protocol when the Hub sends a `chunk_size` — and verify them, then commit
//! everything in one NDJSON payload (`/api/models/{repo}/commit/{rev}`): small files inline in
//! base64, LFS files as pointers (sha256 and size).
//!
//! hf-hub (the download client) has no upload; this is written on ureq like the rest.

use super::{HubEnv, HubError};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

/// One file to upload.
#[derive(Debug, Clone)]
pub struct UploadFile {
    /// Its path in the repository (`/`-separated).
    pub path_in_repo: String,
    pub content: Content,
}

/// Where a file's bytes come from.
#[derive(Debug, Clone)]
pub enum Content {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// What to push where.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// `org/name`.
    pub repo: String,
    /// Branch to commit to (created from the default branch when absent).
    pub revision: String,
    /// Create the repository private (an existing repository keeps its visibility).
    pub private: bool,
    /// The commit's summary line.
    pub message: String,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The commit the Hub made.
    pub commit: String,
    /// Its URL, as the Hub gives it.
    pub commit_url: String,
    /// Files sent inline in the commit, and through Git LFS.
    pub regular: Vec<String>,
    pub lfs: Vec<String>,
}

struct Prepared {
    file: UploadFile,
    size: u64,
    sha256: String,
    sample: Vec<u8>,
}

impl Prepared {
    fn new(file: UploadFile) -> Result<Prepared, HubError> {
        let (size, sha256, sample) = match &file.content {
            Content::Bytes(b) => (b.len() as u64, crate::util::sha256_hex(b), b[..b.len().min(512)].to_vec()),
            Content::File(p) => {
                let mut f = std::fs::File::open(p).map_err(|e| HubError::io(p, e))?;
                let mut h = Sha256::new();
                let size = std::io::copy(&mut f, &mut h).map_err(|e| HubError::io(p, e))?;
                let mut sample = vec![0; size.min(512) as usize];
                f.seek(SeekFrom::Start(0)).and_then(|_| f.read_exact(&mut sample)).map_err(|e| HubError::io(p, e))?;
                (size, h.finalize().iter().map(|b| format!("{b:02x}")).collect(), sample)
            }
        };
        Ok(Prepared { file, size, sha256, sample })
    }

    fn bytes(&self) -> Result<Vec<u8>, HubError> {
        match &self.file.content {
            Content::Bytes(b) => Ok(b.clone()),
            Content::File(p) => std::fs::read(p).map_err(|e| HubError::io(p, e)),
        }
    }

    /// `len` bytes from `offset`, read from disk (LFS parts are uploaded one at a time).
    fn range(&self, offset: u64, len: u64) -> Result<Vec<u8>, HubError> {
        match &self.file.content {
            Content::Bytes(b) => Ok(b[offset as usize..(offset + len) as usize].to_vec()),
            Content::File(p) => {
                let mut f = std::fs::File::open(p).map_err(|e| HubError::io(p, e))?;
                let mut buf = vec![0; len as usize];
                f.seek(SeekFrom::Start(offset)).and_then(|_| f.read_exact(&mut buf)).map_err(|e| HubError::io(p, e))?;
                Ok(buf)
            }
        }
    }
}

struct Pusher<'a> {
    env: &'a HubEnv,
    opts: &'a PushOptions,
    token: String,
    agent: ureq::Agent,
}

impl Pusher<'_> {
    fn err(&self, what: &str, e: ureq::Error) -> HubError {
        let id = self.opts.repo.clone();
        match e {
            ureq::Error::Status(status @ (401 | 403), _) => HubError::Unauthorized {
                id,
                endpoint: self.env.endpoint.clone(),
                status,
                token_file: self.env.token_file.display().to_string(),
            },
            ureq::Error::Status(status, resp) => {
                let url = resp.get_url().to_owned();
                let body: String = resp.into_string().unwrap_or_default().chars().take(300).collect();
                HubError::Http { id, message: format!("{what}: HTTP {status} from {url}: {}", body.trim()) }
            }
            ureq::Error::Transport(t) => {
                HubError::Http { id, message: format!("{what}: could not reach the Hub at {} ({t})", self.env.endpoint) }
            }
        }
    }

    fn post_json(&self, what: &str, url: &str, body: serde_json::Value) -> Result<serde_json::Value, HubError> {
        let resp = self.agent.post(url).set("Authorization", &format!("Bearer {}", self.token)).send_json(body);
        self.read_json(what, resp)
    }

    fn read_json(&self, what: &str, resp: Result<ureq::Response, ureq::Error>) -> Result<serde_json::Value, HubError> {
        let resp = resp.map_err(|e| self.err(what, e))?;
        let text = resp.into_string().map_err(|e| HubError::Http { id: self.opts.repo.clone(), message: format!("{what}: {e}") })?;
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|e| HubError::Http { id: self.opts.repo.clone(), message: format!("{what}: the Hub did not answer JSON ({e})") })
    }

    fn create_repo(&self) -> Result<(), HubError> {
        let (org, name) = self.opts.repo.split_once('/').expect("a checked org/name");
        let body = serde_json::json!({"name": name, "organization": org, "private": self.opts.private});
        match self.agent.post(&format!("{}/api/repos/create", self.env.endpoint)).set("Authorization", &format!("Bearer {}", self.token)).send_json(body) {
            Ok(_) => Ok(()),
            // 409: it exists already, as it usually does after the first push.
            Err(ureq::Error::Status(409, _)) => Ok(()),
            Err(e) => Err(self.err("creating the repository", e)),
        }
    }

    fn create_branch(&self) -> Result<(), HubError> {
        let url = format!("{}/api/models/{}/branch/{}", self.env.endpoint, self.opts.repo, enc(&self.opts.revision));
        match self.agent.post(&url).set("Authorization", &format!("Bearer {}", self.token)).send_json(serde_json::json!({})) {
            Ok(_) | Err(ureq::Error::Status(409, _)) => Ok(()),
            Err(e) => Err(self.err(&format!("creating the branch {}", self.opts.revision), e)),
        }
    }

    /// Which files the Hub wants through LFS.
    fn preupload(&self, files: &[Prepared]) -> Result<Vec<bool>, HubError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = serde_json::json!({"files": files.iter().map(|f| serde_json::json!({
            "path": f.file.path_in_repo, "sample": b64.encode(&f.sample), "size": f.size, "sha": f.sha256,
        })).collect::<Vec<_>>()});
        let url = format!("{}/api/models/{}/preupload/{}", self.env.endpoint, self.opts.repo, enc(&self.opts.revision));
        let v = self.post_json("asking which files go through LFS", &url, body)?;
        let modes = v["files"].as_array().cloned().unwrap_or_default();
        Ok(files
            .iter()
            .map(|f| {
                modes.iter().any(|m| m["path"] == f.file.path_in_repo.as_str() && m["uploadMode"] == "lfs")
            })
            .collect())
    }

    fn upload_lfs(&self, files: &[&Prepared]) -> Result<(), HubError> {
        if files.is_empty() {
            return Ok(());
        }
        let url = format!("{}/{}.git/info/lfs/objects/batch", self.env.endpoint, self.opts.repo);
        let body = serde_json::json!({
            "operation": "upload",
            "transfers": ["basic", "multipart"],
            "objects": files.iter().map(|f| serde_json::json!({"oid": f.sha256, "size": f.size})).collect::<Vec<_>>(),
            "hash_algo": "sha256",
            "ref": {"name": self.opts.revision},
        });
        let resp = self
            .agent
            .post(&url)
            .set("Authorization", &format!("Bearer {}", self.token))
            .set("Accept", "application/vnd.git-lfs+json")
            .set("Content-Type", "application/vnd.git-lfs+json")
            .send_string(&body.to_string());
        let v = self.read_json("the LFS batch request", resp)?;
        for obj in v["objects"].as_array().cloned().unwrap_or_default() {
            let oid = obj["oid"].as_str().unwrap_or_default();
            let Some(f) = files.iter().find(|f| f.sha256 == oid) else { continue };
            if let Some(e) = obj.get("error") {
                return Err(HubError::Http { id: self.opts.repo.clone(), message: format!("LFS refused {}: {e}", f.file.path_in_repo) });
            }
            // No actions: the Hub has this content already.
            let Some(upload) = obj["actions"].get("upload") else { continue };
            tracing::info!(file = %f.file.path_in_repo, bytes = f.size, "uploading through LFS");
            let header = upload["header"].as_object().cloned().unwrap_or_default();
            let href = upload["href"].as_str().unwrap_or_default();
            match header.get("chunk_size").and_then(|c| c.as_str().and_then(|s| s.parse::<u64>().ok()).or(c.as_u64())) {
                Some(chunk) if chunk > 0 => self.multipart(f, href, &header, chunk)?,
                _ => {
                    let mut req = self.agent.put(href);
                    for (k, val) in &header {
                        if let Some(s) = val.as_str() {
                            req = req.set(k, s);
                        }
                    }
                    // Streamed from disk with its length (presigned storage URLs refuse chunked bodies).
                    let sent = match &f.file.content {
                        Content::Bytes(b) => req.send_bytes(b),
                        Content::File(p) => {
                            let file = std::fs::File::open(p).map_err(|e| HubError::io(p, e))?;
                            req.set("Content-Length", &f.size.to_string()).send(file)
                        }
                    };
                    sent.map_err(|e| self.err(&format!("uploading {}", f.file.path_in_repo), e))?;
                }
            }
            if let Some(verify) = obj["actions"].get("verify") {
                let mut req = self.agent.post(verify["href"].as_str().unwrap_or_default()).set("Authorization", &format!("Bearer {}", self.token));
                for (k, val) in verify["header"].as_object().into_iter().flatten() {
                    if let Some(s) = val.as_str() {
                        req = req.set(k, s);
                    }
                }
                req.send_json(serde_json::json!({"oid": f.sha256, "size": f.size}))
                    .map_err(|e| self.err(&format!("verifying {}", f.file.path_in_repo), e))?;
            }
        }
        Ok(())
    }

    /// The multipart protocol: the header holds one presigned URL per part ("00001", …);
    /// each part is PUT, and the parts' ETags are posted back to `href` to complete.
    fn multipart(&self, f: &Prepared, href: &str, header: &serde_json::Map<String, serde_json::Value>, chunk: u64) -> Result<(), HubError> {
        let mut parts: Vec<(u64, &str)> =
            header.iter().filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_str()?))).collect();
        parts.sort();
        let expected = f.size.div_ceil(chunk);
        if parts.len() as u64 != expected {
            return Err(HubError::Http {
                id: self.opts.repo.clone(),
                message: format!("LFS multipart upload of {}: {} part URLs for {expected} parts of {chunk} bytes", f.file.path_in_repo, parts.len()),
            });
        }
        let mut etags = Vec::new();
        for (i, (number, url)) in parts.iter().enumerate() {
            let offset = i as u64 * chunk;
            let bytes = f.range(offset, chunk.min(f.size - offset))?;
            let resp = self.agent.put(url).send_bytes(&bytes).map_err(|e| self.err(&format!("uploading part {number} of {}", f.file.path_in_repo), e))?;
            let etag = resp.header("etag").unwrap_or_default().to_owned();
            etags.push(serde_json::json!({"partNumber": number, "etag": etag}));
        }
        self.agent
            .post(href)
            .send_json(serde_json::json!({"oid": f.sha256, "parts": etags}))
            .map_err(|e| self.err(&format!("completing the upload of {}", f.file.path_in_repo), e))?;
        Ok(())
    }

    fn commit(&self, files: &[Prepared], lfs: &[bool]) -> Result<(String, String), HubError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut lines = vec![serde_json::json!({"key": "header", "value": {"summary": self.opts.message, "description": ""}})];
        for (f, &is_lfs) in files.iter().zip(lfs) {
            lines.push(if is_lfs {
                serde_json::json!({"key": "lfsFile", "value": {"path": f.file.path_in_repo, "algo": "sha256", "oid": f.sha256, "size": f.size}})
            } else {
                serde_json::json!({"key": "file", "value": {"content": b64.encode(f.bytes()?), "path": f.file.path_in_repo, "encoding": "base64"}})
            });
        }
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let url = format!("{}/api/models/{}/commit/{}", self.env.endpoint, self.opts.repo, enc(&self.opts.revision));
        let resp = self
            .agent
            .post(&url)
            .set("Authorization", &format!("Bearer {}", self.token))
            .set("Content-Type", "application/x-ndjson")
            .send_string(&body);
        let v = self.read_json("committing", resp)?;
        let commit = v["commitOid"].as_str().unwrap_or_default().to_owned();
        let url = v["commitUrl"].as_str().unwrap_or_default().to_owned();
        Ok((commit, url))
    }
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Uploads `files` to `opts.repo` in one commit, creating the repository (and the branch)
/// when absent. Needs a token with write access (`HF_TOKEN` or the login token file).
pub fn push(env: &HubEnv, opts: &PushOptions, files: Vec<UploadFile>) -> Result<PushReport, HubError> {
    if opts.repo.contains('@') || super::HubRef::parse_model(&opts.repo).is_none() {
        return Err(HubError::Invalid { id: opts.repo.clone(), problem: "a repository to push to is named org/name (give the branch with --revision)".into() });
    }
    if env.offline {
        return Err(HubError::Invalid { id: opts.repo.clone(), problem: "HF_HUB_OFFLINE is set: pushing needs the Hub (unset it)".into() });
    }
    let token = env
        .token
        .clone()
        .ok_or_else(|| HubError::NoToken { id: opts.repo.clone(), token_file: env.token_file.display().to_string() })?;
    let pusher = Pusher { env, opts, token, agent: ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .timeout_connect(std::time::Duration::from_secs(30))
            .timeout_read(std::time::Duration::from_secs(300))
            .build() };
    let prepared: Vec<Prepared> = files.into_iter().map(Prepared::new).collect::<Result<_, _>>()?;
    pusher.create_repo()?;
    if opts.revision != "main" {
        pusher.create_branch()?;
    }
    let lfs = pusher.preupload(&prepared)?;
    pusher.upload_lfs(&prepared.iter().zip(&lfs).filter(|(_, l)| **l).map(|(f, _)| f).collect::<Vec<_>>())?;
    let (commit, commit_url) = pusher.commit(&prepared, &lfs)?;
    let names = |want: bool| prepared.iter().zip(&lfs).filter(|(_, l)| **l == want).map(|(f, _)| f.file.path_in_repo.clone()).collect();
    Ok(PushReport { commit, commit_url, regular: names(false), lfs: names(true) })
}
