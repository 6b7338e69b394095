//! The run's accounting: records in and out of every stage with the reasons for each
//! rejection, PII counts per entity type, split sizes — the numbers must add up — and the
//! readable table printed at the end. Timings are kept apart (they differ run to run, and
//! report.json must not).

use super::record::Stage;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Counts of one stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageCounts {
    pub stage: String,
    #[serde(rename = "in")]
    pub input: u64,
    pub out: u64,
    pub rejected: u64,
    /// Records the stage made beyond those it was given (augmentation's pairs).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub added: u64,
    /// Rejections by reason.
    pub reasons: BTreeMap<String, u64>,
}

/// report.json: everything counted, nothing timed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub input_records: u64,
    pub stages: Vec<StageCounts>,
    /// Entities replaced, by type (every configured type listed, zero included).
    pub pii_entities: IndexMap<String, u64>,
    /// Records in which the PII stage replaced anything.
    pub pii_records_changed: u64,
    /// Records written per split.
    pub splits: IndexMap<String, u64>,
    pub output_records: u64,
    pub rejected_records: u64,
    /// Records made by stages (so output + rejected = input + added).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub added_records: u64,
    /// The augmentation stage's counts, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<AugmentCounts>,
}

/// What the augmentation stage did with the records it sent to its teacher.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AugmentCounts {
    /// Raw-text records sent to the teacher.
    pub records_sent: u64,
    /// Instruction/response pairs made from the answers.
    pub pairs: u64,
    /// Records rejected because the answer held no pair.
    pub unparseable: u64,
    /// Malformed elements of otherwise good answers (each in the rejects).
    pub bad_pairs: u64,
    /// Records rejected because the request failed after its retries.
    pub teacher_errors: u64,
    /// Pairs beyond `pairs_per_item` in an answer, not used.
    pub surplus_pairs_ignored: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// timing.json: seconds and records per second per stage, and the peak memory.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Timing {
    pub stages: Vec<StageTiming>,
    pub total_seconds: f64,
    pub records_per_second: f64,
    /// The process's peak resident memory (VmHWM), where the system reports it.
    pub peak_rss_bytes: Option<u64>,
    /// The augmentation stage's endpoint traffic (requests, retries, cache hits), when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub augment_client: Option<crate::llm::ClientStats>,
    /// Each filter plugin's calls and time (stage `plugins`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<crate::plugins::budget::PluginTime>,
}

/// Time spent in one stage (on all threads together, wall clock).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
    pub records_per_second: f64,
}

impl Report {
    /// A report for these stages, in order (ingest first, format last).
    pub fn new(stages: &[Stage]) -> Report {
        Report {
            stages: stages.iter().map(|s| StageCounts { stage: s.name().into(), ..Default::default() }).collect(),
            ..Default::default()
        }
    }

    /// Counts a rejection at `stage`.
    pub fn reject(&mut self, stage: Stage, reason: &str) {
        if let Some(s) = self.stages.iter_mut().find(|s| s.stage == stage.name()) {
            s.rejected += 1;
            *s.reasons.entry(reason.to_owned()).or_default() += 1;
        }
        self.rejected_records += 1;
    }

    /// Adds what a shard's run counted while its records went through the stages (records
    /// read and made, PII entities, augmentation); rejections are not taken from it: the
    /// reduce counts every one as it writes it.
    pub fn merge_shard(&mut self, shard: &Report) {
        self.input_records += shard.input_records;
        for s in &shard.stages {
            if let Some(stage) = Stage::from_name(&s.stage) {
                self.add(stage, s.added);
            }
        }
        for (k, v) in &shard.pii_entities {
            *self.pii_entities.entry(k.clone()).or_default() += v;
        }
        self.pii_records_changed += shard.pii_records_changed;
        if let Some(a) = &shard.augment {
            let t = self.augment.get_or_insert_with(AugmentCounts::default);
            t.records_sent += a.records_sent;
            t.pairs += a.pairs;
            t.unparseable += a.unparseable;
            t.bad_pairs += a.bad_pairs;
            t.teacher_errors += a.teacher_errors;
            t.surplus_pairs_ignored += a.surplus_pairs_ignored;
        }
    }

    /// Counts `n` records made at `stage`.
    pub fn add(&mut self, stage: Stage, n: u64) {
        if let Some(s) = self.stages.iter_mut().find(|s| s.stage == stage.name()) {
            s.added += n;
        }
        self.added_records += n;
    }

    /// Fills in and out of every stage from the input count and the rejections (each stage
    /// takes what the one before let through).
    pub fn close(&mut self) {
        let mut flowing = self.input_records;
        for s in &mut self.stages {
            s.input = flowing;
            s.out = flowing + s.added - s.rejected;
            flowing = s.out;
        }
    }

    /// Whether every record is in exactly one place: an output split or the rejects (records
    /// made by a stage counted with the input).
    pub fn balanced(&self) -> bool {
        let split_total: u64 = self.splits.values().sum();
        self.input_records + self.added_records == self.output_records + self.rejected_records
            && split_total == self.output_records
            && self.stages.last().is_none_or(|s| s.out == self.output_records)
    }

    /// The table printed at the end of a run.
    pub fn table(&self, timing: &Timing) -> String {
        let mut t = format!("{:<8} {:>10} {:>10} {:>10} {:>12}  {}\n", "stage", "in", "out", "rejected", "records/s", "reasons");
        for s in &self.stages {
            let rate = timing.stages.iter().find(|x| x.stage == s.stage).map_or(0.0, |x| x.records_per_second);
            let made = (s.added > 0).then(|| format!("made {}", s.added));
            let reasons: Vec<String> = made.into_iter().chain(s.reasons.iter().map(|(r, n)| format!("{r} {n}"))).collect();
            t += &format!("{:<8} {:>10} {:>10} {:>10} {:>12.0}  {}\n", s.stage, s.input, s.out, s.rejected, rate, reasons.join(", "));
        }
        let pii: Vec<String> = self.pii_entities.iter().filter(|(_, n)| **n > 0).map(|(e, n)| format!("{e} {n}")).collect();
        if !pii.is_empty() {
            t += &format!("pii: {} in {} records\n", pii.join(", "), self.pii_records_changed);
        }
        if let Some(a) = &self.augment {
            t += &format!(
                "augment: {} records sent, {} pairs made, {} unparseable answers, {} bad pairs, {} teacher errors\n",
                a.records_sent, a.pairs, a.unparseable, a.bad_pairs, a.teacher_errors
            );
        }
        if let Some(c) = &timing.augment_client {
            t += &format!("teacher: {} HTTP requests ({} retries), {} answers from the cache\n", c.http_requests, c.retries, c.cache_hits);
        }
        for line in crate::plugins::budget::summary_lines(&timing.plugins, timing.total_seconds) {
            t += &line;
            t.push('\n');
        }
        let splits: Vec<String> = self.splits.iter().map(|(s, n)| format!("{s} {n}")).collect();
        t += &format!("splits: {}\n", splits.join(", "));
        let mark = if self.balanced() { "adds up" } else { "DOES NOT ADD UP" };
        let added = if self.added_records > 0 { format!(" + {} made", self.added_records) } else { String::new() };
        t += &format!(
            "total: {} in{added} = {} written + {} rejected ({mark}); {:.1} s, {:.0} records/s\n",
            self.input_records, self.output_records, self.rejected_records, timing.total_seconds, timing.records_per_second
        );
        t
    }
}

/// The peak resident memory of this process (Linux: VmHWM in /proc/self/status).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_counts_flow_and_balance() {
        let mut r = Report::new(&[Stage::Ingest, Stage::Filter, Stage::Format]);
        r.input_records = 10;
        r.reject(Stage::Ingest, "malformed_json");
        r.reject(Stage::Filter, "refusal");
        r.reject(Stage::Filter, "refusal");
        r.close();
        r.splits.insert("train".into(), 6);
        r.splits.insert("test".into(), 1);
        r.output_records = 7;
        let got: Vec<(u64, u64)> = r.stages.iter().map(|s| (s.input, s.out)).collect();
        assert_eq!(got, vec![(10, 9), (9, 7), (7, 7)]);
        assert!(r.balanced());
        r.output_records = 6;
        assert!(!r.balanced());
        assert!(r.table(&Timing::default()).contains("refusal 2"));
    }
}
