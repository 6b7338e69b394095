//! Preemption when the paged KV cache runs out mid-decode, as vLLM's recompute preemption.
//!
//! Admission promises a request only its prompt's blocks and one per choice, so memory follows
//! the live tokens: running sequences take blocks as they grow. Before each decode step, when the
//! free blocks cannot cover every running sequence's next token, the most recently admitted work
//! is preempted until the step fits: its blocks are freed, and a decoding sequence goes back to
//! the head of the waiting line with everything it generated (text already sent, constraint
//! state, penalty counts; a seeded draw depends only on the seed and the token's position, so
//! sampling has no state to keep), a prompt still being prefilled back to the head of the
//! request queue. The oldest admitted work is never preempted and admission refuses a request
//! that could not run alone in the whole pool, so the oldest always progresses: no deadlock.
//!
//! Preempted sequences resume before anything new is admitted, by recomputing the positions they
//! had cached (prompt and generated tokens but the last) through chunked prefill; then each
//! feeds its last token as if nothing had happened, so a client sees no repeated or missing text
//! and a seeded sampler draws the same stream.

use super::{GenRequest, Prefill, PrefillJob, Seq};
use crate::serve::metrics::Metrics;
use crate::serve::paged::{KvPool, SeqKv};
use std::collections::VecDeque;

/// Blocks the next decode step takes beyond what the running sequences hold promised, minus the
/// pool's free, unpromised blocks: positive when that many must be freed first.
fn shortfall(pool: &KvPool, active: &[Seq]) -> isize {
    let need: usize = active.iter().map(|s| pool.blocks_to_append(&s.kv, 1).saturating_sub(s.kv.reserve)).sum();
    need as isize - pool.available() as isize
}

/// Preempts the most recently admitted work (a decoding sequence, or a prefill) until the next
/// decode step fits the pool. Decoding sequences go to the front of `preempted`, a request's
/// prompt being prefilled to the front of `waiting`; each preemption is counted in `metrics` by
/// stage (`decode`, `prefill`).
pub(super) fn make_room(pool: &mut KvPool, active: &mut Vec<Seq>, prefills: &mut VecDeque<Prefill>, waiting: &mut VecDeque<GenRequest>, preempted: &mut VecDeque<Seq>, metrics: &Metrics) {
    // One piece of work left always fits (admission refused what could not run alone).
    while shortfall(pool, active) > 0 && active.len() + prefills.len() > 1 {
        let newest_seq = (0..active.len()).max_by_key(|&i| (active[i].admitted, active[i].index));
        let newest_prefill = (0..prefills.len()).max_by_key(|&j| prefills[j].admitted);
        let prefill = match (newest_seq, newest_prefill) {
            (Some(i), Some(j)) => (prefills[j].admitted > active[i].admitted).then_some(j),
            (None, j) => j,
            (Some(_), None) => None,
        };
        if let Some(mut p) = prefill.and_then(|j| prefills.remove(j)) {
            metrics.preemptions.with_label_values(&["prefill"]).inc();
            tracing::debug!(admitted = p.admitted, prefilled = p.kv.len, "KV cache full: preempted a prefill");
            pool.release(&mut p.kv);
            match p.job {
                PrefillJob::Request(req) => waiting.push_front(req),
                PrefillJob::Resume { seq, .. } => preempted.push_front(*seq),
            }
        } else if let Some(i) = newest_seq {
            let mut seq = active.remove(i);
            metrics.preemptions.with_label_values(&["decode"]).inc();
            tracing::debug!(admitted = seq.admitted, choice = seq.index, cached = seq.kv.len, generated = seq.ids.len(), "KV cache full: preempted a sequence; it resumes by recomputing its cached tokens");
            pool.release(&mut seq.kv);
            preempted.push_front(seq);
        }
    }
}

/// Starts recomputing a preempted sequence when the pool can promise the blocks of what it had
/// cached and of its next token, keeping `headroom` more unpromised (one per running sequence,
/// for its next step); otherwise hands it back.
pub(super) fn resume(pool: &mut KvPool, seq: Seq, headroom: usize) -> Result<Prefill, Seq> {
    // What it had cached and its next token: the prompt and every generated token.
    let need = pool.blocks_for(seq.req.prompt.len() + seq.ids.len());
    if pool.available() < need + headroom || !pool.try_reserve(need) {
        return Err(seq);
    }
    let fed = seq.ids.len().saturating_sub(1);
    let tokens: Vec<u32> = seq.req.prompt.iter().chain(&seq.ids[..fed]).copied().collect();
    tracing::debug!(admitted = seq.admitted, choice = seq.index, recompute = tokens.len(), "resuming a preempted sequence");
    Ok(Prefill { kv: SeqKv { reserve: need, ..SeqKv::default() }, admitted: seq.admitted, job: PrefillJob::Resume { seq: Box::new(seq), tokens } })
}

/// A resumed sequence whose cached positions are recomputed into `kv` rejoins the running
/// batch; it feeds its last generated token next, as it would have without the preemption.
pub(super) fn rejoin(mut seq: Seq, kv: SeqKv, active: &mut Vec<Seq>) {
    seq.kv = kv;
    active.push(seq);
}
