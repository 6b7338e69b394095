//! `ftx bench kernels`: every fused kernel (RMSNorm with the residual add, rotary embedding of
//! q and k, SwiGLU; each forward and backward; the LM head's cross-entropy, in its own module
//! bench_cross_entropy) on random inputs of a model shape, checked and timed against what it
//! replaces.
//!
//! For each kernel and element type it runs, from the same inputs and output gradients:
//! - the fused path on the device (the NVRTC kernels inside their autograd nodes),
//! - the same nodes on CPU copies (the kernels' CPU reference versions), on a CUDA device,
//! - the libtorch composite the model runs without the kernels (same device),
//!
//! and reports the largest error of every output and input gradient against each, normalised
//! by the largest magnitude of the reference (`max |a − b| / max |b|`), and the median time of
//! forward and forward + backward (CUDA events on libtorch's stream; wall clock on the CPU).

use crate::gpu::kernels;
use crate::model::attention::{apply_rope, Rope};
use crate::model::nodes::{swiglu, swiglu_through_kernels};
use crate::model::norm::RmsNorm;
use crate::model::RopeScaling;
use crate::plan::ModelShape;
use anyhow::Result;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// What to run.
#[derive(Debug, Clone)]
pub struct KernelBenchSettings {
    /// The model shape whose widths the inputs take (hidden, intermediate, heads, head_dim).
    pub shape: ModelShape,
    /// Rows of the batch, and tokens per row.
    pub batch: i64,
    pub seq: i64,
    /// Where the fused path runs (a CUDA device for the kernels, the CPU for the references).
    pub device: Device,
    /// Element types to check (float32, bf16).
    pub kinds: Vec<Kind>,
    /// Timed repetitions (after 3 untimed).
    pub iters: usize,
}

/// One kernel's result: one JSON line of `ftx bench kernels`.
#[derive(Debug, Clone, Serialize)]
pub struct KernelBenchResult {
    pub kernel: &'static str,
    pub dtype: &'static str,
    /// The shape of its main input.
    pub shape: Vec<i64>,
    /// Normalised max error of each output and gradient against the CPU reference (CUDA only).
    pub err_vs_reference: Option<Vec<(String, f64)>>,
    pub max_err_vs_reference: Option<f64>,
    pub tolerance_vs_reference: f64,
    /// Normalised max error of each output and gradient against libtorch's composite.
    pub err_vs_libtorch: Vec<(String, f64)>,
    pub max_err_vs_libtorch: f64,
    pub tolerance_vs_libtorch: f64,
    pub fused_fwd_ms: f64,
    pub libtorch_fwd_ms: f64,
    pub fused_fwd_bwd_ms: f64,
    pub libtorch_fwd_bwd_ms: f64,
    pub speedup_fwd: f64,
    pub speedup_fwd_bwd: f64,
    pub pass: bool,
}

/// One kernel's four median times in milliseconds: fused and libtorch's composite, the forward
/// pass alone and forward + backward.
pub(crate) struct KernelTimes {
    pub fused_fwd: f64,
    pub libtorch_fwd: f64,
    pub fused_fwd_bwd: f64,
    pub libtorch_fwd_bwd: f64,
}

impl KernelBenchResult {
    /// One kernel's line from its per-output errors (against the CPU reference where there is
    /// one, and against libtorch) and times: the largest errors, the verdict (within
    /// [`tolerances`] and `finite`, every fused output finite), and the times rounded to 0.1 µs
    /// with the speed-ups.
    pub(crate) fn new(
        kernel: &'static str,
        kind: Kind,
        shape: Vec<i64>,
        err_vs_reference: Option<Vec<(String, f64)>>,
        err_vs_libtorch: Vec<(String, f64)>,
        finite: bool,
        t: KernelTimes,
    ) -> KernelBenchResult {
        let (tolerance_vs_reference, tolerance_vs_libtorch) = tolerances(kind);
        let max = |v: &[(String, f64)]| v.iter().map(|(_, e)| *e).fold(0.0, f64::max);
        let max_err_vs_libtorch = max(&err_vs_libtorch);
        let max_err_vs_reference = err_vs_reference.as_deref().map(max);
        let pass = max_err_vs_libtorch <= tolerance_vs_libtorch && max_err_vs_reference.is_none_or(|e| e <= tolerance_vs_reference) && finite;
        let round = |v: f64| (v * 1e4).round() / 1e4;
        KernelBenchResult {
            kernel,
            dtype: if kind == Kind::BFloat16 { "bf16" } else { "fp32" },
            shape,
            err_vs_reference,
            max_err_vs_reference,
            tolerance_vs_reference,
            err_vs_libtorch,
            max_err_vs_libtorch,
            tolerance_vs_libtorch,
            fused_fwd_ms: round(t.fused_fwd),
            libtorch_fwd_ms: round(t.libtorch_fwd),
            fused_fwd_bwd_ms: round(t.fused_fwd_bwd),
            libtorch_fwd_bwd_ms: round(t.libtorch_fwd_bwd),
            speedup_fwd: round(t.libtorch_fwd / t.fused_fwd.max(1e-9)),
            speedup_fwd_bwd: round(t.libtorch_fwd_bwd / t.fused_fwd_bwd.max(1e-9)),
            pass,
        }
    }
}

/// The tolerances, as a fraction of the reference's largest magnitude. Against the CPU
/// reference (the same arithmetic, float32 accumulation in another order): float32 1e-5; bf16
/// 2⁻⁷, one bf16 rounding of the largest element (both round once per element, so only a
/// value on a rounding boundary can differ). Against libtorch's composite, which rounds its
/// intermediates (e.g. `x·cos` and `rotate_half(x)·sin` separately) to bf16: float32 1e-5, bf16
/// 2⁻⁵, a few bf16 roundings.
pub fn tolerances(kind: Kind) -> (f64, f64) {
    match kind {
        Kind::BFloat16 => (1.0 / 128.0, 1.0 / 32.0),
        _ => (1e-5, 1e-5),
    }
}

/// `max |a − b| / max |b|` in float32 (b is the reference).
pub fn normalised_error(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_device(Device::Cpu).to_kind(Kind::Float), b.to_device(Device::Cpu).to_kind(Kind::Float));
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]);
    if diff == 0.0 {
        0.0
    } else {
        diff / scale.max(f64::MIN_POSITIVE)
    }
}

/// A kernel under test: builds its leaves (inputs requiring grad where they have one) and
/// output gradients on a device, and runs either path to named outputs then, after backward,
/// the leaves' gradients.
struct Case {
    name: &'static str,
    shape: Vec<i64>,
    /// The leaf tensors (on the CPU; moved per run), and which need a gradient.
    leaves: Vec<(Tensor, bool)>,
    /// One cotangent per output.
    cotangents: Vec<Tensor>,
    /// The path with the fused kernels (the nodes; CPU reference versions on the CPU).
    fused: Box<dyn Fn(&[Tensor]) -> Vec<Tensor>>,
    /// libtorch's composite.
    composite: Box<dyn Fn(&[Tensor]) -> Vec<Tensor>>,
}

impl Case {
    fn leaves_on(&self, device: Device) -> Vec<Tensor> {
        self.leaves.iter().map(|(t, grad)| t.to_device(device).detach().set_requires_grad(*grad)).collect()
    }

    /// Outputs followed by the leaves' gradients.
    fn run(&self, fused: bool, device: Device) -> Vec<Tensor> {
        let leaves = self.leaves_on(device);
        let outs = if fused { (self.fused)(&leaves) } else { (self.composite)(&leaves) };
        backward(&outs, &self.cotangents, device);
        let mut all: Vec<Tensor> = outs.iter().map(|o| o.detach()).collect();
        all.extend(leaves.iter().zip(&self.leaves).filter(|(_, (_, g))| *g).map(|(l, _)| l.grad()));
        all
    }

    fn labels(&self, n_outputs: usize) -> Vec<String> {
        let mut l: Vec<String> = (0..n_outputs).map(|i| format!("out{i}")).collect();
        l.extend((0..self.leaves.len()).filter(|&i| self.leaves[i].1).map(|i| format!("grad{i}")));
        l
    }
}

fn backward(outs: &[Tensor], cotangents: &[Tensor], device: Device) {
    let loss = outs
        .iter()
        .zip(cotangents)
        .map(|(o, c)| (o.to_kind(Kind::Float) * c.to_device(device).to_kind(Kind::Float)).sum(Kind::Float))
        .reduce(|a, b| a + b)
        .expect("an output");
    loss.backward();
}

/// Runs every case for every element type; one result per (kernel, type).
pub fn bench_kernels(s: &KernelBenchSettings) -> Result<Vec<KernelBenchResult>> {
    if let Device::Cuda(i) = s.device {
        ftx_kernels::cuda::prepare(i as i32).map_err(|e| anyhow::anyhow!("the fused kernels did not load on cuda:{i}: {e}"))?;
    }
    anyhow::ensure!(kernels::built(), "this ftx was built without the C++ shim (a libtorch without headers): no fused kernels");
    kernels::register();
    let was_enabled = kernels::enabled();
    let mut results = Vec::new();
    for &kind in &s.kinds {
        for case in cases(s, kind) {
            results.push(measure(s, kind, &case)?);
        }
    }
    kernels::set_enabled(was_enabled);
    Ok(results)
}

fn measure(s: &KernelBenchSettings, kind: Kind, case: &Case) -> Result<KernelBenchResult> {
    // The composite paths are the model's own code with the kernels switched off.
    kernels::set_enabled(false);
    let lib = case.run(false, s.device);
    kernels::set_enabled(true);
    let fused = case.run(true, s.device);
    let n_out = case.cotangents.len();
    let labels = case.labels(n_out);
    let errs = |other: &[Tensor]| -> Vec<(String, f64)> { labels.iter().zip(fused.iter().zip(other)).map(|(l, (a, b))| (l.clone(), normalised_error(a, b))).collect() };
    let err_lib = errs(&lib);
    let err_ref = s.device.is_cuda().then(|| errs(&case.run(true, Device::Cpu)));
    let finite = fused.iter().all(|t| t.isfinite().all().int64_value(&[]) == 1);
    let time = |fused: bool, with_backward: bool| -> Result<f64> {
        kernels::set_enabled(fused);
        let leaves = case.leaves_on(s.device);
        let cot: Vec<Tensor> = case.cotangents.iter().map(|c| c.to_device(s.device)).collect();
        let mut once = || {
            let outs = if fused { (case.fused)(&leaves) } else { (case.composite)(&leaves) };
            if with_backward {
                backward(&outs, &cot, s.device);
            }
        };
        let ms = median_ms(s.device, s.iters, &mut once)?;
        kernels::set_enabled(true);
        Ok(ms)
    };
    let t = KernelTimes { fused_fwd: time(true, false)?, libtorch_fwd: time(false, false)?, fused_fwd_bwd: time(true, true)?, libtorch_fwd_bwd: time(false, true)? };
    Ok(KernelBenchResult::new(case.name, kind, case.shape.clone(), err_ref, err_lib, finite, t))
}

/// The median over `iters` runs of `work` (after 3 untimed), by CUDA events on libtorch's
/// current stream, or by the wall clock on the CPU.
pub(crate) fn median_ms(device: Device, iters: usize, work: &mut dyn FnMut()) -> Result<f64> {
    for _ in 0..3 {
        work();
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let ms = match device {
            Device::Cuda(i) => {
                let stream = kernels::current_stream(i);
                ftx_kernels::cuda::time_ms(i as i32, stream, work).map_err(|e| anyhow::anyhow!("timing: {e}"))? as f64
            }
            _ => {
                let t = std::time::Instant::now();
                work();
                t.elapsed().as_secs_f64() * 1e3
            }
        };
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn randn(shape: &[i64], kind: Kind) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(kind)
}

/// The three kernels at `s`'s shape in `kind`.
fn cases(s: &KernelBenchSettings, kind: Kind) -> Vec<Case> {
    tch::manual_seed(7);
    let m = &s.shape;
    let (hidden, inter, heads, kv, hd) = (m.hidden as i64, m.intermediate as i64, m.heads as i64, m.kv_heads as i64, m.head_dim as i64);
    let (b, t) = (s.batch, s.seq);
    let rows = b * t;
    let eps = 1e-5;
    let weight = (randn(&[hidden], Kind::Float) * 0.1 + 1.0).to_kind(kind);
    let norm_case = Case {
        name: "rms_norm_residual",
        shape: vec![b, t, hidden],
        leaves: vec![(randn(&[b, t, hidden], kind), true), (randn(&[b, t, hidden], kind), true), (weight, true)],
        cotangents: vec![randn(&[b, t, hidden], kind), randn(&[b, t, hidden], kind)],
        fused: Box::new(move |l: &[Tensor]| {
            let (sum, y) = kernels::rms_norm(&l[0], Some(&l[1]), &l[2], eps, 0.0);
            vec![sum.expect("sum"), y]
        }),
        composite: Box::new(move |l: &[Tensor]| {
            let norm = RmsNorm { weight: l[2].shallow_clone(), eps, unit_offset: false };
            let (sum, y) = norm.forward_add(&l[0], &l[1]);
            vec![sum, y]
        }),
    };
    // q and k as the model has them: views of one fused q/k/v projection output.
    let width = (heads + 2 * kv) * hd;
    let rope = Rope::new(hd, 500_000.0, &RopeScaling::None, Device::Cpu);
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], false);
    let (cos, sin) = rope.cos_sin(&positions, kind);
    let split = move |y: &Tensor| {
        let q = y.narrow(-1, 0, heads * hd).view([b, t, heads, hd]);
        let k = y.narrow(-1, heads * hd, kv * hd).view([b, t, kv, hd]);
        (q, k)
    };
    let rope_case = Case {
        name: "rope_qk",
        shape: vec![b, t, width],
        leaves: vec![(randn(&[b, t, width], kind), true), (cos, false), (sin, false)],
        cotangents: vec![randn(&[b, t, heads, hd], kind), randn(&[b, t, kv, hd], kind)],
        fused: Box::new(move |l: &[Tensor]| {
            let (q, k) = split(&l[0]);
            let (q, k) = kernels::rope(&q, &k, &l[1].squeeze_dim(1), &l[2].squeeze_dim(1));
            vec![q, k]
        }),
        composite: Box::new(move |l: &[Tensor]| {
            let (q, k) = split(&l[0]);
            let rot = |x: &Tensor| apply_rope(&x.transpose(1, 2), &l[1], &l[2]).transpose(1, 2);
            vec![rot(&q), rot(&k)]
        }),
    };
    let swiglu_case = Case {
        name: "swiglu",
        shape: vec![rows, 2 * inter],
        leaves: vec![(randn(&[rows, 2 * inter], kind), true)],
        cotangents: vec![randn(&[rows, inter], kind)],
        fused: Box::new(|l: &[Tensor]| vec![swiglu_through_kernels(&l[0], None).0]),
        composite: Box::new(|l: &[Tensor]| vec![swiglu(&l[0], None).0]),
    };
    vec![norm_case, rope_case, swiglu_case]
}
