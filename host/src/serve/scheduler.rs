//! The model thread: owns the model (tch tensors stay on one thread), takes jobs from a
//! bounded queue, and decodes every running sequence together.
//!
//! Keys and values live in a paged pool ([`super::paged`]): a request is admitted when the pool
//! can promise its prompt's blocks and one more per choice (otherwise it waits at the head of
//! the queue, and the bounded queue behind it answers 429 when full); sequences take blocks as
//! they grow, and when the pool runs out the most recently admitted ones are preempted and later
//! recomputed ([`preempt`]). Prompts are prefilled at
//! most `prefill_chunk` tokens per scheduler step (pieces of several prompts batched when they
//! fit), between the decode steps of the running sequences, so a long prompt never stalls the
//! streams already running. The `n`
//! choices of a request start from the prompt's shared blocks. Each step decodes every running
//! sequence in one batched forward, whatever adapter each uses: every projection applies each
//! row's own adapter ([`super::lora_rows`]).
//!
//! Adapters: each is attached once at load time, then its per-layer modules are moved out of
//! the model into a store; the model's projections carry row-routed views of every stored
//! adapter's factors.

use super::graphs::DecodeGraphs;
use super::lora_rows::AdapterStore;
use super::paged::{EngineOptions, KvPool, SeqKv};
use super::profile::{Phase, Profile};
use crate::model::decoder::LoadOptions;
use crate::model::generate::{GenerateOptions, StopReason};
use crate::model::{CausalLm, TextTokenizer};
use llguidance::Matcher;
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, RwLock};
use tch::Tensor;
use tokio::sync::{mpsc, oneshot};

mod preempt;
mod sample;

/// What a running request hears from the model thread; `index` is the choice (0..n).
#[derive(Debug)]
pub enum Event {
    /// The next piece of text.
    Text { index: usize, text: String },
    /// A sampled token's log-probability (sent before the text it produces).
    Logprob { index: usize, entry: TokenLogprob },
    /// This choice ended.
    Done { index: usize, prompt_tokens: usize, completion_tokens: usize, stop: StopReason },
    /// Generation failed.
    Error(String),
    /// The request can never run on this server (its prompt and max_tokens exceed the KV
    /// cache): a client error.
    Refused(String),
}

/// A token and its log-probability under the model (the log-softmax of its raw logits, before
/// penalties, temperature or constraints), with the most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// OpenAI's presence and frequency penalties, subtracted from the logits of tokens already
/// generated in this choice: `count × frequency + (count > 0) × presence`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Penalties {
    pub presence: f32,
    pub frequency: f32,
}

/// One generation request, already tokenised and checked.
pub struct GenRequest {
    /// Adapter name, `None` for the base model.
    pub adapter: Option<String>,
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    /// Structured-output constraint, if any.
    pub matcher: Option<Matcher>,
    pub events: mpsc::UnboundedSender<Event>,
    /// Choices; choice `i` samples with seed `opts.seed + i`.
    pub n: usize,
    /// `Some(k)`: report each token's log-probability and `k` alternatives.
    pub logprobs: Option<usize>,
    pub penalties: Penalties,
}

impl GenRequest {
    /// Choice `index`'s own copy: its seed, its own constraint state.
    fn fork(&self, index: usize) -> GenRequest {
        GenRequest {
            adapter: self.adapter.clone(),
            prompt: self.prompt.clone(),
            opts: GenerateOptions { seed: self.opts.seed.wrapping_add(index as u64), ..self.opts.clone() },
            matcher: self.matcher.as_ref().map(Matcher::deep_clone),
            events: self.events.clone(),
            n: 1,
            logprobs: self.logprobs,
            penalties: self.penalties,
        }
    }
}

/// Work for the model thread.
pub enum Job {
    Generate(GenRequest),
    /// Load a PEFT adapter folder under a name; the reply says whether it worked.
    LoadAdapter { name: String, path: PathBuf, reply: oneshot::Sender<Result<(), String>> },
    /// Drop a loaded adapter; refused while running sequences use it.
    UnloadAdapter { name: String, reply: oneshot::Sender<Result<(), String>> },
}

/// The names requests may use in `model`: the base first, then adapters in load order.
pub type ModelNames = Arc<RwLock<Vec<String>>>;

/// A sequence being decoded (one choice of a request).
struct Seq {
    req: GenRequest,
    index: usize,
    /// How often each token was generated so far (for the penalties).
    counts: HashMap<u32, u32>,
    kv: SeqKv,
    ids: Vec<u32>,
    text: String,
    /// Bytes of `text` already sent.
    emitted: usize,
    /// The token to feed next.
    last: u32,
    /// Admission order (the request's): preemption takes the highest first.
    admitted: u64,
}

/// Positions being prefilled, chunk by chunk: a new request's prompt, or what a preempted
/// sequence had cached, recomputed.
struct Prefill {
    job: PrefillJob,
    kv: SeqKv,
    /// Admission order: preemption takes the highest first.
    admitted: u64,
}

/// What a [`Prefill`] fills the cache for.
enum PrefillJob {
    /// A new request's prompt; `kv` also holds the promise of one block per choice, for its
    /// first step.
    Request(GenRequest),
    /// A preempted sequence: `tokens` are its prompt and generated tokens but the last (the one
    /// it feeds next).
    Resume { seq: Box<Seq>, tokens: Vec<u32> },
}

impl Prefill {
    /// The request it serves.
    fn req(&self) -> &GenRequest {
        match &self.job {
            PrefillJob::Request(req) => req,
            PrefillJob::Resume { seq, .. } => &seq.req,
        }
    }

    /// Every token to prefill (`kv.len` of them are in).
    fn tokens(&self) -> &[u32] {
        match &self.job {
            PrefillJob::Request(req) => &req.prompt,
            PrefillJob::Resume { tokens, .. } => tokens,
        }
    }
}

/// How the model thread is set up.
pub struct SchedulerConfig {
    pub model_dir: PathBuf,
    pub load: LoadOptions,
    pub adapters: Vec<(String, PathBuf)>,
    /// Most sequences decoded at once.
    pub max_batch: usize,
    pub metrics: Arc<super::metrics::Metrics>,
    pub engine: EngineOptions,
}

/// Loads the model and adapters, reports readiness on `ready`, then serves `jobs` until the
/// queue closes.
pub fn run(cfg: SchedulerConfig, tok: Arc<TextTokenizer>, names: ModelNames, jobs: Receiver<Job>, ready: std::sync::mpsc::Sender<Result<(), String>>) {
    let _guard = tch::no_grad_guard();
    let mut model = match CausalLm::load(&cfg.model_dir, cfg.load) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(format!("loading the model from {}: {e}", cfg.model_dir.display())));
            return;
        }
    };
    let mut store = AdapterStore::new();
    for (name, path) in &cfg.adapters {
        if let Err(e) = store.load(&mut model, name, path) {
            let _ = ready.send(Err(e));
            return;
        }
        names.write().unwrap_or_else(|e| e.into_inner()).push(name.clone());
    }
    let pool_cfg = cfg.engine.pool(model.config.max_positions, cfg.max_batch);
    let mut pool = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| KvPool::new(&model, pool_cfg))) {
        Ok(p) => p,
        Err(_) => {
            let tokens = pool_cfg.blocks * pool_cfg.block_size;
            let _ = ready.send(Err(format!("allocating the KV cache for {tokens} tokens failed (out of memory?): lower --kv-cache-tokens or --max-batch")));
            return;
        }
    };
    cfg.metrics.kv_blocks_total.set(pool.total() as i64);
    let mut graphs = DecodeGraphs::new(&model, cfg.max_batch, cfg.engine.cuda_graphs);
    let _ = ready.send(Ok(()));
    let chunk = cfg.engine.prefill_chunk.max(1);
    // Requests admitted next, in order, when the pool can promise their blocks (the front one
    // may be a prompt preempted while prefilling).
    let mut head: VecDeque<GenRequest> = VecDeque::new();
    // Preempted sequences, resumed before anything new is admitted.
    let mut preempted: VecDeque<Seq> = VecDeque::new();
    let mut admissions: u64 = 0;
    let mut prefills: VecDeque<Prefill> = VecDeque::new();
    let mut active: Vec<Seq> = Vec::new();
    let mut prof = Profile::from_env(model.device);
    loop {
        let mut sched = prof.begin();
        loop {
            let running = active.len() + prefills.iter().map(|p| p.req().n.max(1)).sum::<usize>();
            if let Some(seq) = preempted.pop_front() {
                if seq.req.events.is_closed() {
                    continue; // the client went away while it waited
                }
                let resumed = if running < cfg.max_batch.max(1) { preempt::resume(&mut pool, seq, active.len()) } else { Err(seq) };
                match resumed {
                    Ok(p) => prefills.push_back(p),
                    Err(seq) => {
                        preempted.push_front(seq);
                        break;
                    }
                }
                continue;
            }
            if let Some(req) = head.pop_front() {
                match admit(&mut pool, &store, req, active.len()) {
                    Admit::Start(mut p) => {
                        admissions += 1;
                        p.admitted = admissions;
                        prefills.push_back(p);
                    }
                    Admit::Wait(req) => {
                        head.push_front(req);
                        break;
                    }
                    Admit::Answered => {}
                }
                continue;
            }
            if running >= cfg.max_batch.max(1) {
                break;
            }
            // Block for work when idle; otherwise take what is waiting.
            let job = if running == 0 {
                let job = match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                };
                sched = prof.begin(); // waiting idle is no step's time
                job
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            };
            match job {
                Job::LoadAdapter { name, path, reply } => {
                    graphs.reset();
                    let r = store.load(&mut model, &name, &path);
                    if r.is_ok() {
                        names.write().unwrap_or_else(|e| e.into_inner()).push(name);
                    }
                    let _ = reply.send(r);
                }
                Job::UnloadAdapter { name, reply } => {
                    let uses = |a: &Option<String>| a.as_deref() == Some(name.as_str());
                    let busy = active.iter().chain(&preempted).filter(|s| uses(&s.req.adapter)).count() + prefills.iter().filter(|p| uses(&p.req().adapter)).count();
                    let r = if busy > 0 {
                        Err(format!("{busy} running sequence(s) use '{name}'; retry when they finish"))
                    } else if store.unload(&mut model, &name) {
                        graphs.reset();
                        names.write().unwrap_or_else(|e| e.into_inner()).retain(|n| *n != name);
                        Ok(())
                    } else {
                        Err(format!("'{name}' is not a loaded adapter"))
                    };
                    let _ = reply.send(r);
                }
                Job::Generate(req) => {
                    cfg.metrics.queue_depth.dec();
                    head.push_back(req);
                }
            }
        }
        report(&cfg.metrics, &pool, &active, &prefills);
        prof.end(Phase::Schedule, sched);
        if active.is_empty() && prefills.is_empty() {
            continue;
        }
        // One prompt chunk, then one decode step for everything running: a long prompt is
        // spread over several steps instead of stalling the running streams.
        let t = prof.begin();
        prefill_step(&model, &mut pool, &store, &tok, &mut prefills, chunk, &mut active);
        prof.end(Phase::Prefill, t);
        let t = prof.begin();
        preempt::make_room(&mut pool, &mut active, &mut prefills, &mut head, &mut preempted, &cfg.metrics);
        prof.end(Phase::Schedule, t);
        let rows = active.len();
        if !active.is_empty() {
            step_all(&model, &mut pool, &mut graphs, &store, &tok, &mut active, &mut prof);
        }
        // Again after the step, so an idle server reports its finished sequences as gone.
        let t = prof.begin();
        report(&cfg.metrics, &pool, &active, &prefills);
        prof.end(Phase::Schedule, t);
        prof.step(rows);
        prof.graphs(&graphs.stats);
    }
}

fn report(m: &super::metrics::Metrics, pool: &KvPool, active: &[Seq], prefills: &VecDeque<Prefill>) {
    m.batch_sequences.set(active.len() as i64);
    m.kv_cache_tokens.set((active.iter().map(|s| s.kv.len).sum::<usize>() + prefills.iter().map(|p| p.kv.len).sum::<usize>()) as i64);
    m.kv_blocks_used.set(pool.used() as i64);
}

impl Seq {
    fn new(req: GenRequest, index: usize, kv: SeqKv) -> Seq {
        Seq { req, index, counts: HashMap::new(), kv, ids: Vec::new(), text: String::new(), emitted: 0, last: 0, admitted: 0 }
    }
}

/// What admission did with a request.
enum Admit {
    /// Its blocks are promised; its prompt goes to prefill.
    Start(Prefill),
    /// The pool cannot promise its blocks yet.
    Wait(GenRequest),
    /// It was answered without running (an error, or nothing to generate).
    Answered,
}

/// Promises a request its prompt's blocks and one per choice for its first step, leaving
/// `headroom` blocks unpromised (one per running sequence, for its next step); refuses one that
/// could not run even alone in the whole pool.
fn admit(pool: &mut KvPool, store: &AdapterStore, req: GenRequest, headroom: usize) -> Admit {
    if let Some(a) = req.adapter.as_deref().filter(|a| !store.stored.contains_key(*a)) {
        // Unloaded while this request waited in the queue: never fall back to the base silently.
        let _ = req.events.send(Event::Error(format!("the adapter '{a}' was unloaded before this request started")));
        return Admit::Answered;
    }
    if req.opts.max_new_tokens == 0 {
        for i in 0..req.n {
            finish(&Seq::new(req.fork(i), i, SeqKv::default()), StopReason::Length);
        }
        return Admit::Answered;
    }
    if req.prompt.is_empty() {
        let _ = req.events.send(Event::Error("the prompt has no tokens".into()));
        return Admit::Answered;
    }
    let n = req.n.max(1);
    let (prompt, new) = (req.prompt.len(), req.opts.max_new_tokens);
    let start = pool.blocks_for(prompt) + n;
    // A choice running alone (the others preempted) holds its prompt and max_tokens − 1 tokens:
    // the last sampled token is never fed back.
    let alone = pool.blocks_for(prompt + new - 1).max(start);
    if alone > pool.total() {
        let msg = format!(
            "this request needs up to {alone} KV-cache blocks of {} tokens ({prompt} prompt tokens, max_tokens {new}, n {n}) but the server's pool holds {} blocks ({} tokens): lower max_tokens, or restart the server with a larger --kv-cache-tokens",
            pool.block_size,
            pool.total(),
            pool.total() * pool.block_size
        );
        let _ = req.events.send(Event::Refused(msg));
        return Admit::Answered;
    }
    if pool.available() < start + headroom || !pool.try_reserve(start) {
        return Admit::Wait(req);
    }
    Admit::Start(Prefill { job: PrefillJob::Request(req), kv: SeqKv { reserve: start, ..SeqKv::default() }, admitted: 0 })
}

/// Prefills up to `chunk` prompt tokens: the next piece of the first waiting prompt, batched
/// with the same-length next pieces of the prompts behind it while the budget lasts. A prompt
/// whose last piece is in starts its choices from its shared blocks and joins `active`.
fn prefill_step(model: &CausalLm, pool: &mut KvPool, store: &AdapterStore, tok: &TextTokenizer, prefills: &mut VecDeque<Prefill>, chunk: usize, active: &mut Vec<Seq>) {
    // Clients that went away while waiting give their blocks back.
    let mut k = 0;
    while k < prefills.len() {
        if prefills[k].req().events.is_closed() {
            if let Some(mut p) = prefills.remove(k) {
                pool.release(&mut p.kv);
            }
        } else {
            k += 1;
        }
    }
    let Some(front) = prefills.front() else { return };
    let t = chunk.min(front.tokens().len() - front.kv.len);
    let mut picked = vec![0];
    for (j, p) in prefills.iter().enumerate().skip(1) {
        if (picked.len() + 1) * t > chunk {
            break;
        }
        if p.tokens().len() - p.kv.len >= t {
            picked.push(j);
        }
    }
    let ids: Vec<Vec<i64>> = picked.iter().map(|&j| prefills[j].tokens()[prefills[j].kv.len..][..t].iter().map(|&x| x as i64).collect()).collect();
    let adapters: Vec<Option<String>> = picked.iter().map(|&j| prefills[j].req().adapter.clone()).collect();
    let out = {
        let mut kvs: Vec<&mut SeqKv> = prefills.iter_mut().enumerate().filter(|(j, _)| picked.contains(j)).map(|(_, p)| &mut p.kv).collect();
        forward_rows(model, pool, store, &mut kvs, &ids, &adapters, None)
    };
    let logits = match out {
        Ok(l) => l,
        Err(e) => {
            for &j in picked.iter().rev() {
                if let Some(mut p) = prefills.remove(j) {
                    let _ = p.req().events.send(Event::Error(e.clone()));
                    pool.release(&mut p.kv);
                }
            }
            return;
        }
    };
    // Last to first, so the indices still to visit stay valid.
    for (k, &j) in picked.iter().enumerate().rev() {
        if prefills[j].kv.len < prefills[j].tokens().len() {
            continue;
        }
        if let Some(p) = prefills.remove(j) {
            start_choices(pool, tok, p, &logits.get(k as i64), active);
        }
    }
}

/// The choices of a prefilled prompt: each takes its first token from the prompt's last logits
/// (`row`, `[vocab]` on the device; the choices drawn together) and a share of the prompt's
/// blocks; the running ones join `active`. A resumed sequence rejoins instead (its next token
/// is already chosen).
fn start_choices(pool: &mut KvPool, tok: &TextTokenizer, p: Prefill, row: &Tensor, active: &mut Vec<Seq>) {
    let (admitted, mut kv) = (p.admitted, p.kv);
    let req = match p.job {
        PrefillJob::Request(req) => req,
        PrefillJob::Resume { seq, .. } => return preempt::rejoin(*seq, kv, active),
    };
    let n = req.n.max(1);
    let mut choices: Vec<Seq> = (0..n)
        .map(|i| {
            // Each choice takes over one promised block, for its first step.
            kv.reserve = kv.reserve.saturating_sub(1);
            let mut seq = Seq::new(req.fork(i), i, pool.share(&kv, 1));
            seq.admitted = admitted;
            seq
        })
        .collect();
    pool.release(&mut kv);
    let drawn = sample::next_tokens(tok, &row.expand([n as i64, -1], false), &mut choices);
    let mut started = Vec::new();
    let mut failed = false;
    for (mut seq, d) in choices.into_iter().zip(drawn) {
        let r = if failed { Ok(false) } else { d.and_then(|(next, lp)| accept(&mut seq, tok, next, lp)) };
        match r {
            Ok(true) => started.push(seq),
            Ok(false) => pool.release(&mut seq.kv),
            Err(e) => {
                let _ = seq.req.events.send(Event::Error(e));
                pool.release(&mut seq.kv);
                failed = true;
            }
        }
    }
    if failed {
        // One failed choice fails the request: the others stop too.
        for mut s in started {
            pool.release(&mut s.kv);
        }
        return;
    }
    active.extend(started);
}

/// The pool's forward pass, with libtorch errors (panics in tch's infallible API) turned
/// into an error so the server stays alive.
fn forward(model: &CausalLm, pool: &mut KvPool, seqs: &mut [&mut SeqKv], ids: &[Vec<i64>]) -> Result<Tensor, String> {
    guarded(|| pool.forward(model, seqs, ids))
}

/// The pool's forward pass of rows that use `adapters` (logits `[rows, vocab]` in row order):
/// one batched forward with the rows routed to their adapters (a decode step through `graphs`
/// when given, which replays a captured CUDA graph where it can), or, where row routing cannot
/// reach an adapter (one of expert projections in a mixed batch), one forward per adapter.
pub(crate) fn forward_rows(
    model: &CausalLm,
    pool: &mut KvPool,
    store: &AdapterStore,
    seqs: &mut [&mut SeqKv],
    ids: &[Vec<i64>],
    adapters: &[Option<String>],
    graphs: Option<&mut DecodeGraphs>,
) -> Result<Tensor, String> {
    if !store.needs_one_adapter_per_forward(adapters) {
        store.plan.set(adapters, model.device);
        return match graphs {
            Some(g) => guarded(|| g.decode(pool, model, seqs, ids, adapters.iter().all(Option::is_none))),
            None => forward(model, pool, seqs, ids),
        };
    }
    let mut distinct: Vec<&Option<String>> = Vec::new();
    for a in adapters {
        if !distinct.contains(&a) {
            distinct.push(a);
        }
    }
    let mut slots: Vec<Option<&mut SeqKv>> = seqs.iter_mut().map(|s| Some(&mut **s)).collect();
    let (mut order, mut parts) = (Vec::new(), Vec::new());
    for a in distinct {
        let rows: Vec<usize> = (0..adapters.len()).filter(|&i| &adapters[i] == a).collect();
        store.plan.set(&vec![a.clone(); rows.len()], model.device);
        let mut group: Vec<&mut SeqKv> = rows.iter().map(|&i| slots[i].take().expect("each row once")).collect();
        let group_ids: Vec<Vec<i64>> = rows.iter().map(|&i| ids[i].clone()).collect();
        parts.push(forward(model, pool, &mut group, &group_ids)?);
        order.extend(rows);
    }
    // Back to row order: row i is at position `at[i]` of the concatenation.
    let mut at = vec![0i64; order.len()];
    for (pos, &i) in order.iter().enumerate() {
        at[i] = pos as i64;
    }
    let all = Tensor::cat(&parts, 0);
    Ok(all.index_select(0, &Tensor::from_slice(&at).to_device(all.device())))
}

/// `f`'s result, or an error for a libtorch error in it (a panic in tch's infallible API).
fn guarded(f: impl FnOnce() -> Tensor) -> Result<Tensor, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| "the forward pass failed (libtorch error; see the server log)".to_owned())
}

/// Takes `next` as the sequence's next token (`logprob`: its entry, when log-probabilities are
/// reported) and emits its text; false when the sequence is done.
fn accept(seq: &mut Seq, tok: &TextTokenizer, next: u32, logprob: Option<TokenLogprob>) -> Result<bool, String> {
    if seq.req.events.is_closed() {
        return Ok(false); // the client went away
    }
    let opts = &seq.req.opts;
    if opts.stop_ids.contains(&next) {
        finish(seq, StopReason::Stop);
        return Ok(false);
    }
    if let Some(entry) = logprob {
        let _ = seq.req.events.send(Event::Logprob { index: seq.index, entry });
    }
    *seq.counts.entry(next).or_default() += 1;
    if let Some(m) = &mut seq.req.matcher {
        m.consume_token(next).map_err(|e| format!("structured output: {e:#}"))?;
    }
    seq.ids.push(next);
    seq.last = next;
    seq.text = tok.decode(&seq.ids, true);
    let mut stop = None;
    if let Some(cut) = opts.stop_strings.iter().filter_map(|s| seq.text.find(s.as_str())).min() {
        seq.text.truncate(cut);
        stop = Some(StopReason::Stop);
    }
    // Hold back an incomplete UTF-8 tail (byte-level BPE splits characters) and an unfinished
    // run of byte-fallback pieces (SentencePiece; see TextTokenizer::decode_stable). Also hold
    // back what could be the start of a stop string: sent text cannot be unsent.
    // Without a trailing byte-fallback run the stable text is the text just decoded (less a
    // trailing U+FFFD, trimmed below): no second decode of the whole sequence.
    let stable = if stop.is_some() || tok.trailing_byte_pieces(&seq.ids) == 0 { Cow::Borrowed(seq.text.as_str()) } else { Cow::Owned(tok.decode_stable(&seq.ids, true)) };
    let ready = stable.trim_end_matches('\u{FFFD}');
    let hold = if stop.is_some() { 0 } else { opts.stop_strings.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0) };
    let mut limit = ready.len().saturating_sub(hold);
    while !ready.is_char_boundary(limit) {
        limit -= 1;
    }
    if limit > seq.emitted && ready.is_char_boundary(seq.emitted) {
        let _ = seq.req.events.send(Event::Text { index: seq.index, text: ready[seq.emitted..limit].to_owned() });
        seq.emitted = limit;
    }
    if stop.is_none() && seq.req.matcher.as_ref().is_some_and(|m| m.is_stopped()) {
        stop = Some(StopReason::Stop); // the document is complete and nothing may follow
    }
    if stop.is_none() && seq.ids.len() >= opts.max_new_tokens {
        stop = Some(StopReason::Length);
    }
    match stop {
        Some(s) => {
            finish(seq, s);
            Ok(false)
        }
        None => Ok(true),
    }
}

fn finish(seq: &Seq, stop: StopReason) {
    if let Some(rest) = seq.text.get(seq.emitted..).filter(|r| !r.is_empty()) {
        let _ = seq.req.events.send(Event::Text { index: seq.index, text: rest.to_owned() });
    }
    let _ = seq.req.events.send(Event::Done {
        index: seq.index,
        prompt_tokens: seq.req.prompt.len(),
        completion_tokens: seq.ids.len(),
        stop,
    });
}

/// One decode step for every running sequence in one batched forward, each row through its
/// own adapter.
fn step_all(model: &CausalLm, pool: &mut KvPool, graphs: &mut DecodeGraphs, store: &AdapterStore, tok: &TextTokenizer, active: &mut Vec<Seq>, prof: &mut Profile) {
    let t = prof.begin();
    let adapters: Vec<Option<String>> = active.iter().map(|s| s.req.adapter.clone()).collect();
    let ids: Vec<Vec<i64>> = active.iter().map(|s| vec![s.last as i64]).collect();
    let result = {
        let mut kvs: Vec<&mut SeqKv> = active.iter_mut().map(|s| &mut s.kv).collect();
        forward_rows(model, pool, store, &mut kvs, &ids, &adapters, Some(graphs))
    };
    prof.end(Phase::Forward, t);
    let t = prof.begin();
    // Every row's next token, drawn on the device: only the ids (and asked-for log-probs) come back.
    let drawn = match result {
        Ok(l) => sample::next_tokens(tok, &l, active),
        Err(e) => active.iter().map(|_| Err(e.clone())).collect(),
    };
    prof.end(Phase::Sample, t);
    let t = prof.begin();
    let mut keep = vec![true; active.len()];
    for (i, (s, d)) in active.iter_mut().zip(drawn).enumerate() {
        let r = d.and_then(|(next, lp)| accept(s, tok, next, lp));
        match r {
            Ok(more) => keep[i] = more,
            Err(e) => {
                let _ = s.req.events.send(Event::Error(e));
                keep[i] = false;
            }
        }
        if !keep[i] {
            pool.release(&mut s.kv);
        }
    }
    let mut i = 0;
    active.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    prof.end(Phase::Emit, t);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KvCache;
    use crate::serve::paged::PoolConfig;
    use tch::{Device, Kind};

    /// Rows for the base model, a LoRA and a DoRA adapter decoded in the same batched steps
    /// give each row the logits (within 1e-4, fp32) and greedy tokens of its adapter alone.
    #[test]
    fn mixed_adapter_rows_decode_as_each_adapter_alone() {
        let rows: [(Option<&str>, Vec<i64>); 4] =
            [(Some("lora"), vec![5, 9, 13, 2, 7]), (None, vec![3, 4]), (Some("dora"), vec![11, 12, 13, 14, 15, 16, 17]), (Some("lora"), vec![8])];
        check_mixed_rows("llama3", &[("lora", "lora_llama3"), ("dora", "dora_llama3")], &rows);
    }

    /// The same on a mixture of experts whose adapter adapts the experts (and the router):
    /// rows of the base and of the adapter in one batch each get their own logits (the
    /// batch runs one forward per adapter, since the experts see tokens sorted by expert).
    #[test]
    fn mixed_rows_of_an_expert_adapter_decode_as_each_alone() {
        let rows: [(Option<&str>, Vec<i64>); 3] = [(Some("lora"), vec![5, 9, 13, 2, 7]), (None, vec![3, 4, 20]), (Some("lora"), vec![8, 1])];
        check_mixed_rows("mixtral", &[("lora", "lora_mixtral")], &rows);
    }

    /// Decodes `rows` (adapter, prompt) of fixture model `model` with `adapters` (name, PEFT
    /// fixture) stored, prefilled one by one and then stepped as one batch through
    /// [`forward_rows`], against each row alone on a model with only its adapter.
    fn check_mixed_rows(model: &str, adapters: &[(&str, &str)], rows: &[(Option<&str>, Vec<i64>)]) {
        let _g = tch::no_grad_guard();
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let dir = fixtures.join("models").join(model);
        let opts = LoadOptions { device: Device::Cpu, kind: Kind::Float };
        let path = |n: &str| adapters.iter().find(|(a, _)| *a == n).map(|(_, p)| fixtures.join("peft/adapters").join(p)).unwrap();
        let mut model = CausalLm::load(&dir, opts).unwrap();
        let mut store = AdapterStore::new();
        for (n, _) in adapters {
            store.load(&mut model, n, &path(n)).unwrap();
        }
        let steps = 6;
        // Each row alone: a model with only its adapter, the plain KV cache, greedy.
        let mut want: Vec<Vec<Tensor>> = Vec::new();
        for (name, prompt) in rows {
            let mut alone = CausalLm::load(&dir, opts).unwrap();
            if let Some(n) = name {
                crate::peft::load_adapter(&mut alone, &path(n)).unwrap();
            }
            let mut cache = KvCache::new(&alone.config);
            let mut input = prompt.clone();
            let mut logits = Vec::new();
            for _ in 0..steps {
                let l = alone.forward(&Tensor::from_slice(&input).unsqueeze(0), Some(&mut cache)).select(1, -1).squeeze_dim(0);
                input = vec![l.argmax(-1, false).int64_value(&[])];
                logits.push(l);
            }
            want.push(logits);
        }
        // Together: each prompt prefilled through its adapter, then every step one batch.
        let mut pool = KvPool::new(&model, PoolConfig { block_size: 4, blocks: 64 });
        let mut kvs: Vec<SeqKv> = Vec::new();
        let mut got: Vec<Vec<Tensor>> = (0..rows.len()).map(|_| Vec::new()).collect();
        for (r, (name, prompt)) in rows.iter().enumerate() {
            let mut kv = SeqKv::default();
            got[r].push(forward_rows(&model, &mut pool, &store, &mut [&mut kv], &[prompt.clone()], &[name.map(str::to_owned)], None).unwrap().get(0));
            kvs.push(kv);
        }
        let names: Vec<Option<String>> = rows.iter().map(|(n, _)| n.map(str::to_owned)).collect();
        for step in 1..steps {
            let ids: Vec<Vec<i64>> = got.iter().map(|g| vec![g[step - 1].argmax(-1, false).int64_value(&[])]).collect();
            let mut refs: Vec<&mut SeqKv> = kvs.iter_mut().collect();
            let out = forward_rows(&model, &mut pool, &store, &mut refs, &ids, &names, None).unwrap();
            for (r, g) in got.iter_mut().enumerate() {
                g.push(out.get(r as i64));
            }
        }
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            for s in 0..steps {
                let d = (&g[s] - &w[s]).abs().max().double_value(&[]);
                assert!(d <= 1e-4, "row {r} ({:?}) step {s}: {d}", rows[r].0);
                assert_eq!(g[s].argmax(-1, false).int64_value(&[]), w[s].argmax(-1, false).int64_value(&[]), "row {r} step {s}");
            }
        }
        // The adapters really move the logits, so the check above means something.
        let bare = CausalLm::load(&dir, opts).unwrap();
        let base = bare.forward(&Tensor::from_slice(&rows[0].1).unsqueeze(0), None).select(1, -1).squeeze_dim(0);
        assert!((&base - &want[0][0]).abs().max().double_value(&[]) > 1e-3);
    }
}
