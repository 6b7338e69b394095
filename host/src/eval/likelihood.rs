//! Scores read off the model's next-token distribution, without generating: perplexity on
//! held-out data (the loss training takes, on the tokens training scores) and
//! multiple-choice accuracy by log-likelihood, as lm-evaluation-harness computes it.

use super::spec::PerplexitySpec;
use super::tasks::ChoiceSample;
use super::EvalError;
use crate::data::{batch, read_examples, Tokenizing};
use crate::model::{CausalLm, TextTokenizer};
use serde::Serialize;
use tch::{Kind, Tensor};

/// Perplexity of a held-out set.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    /// Records scored.
    pub examples: usize,
    /// Target tokens scored.
    pub n_targets: i64,
    /// Summed negative log-likelihood (nats).
    pub nll_sum: f64,
    /// Mean NLL per target token: the loss `ftx train` reports for validation.
    pub mean_nll: f64,
    /// exp(mean NLL).
    pub perplexity: f64,
}

/// The pad id training uses: the tokenizer's pad token, else 0.
pub fn pad_id(tok: &TextTokenizer) -> i64 {
    tok.pad_token.as_deref().and_then(|p| tok.token_id(p)).unwrap_or(0) as i64
}

/// Reads and tokenizes the held-out records (the way training does) before any model runs.
pub fn prepare_perplexity(tok: &TextTokenizer, spec: &PerplexitySpec, limit: Option<usize>) -> Result<Vec<crate::data::TokenizedExample>, EvalError> {
    let mut examples = read_examples(&spec.data, spec.format)?;
    examples.truncate(limit.unwrap_or(usize::MAX));
    let tz = Tokenizing { tok, max_len: spec.max_seq_len, train_on_inputs: false };
    examples
        .iter()
        .enumerate()
        .map(|(i, ex)| tz.example(ex).map_err(|p| EvalError::Other(format!("{}: record {}: {p}", spec.data.display(), i + 1))))
        .collect()
}

/// Perplexity of `model` on tokenized examples, `batch_size` padded rows a forward pass;
/// `progress` gets the number of examples done after each batch.
pub fn perplexity(model: &CausalLm, data: &[crate::data::TokenizedExample], batch_size: usize, pad: i64, mut progress: impl FnMut(usize)) -> Perplexity {
    let (mut nll_sum, mut n_targets) = (0.0, 0);
    for chunk in data.chunks(batch_size.max(1)) {
        let rows: Vec<_> = chunk.iter().collect();
        let (s, n) = crate::train::step::eval_loss(model, std::iter::once(batch::pad(&rows, pad).to(model.device)));
        nll_sum += s;
        n_targets += n;
        progress(chunk.len());
    }
    let mean_nll = nll_sum / n_targets.max(1) as f64;
    Perplexity { examples: data.len(), n_targets, nll_sum, mean_nll, perplexity: mean_nll.exp() }
}

/// One question's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceOutcome {
    /// Summed log-probability of each choice's continuation given the context.
    pub loglik: Vec<f64>,
    /// The choice with the highest log-likelihood.
    pub pred: usize,
    /// The choice with the highest log-likelihood per character of the choice.
    pub pred_norm: usize,
    pub gold: usize,
}

/// Accuracy of a multiple-choice task.
#[derive(Debug, Clone, Serialize)]
pub struct ChoiceScores {
    pub n: usize,
    /// Share of questions whose most likely choice is the right one.
    pub acc: f64,
    /// The same with log-likelihoods divided by the choices' character lengths.
    pub acc_norm: f64,
}

/// Context and continuation ids of one choice, split as the harness splits them: trailing
/// spaces of the context move to the continuation, the two are encoded together, and the
/// continuation is what follows the context's own encoding.
pub fn split_ids(tok: &TextTokenizer, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>), String> {
    let stripped = context.trim_end_matches(' ');
    let continuation = format!("{}{continuation}", &context[stripped.len()..]);
    let whole = tok.encode(&format!("{stripped}{continuation}"), true).map_err(|e| e.to_string())?;
    let ctx = tok.encode(stripped, true).map_err(|e| e.to_string())?;
    if ctx.is_empty() {
        return Err("the context is empty and the tokenizer adds no BOS: nothing to condition on".into());
    }
    if whole.len() <= ctx.len() {
        return Err("a choice encodes to no tokens".into());
    }
    Ok((whole[..ctx.len()].to_vec(), whole[ctx.len()..].to_vec()))
}

/// The first index of the largest value (numpy's argmax, which the harness uses).
fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// Log-likelihoods of every choice of every question, `batch_size` sequences a forward pass;
/// `progress` gets the number of questions finished after each batch.
pub fn multiple_choice(
    model: &CausalLm,
    tok: &TextTokenizer,
    samples: &[ChoiceSample],
    delimiter: &str,
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<(ChoiceScores, Vec<ChoiceOutcome>), String> {
    let _g = tch::no_grad_guard();
    let max_len = model.config.max_positions.max(2) as usize;
    // (question, choice, ids, first continuation index in ids); contexts that are too long
    // lose their oldest tokens, as in the harness.
    let mut requests = Vec::new();
    for (q, s) in samples.iter().enumerate() {
        for (c, choice) in s.choices.iter().enumerate() {
            let (ctx, cont) = split_ids(tok, &s.context, &format!("{delimiter}{choice}")).map_err(|e| format!("line {}: choice {c}: {e}", s.line))?;
            let mut ids: Vec<i64> = ctx.iter().chain(&cont).map(|&i| i64::from(i)).collect();
            ids.pop(); // the last token is only predicted
            let mut first = ctx.len();
            if ids.len() > max_len {
                let drop = ids.len() - max_len;
                if drop >= first {
                    return Err(format!("line {}: choice {c} alone is longer than the model's {max_len} positions", s.line));
                }
                ids.drain(..drop);
                first -= drop;
            }
            requests.push((q, c, ids, first, cont));
        }
    }
    let mut loglik: Vec<Vec<f64>> = samples.iter().map(|s| vec![0.0; s.choices.len()]).collect();
    let pad = pad_id(tok);
    let mut done_q = 0;
    for chunk in requests.chunks(batch_size.max(1)) {
        let t = chunk.iter().map(|r| r.2.len()).max().unwrap_or(1);
        let (mut ids, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (_, _, seq, first, cont) in chunk {
            ids.extend(seq.iter().copied().chain(std::iter::repeat_n(pad, t - seq.len())));
            // Position p predicts token p + 1: the continuation's j-th token is read at first + j - 1.
            let mut tg = vec![0i64; t];
            let mut m = vec![0f64; t];
            for (j, &tok_id) in cont.iter().enumerate() {
                tg[first + j - 1] = i64::from(tok_id);
                m[first + j - 1] = 1.0;
            }
            targets.extend(tg);
            mask.extend(m);
        }
        let b = chunk.len() as i64;
        let dev = model.device;
        let x = Tensor::from_slice(&ids).view([b, t as i64]).to_device(dev);
        let tg = Tensor::from_slice(&targets).view([b, t as i64, 1]).to_device(dev);
        let m = Tensor::from_slice(&mask).view([b, t as i64]).to_device(dev);
        let logp = model.forward(&x, None).log_softmax(-1, Kind::Float);
        let ll = (logp.gather(2, &tg, false).squeeze_dim(-1).to_kind(Kind::Double) * m).sum_dim_intlist([-1i64].as_slice(), false, Kind::Double);
        let ll = Vec::<f64>::try_from(ll.to_device(tch::Device::Cpu)).map_err(|e| e.to_string())?;
        for ((q, c, ..), v) in chunk.iter().zip(ll) {
            loglik[*q][*c] = v;
        }
        let finished = chunk.last().map_or(0, |r| if r.1 + 1 == samples[r.0].choices.len() { r.0 + 1 } else { r.0 });
        progress(finished - done_q);
        done_q = finished;
    }
    let outcomes: Vec<ChoiceOutcome> = samples
        .iter()
        .zip(loglik)
        .map(|(s, ll)| {
            let norm: Vec<f64> = ll.iter().zip(&s.choices).map(|(l, c)| l / c.chars().count().max(1) as f64).collect();
            ChoiceOutcome { pred: argmax(&ll), pred_norm: argmax(&norm), gold: s.gold, loglik: ll }
        })
        .collect();
    let n = outcomes.len().max(1) as f64;
    let scores = ChoiceScores {
        n: outcomes.len(),
        acc: outcomes.iter().filter(|o| o.pred == o.gold).count() as f64 / n,
        acc_norm: outcomes.iter().filter(|o| o.pred_norm == o.gold).count() as f64 / n,
    };
    Ok((scores, outcomes))
}
