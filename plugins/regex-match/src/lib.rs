//! 1.0 when the whole completion, trimmed, matches the reference read as a regular expression
//! (Rust `regex` syntax, anchored as `^(?:reference)$`, so `a|b` means exactly "a" or "b");
//! 0.0 otherwise, when the sample has no reference, or when the reference is not a valid
//! regex on its own (so `a)|(b` cannot escape the anchors) or compiles to more than 1 MiB. Matching is case-sensitive unless the pattern says
//! `(?i)`; it runs in linear time, so no pattern can hang the scorer. A batch compiles each
//! distinct reference once (GRPO groups share one).

use ftx_plugin_api::reward::{export_reward, Reward, Sample};
use regex::{Regex, RegexBuilder};
use std::collections::HashMap;

/// Largest compiled pattern.
const SIZE_LIMIT: usize = 1 << 20;

struct RegexMatch;

/// `^(?:r)$`, when `r` is a valid pattern on its own (so "a)|(b" cannot break out of the group).
fn anchored(r: &str) -> Option<Regex> {
    let build = |p: &str| RegexBuilder::new(p).size_limit(SIZE_LIMIT).build().ok();
    build(r)?;
    build(&format!("^(?:{r})$"))
}

impl Reward for RegexMatch {
    fn score(samples: Vec<Sample>) -> Vec<f32> {
        let mut compiled: HashMap<&str, Option<Regex>> = HashMap::new();
        samples
            .iter()
            .map(|s| {
                let Some(r) = s.reference.as_deref() else { return 0.0 };
                let re = compiled.entry(r).or_insert_with(|| anchored(r));
                match re {
                    Some(re) if re.is_match(s.completion.trim()) => 1.0,
                    _ => 0.0,
                }
            })
            .collect()
    }
}

export_reward!(RegexMatch);
