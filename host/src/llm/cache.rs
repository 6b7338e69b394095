//! Answers kept on disk, one file per distinct request (`<dir>/<first 2 hex>/<sha256>.json`),
//! written atomically so that an interrupted run leaves no half-written answer.

use super::LlmError;
use std::path::{Path, PathBuf};

/// A folder of cached answers.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// A cache in `dir` (created when the first answer is written).
    pub fn new(dir: &Path) -> DiskCache {
        DiskCache { dir: dir.to_path_buf() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2.min(key.len())]).join(format!("{key}.json"))
    }

    /// The answer stored under `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<String>, LlmError> {
        let path = self.path(key);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LlmError::Cache { path, source }),
        }
    }

    /// Stores `answer` under `key`.
    pub fn put(&self, key: &str, answer: &str) -> Result<(), LlmError> {
        let path = self.path(key);
        crate::util::write_atomic(&path, answer.as_bytes()).map_err(|source| LlmError::Cache { path, source })
    }
}
