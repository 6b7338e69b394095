//! Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k,
//! top-p), stopping at stop tokens, streaming text as it is decoded.
//!
//! Sampling draws from ftx's own seeded generator on CPU-side probabilities, so a seed gives
//! the same text on CPU and GPU.

use super::{CausalLm, KvCache, TextTokenizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// Decoding settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0 = off).
    pub top_p: f64,
    pub seed: u64,
    /// Ids that end generation (they are not emitted).
    pub stop_ids: Vec<u32>,
    /// Strings that end generation (the text stops before them).
    pub stop_strings: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token or stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// The new tokens, their text, and why it stopped.
#[derive(Debug, Clone)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
}

/// Picks the next token from `logits [vocab]` (fp32 on CPU).
pub struct Sampler {
    opts: GenerateOptions,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(opts: &GenerateOptions) -> Sampler {
        Sampler { opts: opts.clone(), rng: ChaCha8Rng::seed_from_u64(opts.seed) }
    }

    pub fn next(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            best as u32
        };
        if self.opts.temperature <= 0.0 {
            return argmax();
        }
        let t = self.opts.temperature as f32;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.opts.top_k > 0 {
            cand.truncate(self.opts.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.opts.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    acc += p;
                    acc as f64 >= self.opts.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut r: f32 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return cand[i].0;
            }
            r -= p;
        }
        cand[probs.len() - 1].0
    }
}

/// Continues `prompt` and calls `on_text` with each new piece of text as it is decoded.
pub fn generate(
    model: &CausalLm,
    tok: &TextTokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, super::ModelError> {
    let _guard = tch::no_grad_guard();
    let mut cache = KvCache::new(&model.config);
    let mut sampler = Sampler::new(opts);
    let mut ids: Vec<u32> = Vec::new();
    let mut emitted = 0usize; // bytes of `text` already passed to on_text
    let mut input: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut stop = StopReason::Length;
    let mut text = String::new();
    for _ in 0..opts.max_new_tokens {
        let x = Tensor::from_slice(&input).to_device(model.device).unsqueeze(0);
        let logits = model.forward(&x, Some(&mut cache));
        let last = logits.select(1, -1).squeeze_dim(0).to_kind(Kind::Float).to_device(tch::Device::Cpu);
        let v: Vec<f32> = Vec::<f32>::try_from(&last)?;
        let next = sampler.next(&v);
        if opts.stop_ids.contains(&next) {
            stop = StopReason::Stop;
            break;
        }
        ids.push(next);
        text = tok.decode(&ids, true);
        if let Some(cut) = opts.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
            stop = StopReason::Stop;
        }
        // Only what later tokens cannot change (see TextTokenizer::decode_stable).
        let ready = if stop == StopReason::Stop { text.clone() } else { tok.decode_stable(&ids, true) };
        if ready.len() > emitted && ready.is_char_boundary(emitted) {
            on_text(&ready[emitted..]);
            emitted = ready.len();
        }
        if stop == StopReason::Stop {
            break;
        }
        input = vec![next as i64];
    }
    if let Some(rest) = text.get(emitted..).filter(|r| !r.is_empty()) {
        on_text(rest);
    }
    Ok(Generation { ids, text, stop })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(&GenerateOptions::default());
        assert_eq!(s.next(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_even_when_sampling() {
        let opts = GenerateOptions { temperature: 1.5, top_k: 1, ..Default::default() };
        let mut s = Sampler::new(&opts);
        for _ in 0..20 {
            assert_eq!(s.next(&[0.0, 1.0, 0.5]), 1);
        }
    }

    #[test]
    fn top_p_drops_the_tail_and_sampling_follows_the_distribution() {
        // Probabilities 0.5, 0.3, 0.2 (logits = ln p): top_p 0.75 keeps the first two only.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let opts = GenerateOptions { temperature: 1.0, top_p: 0.75, seed: 7, ..Default::default() };
        let mut s = Sampler::new(&opts);
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            counts[s.next(&logits) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let frac0 = counts[0] as f64 / 4000.0; // expected 0.5 / 0.8 = 0.625
        assert!((frac0 - 0.625).abs() < 0.03, "{frac0}");
    }

    #[test]
    fn same_seed_same_draws() {
        let opts = GenerateOptions { temperature: 1.0, seed: 42, ..Default::default() };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = { let mut s = Sampler::new(&opts); (0..30).map(|_| s.next(&logits)).collect() };
        let b: Vec<u32> = { let mut s = Sampler::new(&opts); (0..30).map(|_| s.next(&logits)).collect() };
        assert_eq!(a, b);
    }
}
