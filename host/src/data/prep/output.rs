//! Output files that are written while the run streams and appear only when it succeeds:
//! each goes to a temporary file beside its final name and is fsynced and renamed at the end
//! (the protocol of [`crate::util::write_atomic`], for files too large to build in memory).

use super::PrepError;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A JSONL file being written.
pub struct StagedFile {
    path: PathBuf,
    tmp: PathBuf,
    w: std::io::BufWriter<std::fs::File>,
    hash: Sha256,
    pub lines: u64,
}

/// What a committed file holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub file: String,
    pub records: u64,
    pub sha256: String,
}

impl StagedFile {
    /// Starts `dir/name` (as a hidden temporary file).
    pub fn create(dir: &Path, name: &str) -> Result<StagedFile, PrepError> {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let f = std::fs::File::create(&tmp).map_err(|source| PrepError::Io { path: tmp.clone(), source })?;
        Ok(StagedFile { path, tmp, w: std::io::BufWriter::with_capacity(1 << 20, f), hash: Sha256::new(), lines: 0 })
    }

    /// Appends one line (a newline is added).
    pub fn line(&mut self, bytes: &[u8]) -> Result<(), PrepError> {
        self.hash.update(bytes);
        self.hash.update(b"\n");
        self.lines += 1;
        self.w.write_all(bytes).and_then(|()| self.w.write_all(b"\n")).map_err(|source| PrepError::Io { path: self.tmp.clone(), source })
    }

    /// Flushes, fsyncs and renames the file into place.
    pub fn commit(self) -> Result<Written, PrepError> {
        let io = |source| PrepError::Io { path: self.path.clone(), source };
        let f = self.w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path).map_err(io)?;
        let file = self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Written { file, records: self.lines, sha256: self.hash.finalize().iter().map(|b| format!("{b:02x}")).collect() })
    }

    /// Removes the temporary file (the run failed).
    pub fn abandon(self) {
        let tmp = self.tmp.clone();
        drop(self);
        let _ = std::fs::remove_file(tmp);
    }
}
