//! The next token of every sequence in a step, drawn on the device in one batch
//! ([`crate::model::generate::sampling`]): each row's penalties, its `response_format` mask
//! (llguidance's bitset, one bit a token) and its settings go to the device; only the ids and
//! the log-probabilities a request asked for come back.

use super::{Seq, TokenLogprob};
use crate::model::generate::sampling::{self, Draw, RowRequest, RowSampling};
use crate::model::TextTokenizer;
use tch::Tensor;

/// What `seq`'s next draw needs: OpenAI's penalties from its counts, the tokens its constraint
/// allows now, its settings at its position (its own seed; the number of tokens it generated
/// so far is the step, so a preempted and resumed sequence draws on as it would have).
fn row_request(seq: &mut Seq) -> Result<RowRequest, String> {
    let p = seq.req.penalties;
    let penalties = if p.presence != 0.0 || p.frequency != 0.0 { seq.counts.iter().map(|(&t, &c)| (t, c as f32 * p.frequency + p.presence)).collect() } else { Vec::new() };
    let allowed = match &mut seq.req.matcher {
        Some(m) => Some(m.compute_mask().map_err(|e| format!("structured output: {e:#}"))?.as_slice().to_vec()),
        None => None,
    };
    Ok(RowRequest { sampling: RowSampling::new(&seq.req.opts, seq.ids.len()), penalties, allowed, logprobs: seq.req.logprobs })
}

/// The next token of each of `seqs` from its row of `logits` (`[seqs.len(), vocab]`, on the
/// model's device), with its log-probability entry when the request asked for one; an error
/// for a row whose constraint failed, or for every row when libtorch failed.
pub(super) fn next_tokens(tok: &TextTokenizer, logits: &Tensor, seqs: &mut [Seq]) -> Vec<Result<(u32, Option<TokenLogprob>), String>> {
    // A row whose constraint failed is drawn greedily, unconstrained, and the draw discarded.
    let mut failed: Vec<Option<String>> = Vec::with_capacity(seqs.len());
    let rows: Vec<RowRequest> = seqs
        .iter_mut()
        .map(|s| {
            let r = row_request(s);
            failed.push(r.as_ref().err().cloned());
            r.unwrap_or_default()
        })
        .collect();
    let drawn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sampling::sample(logits, &rows)))
        .map_err(|_| "sampling failed (libtorch error; see the server log)".to_owned())
        .and_then(|r| r.map_err(|e| format!("sampling: {e}")));
    let draws = match drawn {
        Ok(d) => d,
        Err(e) => return seqs.iter().map(|_| Err(e.clone())).collect(),
    };
    failed.into_iter().zip(draws).map(|(err, d)| err.map_or_else(|| Ok((d.id, entry(tok, &d))), Err)).collect()
}

/// A draw's log-probabilities with the tokens' text, when it has them.
fn entry(tok: &TextTokenizer, d: &Draw) -> Option<TokenLogprob> {
    let lp = d.logprobs.as_ref()?;
    let text = |id: u32| tok.decode(&[id], false);
    Some(TokenLogprob { token: text(d.id), logprob: lp.logprob, top: lp.top.iter().map(|&(id, l)| (text(id), l)).collect() })
}
