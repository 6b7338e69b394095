//! Where gradient checkpointing keeps the layer inputs between the forward and the backward
//! pass, and how many it keeps.
//!
//! Offloaded inputs live in pinned host memory, copied out in chunks of [`HOST_CHUNK_BYTES`]
//! on a side stream ([`crate::gpu::stream`]) into a pool of equal pinned buffers, so the copies
//! overlap the layers computing meanwhile; the compute stream waits for a copy (on the device)
//! only before the memory it reads is reused, and for a copy back only before the layer that
//! needs it. Equal chunks also avoid libtorch's pinned cache, which rounds every allocation up
//! to a power of two: one llama-3.1-8b layer input of 410k tokens (3.36 GB) taken whole would
//! hold 4 GiB, 32 of them more than a 128 GiB host has. Without a side stream the same chunks
//! are copied by libtorch on the compute stream.
//!
//! When even the exact bytes do not fit the host (llama-3.1-70b at 107k tokens: 80 inputs of
//! 1.75 GB), only every `k`-th layer's input is kept ([`segment_len`]); the backward pass
//! recomputes a segment's other inputs from its first one, without autograd, on the device
//! (`k − 1` inputs there at a time), at the cost of one more forward pass of those layers.

use crate::gpu::stream::{Event, PinnedBuffer, SideStream};
use tch::{Device, Tensor};

/// Bytes of one pinned-host chunk of an offloaded layer input (a power of two).
pub const HOST_CHUNK_BYTES: i64 = 32 << 20;

/// Share of the host's available memory (at the first offloaded step) the layer inputs may
/// take; the rest is left to the process and the system.
pub const HOST_BUDGET_PERCENT: u64 = 80;

/// One layer input kept for the backward pass.
pub enum SavedInput {
    /// On the device (or on the CPU, when the run is on the CPU).
    Device(Tensor),
    /// In pinned host memory: the rows of the `[B·T, D]` view in chunks, and the shape.
    Host {
        chunks: Vec<HostChunk>,
        size: Vec<i64>,
        /// While the side stream still copies out: its event, and the device tensor it reads.
        copying: Option<(Event, Tensor)>,
    },
}

/// One chunk of an offloaded input: a CPU tensor in pinned memory, and the pooled buffer it
/// lives in when the side stream copied it (else libtorch's pinned cache owns it).
pub struct HostChunk {
    tensor: Tensor,
    _buffer: Option<PinnedBuffer>,
}

/// An input on its way back to the device: [`Restoring::wait`] hands it to the compute stream.
pub struct Restoring {
    tensor: Tensor,
    done: Option<Event>,
    _chunks: Vec<HostChunk>,
}

impl Restoring {
    /// The input, once the compute stream has been made to wait for its copy (no host sync).
    pub fn wait(self) -> Tensor {
        if let Some(e) = &self.done {
            e.block_compute();
        }
        self.tensor
    }
}

impl SavedInput {
    /// Keeps `h` (a `[B, T, D]` layer input): copied to pinned host memory in chunks with
    /// `offload` on a CUDA device, else kept as it is. The copies run on the device's side
    /// stream when there is one ([`SideStream`]), else on the compute stream (no host sync
    /// either way); call [`SavedInput::release_source`] once the work reading `h` is queued.
    pub fn save(h: &Tensor, offload: bool) -> SavedInput {
        if !(offload && h.device().is_cuda()) {
            return SavedInput::Device(h.shallow_clone());
        }
        let size = h.size();
        let width = *size.last().expect("hidden states have a last dimension");
        let flat = h.reshape([-1, width]).contiguous();
        let rows = flat.size()[0];
        let row_bytes = width * h.kind().elt_size_in_bytes() as i64;
        let per_chunk = (HOST_CHUNK_BYTES / row_bytes).max(1);
        let spans: Vec<(i64, i64)> = (0..rows).step_by(per_chunk as usize).map(|s| (s, per_chunk.min(rows - s))).collect();
        if let Some(side) = SideStream::of(h.device()) {
            if let Some(saved) = save_on_side(side, &flat, &spans, (per_chunk * row_bytes) as usize, &size) {
                return saved;
            }
        }
        // Non-blocking to the host lands in pinned memory, on the compute stream.
        let chunks = spans
            .iter()
            .map(|&(s, n)| HostChunk { tensor: flat.narrow(0, s, n).to_device_(Device::Cpu, h.kind(), true, false), _buffer: None })
            .collect();
        SavedInput::Host { chunks, size, copying: None }
    }

    /// Once the work that reads the input on the device is queued: the compute stream waits
    /// (on the device) for the copy out, and the device tensor is let go, so the allocator can
    /// give its memory to later work only once the copy has read it.
    pub fn release_source(&mut self) {
        if let SavedInput::Host { copying, .. } = self {
            if let Some((done, source)) = copying.take() {
                done.block_compute();
                drop(source);
            }
        }
    }

    /// Starts bringing the input back to `device` (on the side stream when the chunks were
    /// copied there; chunk by chunk through a small device buffer otherwise, so the only
    /// full-size allocation is the result).
    pub fn restore(mut self, device: Device) -> Restoring {
        self.release_source();
        let (chunks, size) = match self {
            SavedInput::Device(t) => return Restoring { tensor: t, done: None, _chunks: Vec::new() },
            SavedInput::Host { chunks, size, .. } => (chunks, size),
        };
        let kind = chunks[0].tensor.kind();
        let width = *size.last().expect("a shape");
        let out = Tensor::empty([size.iter().product::<i64>() / width, width], (kind, device));
        let pooled = chunks.iter().all(|c| c._buffer.is_some());
        if let Some(side) = SideStream::of(device).filter(|_| pooled) {
            // The side stream starts once the compute stream is done with `out`'s memory.
            let mut ok = side.wait_for_compute();
            let mut start = 0;
            for c in &chunks {
                let n = c.tensor.size()[0];
                ok = ok && side.copy(&out.narrow(0, start, n), &c.tensor);
                start += n;
            }
            if let Some(done) = side.done().filter(|_| ok) {
                return Restoring { tensor: out.view(size.as_slice()), done: Some(done), _chunks: chunks };
            }
            // CUDA refused a copy: let everything queued finish, then copy on the compute stream.
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
        }
        let mut start = 0;
        for c in &chunks {
            let n = c.tensor.size()[0];
            // Pinned → device without a host sync (blocking for pooled buffers, which go back to
            // the pool when this returns), then a device-to-device copy.
            let on_device = c.tensor.to_device_(device, kind, !pooled, false);
            out.narrow(0, start, n).copy_(&on_device);
            start += n;
        }
        Restoring { tensor: out.view(size.as_slice()), done: None, _chunks: Vec::new() }
    }
}

/// [`SavedInput::save`] through the side stream into pooled pinned buffers; `None` (after
/// letting anything queued finish) when CUDA refused a step.
fn save_on_side(side: &SideStream, flat: &Tensor, spans: &[(i64, i64)], buffer_bytes: usize, size: &[i64]) -> Option<SavedInput> {
    let width = flat.size()[1];
    let mut ok = side.wait_for_compute();
    let mut chunks = Vec::with_capacity(spans.len());
    for &(s, n) in spans {
        let Some(buffer) = PinnedBuffer::take(buffer_bytes).filter(|_| ok) else {
            ok = false;
            break;
        };
        let tensor = buffer.tensor(&[n, width], flat.kind());
        ok = side.copy(&tensor, &flat.narrow(0, s, n));
        chunks.push(HostChunk { tensor, _buffer: Some(buffer) });
    }
    match side.done().filter(|_| ok) {
        Some(done) => Some(SavedInput::Host { chunks, size: size.to_vec(), copying: Some((done, flat.shallow_clone())) }),
        None => {
            if let Device::Cuda(i) = flat.device() {
                tch::Cuda::synchronize(i as i64);
            }
            None
        }
    }
}

/// Layers per checkpointed segment: the smallest `k` for which the inputs of every `k`-th of
/// `layers` layers (`ceil(layers / k)` inputs of `input_bytes`) fit in `budget` bytes; 1 when
/// all of them fit, `layers` when not even one does.
pub fn segment_len(layers: usize, input_bytes: u64, budget: u64) -> usize {
    let fit = (budget / input_bytes.max(1)) as usize;
    if fit == 0 {
        return layers.max(1);
    }
    layers.div_ceil(fit).clamp(1, layers.max(1))
}

/// Bytes the offloaded layer inputs may take in host memory: [`HOST_BUDGET_PERCENT`] of what
/// the host had available when first asked (later calls return the same number, as the pinned
/// cache then holds part of it). `FTX_OFFLOAD_HOST_GIB` sets it instead.
pub fn host_budget() -> u64 {
    static BUDGET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        if let Some(gib) = std::env::var("FTX_OFFLOAD_HOST_GIB").ok().and_then(|v| v.trim().parse::<f64>().ok()) {
            return (gib * (1u64 << 30) as f64) as u64;
        }
        mem_available().map_or(u64::MAX, |b| b / 100 * HOST_BUDGET_PERCENT)
    })
}

/// `MemAvailable` of /proc/meminfo in bytes (Linux).
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_as_short_as_the_host_allows() {
        // 80 inputs of 1.75 GB (llama-3.1-70b at 107k tokens) in 100 GB: 57 fit → k = 2.
        assert_eq!(segment_len(80, 1_750_000_000, 100_000_000_000), 2);
        // All fit: k = 1. Exactly 40 fit: k = 2 (40 inputs). 39 fit: k = 3 (27 inputs).
        assert_eq!(segment_len(32, 1000, 32_000), 1);
        assert_eq!(segment_len(80, 1000, 40_000), 2);
        assert_eq!(segment_len(80, 1000, 39_999), 3);
        // Not even one: one segment of every layer.
        assert_eq!(segment_len(16, 1000, 999), 16);
    }

    #[test]
    fn a_cpu_input_is_kept_as_it_is() {
        let h = Tensor::arange(24, (tch::Kind::Float, Device::Cpu)).view([1, 6, 4]);
        let saved = SavedInput::save(&h, true);
        assert!(matches!(saved, SavedInput::Device(_)));
        assert_eq!(saved.restore(Device::Cpu).wait(), h);
    }
}
