//! 1.0 when the completion, trimmed, equals the reference, trimmed (exactly: case and inner
//! whitespace count); 0.0 otherwise, and when the sample has no reference.

use ftx_plugin_api::reward::{export_reward, Reward, Sample};

struct ExactMatch;

impl Reward for ExactMatch {
    fn score(samples: Vec<Sample>) -> Vec<f32> {
        samples
            .iter()
            .map(|s| match &s.reference {
                Some(r) if r.trim() == s.completion.trim() => 1.0,
                _ => 0.0,
            })
            .collect()
    }
}

export_reward!(ExactMatch);
