//! The huggingface_hub cache layout, read and written the way Python's huggingface_hub does:
//! `<cache>/models--org--name/refs/<revision>` holds a commit hash,
//! `snapshots/<commit>/<file>` are (links to) the files, `blobs/<etag>` their content.

use super::{HubError, HubRef, RepoKind};
use std::path::{Path, PathBuf};

/// `<cache>/models--org--name` (or `datasets--org--name`).
pub fn repo_folder(cache: &Path, kind: RepoKind, repo: &str) -> PathBuf {
    cache.join(format!("{}--{}", kind.plural(), repo.replace('/', "--")))
}

/// A 40-hex-digit git commit hash.
pub fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// The commit a revision names in the cache: the revision itself when it is a commit hash,
/// else the content of `refs/<revision>`.
pub fn cached_commit(cache: &Path, r: &HubRef) -> Option<String> {
    if is_commit(&r.revision) {
        return Some(r.revision.to_ascii_lowercase());
    }
    let text = std::fs::read_to_string(repo_folder(cache, r.kind, &r.repo).join("refs").join(&r.revision)).ok()?;
    Some(text.trim().to_owned()).filter(|c| is_commit(c))
}

/// `snapshots/<commit>` of `r` in the cache, if the cache knows the revision.
pub fn cached_snapshot(cache: &Path, r: &HubRef) -> Option<PathBuf> {
    let commit = cached_commit(cache, r)?;
    let dir = repo_folder(cache, r.kind, &r.repo).join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// Records that `revision` points at `commit` (as huggingface_hub does, only for names that
/// are not themselves the commit), atomically.
pub fn write_ref(cache: &Path, r: &HubRef, commit: &str) -> Result<(), HubError> {
    if r.revision == commit {
        return Ok(());
    }
    let path = repo_folder(cache, r.kind, &r.repo).join("refs").join(&r.revision);
    crate::util::write_atomic(&path, commit.as_bytes()).map_err(|e| HubError::io(&path, e))
}

/// hf-hub records every revision it downloads at, commit hashes included; huggingface_hub
/// never writes `refs/<commit>`, so the stray file is removed to keep the layouts identical.
pub fn remove_commit_ref(cache: &Path, r: &HubRef, commit: &str) {
    let path = repo_folder(cache, r.kind, &r.repo).join("refs").join(commit);
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ref_names_the_snapshot_and_a_commit_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let r = HubRef::parse_model("org/tiny@dev").unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(cached_snapshot(dir.path(), &r), None);
        write_ref(dir.path(), &r, commit).unwrap();
        let folder = dir.path().join("models--org--tiny");
        assert_eq!(std::fs::read_to_string(folder.join("refs/dev")).unwrap(), commit);
        std::fs::create_dir_all(folder.join("snapshots").join(commit)).unwrap();
        assert_eq!(cached_snapshot(dir.path(), &r), Some(folder.join("snapshots").join(commit)));
        let pinned = HubRef::parse_model(&format!("org/tiny@{commit}")).unwrap();
        assert_eq!(cached_commit(dir.path(), &pinned).as_deref(), Some(commit));
    }
}
