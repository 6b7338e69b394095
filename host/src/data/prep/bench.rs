//! `ftx bench prep`: a seeded synthetic corpus with planted PII, lookalikes that are not PII
//! (Luhn-failing numbers, bad IBAN checksums, dates, version numbers), and planted exact and
//! near duplicates; then the pipeline's records/s per stage, and the recall and precision of
//! the PII scrubber and the deduplicator against what was planted (timed: the scrubbing and
//! the deduplication alone, on one thread). truth.jsonl beside the corpus says what was
//! planted, for host/bench/prep_compare.py to score the Python tools by the same rules.

use super::dedup::{DedupConfig, Deduper};
use super::pii::{PiiConfig, Scrubber};
use super::record::{joined, Origin};
use crate::data::Example;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::VecDeque;

/// One generated record and what was planted in it.
#[derive(Debug, Clone)]
pub struct Planted {
    pub example: Example,
    /// (entity type, value) written into the record.
    pub pii: Vec<(&'static str, String)>,
    /// Strings that look like PII but are not.
    pub decoys: Vec<String>,
    /// Whether the record copies an earlier one (exactly, up to case and spacing, or with a
    /// word or two changed).
    pub duplicate: bool,
}

impl Planted {
    /// What was planted, as one JSON line of truth.jsonl (read by host/bench/prep_compare.py).
    pub fn truth_json(&self) -> serde_json::Value {
        serde_json::json!({ "pii": self.pii, "decoys": self.decoys, "duplicate": self.duplicate })
    }
}

/// The corpus generator: the same seed gives the same records.
pub struct Corpus {
    rng: ChaCha8Rng,
    recent: VecDeque<(String, String)>,
}

const SYLLABLES: [&str; 24] = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "an", "qui", "ber", "lis", "no", "fa", "tre", "gu", "pel", "zo", "ha", "wen", "cri", "mo", "dap", "sen"];
const AREA_CODES: [&str; 8] = ["212", "310", "415", "617", "206", "312", "503", "704"];

fn digits(rng: &mut ChaCha8Rng, n: usize) -> String {
    (0..n).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect()
}

pub(crate) fn luhn_digit(body: &[u8]) -> u8 {
    // The check digit makes the sum, with every second digit from the right doubled, ≡ 0.
    let mut sum = 0u32;
    for (i, d) in body.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if i % 2 == 0 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    ((10 - sum % 10) % 10) as u8
}

impl Corpus {
    pub fn new(seed: u64) -> Corpus {
        Corpus { rng: ChaCha8Rng::seed_from_u64(seed), recent: VecDeque::new() }
    }

    fn word(&mut self) -> String {
        let n = self.rng.random_range(1..4);
        (0..n).map(|_| SYLLABLES[self.rng.random_range(0..SYLLABLES.len())]).collect()
    }

    fn sentence(&mut self, words: usize) -> String {
        (0..words).map(|_| self.word()).collect::<Vec<_>>().join(" ")
    }

    fn pii(&mut self) -> (&'static str, String) {
        let r = &mut self.rng;
        match r.random_range(0..7) {
            0 => ("EMAIL", format!("{}.{}{}@example-{}.com", SYLLABLES[r.random_range(0..24)], SYLLABLES[r.random_range(0..24)], r.random_range(1..999), r.random_range(1..99))),
            1 => match r.random_range(0..3) {
                0 => ("PHONE", format!("({}) {}{}-{}", AREA_CODES[r.random_range(0..8)], r.random_range(2..10), digits(r, 2), digits(r, 4))),
                1 => ("PHONE", format!("+44 20 7{} {}", digits(r, 3), digits(r, 4))),
                _ => ("PHONE", format!("+49 30 {}", format!("{}{}", r.random_range(2..10), digits(r, 7)))),
            },
            2 => ("IP_ADDRESS", format!("{}.{}.{}.{}", r.random_range(1..224), r.random_range(0..256), r.random_range(0..256), r.random_range(1..255))),
            3 => {
                let mut d: Vec<u8> = std::iter::once(4).chain((0..14).map(|_| r.random_range(0..10u8))).collect();
                d.push(luhn_digit(&d));
                let s: String = d.iter().map(|x| char::from(b'0' + x)).collect();
                ("CREDIT_CARD", format!("{} {} {} {}", &s[..4], &s[4..8], &s[8..12], &s[12..]))
            }
            4 => {
                let bban = digits(r, 18);
                let check = 98 - super::checks::iban_mod97(&format!("DE00{bban}")).expect("digits");
                ("IBAN", format!("DE{check:02}{bban}"))
            }
            5 => ("US_SSN", format!("{:03}-{:02}-{:04}", r.random_range(1..666), r.random_range(1..100), r.random_range(1..10000))),
            _ => ("SECRET", format!("AKIA{}", (0..16).map(|_| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[r.random_range(0..32)])).collect::<String>())),
        }
    }

    fn decoy(&mut self) -> String {
        let r = &mut self.rng;
        match r.random_range(0..5) {
            0 => {
                // A Visa-shaped number whose check digit is off by one.
                let mut d: Vec<u8> = std::iter::once(4).chain((0..14).map(|_| r.random_range(0..10u8))).collect();
                d.push((luhn_digit(&d) + 1) % 10);
                d.iter().map(|x| char::from(b'0' + x)).collect()
            }
            1 => format!("{}-{:02}-{:02}", r.random_range(1990..2030), r.random_range(1..13), r.random_range(1..29)),
            2 => {
                let bban = digits(r, 18);
                let check = 98 - super::checks::iban_mod97(&format!("DE00{bban}")).expect("digits");
                format!("DE{:02}{bban}", (check + 1) % 100)
            }
            3 => format!("v{}.{}.{}", r.random_range(0..20), r.random_range(0..50), r.random_range(0..100)),
            _ => format!("order {}", digits(r, 8)),
        }
    }

    /// The next record.
    pub fn next_record(&mut self) -> Planted {
        let roll = self.rng.random_range(0..100);
        if roll < 10 && !self.recent.is_empty() {
            let (instruction, output) = self.recent[self.rng.random_range(0..self.recent.len())].clone();
            let output = if roll < 4 {
                output.to_uppercase().replace(' ', "  ")
            } else {
                let mut w: Vec<String> = output.split(' ').map(str::to_owned).collect();
                let i = self.rng.random_range(0..w.len());
                w[i] = self.word();
                w.join(" ")
            };
            let example = Example::Alpaca { instruction, input: String::new(), output };
            return Planted { example, pii: vec![], decoys: vec![], duplicate: true };
        }
        let instruction = format!("Write about {}.", self.sentence(4));
        let n = self.rng.random_range(40..90);
        let mut words: Vec<String> = (0..n).map(|_| self.word()).collect();
        let mut pii = Vec::new();
        let mut decoys = Vec::new();
        if self.rng.random_range(0..100) < 30 {
            let p = self.pii();
            words.insert(self.rng.random_range(0..words.len()), p.1.clone());
            pii.push(p);
        }
        if self.rng.random_range(0..100) < 10 {
            let d = self.decoy();
            words.insert(self.rng.random_range(0..words.len()), d.clone());
            decoys.push(d);
        }
        let output = words.join(" ") + ".";
        if pii.is_empty() {
            self.recent.push_back((instruction.clone(), output.clone()));
            if self.recent.len() > 1000 {
                self.recent.pop_front();
            }
        }
        Planted { example: Example::Alpaca { instruction, input: String::new(), output }, pii, decoys, duplicate: false }
    }
}

/// Recall and precision of one detector.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Quality {
    pub planted: u64,
    pub found: u64,
    pub flagged: u64,
    pub recall: f64,
    pub precision: f64,
}

impl Quality {
    fn finish(mut self) -> Quality {
        self.recall = self.found as f64 / self.planted.max(1) as f64;
        self.precision = self.found as f64 / self.flagged.max(1) as f64;
        self
    }
}

/// PII recall/precision (overall and per entity), decoys wrongly scrubbed, and records/s of
/// the scrubber on one thread.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PiiQuality {
    pub overall: Quality,
    pub per_entity: indexmap::IndexMap<String, Quality>,
    pub decoys: u64,
    pub decoys_scrubbed: u64,
    pub records_per_second_one_thread: f64,
    /// Records per second of this thread's CPU time, where the system reports it.
    pub records_per_cpu_second: Option<f64>,
}

/// Records generated, then processed, at a time: the clocks are read around each batch.
const BATCH: usize = 4096;

/// This thread's time on a CPU so far (Linux: /proc/thread-self/schedstat, in ns). CPU time
/// is what the comparisons use: on a shared machine wall time measures the neighbours too.
pub fn thread_cpu_time() -> Option<std::time::Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(std::time::Duration::from_nanos(s.split_whitespace().next()?.parse().ok()?))
}

/// Wall and CPU time of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, Option<f64>) {
    let (c0, t) = (thread_cpu_time(), std::time::Instant::now());
    let out = f();
    let wall = t.elapsed().as_secs_f64();
    let cpu = thread_cpu_time().zip(c0).map(|(b, a)| (b - a).as_secs_f64());
    (out, wall, cpu)
}

/// Scores the default scrubber on `n` records of the corpus of `seed`.
pub fn pii_quality(seed: u64, n: usize) -> PiiQuality {
    let s = Scrubber::new(&PiiConfig::default()).expect("default config");
    let names = s.entity_names().to_vec();
    let mut q = PiiQuality::default();
    let mut corpus = Corpus::new(seed);
    let (mut wall, mut cpu) = (0.0, Some(0.0));
    let mut left = n;
    while left > 0 {
        let mut batch: Vec<Planted> = (0..left.min(BATCH)).map(|_| corpus.next_record()).collect();
        left -= batch.len();
        let (counts, w, c) = timed(|| {
            batch
                .iter_mut()
                .map(|p| {
                    let mut counts = vec![0u64; names.len()];
                    s.scrub(&mut p.example, &mut counts);
                    counts
                })
                .collect::<Vec<_>>()
        });
        wall += w;
        cpu = cpu.zip(c).map(|(a, b)| a + b);
        for (p, counts) in batch.iter().zip(&counts) {
            let text = joined(&p.example);
            for (e, v) in &p.pii {
                let entry = q.per_entity.entry(e.to_string()).or_default();
                entry.planted += 1;
                if !text.contains(v.as_str()) && counts[names.iter().position(|x| x == e).expect("known")] > 0 {
                    entry.found += 1;
                }
            }
            for (name, c) in names.iter().zip(counts) {
                if *c > 0 {
                    q.per_entity.entry(name.clone()).or_default().flagged += c;
                }
            }
            q.decoys += p.decoys.len() as u64;
            q.decoys_scrubbed += p.decoys.iter().filter(|d| !text.contains(d.as_str())).count() as u64;
        }
    }
    q.records_per_second_one_thread = n as f64 / wall.max(1e-9);
    q.records_per_cpu_second = cpu.map(|c| n as f64 / c.max(1e-9));
    for v in q.per_entity.values_mut() {
        q.overall.planted += v.planted;
        q.overall.found += v.found;
        q.overall.flagged += v.flagged;
        *v = std::mem::take(v).finish();
    }
    q.overall = std::mem::take(&mut q.overall).finish();
    q
}

/// The deduplicator's quality and speed on a corpus prefix.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DedupQuality {
    pub quality: Quality,
    pub records_per_second_one_thread: f64,
    /// Records per second of this thread's CPU time, where the system reports it.
    pub records_per_cpu_second: Option<f64>,
}

/// Scores the default deduplicator on `n` records of the corpus of `seed`.
pub fn dedup_quality(seed: u64, n: usize) -> DedupQuality {
    let mut d = Deduper::new(&DedupConfig::default());
    let mut corpus = Corpus::new(seed);
    let mut q = Quality::default();
    let (mut wall, mut cpu) = (0.0, Some(0.0));
    let mut done = 0;
    while done < n {
        let batch: Vec<Planted> = (0..(n - done).min(BATCH)).map(|_| corpus.next_record()).collect();
        let (flags, w, c) = timed(|| {
            batch
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let sig = d.signature(&joined(&p.example));
                    d.check(&sig, Origin { source: 0, line: (done + i) as u64 + 1 }).is_some()
                })
                .collect::<Vec<_>>()
        });
        wall += w;
        cpu = cpu.zip(c).map(|(a, b)| a + b);
        for (p, flagged) in batch.iter().zip(flags) {
            q.planted += u64::from(p.duplicate);
            q.flagged += u64::from(flagged);
            q.found += u64::from(flagged && p.duplicate);
        }
        done += batch.len();
    }
    DedupQuality { quality: q.finish(), records_per_second_one_thread: n as f64 / wall.max(1e-9), records_per_cpu_second: cpu.map(|c| n as f64 / c.max(1e-9)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pii_is_valid_and_decoys_are_not() {
        let mut c = Corpus::new(3);
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let p = c.next_record();
            for (e, v) in &p.pii {
                kinds.insert(*e);
                if *e == "CREDIT_CARD" {
                    assert!(super::super::checks::is_card_number(v), "{v}");
                }
                if *e == "IBAN" {
                    assert!(super::super::checks::iban_valid(v).is_some(), "{v}");
                }
            }
        }
        assert_eq!(kinds.len(), 7);
    }
}
