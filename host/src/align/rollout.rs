//! Rollouts: a group of completions of one prompt, sampled from the current policy in one
//! batch on the serving engine's paged KV cache (the prompt prefilled once, its blocks shared
//! by every row), and the token-level log-probs and hidden states of (prompt, completion)
//! batches.

use crate::data::tokenize::IGNORE;
use crate::data::{batch, Batch, TokenizedExample};
use crate::model::generate::sampling::{self, RowRequest, RowSampling};
use crate::model::generate::GenerateOptions;
use crate::model::{CausalLm, TextTokenizer};
use crate::serve::paged::{KvPool, PoolConfig, SeqKv};
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
///
/// Runs on the serving engine's paged KV cache ([`crate::serve::paged`]): the prompt is
/// prefilled once and its blocks shared by every row, and a row that stops leaves the batch.
/// Tokens are drawn on the model's device ([`sampling`]): only the ids come back each step.
pub fn sample_group(model: &CausalLm, tok: &TextTokenizer, prompt: &[i64], group: usize, opts: &GenerateOptions) -> Result<Vec<Completion>, crate::model::ModelError> {
    let _g = tch::no_grad_guard();
    let mut ids: Vec<Vec<i64>> = vec![Vec::new(); group];
    if group > 0 && !prompt.is_empty() && opts.max_new_tokens > 0 {
        let block_size = 16;
        // The prompt's blocks, then each row's own: a copy of the prompt's partial block and its
        // new tokens.
        let per_row = opts.max_new_tokens.div_ceil(block_size) + 1;
        let blocks = prompt.len().div_ceil(block_size) + group * per_row;
        let mut pool = KvPool::new(model, PoolConfig { block_size, blocks });
        let mut shared = SeqKv::default();
        let first = pool.forward(model, &mut [&mut shared], &[prompt.to_vec()]);
        let mut kvs: Vec<SeqKv> = (0..group).map(|_| pool.share(&shared, 0)).collect();
        pool.release(&mut shared);
        // Every row starts from the prompt's last logits.
        let mut logits = first.expand([group as i64, -1], false);
        let mut live: Vec<usize> = (0..group).collect();
        for step in 0..opts.max_new_tokens {
            let rows: Vec<RowRequest> = live
                .iter()
                .map(|&r| RowRequest { sampling: RowSampling { seed: opts.seed.wrapping_add(r as u64), ..RowSampling::new(opts, ids[r].len()) }, ..RowRequest::default() })
                .collect();
            let draws = sampling::sample(&logits, &rows)?;
            live = live
                .into_iter()
                .zip(draws)
                .filter_map(|(r, d)| {
                    ids[r].push(i64::from(d.id));
                    (!opts.stop_ids.contains(&d.id)).then_some(r)
                })
                .collect();
            if live.is_empty() || step + 1 == opts.max_new_tokens {
                break;
            }
            let next: Vec<Vec<i64>> = live.iter().map(|&r| vec![*ids[r].last().expect("a sampled token")]).collect();
            let mut rows: Vec<&mut SeqKv> = kvs.iter_mut().enumerate().filter(|(r, _)| live.contains(r)).map(|(_, kv)| kv).collect();
            logits = pool.forward(model, &mut rows, &next);
        }
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
