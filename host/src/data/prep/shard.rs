//! `ftx prep` beyond one machine: `--shard K/N` runs the pipeline on the K-th of N shares of
//! the records and `--reduce` joins the shares.
//!
//! A record belongs to shard `hash(file index, line) mod N` ([`ingest::shard_owner`]): every shard reads
//! the inputs and keeps its own records, so the shares depend on nothing but the inputs and
//! N — not on the machine, the scheduler or the order shards run in. A shard runs every
//! stage up to dedup (dedup must be the last middle stage) and writes, in its own folder
//! `OUT/shards/KKKKK-of-NNNNN/`, `records.jsonl` (each record in input order: the example
//! with its page metadata, or the finished rejects line), `signatures.bin` (each live
//! record's exact hash and MinHash signature, spilled to disk as it is made) and, last,
//! `shard.json`, the completion marker (its counts and a fingerprint of the config). Every
//! file is written atomically, so a killed shard leaves no marker and is simply run again.
//!
//! The reduce streams all shards' records in global input order (a k-way merge on file and
//! line), runs the one-process [`Deduper`] over their signatures (the same LSH banding and
//! threshold, the first record of a cluster kept), then formats, splits and writes exactly
//! as a one-process run does — so the splits and rejects are byte-identical to it.

use super::dedup::{Deduper, Signature};
use super::extract::PageMeta;
use super::ingest;
use super::output::{format_line, reject_line, reject_value, SplitSink, StagedFile};
use super::record::{self, Item, Origin, Stage, State};
use super::report::{Report, StageTiming, Timing};
use super::{PrepConfig, PrepError, PrepOutcome};
use crate::data::Example;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The marker a finished shard writes last.
const MARKER: &str = "shard.json";
const RECORDS: &str = "records.jsonl";
const SIGNATURES: &str = "signatures.bin";

/// Which share of the records a run takes: shard `index` (from 0) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    pub index: u32,
    pub count: u32,
}

impl ShardSpec {
    /// Reads `K/N` (K from 0), `auto/N` or `auto`. `auto` takes K from the scheduler:
    /// `SLURM_ARRAY_TASK_ID` (less `SLURM_ARRAY_TASK_MIN`, so `--array=1-8` works too) or
    /// Kubernetes' `JOB_COMPLETION_INDEX`; N, when not given, from `SLURM_ARRAY_TASK_COUNT`.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<ShardSpec, String> {
        let (k, n) = text.split_once('/').map_or((text, None), |(k, n)| (k, Some(n)));
        let number = |what: &str, v: &str| v.trim().parse::<u32>().map_err(|_| format!("--shard {text}: {what} \"{v}\" is not a whole number"));
        let count = match n {
            Some(n) => number("N", n)?,
            None if k == "auto" => match env("SLURM_ARRAY_TASK_COUNT") {
                Some(c) => number("SLURM_ARRAY_TASK_COUNT", &c)?,
                None => return Err("--shard auto: N is not known (SLURM_ARRAY_TASK_COUNT is not set); give it: --shard auto/N".into()),
            },
            None => return Err(format!("--shard {text}: expected K/N (shard K of N, K from 0), auto/N or auto")),
        };
        let index = if k == "auto" {
            match (env("SLURM_ARRAY_TASK_ID"), env("JOB_COMPLETION_INDEX")) {
                (Some(id), _) => {
                    let min = env("SLURM_ARRAY_TASK_MIN").map(|m| number("SLURM_ARRAY_TASK_MIN", &m)).transpose()?.unwrap_or(0);
                    number("SLURM_ARRAY_TASK_ID", &id)?.checked_sub(min).ok_or("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?
                }
                (None, Some(i)) => number("JOB_COMPLETION_INDEX", &i)?,
                (None, None) => return Err("--shard auto: neither SLURM_ARRAY_TASK_ID (a Slurm array) nor JOB_COMPLETION_INDEX (a Kubernetes indexed job) is set; give the shard: --shard K/N".into()),
            }
        } else {
            number("K", k)?
        };
        if count == 0 || index >= count {
            return Err(format!("--shard: shard {index} of {count} does not exist (K runs from 0 to N-1)"));
        }
        Ok(ShardSpec { index, count })
    }

    /// The shard's folder under the run's output folder.
    pub fn dir(&self, out: &Path) -> PathBuf {
        out.join("shards").join(format!("{:05}-of-{:05}", self.index, self.count))
    }
}

/// Sharding needs dedup, if it runs, to be the last middle stage: a stage after it would run
/// on records the reduce may still drop, and its results would differ from one process's.
pub fn check_stages(cfg: &PrepConfig) -> Result<(), PrepError> {
    match cfg.stages.iter().position(|s| s == "dedup") {
        Some(i) if i + 1 < cfg.stages.len() => Err(PrepError::Config(format!(
            "--shard needs \"dedup\" last in prep.stages (the reduce deduplicates across shards, after every other stage); got {:?}: move {:?} before \"dedup\"",
            cfg.stages,
            &cfg.stages[i + 1..]
        ))),
        _ => Ok(()),
    }
}

/// A digest of everything in the config that decides the outputs (not `out`, `threads` or
/// `chunk_size`): the reduce refuses shards that ran with another config.
pub fn fingerprint(cfg: &PrepConfig) -> String {
    let mut c = cfg.clone();
    c.out = PathBuf::new();
    c.threads = 0;
    c.chunk_size = 1;
    let bytes = serde_json::to_vec(&c).expect("config serialises");
    Sha256::digest(&bytes).iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// shard.json.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    shard: u32,
    of: u32,
    fingerprint: String,
    sources: Vec<String>,
    records: u64,
    report: Report,
}

/// One line of a shard's records.jsonl.
#[derive(Serialize, Deserialize)]
struct ShardRecord {
    source: u32,
    line: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    derived: bool,
    /// A live record (it has a signature when dedup runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    example: Option<Example>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    meta: Option<PageMeta>,
    /// A rejected record: its line of rejects.jsonl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reject: Option<Value>,
}

/// A shard's outputs while it runs.
pub struct ShardSink {
    dir: PathBuf,
    spec: ShardSpec,
    names: Vec<String>,
    records: StagedFile,
    signatures: Option<StagedFile>,
    deduper: Option<Deduper>,
}

impl ShardSink {
    /// Starts the shard's folder: a marker from an earlier run and the temporary files a
    /// killed run left are removed first.
    pub fn create(cfg: &PrepConfig, spec: &ShardSpec, names: Vec<String>) -> Result<ShardSink, PrepError> {
        let dir = spec.dir(&cfg.out);
        let io = |source| PrepError::Io { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        match std::fs::remove_file(dir.join(MARKER)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.') && n.contains(".tmp-")) {
                let _ = std::fs::remove_file(&path);
            }
        }
        let dedup = cfg.stages.iter().any(|s| s == "dedup");
        Ok(ShardSink {
            records: StagedFile::create(&dir, RECORDS)?,
            signatures: if dedup { Some(StagedFile::create(&dir, SIGNATURES)?) } else { None },
            deduper: dedup.then(|| Deduper::new(&cfg.dedup)),
            dir,
            spec: *spec,
            names,
        })
    }

    /// Writes a chunk's records (and signs the live ones, on the worker threads); counts the
    /// rejected ones into the shard's report.
    pub fn write_chunk(&mut self, cfg: &PrepConfig, chunk: &mut [Item], report: &mut Report) -> Result<(), PrepError> {
        for it in chunk.iter() {
            if let State::Rejected { reject, .. } = &it.state {
                report.reject(reject.stage, reject.reason);
            }
        }
        let names = &self.names;
        let deduper = self.deduper.as_ref();
        let lines: Vec<(Vec<u8>, Option<Vec<u8>>)> = chunk
            .par_iter_mut()
            .map(|it| {
                let mut rec = ShardRecord { source: it.origin.source, line: it.origin.line, derived: it.derived, example: None, meta: None, reject: None };
                let mut sig = None;
                match &it.state {
                    State::Alive(e) => {
                        sig = deduper.map(|d| encode_signature(&d.signature(&record::joined(e))));
                        rec.example = Some(e.clone());
                        rec.meta = it.meta.as_deref().cloned();
                    }
                    State::Rejected { .. } => rec.reject = Some(reject_value(cfg, names, it)),
                    State::Raw(_) => unreachable!("ingest parses every record"),
                }
                (serde_json::to_vec(&rec).expect("JSON serialises"), sig)
            })
            .collect();
        for (line, sig) in lines {
            self.records.line(&line)?;
            if let (Some(f), Some(sig)) = (self.signatures.as_mut(), sig) {
                f.bytes(&sig)?;
            }
        }
        Ok(())
    }

    /// Commits the records and signatures, then writes the marker.
    pub fn commit(self, cfg: &PrepConfig, mut report: Report, mut timing: Timing) -> Result<PrepOutcome, PrepError> {
        let fp = fingerprint(cfg);
        let records = self.records.commit()?;
        if let Some(s) = self.signatures {
            s.commit()?;
        }
        report.close();
        super::fill_rates(&mut timing, &report);
        let marker = Marker { shard: self.spec.index, of: self.spec.count, fingerprint: fp, sources: self.names, records: records.records, report: report.clone() };
        let path = self.dir.join(MARKER);
        let text = serde_json::to_vec_pretty(&marker).expect("marker serialises");
        crate::util::write_atomic(&path, &text).map_err(|source| PrepError::Io { path, source })?;
        Ok(PrepOutcome { report, timing, out: self.dir })
    }

    /// Removes the temporary files (the shard failed).
    pub fn abandon(self) {
        self.records.abandon();
        if let Some(s) = self.signatures {
            s.abandon();
        }
    }
}

/// A signature on disk: the exact hash (16 bytes), the number of minima (4), the minima (8
/// each), little-endian.
fn encode_signature(s: &Signature) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + 8 * s.minhash.len());
    out.extend_from_slice(&s.exact.to_le_bytes());
    out.extend_from_slice(&(s.minhash.len() as u32).to_le_bytes());
    for m in &s.minhash {
        out.extend_from_slice(&m.to_le_bytes());
    }
    out
}

fn read_signature(r: &mut impl Read) -> std::io::Result<Signature> {
    let mut head = [0u8; 20];
    r.read_exact(&mut head)?;
    let exact = u128::from_le_bytes(head[..16].try_into().expect("16 bytes"));
    let n = u32::from_le_bytes(head[16..].try_into().expect("4 bytes")) as usize;
    let mut body = vec![0u8; 8 * n];
    r.read_exact(&mut body)?;
    let minhash = body.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    Ok(Signature { exact, minhash })
}

/// The shard folders `dirs` name: each is a shard's folder or holds shard folders.
fn shard_dirs(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, PrepError> {
    let mut out = Vec::new();
    for d in dirs {
        let io = |source| PrepError::Io { path: d.clone(), source };
        if d.join(MARKER).exists() || d.join(RECORDS).exists() {
            out.push(d.clone());
            continue;
        }
        if !d.is_dir() {
            return Err(PrepError::Config(format!("--reduce: {} is not a folder", d.display())));
        }
        let mut subs: Vec<PathBuf> = std::fs::read_dir(d).map_err(io)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
        subs.sort();
        if subs.is_empty() {
            return Err(PrepError::Config(format!("--reduce: {} holds no shard folders (run `ftx prep --shard K/N` first)", d.display())));
        }
        out.extend(subs);
    }
    Ok(out)
}

/// One shard being read by the reduce.
struct ShardReader {
    dir: PathBuf,
    records: std::io::Lines<BufReader<std::fs::File>>,
    signatures: Option<BufReader<std::fs::File>>,
}

impl ShardReader {
    fn next(&mut self) -> Result<Option<ShardRecord>, PrepError> {
        let path = self.dir.join(RECORDS);
        match self.records.next() {
            None => Ok(None),
            Some(Err(source)) => Err(PrepError::Io { path, source }),
            Some(Ok(line)) => serde_json::from_str(&line).map(Some).map_err(|e| PrepError::Config(format!("{}: not a shard record ({e}): was it written by this ftx?", path.display()))),
        }
    }
}

/// `ftx prep --reduce`: joins the shards in `dirs` (or `OUT/shards` when empty) into the final
/// splits, rejects, report and manifest in `cfg.out`, as the one-process run would.
pub fn reduce(cfg: &PrepConfig, dirs: &[PathBuf]) -> Result<PrepOutcome, PrepError> {
    let started = Instant::now();
    let default = [cfg.out.join("shards")];
    let dirs = shard_dirs(if dirs.is_empty() { &default[..] } else { dirs })?;
    let fp = fingerprint(cfg);
    let sources = ingest::resolve_inputs(&cfg.inputs, cfg.extract.format)?;
    let names: Vec<String> = sources.iter().map(|s| s.path.display().to_string()).collect();
    let mut markers: Vec<(Marker, PathBuf)> = Vec::new();
    let mut unfinished = Vec::new();
    for d in &dirs {
        let path = d.join(MARKER);
        let Ok(text) = std::fs::read(&path) else {
            unfinished.push(d.display().to_string());
            continue;
        };
        let m: Marker = serde_json::from_slice(&text).map_err(|e| PrepError::Config(format!("{}: not a shard marker: {e}", path.display())))?;
        if m.fingerprint != fp {
            return Err(PrepError::Config(format!("{}: shard {} of {} ran with another prep config than this one; run the shards and the reduce with the same config", d.display(), m.shard, m.of)));
        }
        if m.sources != names {
            return Err(PrepError::Config(format!("{}: the shard read other input files than this config finds now ({} vs {} files); were inputs added or moved?", d.display(), m.sources.len(), names.len())));
        }
        markers.push((m, d.clone()));
    }
    if !unfinished.is_empty() {
        return Err(PrepError::Config(format!("shards that did not finish (no {MARKER}): {}; run them again with the same --shard K/N, then reduce", unfinished.join(", "))));
    }
    let count = markers.first().map(|(m, _)| m.of).ok_or_else(|| PrepError::Config("--reduce: no shards found".into()))?;
    let mut seen = vec![None::<PathBuf>; count as usize];
    for (m, d) in &markers {
        if m.of != count {
            return Err(PrepError::Config(format!("{}: shard of {} but others are of {count}", d.display(), m.of)));
        }
        if let Some(other) = seen[m.shard as usize].replace(d.clone()) {
            return Err(PrepError::Config(format!("shard {} of {count} is given twice: {} and {}", m.shard, other.display(), d.display())));
        }
    }
    let missing: Vec<String> = seen.iter().enumerate().filter(|(_, d)| d.is_none()).map(|(k, _)| format!("{k}/{count}")).collect();
    if !missing.is_empty() {
        return Err(PrepError::Config(format!("shards missing: {} (run `ftx prep --shard K/N` for each, then reduce)", missing.join(", "))));
    }

    let order = super::stage_order(cfg);
    let mut report = Report::new(&order);
    for (m, _) in &markers {
        report.merge_shard(&m.report);
    }
    std::fs::create_dir_all(&cfg.out).map_err(|source| PrepError::Io { path: cfg.out.clone(), source })?;
    let mut sink = SplitSink::create(cfg, names.clone())?;
    let result = merge_into(cfg, &markers, &names, &mut sink, &mut report);
    if let Err(e) = result {
        sink.abandon();
        return Err(e);
    }
    let total = started.elapsed().as_secs_f64();
    let timing = Timing {
        stages: order.iter().map(|s| StageTiming { stage: s.name().into(), seconds: 0.0, records_per_second: 0.0 }).collect(),
        total_seconds: total,
        records_per_second: report.input_records as f64 / total.max(1e-9),
        ..Default::default()
    };
    super::finish(cfg, &sources, sink, report, timing)
}

/// Streams every shard's records in input order through dedup, format and split.
fn merge_into(cfg: &PrepConfig, markers: &[(Marker, PathBuf)], names: &[String], sink: &mut SplitSink, report: &mut Report) -> Result<(), PrepError> {
    let mut readers = Vec::new();
    for (m, d) in markers {
        let open = |name: &str| {
            let path = d.join(name);
            std::fs::File::open(&path).map(|f| BufReader::with_capacity(1 << 20, f)).map_err(|source| PrepError::Io { path, source })
        };
        let signatures = if d.join(SIGNATURES).exists() { Some(open(SIGNATURES)?) } else { None };
        readers.push((m.shard, ShardReader { dir: d.clone(), records: open(RECORDS)?.lines(), signatures }));
    }
    let mut deduper = cfg.stages.iter().any(|s| s == "dedup").then(|| Deduper::new(&cfg.dedup));
    // The next record of each shard, smallest (file, line, shard) first; a shard's records
    // of one origin (augmentation's pairs) follow each other.
    let mut heads: BinaryHeap<std::cmp::Reverse<(u32, u64, usize)>> = BinaryHeap::new();
    let mut pending: Vec<Option<ShardRecord>> = Vec::new();
    for (i, (_, r)) in readers.iter_mut().enumerate() {
        let rec = r.next()?;
        if let Some(rec) = &rec {
            heads.push(std::cmp::Reverse((rec.source, rec.line, i)));
        }
        pending.push(rec);
    }
    while let Some(std::cmp::Reverse((_, _, i))) = heads.pop() {
        let rec = pending[i].take().expect("a head has its record");
        let (shard, reader) = &mut readers[i];
        place(cfg, names, rec, reader, *shard, deduper.as_mut(), sink, report)?;
        let next = reader.next()?;
        if let Some(n) = &next {
            heads.push(std::cmp::Reverse((n.source, n.line, i)));
        }
        pending[i] = next;
    }
    Ok(())
}

/// Deduplicates, formats and writes one record of a shard.
#[allow(clippy::too_many_arguments)]
fn place(cfg: &PrepConfig, names: &[String], rec: ShardRecord, reader: &mut ShardReader, shard: u32, deduper: Option<&mut Deduper>, sink: &mut SplitSink, report: &mut Report) -> Result<(), PrepError> {
    let origin = Origin { source: rec.source, line: rec.line };
    if (rec.source as usize) >= names.len() {
        return Err(PrepError::Config(format!("{}: a record of input file {} but there are {}", reader.dir.display(), rec.source, names.len())));
    }
    if let Some(v) = rec.reject {
        let stage = v.get("stage").and_then(Value::as_str).and_then(Stage::from_name).unwrap_or(Stage::Ingest);
        let reason = v.get("reason").and_then(Value::as_str).unwrap_or("unknown").to_owned();
        let line = serde_json::to_vec(&v).expect("JSON serialises");
        return sink.rejected(origin, rec.derived, stage, &reason, &line, report);
    }
    let example = rec.example.ok_or_else(|| PrepError::Config(format!("{}: a record with neither example nor reject (shard {shard})", reader.dir.display())))?;
    let mut it = Item { origin, state: State::Alive(example), derived: rec.derived, meta: rec.meta.map(Box::new) };
    if let Some(d) = deduper {
        let sigs = reader.signatures.as_mut().ok_or_else(|| PrepError::Config(format!("{}: no {SIGNATURES} (the shard ran without dedup)", reader.dir.display())))?;
        let sig = read_signature(sigs).map_err(|source| PrepError::Io { path: reader.dir.join(SIGNATURES), source })?;
        if let Some(r) = d.check(&sig, origin) {
            it.reject(r);
        }
    }
    match format_line(cfg, &mut it) {
        Some(line) => sink.written(&it, &line, report),
        None => {
            let State::Rejected { reject, .. } = &it.state else { unreachable!("format_line rejects what it cannot write") };
            let (stage, reason): (Stage, &str) = (reject.stage, reject.reason);
            let line = reject_line(cfg, names, &it);
            sink.rejected(origin, it.derived, stage, reason, &line, report)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_from_arguments_and_schedulers() {
        let none = |_: &str| None;
        assert_eq!(ShardSpec::parse("2/4", none), Ok(ShardSpec { index: 2, count: 4 }));
        assert!(ShardSpec::parse("4/4", none).unwrap_err().contains("does not exist"));
        assert!(ShardSpec::parse("auto/4", none).unwrap_err().contains("SLURM_ARRAY_TASK_ID"));
        let slurm = |k: &str| match k {
            "SLURM_ARRAY_TASK_ID" => Some("3".to_owned()),
            "SLURM_ARRAY_TASK_MIN" => Some("1".to_owned()),
            "SLURM_ARRAY_TASK_COUNT" => Some("8".to_owned()),
            _ => None,
        };
        assert_eq!(ShardSpec::parse("auto", slurm), Ok(ShardSpec { index: 2, count: 8 }));
        let k8s = |k: &str| (k == "JOB_COMPLETION_INDEX").then(|| "5".to_owned());
        assert_eq!(ShardSpec::parse("auto/6", k8s), Ok(ShardSpec { index: 5, count: 6 }));
        assert!(ShardSpec::parse("auto", k8s).unwrap_err().contains("auto/N"));
    }

    #[test]
    fn owners_spread_records_and_signatures_round_trip() {
        let mut per = [0u32; 4];
        for line in 1..=4000 {
            per[ingest::shard_owner(Origin { source: 0, line }, 4) as usize] += 1;
        }
        // 1000 expected each, standard deviation ≈ 27: allow five.
        assert!(per.iter().all(|n| n.abs_diff(1000) < 140), "{per:?}");
        let s = Signature { exact: 0x0123_4567_89ab_cdef_0011_2233_4455_6677, minhash: vec![1, u64::MAX, 42] };
        assert_eq!(read_signature(&mut &encode_signature(&s)[..]).unwrap(), s);
    }
}
