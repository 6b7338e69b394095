//! Output files that are written while the run streams and appear only when it succeeds:
//! each goes to a temporary file beside its final name and is fsynced and renamed at the end
//! (the protocol of [`crate::util::write_atomic`], for files too large to build in memory);
//! and the sink that fills the final split files and rejects.jsonl in input order (the
//! one-process run and the reduce of a sharded run both write through it).

use super::record::{Item, Origin, Stage, State};
use super::{split, PrepConfig, PrepError, Report};
use rayon::prelude::*;
use serde_json::{json, Value};
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

impl StagedFile {
    /// Appends bytes as they are (a binary file: no newline, not counted as a line).
    pub fn bytes(&mut self, bytes: &[u8]) -> Result<(), PrepError> {
        self.hash.update(bytes);
        self.w.write_all(bytes).map_err(|source| PrepError::Io { path: self.tmp.clone(), source })
    }
}

/// One line of rejects.jsonl: the stage, reason and particulars, the record's file and line,
/// the record it duplicates, its page URL and title, and (if `[prep.output] rejects_record`)
/// the record as it was when rejected.
pub fn reject_line(cfg: &PrepConfig, names: &[String], it: &Item) -> Vec<u8> {
    serde_json::to_vec(&reject_value(cfg, names, it)).expect("JSON serialises")
}

/// The object [`reject_line`] writes.
pub fn reject_value(cfg: &PrepConfig, names: &[String], it: &Item) -> Value {
    let State::Rejected { reject, record } = &it.state else { unreachable!("only a rejected record has a rejects line") };
    let origin_json = |o: Origin| json!({ "source": names[o.source as usize], "line": o.line });
    let mut v = json!({
        "stage": reject.stage.name(),
        "reason": reject.reason,
        "detail": reject.detail,
        "source": names[it.origin.source as usize],
        "line": it.origin.line,
    });
    if let Some(d) = reject.duplicate_of {
        v["duplicate_of"] = origin_json(d);
    }
    if let Some(m) = &it.meta {
        m.annotate(&mut v);
    }
    if cfg.output.rejects_record {
        v["record"] = record.clone().unwrap_or(Value::Null);
    }
    v
}

/// The written form of a live record in the configured shape (its page URL and title beside
/// it), or, when it cannot take that shape, the record is rejected at `format` and None.
pub fn format_line(cfg: &PrepConfig, it: &mut Item) -> Option<Vec<u8>> {
    let formatted = it.alive().map(|e| split::format_record(e, cfg.output.format))?;
    match formatted {
        Ok(mut v) => {
            if let Some(m) = &it.meta {
                m.annotate(&mut v);
            }
            Some(serde_json::to_vec(&v).expect("JSON serialises"))
        }
        Err(r) => {
            it.reject(r);
            None
        }
    }
}

/// The final outputs of a run: the split files and rejects.jsonl, filled in input order, and
/// the records counted per input file.
pub struct SplitSink {
    splitter: split::Splitter,
    files: Vec<Option<StagedFile>>,
    rejects: StagedFile,
    /// Records counted per input file (written and rejected; made ones not).
    pub per_source: Vec<u64>,
    names: Vec<String>,
}

impl SplitSink {
    /// Starts the split files of non-zero fraction and rejects.jsonl in `cfg.out`.
    pub fn create(cfg: &PrepConfig, names: Vec<String>) -> Result<SplitSink, PrepError> {
        let fractions = [cfg.split.train, cfg.split.validation, cfg.split.test];
        let mut files = Vec::new();
        for (name, f) in split::SPLITS.iter().zip(fractions) {
            files.push(if f > 0.0 { Some(StagedFile::create(&cfg.out, &format!("{name}.jsonl"))?) } else { None });
        }
        let rejects = StagedFile::create(&cfg.out, "rejects.jsonl")?;
        let per_source = vec![0; names.len()];
        Ok(SplitSink { splitter: split::Splitter::new(&cfg.split), files, rejects, per_source, names })
    }

    /// Writes a live record's line to its split.
    pub fn written(&mut self, it: &Item, line: &[u8], report: &mut Report) -> Result<(), PrepError> {
        self.per_source[it.origin.source as usize] += u64::from(!it.derived);
        let s = self.splitter.assign(it.origin, &self.names[it.origin.source as usize], line);
        // A split of fraction 0 is never drawn but for rounding at the edge.
        let s = if self.files[s].is_some() { s } else { self.files.iter().position(Option::is_some).expect("fractions add up to 1") };
        self.files[s].as_mut().expect("checked").line(line)?;
        report.output_records += 1;
        Ok(())
    }

    /// Writes a rejected record's line (made by [`reject_line`]) to rejects.jsonl.
    pub fn rejected(&mut self, origin: Origin, derived: bool, stage: Stage, reason: &str, line: &[u8], report: &mut Report) -> Result<(), PrepError> {
        self.per_source[origin.source as usize] += u64::from(!derived);
        report.reject(stage, reason);
        self.rejects.line(line)
    }

    /// Formats the live records of a chunk (on the worker threads), then writes every record
    /// of it in order.
    pub fn write_chunk(&mut self, cfg: &PrepConfig, chunk: &mut [Item], report: &mut Report) -> Result<(), PrepError> {
        let lines: Vec<Option<Vec<u8>>> = chunk.par_iter_mut().map(|it| format_line(cfg, it)).collect();
        for (it, line) in chunk.iter().zip(lines) {
            match (&it.state, line) {
                (_, Some(line)) => self.written(it, &line, report)?,
                (State::Rejected { reject, .. }, None) => {
                    let line = reject_line(cfg, &self.names, it);
                    self.rejected(it.origin, it.derived, reject.stage, reject.reason, &line, report)?;
                }
                (state, None) => unreachable!("a record left the pipeline neither written nor rejected: {state:?}"),
            }
        }
        Ok(())
    }

    /// Renames the files into place and counts the splits into the report.
    pub fn commit(self, report: &mut Report) -> Result<Vec<Written>, PrepError> {
        let mut outputs = Vec::new();
        for (name, f) in split::SPLITS.iter().zip(self.files) {
            if let Some(f) = f {
                let w = f.commit()?;
                report.splits.insert(name.to_string(), w.records);
                outputs.push(w);
            }
        }
        outputs.push(self.rejects.commit()?);
        Ok(outputs)
    }

    /// Removes the temporary files (the run failed).
    pub fn abandon(self) {
        self.files.into_iter().flatten().for_each(StagedFile::abandon);
        self.rejects.abandon();
    }
}
