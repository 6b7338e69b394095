//! The reward plugins of an RL run, scored together: each plugin's scores times its weight,
//! summed per completion.

use crate::plugins::reward::{RewardPlugin, RewardSample};
use anyhow::Result;

/// The reward plugins of a run with their weights.
pub struct Rewards {
    pub plugins: Vec<(RewardPlugin, f64)>,
}

impl Rewards {
    /// Weighted sum of every plugin's scores, and each plugin's mean score.
    pub fn score(&mut self, samples: &[RewardSample]) -> Result<(Vec<f64>, Vec<(String, f64)>)> {
        let mut total = vec![0.0; samples.len()];
        let mut means = Vec::new();
        for (p, w) in &mut self.plugins {
            let s = p.score(samples)?;
            for (t, x) in total.iter_mut().zip(&s) {
                *t += *w * f64::from(*x);
            }
            means.push((format!("reward/{}", p.name), s.iter().map(|&x| f64::from(x)).sum::<f64>() / s.len().max(1) as f64));
        }
        Ok((total, means))
    }
}
