//! The paged KV cache: keys and values of every layer live in one pool allocated once at
//! start, cut into fixed-size blocks; each sequence holds a block table (its blocks in
//! position order), so memory follows the tokens actually cached, and the choices of an
//! `n > 1` request share their prompt's blocks (reference-counted, copied on write when a
//! choice appends into a shared, partly filled block).
//!
//! Attention ([`PagedKv`]) writes each layer's new keys and values straight into their slots,
//! then reads each row's slots, new ones included, into a padded `[B, kv_heads, S, head_dim]`
//! tensor, one layer at a time, and runs libtorch's SDPA over the whole batch in one call (a
//! mask hides each row's padding). The gather costs one copy of the batch's live keys and values
//! per layer and step (freed before the next layer); a paged attention kernel would read the
//! blocks in place. The step's slot indices, token ids and lengths go to the device in one copy.

use crate::model::decoder::{AttnMask, LayerCache, PagedKv};
use crate::model::CausalLm;
use tch::{Kind, Tensor};

/// How the serving engine caches and schedules (`ftx serve --kv-block-size`,
/// `--kv-cache-tokens`, `--prefill-chunk`, `--no-cuda-graphs`).
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Tokens per KV-cache block.
    pub kv_block_size: usize,
    /// Tokens the pool holds over all sequences; 0: `max_batch × min(max_positions, 4096)`.
    pub kv_cache_tokens: usize,
    /// Prompt tokens prefilled per scheduler step.
    pub prefill_chunk: usize,
    /// Decode steps replay CUDA graphs where they fit ([`super::graphs`]; `--no-cuda-graphs`).
    pub cuda_graphs: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { kv_block_size: 16, kv_cache_tokens: 0, prefill_chunk: 2048, cuda_graphs: true }
    }
}

impl EngineOptions {
    /// The pool for a model of `max_positions` serving up to `max_batch` sequences.
    pub fn pool(&self, max_positions: i64, max_batch: usize) -> PoolConfig {
        let block_size = self.kv_block_size.max(1);
        let tokens = match self.kv_cache_tokens {
            0 => max_batch.max(1) * max_positions.clamp(1, 4096) as usize,
            t => t,
        };
        PoolConfig { block_size, blocks: tokens.div_ceil(block_size).max(1) }
    }
}

/// How the pool is sized.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool (per layer; every layer has the same table).
    pub blocks: usize,
}

/// A sequence's place in the pool: its blocks in position order and how many positions are
/// written. `reserve` is what admission promised it beyond what it holds; blocks beyond that
/// come from the unpromised free ones, which the scheduler checks (preempting) before a step.
#[derive(Debug, Default)]
pub struct SeqKv {
    pub blocks: Vec<u32>,
    pub len: usize,
    /// Blocks this sequence may still allocate under its admission.
    pub reserve: usize,
}

/// Preallocated key/value blocks of every layer.
pub struct KvPool {
    pub block_size: usize,
    /// Per layer, keys and values `[blocks × block_size, kv_heads, head_dim]` (one row a slot).
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    refs: Vec<u32>,
    free: Vec<u32>,
    /// Blocks promised to admitted sequences and not yet taken.
    reserved: usize,
}

impl KvPool {
    /// Allocates the pool for `model`'s layers (zeros: padded slots are read, masked, and must
    /// stay finite), with one spare block past the last for padding rows to write to.
    pub fn new(model: &CausalLm, cfg: PoolConfig) -> KvPool {
        let slots = ((cfg.blocks + 1) * cfg.block_size) as i64;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for layer in &model.layers {
            let a = layer.attention();
            k.push(Tensor::zeros([slots, a.kv_heads, a.head_dim], (model.kind, model.device)));
            v.push(Tensor::zeros([slots, a.kv_heads, a.head_dim], (model.kind, model.device)));
        }
        KvPool { block_size: cfg.block_size, k, v, refs: vec![0; cfg.blocks], free: (0..cfg.blocks as u32).rev().collect(), reserved: 0 }
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks held by sequences.
    pub fn used(&self) -> usize {
        self.total() - self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Promises `blocks` to a new sequence if the free blocks cover every promise made.
    pub fn try_reserve(&mut self, blocks: usize) -> bool {
        if self.free.len() < self.reserved + blocks {
            return false;
        }
        self.reserved += blocks;
        true
    }

    /// Free blocks not promised to anyone.
    pub fn available(&self) -> usize {
        self.free.len().saturating_sub(self.reserved)
    }

    /// Blocks `seq` takes to append `t` positions: a copy of its last block when that is shared
    /// and partly filled (see `append`), then new blocks.
    pub fn blocks_to_append(&self, seq: &SeqKv, t: usize) -> usize {
        let copy = seq.len % self.block_size != 0 && seq.blocks.last().is_some_and(|&b| self.refs[b as usize] > 1);
        usize::from(copy) + self.blocks_for(seq.len + t).saturating_sub(seq.blocks.len())
    }

    /// Returns an unused promise.
    pub fn unreserve(&mut self, blocks: usize) {
        self.reserved = self.reserved.saturating_sub(blocks);
    }

    fn alloc(&mut self, seq: &mut SeqKv) -> u32 {
        // Promised to `seq`, or counted free before the step (the scheduler preempts until every
        // sequence's next blocks are), so the free list cannot be empty here.
        let b = self.free.pop().expect("the scheduler makes room for every block a step takes");
        self.refs[b as usize] = 1;
        if seq.reserve > 0 {
            seq.reserve -= 1;
            self.reserved = self.reserved.saturating_sub(1);
        }
        b
    }

    /// Drops a sequence's hold on its blocks (freed when no other sequence shares them) and
    /// what is left of its promise.
    pub fn release(&mut self, seq: &mut SeqKv) {
        for &b in &seq.blocks {
            let r = &mut self.refs[b as usize];
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.free.push(b);
            }
        }
        seq.blocks.clear();
        seq.len = 0;
        self.unreserve(std::mem::take(&mut seq.reserve));
    }

    /// A new sequence sharing `seq`'s cached positions (its blocks gain a reference).
    pub fn share(&mut self, seq: &SeqKv, reserve: usize) -> SeqKv {
        for &b in &seq.blocks {
            self.refs[b as usize] += 1;
        }
        SeqKv { blocks: seq.blocks.clone(), len: seq.len, reserve }
    }

    /// Makes room for `t` more positions: copies a shared, partly filled last block first (the
    /// new positions would land in it), then adds blocks. Returns the slots of the new positions.
    fn append(&mut self, seq: &mut SeqKv, t: usize) -> Vec<i64> {
        let bs = self.block_size;
        if seq.len % bs != 0 {
            let last = seq.blocks.len() - 1;
            let old = seq.blocks[last];
            if self.refs[old as usize] > 1 {
                let new = self.alloc(seq);
                let (from, to) = ((old as usize * bs) as i64, (new as usize * bs) as i64);
                for pool in self.k.iter().chain(&self.v) {
                    pool.narrow(0, to, bs as i64).copy_(&pool.narrow(0, from, bs as i64));
                }
                self.refs[old as usize] -= 1;
                seq.blocks[last] = new;
            }
        }
        while seq.blocks.len() * bs < seq.len + t {
            let b = self.alloc(seq);
            seq.blocks.push(b);
        }
        (seq.len..seq.len + t).map(|p| self.slot(seq, p)).collect()
    }

    fn slot(&self, seq: &SeqKv, pos: usize) -> i64 {
        (seq.blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size) as i64
    }

    /// Logits `[B, vocab]` at the last new position of each row, for `ids[r]` (every row the
    /// same length `t`) continuing `seqs[r]`'s cached positions; the new keys and values are
    /// written into the pool and each `len` advanced.
    pub fn forward(&mut self, model: &CausalLm, seqs: &mut [&mut SeqKv], ids: &[Vec<i64>]) -> Tensor {
        let (host, layout) = self.prepare(seqs, ids, None);
        // The step's indices in one host-to-device copy (each copy waits for the device).
        let all = Tensor::from_slice(&host).to_device(model.device);
        let logits = self.run(model, &all, layout);
        Self::advance(seqs, layout);
        logits
    }

    /// The slot a padding row writes its keys and values to: the pool's spare block, never
    /// handed to a sequence.
    fn scratch_slot(&self) -> i64 {
        (self.refs.len() * self.block_size) as i64
    }

    /// Makes room for the step's new positions and lays out everything [`KvPool::run`] reads as
    /// one int64 vector: per row the slots to read (`0..len` padded to `s_max` with slot 0, then
    /// the new ones), the slots to write, the token ids, the cached lengths. `pad = (rows,
    /// s_max)` pads to a fixed shape (for a captured graph): rows past the real ones are empty
    /// sequences writing to the scratch slot, and `s_max` is at least every row's length.
    pub(super) fn prepare(&mut self, seqs: &mut [&mut SeqKv], ids: &[Vec<i64>], pad: Option<(i64, i64)>) -> (Vec<i64>, Layout) {
        let t = ids.first().map_or(0, Vec::len) as i64;
        let lens: Vec<i64> = seqs.iter().map(|s| s.len as i64).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        let (b, s_max) = pad.map_or((seqs.len() as i64, longest), |(rows, s)| (rows.max(seqs.len() as i64), s.max(longest)));
        let layout = Layout { b, t, s_max };
        // Slots to write: the new positions. Slots to read, row after row: positions 0..len
        // padded to s_max with slot 0 (finite, masked), then the new ones. (A block copied on
        // write by `append` holds the same keys, so reading through it after is the same.)
        let mut write = Vec::with_capacity((b * t) as usize);
        let mut read = Vec::with_capacity(layout.n_read() as usize);
        for s in seqs.iter_mut() {
            let new = self.append(s, t as usize);
            if s_max > 0 {
                read.extend((0..s.len).map(|p| self.slot(s, p)));
                read.extend(std::iter::repeat_n(0, s_max as usize - s.len));
                read.extend(&new);
            }
            write.extend(new);
        }
        // Padding rows: nothing cached (length 0), token 0, keys and values to the scratch slot.
        let (pad_rows, t_u) = (b as usize - seqs.len(), t as usize);
        if s_max > 0 {
            read.extend(std::iter::repeat_n(self.scratch_slot(), pad_rows * (s_max as usize + t_u)));
        }
        write.extend(std::iter::repeat_n(self.scratch_slot(), pad_rows * t_u));
        let mut host = read;
        host.extend(write);
        host.extend(ids.iter().flatten());
        host.extend(std::iter::repeat_n(0, pad_rows * t_u));
        host.extend(&lens);
        host.extend(std::iter::repeat_n(0, pad_rows));
        debug_assert_eq!(host.len() as i64, layout.indices());
        (host, layout)
    }

    /// Each sequence's `len` after a step laid out as `layout`.
    pub(super) fn advance(seqs: &mut [&mut SeqKv], layout: Layout) {
        for s in seqs.iter_mut() {
            s.len += layout.t as usize;
        }
    }

    /// The step's device work, from the indices [`KvPool::prepare`] laid out (`all`, on the
    /// model's device): logits `[layout.b, vocab]`. Only device operations, shapes fixed by
    /// `layout`, no host synchronisation: what a CUDA graph captures.
    pub(super) fn run(&self, model: &CausalLm, all: &Tensor, layout: Layout) -> Tensor {
        let device = model.device;
        let Layout { b, t, s_max } = layout;
        let (n_read, n_write) = (layout.n_read(), b * t);
        let read = all.narrow(0, 0, n_read);
        let write = all.narrow(0, n_read, n_write);
        let ids = all.narrow(0, n_read + n_write, b * t).view([b, t]);
        let len_t = all.narrow(0, n_read + n_write + b * t, b).view([b, 1]);
        let positions = &len_t + Tensor::arange(t, (Kind::Int64, device)).view([1, t]);
        let mask = |window: Option<i64>| {
            if s_max == 0 && window.is_none_or(|w| w >= t) {
                return AttnMask::Causal;
            }
            // Keys: slots 0..s_max are cached positions (real below the row's len), then the
            // t new ones at positions len..len+t.
            let key = Tensor::arange(s_max + t, (Kind::Int64, device)).view([1, 1, s_max + t]);
            let lens3 = len_t.view([b, 1, 1]);
            let key_pos = key.expand([b, 1, s_max + t], false).where_self(&key.lt(s_max), &(&lens3 + (&key - s_max)));
            let q_pos = positions.view([b, t, 1]);
            let mut allowed = key.lt_tensor(&lens3).logical_or(&key.ge(s_max)).logical_and(&key_pos.le_tensor(&q_pos));
            if let Some(w) = window {
                allowed = allowed.logical_and(&(&q_pos - &key_pos).lt(w));
            }
            AttnMask::Explicit(allowed.unsqueeze(1))
        };
        let inp = model.attn_inputs(&positions, mask);
        let mut h = model.embed(&ids);
        for (l, layer) in model.layers.iter().enumerate() {
            // Attention writes the new keys into the pool, then reads every row's back.
            let paged = PagedKv { k: self.k[l].shallow_clone(), v: self.v[l].shallow_clone(), write: write.shallow_clone(), read: (s_max > 0).then(|| read.shallow_clone()) };
            let mut cache = LayerCache { kv: None, paged: Some(paged) };
            h = layer.forward(&h, &inp, Some(&mut cache), false);
        }
        model.head(&h.narrow(1, t - 1, 1)).squeeze_dim(1)
    }
}

/// The shape of a step's device work: rows, new positions per row, cached positions each row
/// reads (padded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub b: i64,
    pub t: i64,
    pub s_max: i64,
}

impl Layout {
    /// Slots read: every row's `s_max` cached and `t` new ones (none when nothing is cached).
    fn n_read(&self) -> i64 {
        if self.s_max > 0 {
            self.b * (self.s_max + self.t)
        } else {
            0
        }
    }

    /// Length of the index vector: reads, writes, ids, lengths.
    pub fn indices(&self) -> i64 {
        self.n_read() + 2 * self.b * self.t + self.b
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::decoder::LoadOptions;
    use crate::model::{KvCache, ModelConfig};
    use tch::Device;

    /// A random two-layer Mistral (a sliding window when `window` is set), fp32 on the CPU.
    pub(crate) fn tiny(window: Option<i64>) -> CausalLm {
        let cfg = serde_json::json!({"architectures": ["MistralForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
            "sliding_window": window, "max_position_embeddings": 256});
        let cfg = ModelConfig::from_json(cfg, std::path::Path::new("config.json")).unwrap();
        CausalLm::random(cfg, LoadOptions { device: Device::Cpu, kind: Kind::Float }, 3).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Prompts prefilled in chunks, then rows of different lengths decoded in one batch (two
    /// of them sharing a prompt's blocks, copy-on-write), give each row the logits of its own
    /// unpaged, unbatched forward; releasing everything frees the whole pool.
    #[test]
    fn paged_chunked_batched_steps_equal_the_plain_forward() {
        let _g = tch::no_grad_guard();
        for window in [None, Some(3)] {
            let model = tiny(window);
            let mut pool = KvPool::new(&model, PoolConfig { block_size: 4, blocks: 32 });
            let prompts: [Vec<i64>; 3] = [vec![1, 2, 3, 4, 5, 6, 7], (8..19).collect(), vec![19]];
            let mut seqs: Vec<SeqKv> = Vec::new();
            let mut refs: Vec<KvCache> = Vec::new();
            let mut last = Vec::new();
            for p in &prompts {
                assert!(pool.try_reserve(8));
                let mut kv = SeqKv { reserve: 8, ..Default::default() };
                let mut got = None;
                for chunk in p.chunks(3) {
                    got = Some(pool.forward(&model, &mut [&mut kv], &[chunk.to_vec()]));
                }
                let mut cache = KvCache::new(&model.config);
                let want = model.forward(&Tensor::from_slice(p).unsqueeze(0), Some(&mut cache)).select(1, -1);
                let d = max_diff(&got.unwrap(), &want);
                assert!(d < 1e-5, "window {window:?} chunked prefill: {d}");
                seqs.push(kv);
                refs.push(cache);
                last.push(want.argmax(-1, false).int64_value(&[0]));
            }
            // Pieces of two prompts in one forward (as batched prefill runs them).
            let more: [Vec<i64>; 2] = [vec![21, 22], vec![23, 24]];
            {
                let (first, rest) = seqs.split_at_mut(1);
                let got = pool.forward(&model, &mut [&mut first[0], &mut rest[0]], &more);
                for (r, ids) in more.iter().enumerate() {
                    let want = model.forward(&Tensor::from_slice(ids).unsqueeze(0), Some(&mut refs[r])).select(1, -1);
                    let d = max_diff(&got.get(r as i64), &want.squeeze_dim(0));
                    assert!(d < 1e-5, "window {window:?} batched prefill row {r}: {d}");
                }
            }
            // A fourth row shares the first one's prompt (9 positions: a partly filled block).
            assert!(pool.try_reserve(4));
            let shared = pool.share(&seqs[0], 4);
            let copy = KvCache { layers: refs[0].layers.iter().map(|l| LayerCache { kv: l.kv.as_ref().map(|(k, v)| (k.shallow_clone(), v.shallow_clone())), paged: None }).collect() };
            seqs.push(shared);
            refs.push(copy);
            last.push(33);
            for step in 0..5 {
                let ids: Vec<Vec<i64>> = last.iter().map(|&t| vec![t]).collect();
                let mut rows: Vec<&mut SeqKv> = seqs.iter_mut().collect();
                let got = pool.forward(&model, &mut rows, &ids);
                for (r, cache) in refs.iter_mut().enumerate() {
                    let want = model.forward(&Tensor::from_slice(&[last[r]]).unsqueeze(0), Some(cache)).select(1, -1);
                    let d = max_diff(&got.get(r as i64), &want.squeeze_dim(0));
                    assert!(d < 1e-5, "window {window:?} step {step} row {r}: {d}");
                }
                for (r, t) in last.iter_mut().enumerate() {
                    *t = (5 * step + r as i64 + 1) % 40;
                }
            }
            assert_ne!(seqs[0].blocks.last(), seqs[3].blocks.last(), "the shared partial block was copied on write");
            assert_eq!(seqs[0].blocks[0], seqs[3].blocks[0], "full prompt blocks stay shared");
            for s in &mut seqs {
                pool.release(s);
            }
            assert_eq!(pool.used(), 0);
            assert!(pool.try_reserve(32), "every promise was returned");
        }
    }
}
