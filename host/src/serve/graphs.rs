//! CUDA graphs for the decode step (`ftx serve --no-cuda-graphs` turns them off). A decode step
//! of a small model is hundreds of small kernels whose launches from the host (libtorch's
//! dispatch, a few microseconds each) cost more than the kernels run; replaying a captured graph
//! launches them all at once.
//!
//! A graph needs fixed shapes, so a step is padded to a bucket: rows to the next power of two
//! (padding rows are empty sequences writing to the pool's scratch slot), and the cached
//! positions every row reads to the next power of two of the longest row (at least
//! [`MIN_CONTEXT`]; the mask hides the padding). Each (rows, context) bucket is captured the first
//! time a step needs it, into one memory pool shared by all buckets, and replayed after: the
//! step's indices are copied into the bucket's input tensor, the graph replays, and the logits
//! are read from its output. The capture's eager warm-up run computes the same step, so every
//! capture is checked on the spot: its first replay must give the warm-up's logits, or graphs are
//! turned off for the server's life (as after any failed capture). Loading or unloading an adapter
//! drops the captured graphs (they are captured again as steps need them).
//!
//! Steps that do not fit fall back to the eager forward, with the same result: on the CPU,
//! prefill chunks, rows of an adapter (graphs are captured for the base model's rows only),
//! batches past the largest bucket, contexts past [`MAX_CONTEXT`], and families whose forward
//! is not capturable (a host sync or host tensor in it: LongRoPE, Gemma's scaled embeddings,
//! mixture-of-experts routing).

use super::paged::{KvPool, Layout, SeqKv};
use crate::gpu::graph::{self, CudaGraph, GraphPool};
use crate::model::{CausalLm, Family, RopeScaling};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The shortest padded context: below it the gather is cheap and buckets would multiply.
pub const MIN_CONTEXT: i64 = 64;
/// The longest padded context a graph is captured for: past it, gathering the padded keys and
/// values costs more than launching kernels does.
pub const MAX_CONTEXT: i64 = 8192;

/// What the graphs did, for the serve profile.
#[derive(Debug, Clone, Copy, Default)]
pub struct GraphStats {
    /// Decode steps run by replaying a graph.
    pub replays: u64,
    /// Graphs captured, and the time their captures took (warm-up and check included).
    pub captures: u64,
    pub capture_time: Duration,
    /// Decode steps run eagerly.
    pub eager: u64,
}

/// One bucket's captured step.
struct Captured {
    graph: CudaGraph,
    /// The step's indices (see `KvPool::prepare`), rewritten before each replay.
    input: Tensor,
    /// `[rows, vocab]`, rewritten by each replay.
    logits: Tensor,
}

/// The decode graphs of one model and KV pool.
pub struct DecodeGraphs {
    /// `Some` while graphs are used: the device and the pool every bucket's graph shares.
    ready: Option<(usize, GraphPool)>,
    /// The largest rows bucket.
    max_rows: i64,
    captured: HashMap<(i64, i64), Captured>,
    pub stats: GraphStats,
}

impl DecodeGraphs {
    /// Graphs for `model`'s decode steps of up to `max_batch` rows, when `on` and the model's
    /// device and family allow them (otherwise every step runs eagerly; why is logged).
    pub fn new(model: &CausalLm, max_batch: usize, on: bool) -> DecodeGraphs {
        let ready = if on { Self::start(model) } else { None };
        DecodeGraphs { ready, max_rows: max_batch.max(1).next_power_of_two() as i64, captured: HashMap::new(), stats: GraphStats::default() }
    }

    fn start(model: &CausalLm) -> Option<(usize, GraphPool)> {
        let Device::Cuda(device) = model.device else { return None };
        if let Some(why) = not_capturable(model) {
            tracing::info!("CUDA graphs off for decoding: {why}");
            return None;
        }
        match graph::available().and_then(|()| GraphPool::new()) {
            Ok(pool) => Some((device, pool)),
            Err(e) => {
                tracing::warn!("decoding without CUDA graphs: {e}");
                None
            }
        }
    }

    /// Drops every captured graph (they are captured again as steps need them): after the
    /// model's modules change (an adapter loaded or unloaded), a graph could still read tensors
    /// the change replaced.
    pub fn reset(&mut self) {
        self.captured.clear();
    }

    /// Whether steps may replay graphs.
    pub fn active(&self) -> bool {
        self.ready.is_some()
    }

    /// One decode step (one new token per row): as [`KvPool::forward`], through a graph when
    /// the step fits a bucket (`base_rows`: every row uses the base model, no adapter).
    pub fn decode(&mut self, pool: &mut KvPool, model: &CausalLm, seqs: &mut [&mut SeqKv], ids: &[Vec<i64>], base_rows: bool) -> Tensor {
        let bucket = self.bucket(seqs, ids).filter(|_| base_rows);
        let (Some(bucket), Some((device, graph_pool))) = (bucket, self.ready) else {
            self.stats.eager += 1;
            return pool.forward(model, seqs, ids);
        };
        let rows = seqs.len() as i64;
        let (host, layout) = pool.prepare(seqs, ids, Some(bucket));
        let host = Tensor::from_slice(&host);
        let logits = match self.captured.get_mut(&bucket) {
            Some(c) => {
                c.input.copy_(&host);
                match c.graph.replay() {
                    Ok(()) => {
                        self.stats.replays += 1;
                        Some(c.logits.narrow(0, 0, rows))
                    }
                    Err(e) => {
                        tracing::warn!("decoding without CUDA graphs from now on: {e}");
                        None
                    }
                }
            }
            None => self.capture(pool, model, device, graph_pool, bucket, layout, &host).map(|l| l.narrow(0, 0, rows)),
        };
        let logits = logits.unwrap_or_else(|| {
            // Off from now on; this step eagerly, from the same indices (its key and value
            // writes, if a warm-up made them already, write the same values again).
            self.ready = None;
            self.captured.clear();
            self.stats.eager += 1;
            pool.run(model, &host.to_device(model.device), layout).narrow(0, 0, rows)
        });
        KvPool::advance(seqs, layout);
        logits
    }

    /// The (rows, context) bucket of a decode step, `None` when it has none.
    fn bucket(&self, seqs: &[&mut SeqKv], ids: &[Vec<i64>]) -> Option<(i64, i64)> {
        if seqs.is_empty() || ids.iter().any(|i| i.len() != 1) || seqs.iter().any(|s| s.len == 0) {
            return None;
        }
        let rows = seqs.len().next_power_of_two() as i64;
        let longest = seqs.iter().map(|s| s.len).max()?;
        let context = (longest.next_power_of_two() as i64).max(MIN_CONTEXT);
        (rows <= self.max_rows && context <= MAX_CONTEXT).then_some((rows, context))
    }

    /// Captures `bucket`'s graph for this step's indices `host`, replays it, and checks the
    /// replay against the capture's eager warm-up; the step's logits, or `None` (graphs off).
    #[allow(clippy::too_many_arguments)]
    fn capture(&mut self, pool: &KvPool, model: &CausalLm, device: usize, graph_pool: GraphPool, bucket: (i64, i64), layout: Layout, host: &Tensor) -> Option<Tensor> {
        let start = Instant::now();
        let input = host.to_device(model.device);
        let captured = CudaGraph::capture(device, graph_pool, || pool.run(model, &input, layout));
        let (graph, warm, logits) = match captured {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("decoding without CUDA graphs: capturing {} rows × {} positions: {e}", bucket.0, bucket.1);
                return None;
            }
        };
        if let Err(e) = graph.replay() {
            tracing::warn!("decoding without CUDA graphs: {e}");
            return None;
        }
        let diff = (&logits - &warm).abs().max().to_kind(Kind::Float).double_value(&[]);
        let scale = warm.abs().max().to_kind(Kind::Float).double_value(&[]);
        let agrees = diff.is_finite() && diff <= 1e-3 * scale.max(1.0);
        if !agrees {
            tracing::warn!("decoding without CUDA graphs: the replay of {} rows × {} positions differs from the eager step by {diff} (logits up to {scale})", bucket.0, bucket.1);
            return None;
        }
        self.stats.captures += 1;
        self.stats.capture_time += start.elapsed();
        tracing::info!("captured the decode graph for {} rows × {} positions in {:.0} ms (replay vs eager: max |Δlogit| {diff})", bucket.0, bucket.1, start.elapsed().as_secs_f64() * 1e3);
        let out = logits.shallow_clone();
        self.captured.insert(bucket, Captured { graph, input, logits });
        Some(out)
    }
}

/// Why `model`'s decode forward cannot be captured (`None`: it can).
fn not_capturable(model: &CausalLm) -> Option<&'static str> {
    let c = &model.config;
    if c.moe.is_some() || c.family == Family::GptOss {
        return Some("mixture-of-experts routing sizes its work on the host");
    }
    if matches!(c.rope_scaling, RopeScaling::LongRope { .. }) {
        return Some("LongRoPE picks its frequencies on the host from the positions");
    }
    if c.scale_embeddings {
        return Some("the embedding scale is copied from the host each step");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::paged::tests::tiny;
    use crate::serve::paged::PoolConfig;

    /// The shape a graph captures — rows padded to the bucket (padding rows writing to the
    /// scratch slot), every row's cached positions padded to the bucket's context — gives each
    /// real row the logits of the unpadded step, and leaves the cache as the unpadded step does:
    /// later plain steps agree too.
    #[test]
    fn padded_decode_steps_equal_the_plain_ones() {
        let _g = tch::no_grad_guard();
        for window in [None, Some(5)] {
            let model = tiny(window);
            // Two pools fed the same prompts: one decodes padded, the other plainly.
            let mut pools = [KvPool::new(&model, PoolConfig { block_size: 4, blocks: 40 }), KvPool::new(&model, PoolConfig { block_size: 4, blocks: 40 })];
            let prompts: [Vec<i64>; 3] = [(1..10).collect(), vec![11, 12], (13..30).collect()];
            let mut seqs: [Vec<SeqKv>; 2] = [Vec::new(), Vec::new()];
            for (pool, seqs) in pools.iter_mut().zip(&mut seqs) {
                for p in &prompts {
                    let mut kv = SeqKv::default();
                    let _ = pool.forward(&model, &mut [&mut kv], &[p.clone()]);
                    seqs.push(kv);
                }
            }
            let mut last: Vec<i64> = vec![3, 7, 9];
            for step in 0..4 {
                let ids: Vec<Vec<i64>> = last.iter().map(|&t| vec![t]).collect();
                let [padded_pool, plain_pool] = &mut pools;
                let [padded_seqs, plain_seqs] = &mut seqs;
                // 3 rows → a bucket of 4; the longest row (17 + step) → a context of 64.
                let mut rows: Vec<&mut SeqKv> = padded_seqs.iter_mut().collect();
                let (host, layout) = padded_pool.prepare(&mut rows, &ids, Some((4, 64)));
                assert_eq!((layout.b, layout.s_max), (4, 64));
                let padded = padded_pool.run(&model, &Tensor::from_slice(&host), layout);
                KvPool::advance(&mut rows, layout);
                let mut rows: Vec<&mut SeqKv> = plain_seqs.iter_mut().collect();
                let plain = plain_pool.forward(&model, &mut rows, &ids);
                assert_eq!(padded.size(), vec![4, 40]);
                let d = (padded.narrow(0, 0, 3) - &plain).abs().max().double_value(&[]);
                assert!(d < 1e-5, "window {window:?} step {step}: {d}");
                // The padding rows are finite (masked padding never yields NaN).
                assert!(padded.isfinite().all().int64_value(&[]) == 1);
                last = (0..3).map(|r| plain.get(r).argmax(-1, false).int64_value(&[])).collect();
            }
            for (a, b) in seqs[0].iter().zip(&seqs[1]) {
                assert_eq!((a.len, &a.blocks), (b.len, &b.blocks), "the padded steps took the same blocks");
            }
        }
    }

    /// Buckets: rows to the next power of two up to the largest bucket, context to the next
    /// power of two of the longest row (at least MIN_CONTEXT, at most MAX_CONTEXT); prefill chunks
    /// and empty rows have none. On the CPU no graph is used.
    #[test]
    fn decode_steps_fall_into_power_of_two_buckets() {
        let model = tiny(None);
        let graphs = DecodeGraphs::new(&model, 24, true);
        assert!(!graphs.active(), "no graphs on the CPU");
        assert_eq!(graphs.max_rows, 32);
        let mut kvs: Vec<SeqKv> = [3usize, 100, 65].iter().map(|&len| SeqKv { len, ..Default::default() }).collect();
        let one = vec![vec![1i64]; 3];
        let rows: Vec<&mut SeqKv> = kvs.iter_mut().collect();
        assert_eq!(graphs.bucket(&rows, &one), Some((4, 128)));
        assert_eq!(graphs.bucket(&rows[..1], &one[..1]), Some((1, MIN_CONTEXT)));
        assert_eq!(graphs.bucket(&rows, &vec![vec![1i64, 2]; 3]), None, "two tokens a row: a prefill chunk");
        let mut long = SeqKv { len: MAX_CONTEXT as usize + 1, ..Default::default() };
        assert_eq!(graphs.bucket(&[&mut long], &one[..1]), None);
        let mut many: Vec<SeqKv> = (0..33).map(|_| SeqKv { len: 1, ..Default::default() }).collect();
        let rows: Vec<&mut SeqKv> = many.iter_mut().collect();
        assert_eq!(graphs.bucket(&rows, &vec![vec![1i64]; 33]), None, "past the largest bucket");
    }
}
