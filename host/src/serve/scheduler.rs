//! The model thread: owns the model (tch tensors stay on one thread), takes jobs from a
//! bounded queue, and decodes every running sequence together.
//!
//! Each sequence keeps its own KV cache. A new request is prefilled alone (once, however
//! many choices `n` it asks for: the choices start from shared prompt keys and values, which
//! the first decode step copies on write); then, step by
//! step, the running sequences that use the same adapter go through one batched forward:
//! their caches are right-padded to the longest, a mask hides the padding, and each row gets
//! its own rotary position. A group of one runs exactly as `model::generate` does.
//!
//! Adapters: each is attached once at load time, then its per-layer modules are moved out of
//! the model into a store. Switching adapters between groups moves boxes back and forth (no
//! tensor copies), so a step for adapter A never sees adapter B's weights.

use super::constrain::mask_logits;
use crate::model::decoder::{AttnMask, LayerCache, LoadOptions};
use crate::model::generate::{GenerateOptions, Sampler, StopReason};
use crate::model::linear::Adapter;
use crate::model::{CausalLm, KvCache, TextTokenizer};
use llguidance::Matcher;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, RwLock};
use tch::{Device, Kind, Tensor};
use tokio::sync::{mpsc, oneshot};

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

/// Adapters moved out of the model, one slot per projection (`linears_mut` order).
struct AdapterStore {
    stored: HashMap<String, Vec<Option<Box<dyn Adapter>>>>,
    active: Option<String>,
}

impl AdapterStore {
    fn swap(model: &mut CausalLm, slots: &mut [Option<Box<dyn Adapter>>]) {
        for ((_, lin), slot) in model.linears_mut().into_iter().zip(slots.iter_mut()) {
            std::mem::swap(&mut lin.adapter, slot);
        }
    }

    /// Makes `name`'s adapter (or none) the one the model runs with.
    fn activate(&mut self, model: &mut CausalLm, name: Option<&str>) {
        if self.active.as_deref() == name {
            return;
        }
        if let Some(cur) = self.active.take() {
            if let Some(slots) = self.stored.get_mut(&cur) {
                Self::swap(model, slots);
            }
        }
        if let Some(n) = name {
            if let Some(slots) = self.stored.get_mut(n) {
                Self::swap(model, slots);
                self.active = Some(n.to_owned());
            }
        }
    }

    /// Forgets an adapter's modules (the model runs bare if it was active).
    fn unload(&mut self, model: &mut CausalLm, name: &str) -> bool {
        if self.active.as_deref() == Some(name) {
            self.activate(model, None);
        }
        self.stored.remove(name).is_some()
    }

    fn load(&mut self, model: &mut CausalLm, name: &str, path: &std::path::Path) -> Result<(), String> {
        self.activate(model, None);
        let result = crate::peft::load_adapter(model, path).map(|_| ());
        // On success the fresh modules go to the store; on failure they are dropped. Either
        // way the model is left bare.
        let slots: Vec<_> = model.linears_mut().into_iter().map(|(_, l)| l.adapter.take()).collect();
        result.map_err(|e| format!("adapter {}: {e}", path.display()))?;
        self.stored.insert(name.to_owned(), slots);
        Ok(())
    }
}

/// A sequence being decoded (one choice of a request).
struct Seq {
    req: GenRequest,
    index: usize,
    /// How often each token was generated so far (for the penalties).
    counts: HashMap<u32, u32>,
    cache: KvCache,
    sampler: Sampler,
    ids: Vec<u32>,
    text: String,
    /// Bytes of `text` already sent.
    emitted: usize,
    /// The token to feed next.
    last: u32,
}

/// How the model thread is set up.
pub struct SchedulerConfig {
    pub model_dir: PathBuf,
    pub load: LoadOptions,
    pub adapters: Vec<(String, PathBuf)>,
    /// Most sequences decoded at once.
    pub max_batch: usize,
    pub metrics: Arc<super::metrics::Metrics>,
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
    let mut store = AdapterStore { stored: HashMap::new(), active: None };
    for (name, path) in &cfg.adapters {
        if let Err(e) = store.load(&mut model, name, path) {
            let _ = ready.send(Err(e));
            return;
        }
        names.write().unwrap_or_else(|e| e.into_inner()).push(name.clone());
    }
    let _ = ready.send(Ok(()));
    let mut active: Vec<Seq> = Vec::new();
    loop {
        // Block for work when idle; otherwise take what is waiting, up to the batch size.
        while active.len() < cfg.max_batch.max(1) {
            let job = if active.is_empty() {
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            };
            match job {
                Job::LoadAdapter { name, path, reply } => {
                    let r = store.load(&mut model, &name, &path);
                    if r.is_ok() {
                        names.write().unwrap_or_else(|e| e.into_inner()).push(name);
                    }
                    let _ = reply.send(r);
                }
                Job::UnloadAdapter { name, reply } => {
                    let busy = active.iter().filter(|s| s.req.adapter.as_deref() == Some(name.as_str())).count();
                    let r = if busy > 0 {
                        Err(format!("{busy} running sequence(s) use '{name}'; retry when they finish"))
                    } else if store.unload(&mut model, &name) {
                        names.write().unwrap_or_else(|e| e.into_inner()).retain(|n| *n != name);
                        Ok(())
                    } else {
                        Err(format!("'{name}' is not a loaded adapter"))
                    };
                    let _ = reply.send(r);
                }
                Job::Generate(req) => {
                    cfg.metrics.queue_depth.dec();
                    active.extend(start(&mut model, &mut store, &tok, req));
                }
            }
        }
        cfg.metrics.batch_sequences.set(active.len() as i64);
        cfg.metrics.kv_cache_tokens.set(active.iter().map(|s| s.cache.len()).sum());
        if active.is_empty() {
            continue;
        }
        step_all(&mut model, &mut store, &tok, &mut active);
        // Again after the step, so an idle server reports its finished sequences as gone.
        cfg.metrics.batch_sequences.set(active.len() as i64);
        cfg.metrics.kv_cache_tokens.set(active.iter().map(|s| s.cache.len()).sum());
    }
}

impl Seq {
    fn new(req: GenRequest, index: usize, cache: KvCache) -> Seq {
        Seq { sampler: Sampler::new(&req.opts), req, index, counts: HashMap::new(), cache, ids: Vec::new(), text: String::new(), emitted: 0, last: 0 }
    }
}

/// Prefills a new request once and takes each choice's first token; the choices still
/// running come back.
fn start(model: &mut CausalLm, store: &mut AdapterStore, tok: &TextTokenizer, req: GenRequest) -> Vec<Seq> {
    if let Some(a) = req.adapter.as_deref().filter(|a| !store.stored.contains_key(*a)) {
        // Unloaded while this request waited in the queue: never fall back to the base silently.
        let _ = req.events.send(Event::Error(format!("the adapter '{a}' was unloaded before this request started")));
        return Vec::new();
    }
    store.activate(model, req.adapter.as_deref());
    if req.opts.max_new_tokens == 0 {
        for i in 0..req.n {
            finish(&Seq::new(req.fork(i), i, KvCache::new(&model.config)), StopReason::Length);
        }
        return Vec::new();
    }
    let mut cache = KvCache::new(&model.config);
    let input: Vec<i64> = req.prompt.iter().map(|&t| t as i64).collect();
    let x = Tensor::from_slice(&input).to_device(model.device).unsqueeze(0);
    let row = match model_forward(model, &x, &mut cache).and_then(|l| rows(&l)) {
        Ok(mut r) => r.remove(0),
        Err(e) => {
            let _ = req.events.send(Event::Error(e));
            return Vec::new();
        }
    };
    let mut running = Vec::new();
    for i in 0..req.n.max(1) {
        // The decode step concatenates new keys onto these, so the choices never write into
        // the shared prompt tensors.
        let shared = KvCache { layers: cache.layers.iter().map(|l| LayerCache { kv: l.kv.as_ref().map(|(k, v)| (k.shallow_clone(), v.shallow_clone())) }).collect() };
        let mut seq = Seq::new(req.fork(i), i, shared);
        match advance(&mut seq, tok, &mut row.clone()) {
            Ok(true) => running.push(seq),
            Ok(false) => {}
            Err(e) => {
                let _ = seq.req.events.send(Event::Error(e));
                return Vec::new();
            }
        }
    }
    running
}

/// `logits`' log-softmax at `token`, and the `k` most likely tokens with theirs.
fn token_logprob(tok: &TextTokenizer, logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    let text = |id: u32| tok.decode(&[id], false);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    }
    order.truncate(k);
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    TokenLogprob {
        token: text(token),
        logprob: logits[token as usize] - log_z,
        top: order.into_iter().map(|id| (text(id), logits[id as usize] - log_z)).collect(),
    }
}

fn model_forward(model: &CausalLm, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor, String> {
    // libtorch errors surface as panics in tch's infallible API; keep the server alive.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.forward(ids, Some(cache)).select(1, -1)))
        .map_err(|_| "the forward pass failed (libtorch error; see the server log)".to_owned())
}

/// Logits `[B, vocab]` as one fp32 row per sequence.
fn rows(logits: &Tensor) -> Result<Vec<Vec<f32>>, String> {
    let l = logits.to_kind(Kind::Float).to_device(Device::Cpu);
    let b = l.size()[0];
    (0..b).map(|i| Vec::<f32>::try_from(&l.get(i)).map_err(|e| e.to_string())).collect()
}

/// Samples the next token from `logits`, emits text; false when the sequence is done.
fn advance(seq: &mut Seq, tok: &TextTokenizer, logits: &mut [f32]) -> Result<bool, String> {
    if seq.req.events.is_closed() {
        return Ok(false); // the client went away
    }
    let raw = seq.req.logprobs.map(|_| logits.to_vec());
    let p = seq.req.penalties;
    if p.presence != 0.0 || p.frequency != 0.0 {
        for (&t, &c) in &seq.counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= c as f32 * p.frequency + p.presence;
            }
        }
    }
    if let Some(m) = &mut seq.req.matcher {
        mask_logits(m, logits)?;
    }
    let next = seq.sampler.next(logits);
    let opts = &seq.req.opts;
    if opts.stop_ids.contains(&next) {
        finish(seq, StopReason::Stop);
        return Ok(false);
    }
    if let (Some(raw), Some(k)) = (&raw, seq.req.logprobs) {
        let _ = seq.req.events.send(Event::Logprob { index: seq.index, entry: token_logprob(tok, raw, next, k) });
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
    // Hold back an incomplete UTF-8 tail (byte-level BPE splits characters).
    // Also hold back what could be the start of a stop string: sent text cannot be unsent.
    let ready = seq.text.trim_end_matches('\u{FFFD}');
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

/// One decode step for every running sequence, batched per adapter.
fn step_all(model: &mut CausalLm, store: &mut AdapterStore, tok: &TextTokenizer, active: &mut Vec<Seq>) {
    let mut groups: Vec<(Option<String>, Vec<usize>)> = Vec::new();
    for (i, s) in active.iter().enumerate() {
        match groups.iter_mut().find(|(a, _)| *a == s.req.adapter) {
            Some((_, v)) => v.push(i),
            None => groups.push((s.req.adapter.clone(), vec![i])),
        }
    }
    let mut keep = vec![true; active.len()];
    for (adapter, idx) in groups {
        store.activate(model, adapter.as_deref());
        let result = if idx.len() == 1 {
            let s = &mut active[idx[0]];
            let x = Tensor::from_slice(&[s.last as i64]).to_device(model.device).unsqueeze(0);
            model_forward(model, &x, &mut s.cache)
        } else {
            let mut seqs: Vec<&mut Seq> = Vec::new();
            for (i, s) in active.iter_mut().enumerate() {
                if idx.contains(&i) {
                    seqs.push(s);
                }
            }
            batched_forward(model, &mut seqs)
        };
        let rows = result.and_then(|l| rows(&l));
        for (k, &i) in idx.iter().enumerate() {
            let s = &mut active[i];
            let r = match &rows {
                Ok(rows) => {
                    let mut row = rows[k].clone();
                    advance(s, tok, &mut row)
                }
                Err(e) => Err(e.clone()),
            };
            match r {
                Ok(more) => keep[i] = more,
                Err(e) => {
                    let _ = s.req.events.send(Event::Error(e));
                    keep[i] = false;
                }
            }
        }
    }
    let mut i = 0;
    active.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

/// Last-position logits `[B, vocab]` for one new token per sequence, every sequence
/// continuing its own cache; the caches are extended in place.
fn batched_forward(model: &CausalLm, seqs: &mut [&mut Seq]) -> Result<Tensor, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batched_forward_inner(model, seqs)))
        .map_err(|_| "the batched forward pass failed (libtorch error; see the server log)".to_owned())
}

fn batched_forward_inner(model: &CausalLm, seqs: &mut [&mut Seq]) -> Tensor {
    let device = model.device;
    let lens: Vec<i64> = seqs.iter().map(|s| s.cache.len()).collect();
    let max = *lens.iter().max().unwrap_or(&0);
    let b = seqs.len() as i64;
    let ids = Tensor::from_slice(&seqs.iter().map(|s| s.last as i64).collect::<Vec<_>>()).to_device(device).view([b, 1]);
    let positions = Tensor::from_slice(&lens).to_device(device).view([b, 1]);
    // Keys: slots 0..len are the row's cache, len..max padding, slot `max` the new token.
    let key = Tensor::arange(max + 1, (Kind::Int64, device)).view([1, max + 1]);
    let len_t = positions.shallow_clone();
    let mask = |window: Option<i64>| {
        let mut allowed = key.lt_tensor(&len_t).logical_or(&key.eq(max));
        if let Some(w) = window {
            // Query position `len`, cached key position `slot`: visible when len − slot < w.
            allowed = allowed.logical_and(&(&len_t - &key).lt(w).logical_or(&key.eq(max)));
        }
        AttnMask::Explicit(allowed.view([b, 1, 1, max + 1]))
    };
    let mut cache = KvCache { layers: Vec::with_capacity(model.config.layers) };
    for layer in 0..model.config.layers {
        let pad = |t: &Tensor| {
            let s = t.size()[2];
            if s == max { t.shallow_clone() } else { t.constant_pad_nd([0, 0, 0, max - s]) }
        };
        let (ks, vs): (Vec<Tensor>, Vec<Tensor>) = seqs
            .iter()
            .map(|s| {
                let (k, v) = s.cache.layers[layer].kv.as_ref().expect("a prefilled sequence has a cache");
                (pad(k), pad(v))
            })
            .unzip();
        cache.layers.push(LayerCache { kv: Some((Tensor::cat(&ks, 0), Tensor::cat(&vs, 0))) });
    }
    let inp = model.attn_inputs(&positions, mask);
    let logits = model.head(&model.hidden(&ids, &inp, Some(&mut cache), false)).select(1, -1);
    for (layer, lc) in cache.layers.into_iter().enumerate() {
        let (k, v) = lc.kv.expect("the forward pass fills the cache");
        for (row, s) in seqs.iter_mut().enumerate() {
            let take = |t: &Tensor| {
                let r = t.narrow(0, row as i64, 1);
                Tensor::cat(&[r.narrow(2, 0, lens[row]), r.narrow(2, max, 1)], 2)
            };
            s.cache.layers[layer].kv = Some((take(&k), take(&v)));
        }
    }
    logits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    fn tiny(window: Option<i64>) -> CausalLm {
        let cfg = serde_json::json!({"architectures": ["MistralForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
            "sliding_window": window, "max_position_embeddings": 64});
        let cfg = ModelConfig::from_json(cfg, std::path::Path::new("config.json")).unwrap();
        CausalLm::random(cfg, LoadOptions { device: Device::Cpu, kind: Kind::Float }, 3).unwrap()
    }

    fn seq(model: &CausalLm, prompt: &[i64], last: u32) -> Seq {
        let mut cache = KvCache::new(&model.config);
        let _ = model.forward(&Tensor::from_slice(prompt).unsqueeze(0), Some(&mut cache));
        let (events, _) = mpsc::unbounded_channel();
        let req = GenRequest { adapter: None, prompt: vec![], opts: GenerateOptions::default(), matcher: None, events, n: 1, logprobs: None, penalties: Penalties::default() };
        Seq { last, ..Seq::new(req, 0, cache) }
    }

    /// Rows of different lengths, padded into one forward, give each row's own logits and cache.
    #[test]
    fn a_batched_step_equals_steps_one_by_one() {
        let _g = tch::no_grad_guard();
        for window in [None, Some(3)] {
            let model = tiny(window);
            let prompts: [&[i64]; 3] = [&[1, 2, 3], &[4, 5, 6, 7, 8, 9], &[10]];
            let mut seqs: Vec<Seq> = prompts.iter().enumerate().map(|(i, p)| seq(&model, p, 11 + i as u32)).collect();
            for step in 0..3 {
                let mut expected = Vec::new();
                let mut caches = Vec::new();
                for s in &seqs {
                    let mut c = KvCache { layers: s.cache.layers.iter().map(|l| LayerCache { kv: l.kv.as_ref().map(|(k, v)| (k.shallow_clone(), v.shallow_clone())) }).collect() };
                    expected.push(model.forward(&Tensor::from_slice(&[s.last as i64]).unsqueeze(0), Some(&mut c)).select(1, -1));
                    caches.push(c);
                }
                let mut refs: Vec<&mut Seq> = seqs.iter_mut().collect();
                let got = batched_forward_inner(&model, &mut refs);
                for (i, s) in seqs.iter_mut().enumerate() {
                    let diff = (got.get(i as i64) - expected[i].squeeze_dim(0)).abs().max().double_value(&[]);
                    assert!(diff < 1e-5, "window {window:?} step {step} row {i}: {diff}");
                    for (a, b) in s.cache.layers.iter().zip(&caches[i].layers) {
                        let (ka, _) = a.kv.as_ref().unwrap();
                        let (kb, _) = b.kv.as_ref().unwrap();
                        assert_eq!(ka.size(), kb.size());
                        assert!((ka - kb).abs().max().double_value(&[]) < 1e-6);
                    }
                    s.last = 20 + step as u32;
                }
            }
        }
    }
}
