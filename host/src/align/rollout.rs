//! Rollouts: a group of completions of one prompt, sampled from the current policy in one
//! batch with a KV cache (every row shares the prompt, so none needs padding), and the
//! token-level log-probs and hidden states of (prompt, completion) batches.

use crate::data::tokenize::IGNORE;
use crate::data::{batch, Batch, TokenizedExample};
use crate::model::generate::{GenerateOptions, Sampler};
use crate::model::{CausalLm, KvCache, TextTokenizer};
use tch::{Device, Kind, Tensor};

/// One sampled completion.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Its tokens, the stop token included when it stopped (the policy learns to stop).
    pub ids: Vec<i64>,
    /// Its text (without the stop token).
    pub text: String,
}

/// Samples `group` completions of `prompt` in one batch; row `i` draws with seed `opts.seed + i`.
pub fn sample_group(model: &CausalLm, tok: &TextTokenizer, prompt: &[i64], group: usize, opts: &GenerateOptions) -> Result<Vec<Completion>, crate::model::ModelError> {
    let _g = tch::no_grad_guard();
    let mut cache = KvCache::new(&model.config);
    let mut samplers: Vec<Sampler> = (0..group).map(|i| Sampler::new(&GenerateOptions { seed: opts.seed.wrapping_add(i as u64), ..opts.clone() })).collect();
    let mut ids: Vec<Vec<i64>> = vec![Vec::new(); group];
    let mut done = vec![false; group];
    let mut input = Tensor::from_slice(prompt).to_device(model.device).unsqueeze(0).repeat([group as i64, 1]);
    for _ in 0..opts.max_new_tokens {
        let logits = model.forward(&input, Some(&mut cache));
        let last = logits.select(1, -1).to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
        let flat: Vec<f32> = Vec::<f32>::try_from(&last.view([-1]))?;
        let vocab = flat.len() / group;
        let mut next = Vec::with_capacity(group);
        for (r, row) in flat.chunks(vocab).enumerate() {
            if done[r] {
                // Finished rows keep decoding a filler token nobody reads.
                next.push(*ids[r].last().unwrap_or(&0));
                continue;
            }
            let t = samplers[r].next(row);
            ids[r].push(t as i64);
            done[r] = opts.stop_ids.contains(&t);
            next.push(t as i64);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_slice(&next).to_device(model.device).unsqueeze(1);
    }
    Ok(ids
        .into_iter()
        .map(|ids| {
            let text_ids: Vec<u32> = ids.iter().map(|&t| t as u32).filter(|t| !opts.stop_ids.contains(t)).collect();
            Completion { text: tok.decode(&text_ids, true), ids }
        })
        .collect())
}

/// A (prompt, completion) sequence whose targets are the completion's tokens.
pub fn sequence(prompt: &[i64], completion: &[i64]) -> TokenizedExample {
    let labels = std::iter::repeat_n(IGNORE, prompt.len()).chain(completion.iter().copied()).collect();
    TokenizedExample { ids: [prompt, completion].concat(), labels }
}

/// Where each row's completion log-probs sit in a padded batch of [`sequence`]s: the
/// positions that predict the completion tokens, `(start, len)`.
pub fn spans(seqs: &[&TokenizedExample]) -> Vec<(usize, usize)> {
    seqs.iter()
        .map(|s| {
            let prompt = s.labels.iter().take_while(|&&l| l == IGNORE).count();
            (prompt - 1, s.ids.len() - prompt)
        })
        .collect()
}

/// A padded batch of sequences on `device`.
pub fn pad(seqs: &[&TokenizedExample], pad_id: i64, device: Device) -> Batch {
    batch::pad(seqs, pad_id).to(device)
}

/// Token log-probs of the targets `[B, T]` (fp32; 0 where there is no target) and the last
/// hidden states `[B, T, hidden]`.
pub fn token_logps(model: &CausalLm, b: &Batch, train: bool) -> (Tensor, Tensor) {
    let inp = model.attn_inputs(&b.positions, |w| b.mask(w));
    let h = model.hidden(&b.input_ids, &inp, None, train);
    let logp = model.head(&h).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    let mask = b.targets.ne(IGNORE).to_kind(Kind::Float);
    let tok = logp.gather(2, &b.targets.clamp_min(0).unsqueeze(-1), false).squeeze_dim(-1) * mask;
    (tok, h)
}

/// Each row's values over its span, as numbers.
pub fn rows(t: &Tensor, spans: &[(usize, usize)]) -> Vec<Vec<f64>> {
    let t = t.detach().to_kind(Kind::Double).to_device(Device::Cpu);
    let width = t.size()[1] as usize;
    let flat: Vec<f64> = Vec::<f64>::try_from(&t.contiguous().view([-1])).expect("f64 tensor");
    spans.iter().enumerate().map(|(r, &(s, n))| flat[r * width + s..r * width + s + n].to_vec()).collect()
}

/// A `[B, width]` fp32 tensor holding `values[r]` over row r's span, 0 elsewhere.
pub fn place(values: &[&[f64]], spans: &[(usize, usize)], width: usize, device: Device) -> Tensor {
    let mut flat = vec![0f32; values.len() * width];
    for (r, (v, &(s, _))) in values.iter().zip(spans).enumerate() {
        for (k, x) in v.iter().enumerate() {
            flat[r * width + s + k] = *x as f32;
        }
    }
    Tensor::from_slice(&flat).view([values.len() as i64, width as i64]).to_device(device)
}
