//! Deduplication: exact (a hash of the normalised text) and near-duplicate (MinHash over
//! word shingles, banded LSH to find candidates, then the similarity estimated from stored
//! 8-bit sketches of the signatures and compared with the threshold). The first record of
//! each cluster is kept; a dropped one names it.
//!
//! Signatures are computed on the worker threads ([`Deduper::signature`] is pure); the index
//! is consulted and grown in input order ([`Deduper::check`]), so the result does not depend
//! on the thread count. The index is the one part of `ftx prep` that grows with the input:
//! about `permutations + 24 · bands + 40` bytes per kept record.

use super::record::{Origin, Reject, Stage};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use unicode_normalization::UnicodeNormalization;

/// `[prep.dedup]`: exact and near-duplicate removal; the first record of a cluster is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Drop records whose normalised text (NFKC, lower case, whitespace collapsed) was seen.
    #[serde(default = "yes")]
    pub exact: bool,
    /// Drop near-duplicates found by MinHash LSH.
    #[serde(default = "yes")]
    pub near: bool,
    /// Words per shingle.
    #[serde(default = "default_shingle")]
    pub shingle_size: usize,
    /// MinHash permutations (signature length); a multiple of `bands`.
    #[serde(default = "default_perms")]
    pub permutations: usize,
    /// LSH bands; `permutations / bands` rows each. More bands find lower similarities.
    #[serde(default = "default_bands")]
    pub bands: usize,
    /// Estimated Jaccard similarity at or above which a candidate is a duplicate.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Seed of the permutations.
    #[serde(default = "one_u64")]
    pub seed: u64,
}

impl DedupConfig {
    /// Checks the values of `[prep.dedup]`; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.bands == 0 || self.permutations == 0 || self.permutations % self.bands != 0 {
            return Err(format!("prep.dedup.permutations ({}) must be a positive multiple of bands ({})", self.permutations, self.bands));
        }
        if self.shingle_size == 0 || !(0.0..=1.0).contains(&self.threshold) {
            return Err("prep.dedup: shingle_size must be ≥ 1 and threshold in [0, 1]".into());
        }
        Ok(())
    }
}

impl Default for DedupConfig {
    fn default() -> Self {
        crate::config::serde_defaults()
    }
}

fn yes() -> bool { true }
fn one_u64() -> u64 { 1 }
fn default_shingle() -> usize { 5 }
fn default_perms() -> usize { 128 }
fn default_bands() -> usize { 16 }
fn default_threshold() -> f64 { 0.7 }

/// The Mersenne prime 2^61 − 1: MinHash permutations are `(a·x + b) mod P`.
const P: u64 = (1 << 61) - 1;

/// What the index needs of one record.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    /// 128 bits of SHA-256 of the normalised text.
    pub exact: u128,
    /// One minimum per permutation (empty when near-duplicate search is off or there are no words).
    pub minhash: Vec<u64>,
}

/// The dedup stage: the permutations and the index of kept records.
pub struct Deduper {
    cfg: DedupConfig,
    a: Vec<u64>,
    b: Vec<u64>,
    exact: HashMap<u128, Origin, BuildHasherDefault<PreHashed>>,
    buckets: HashMap<u64, u32, BuildHasherDefault<PreHashed>>,
    sketches: Vec<u8>,
    kept: Vec<Origin>,
}

/// NFKC, lower case, runs of whitespace made one space, trimmed.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.nfkc().flat_map(char::to_lowercase) {
        if c.is_whitespace() {
            space = !out.is_empty();
        } else {
            if space {
                out.push(' ');
                space = false;
            }
            out.push(c);
        }
    }
    out
}

/// 64-bit FNV-1a followed by the SplitMix64 finaliser: a stable hash (the standard
/// library's may change between releases, and outputs must not).
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `(a·x + b) mod (2^61 − 1)`.
fn perm(a: u64, b: u64, x: u64) -> u64 {
    let v = u128::from(a) * u128::from(x) + u128::from(b);
    let r = ((v & u128::from(P)) + (v >> 61)) as u64;
    let r = (r & P) + (r >> 61);
    if r >= P { r - P } else { r }
}

impl Deduper {
    /// An empty index with seeded permutations.
    pub fn new(cfg: &DedupConfig) -> Deduper {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        let a = (0..cfg.permutations).map(|_| rng.random_range(1..P)).collect();
        let b = (0..cfg.permutations).map(|_| rng.random_range(0..P)).collect();
        Deduper {
            cfg: cfg.clone(),
            a,
            b,
            exact: HashMap::default(),
            buckets: HashMap::default(),
            sketches: Vec::new(),
            kept: Vec::new(),
        }
    }

    /// Hashes of `text`'s word shingles (the words of its normalised form, `shingle_size` at
    /// a time; one shingle of all words when there are fewer).
    pub fn shingles(&self, normalised: &str) -> Vec<u64> {
        let words: Vec<&str> = normalised.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
        if words.is_empty() {
            return Vec::new();
        }
        let k = self.cfg.shingle_size.min(words.len());
        let mut out: Vec<u64> = words.windows(k).map(|w| hash64(w.join(" ").as_bytes()) % P).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The record's signature (pure: run it on any thread).
    pub fn signature(&self, text: &str) -> Signature {
        let norm = normalise(text);
        let digest = Sha256::digest(norm.as_bytes());
        let exact = u128::from_le_bytes(digest[..16].try_into().expect("16 bytes"));
        let mut minhash = Vec::new();
        if self.cfg.near {
            let sh = self.shingles(&norm);
            if !sh.is_empty() {
                minhash = self.a.iter().zip(&self.b).map(|(&a, &b)| sh.iter().map(|&x| perm(a, b, x)).min().expect("non-empty")).collect();
            }
        }
        Signature { exact, minhash }
    }

    /// Jaccard similarity estimated from two 8-bit sketches: a share `f` of equal bytes means
    /// `J ≈ (f − 1/256) / (1 − 1/256)` (unequal minima still agree by chance one time in 256).
    pub fn estimate(x: &[u8], y: &[u8]) -> f64 {
        let equal = x.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / x.len().max(1) as f64;
        ((equal - 1.0 / 256.0) / (1.0 - 1.0 / 256.0)).max(0.0)
    }

    fn band_keys(&self, minhash: &[u64]) -> Vec<u64> {
        let rows = self.cfg.permutations / self.cfg.bands;
        minhash
            .chunks(rows)
            .enumerate()
            .map(|(band, vals)| {
                let mut h = mix64(band as u64 + 1);
                for v in vals {
                    h = mix64(h ^ v.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                }
                h
            })
            .collect()
    }

    /// Whether the record duplicates one kept earlier (then the rejection), else records it as
    /// kept. Call in input order.
    pub fn check(&mut self, sig: &Signature, origin: Origin) -> Option<Reject> {
        if self.cfg.exact {
            if let Some(first) = self.exact.get(&sig.exact) {
                return Some(Reject {
                    stage: Stage::Dedup,
                    reason: "exact_duplicate",
                    detail: "same normalised text".into(),
                    duplicate_of: Some(*first),
                });
            }
        }
        let mut keys = Vec::new();
        if self.cfg.near && !sig.minhash.is_empty() {
            keys = self.band_keys(&sig.minhash);
            let sketch: Vec<u8> = sig.minhash.iter().map(|v| *v as u8).collect();
            let mut candidates: Vec<u32> = keys.iter().filter_map(|k| self.buckets.get(k).copied()).collect();
            candidates.sort_unstable();
            candidates.dedup();
            let n = self.cfg.permutations;
            let best = candidates
                .into_iter()
                .map(|c| (c, Self::estimate(&sketch, &self.sketches[c as usize * n..(c as usize + 1) * n])))
                .filter(|(_, j)| *j >= self.cfg.threshold)
                .fold(None, |best: Option<(u32, f64)>, (c, j)| match best {
                    Some((_, bj)) if bj >= j => best,
                    _ => Some((c, j)),
                });
            if let Some((c, j)) = best {
                return Some(Reject {
                    stage: Stage::Dedup,
                    reason: "near_duplicate",
                    detail: format!("estimated Jaccard similarity {j:.2}"),
                    duplicate_of: Some(self.kept[c as usize]),
                });
            }
            let id = u32::try_from(self.kept.len()).expect("fewer than 2^32 kept records");
            self.sketches.extend(sketch);
            for k in &keys {
                self.buckets.entry(*k).or_insert(id);
            }
        }
        if self.cfg.exact {
            self.exact.insert(sig.exact, origin);
        }
        if !keys.is_empty() {
            self.kept.push(origin);
        }
        None
    }
}

/// A hasher for keys that are hashes already: it keeps their bits.
#[derive(Default)]
pub struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = hash64(bytes) ^ self.0.rotate_left(5);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
    fn write_u128(&mut self, v: u128) {
        self.0 ^= (v as u64) ^ ((v >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(line: u64) -> Origin {
        Origin { source: 0, line }
    }

    #[test]
    fn normalising_and_the_permutation_arithmetic() {
        assert_eq!(normalise("  Ｈｅｌｌｏ\t\n WORLD  "), "hello world");
        // (3·(P−1) + 5) mod P = (−3 + 5) mod P = 2
        assert_eq!(perm(3, 5, P - 1), 2);
        assert_eq!(perm(1 << 40, 0, 1 << 40), (1u128 << 80).rem_euclid(P as u128) as u64);
        assert_eq!(Deduper::estimate(&[1, 2, 3, 4], &[1, 2, 3, 4]), 1.0);
        assert!((Deduper::estimate(&[1, 2, 3, 4], &[1, 2, 9, 9]) - (0.5 - 1.0 / 256.0) / (255.0 / 256.0)).abs() < 1e-12);
    }

    #[test]
    fn exact_duplicates_differ_only_in_case_and_spacing() {
        let mut d = Deduper::new(&DedupConfig { near: false, ..DedupConfig::default() });
        let s1 = d.signature("The cat sat on the mat.");
        assert_eq!(d.check(&s1, o(1)), None);
        let r = d.check(&d.signature("the  CAT sat on the mat."), o(2)).unwrap();
        assert_eq!((r.reason, r.duplicate_of), ("exact_duplicate", Some(o(1))));
        assert_eq!(d.check(&d.signature("The cat sat on the hat."), o(3)), None);
    }

    #[test]
    fn planted_near_duplicates_are_found_and_different_texts_are_not() {
        let base: Vec<String> = (0..60).map(|i| format!("word{i}")).collect();
        let text = base.join(" ");
        let mut near = base.clone();
        near[30] = "changed".into(); // one word of 60: 5 of 56 shingles change, J = 51/61 ≈ 0.84
        let other: Vec<String> = (0..60).map(|i| format!("other{i}")).collect();
        let mut half = base.clone();
        for w in half.iter_mut().skip(20).step_by(4) {
            *w = "x".into(); // every 4th word from 20 on: most shingles change
        }
        let mut d = Deduper::new(&DedupConfig { exact: false, ..DedupConfig::default() });
        assert_eq!(d.check(&d.signature(&text), o(1)), None);
        let r = d.check(&d.signature(&near.join(" ")), o(2)).unwrap();
        assert_eq!((r.reason, r.duplicate_of), ("near_duplicate", Some(o(1))));
        assert_eq!(d.check(&d.signature(&other.join(" ")), o(3)), None);
        assert_eq!(d.check(&d.signature(&half.join(" ")), o(4)), None);
        // An exact copy is a near duplicate too when exact matching is off.
        assert_eq!(d.check(&d.signature(&text), o(5)).unwrap().duplicate_of, Some(o(1)));
    }
}
