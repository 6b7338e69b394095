//! Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k,
//! top-p), stopping at stop tokens, streaming text as it is decoded.
//!
//! Sampling runs on the model's device ([`sampling`]): only the chosen id comes back each step,
//! and a seed's draws depend only on the seed, the token's position and the logits, so a seed
//! gives the same text on the CPU and a GPU (as far as their logits agree).

use super::{CausalLm, KvCache, TextTokenizer};
use sampling::{RowRequest, RowSampling};
use tch::Tensor;

pub mod sampling;

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
    /// Seeds the draws: the k-th new token's depends only on (seed, k, the logits).
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
    let mut ids: Vec<u32> = Vec::new();
    let mut emitted = 0usize; // bytes of `text` already passed to on_text
    let mut input: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut stop = StopReason::Length;
    let mut text = String::new();
    for _ in 0..opts.max_new_tokens {
        let x = Tensor::from_slice(&input).to_device(model.device).unsqueeze(0);
        let logits = model.forward(&x, Some(&mut cache));
        let row = RowRequest { sampling: RowSampling::new(opts, ids.len()), ..RowRequest::default() };
        let next = sampling::sample(&logits.select(1, -1), &[row])?[0].id;
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
