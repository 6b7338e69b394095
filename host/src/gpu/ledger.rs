//! The step ledger (issue 15): every kernel a piece of work runs — a training step, forward,
//! backward and optimizer — with the bytes its tensors move and, for GEMMs and attention, its
//! FLOPs, recorded through libtorch's RecordFunction callbacks (src/gpu/ledger.cpp) on any
//! device, and what those would take at a stated bandwidth and matmul rate. What the GPU
//! profile shows, predicted without a GPU.
//!
//! Counting (ledger.cpp has the rules): one entry per kernel — the leaf ops of libtorch's
//! dispatcher (a composite such as `aten::linear` or `aten::to` is not counted, the `addmm`
//! or `copy_` it calls is), GEMM and attention ops even where they call helper kernels, and
//! each fused kernel (`ftx::kernel::*`: its scope's reads and writes, [`kernel`]) as one.
//! Views and allocations are counted without bytes. Each kernel is attributed to the phase of
//! the step and the innermost ftx node around it ([`scope`], the C++ nodes' own scopes, and
//! their backward `ftx::<node>.backward`), else the autograd node that ran it.
//!
//! On the CPU the fused kernels run their reference versions when asked
//! ([`super::kernels::with_cpu_reference`]): the same nodes and scopes as on CUDA, so the CPU
//! ledger counts the kernels the GPU step launches.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::Tensor;

/// Why a ledger could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// This build has no C++ shim (a libtorch without headers).
    #[error("the step ledger needs the C++ shim, which this build of ftx lacks (a libtorch without headers)")]
    NotBuilt,
    /// libtorch refused the callback, or a ledger already records.
    #[error("starting the step ledger: {0}")]
    Start(String),
}

/// The kind of work a kernel does, as the report groups them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpClass {
    /// Matrix products (`mm`, `addmm`, `bmm`, `_grouped_mm`, …).
    Gemm,
    /// Scaled dot-product attention kernels (flash, efficient, cuDNN, CPU flash).
    Attention,
    /// One of ftx's fused NVRTC kernels (RMSNorm, RoPE, SwiGLU, cross-entropy).
    Fused,
    /// Elementwise and fill kernels (add, mul, silu, fused AdamW, …).
    Elementwise,
    /// Copies, casts and gathers (`copy_`, `cat`, `index_select`, the embedding's backward, …).
    Copy,
    /// Reductions and softmaxes (sum, norm, log-softmax, NLL, …).
    Reduction,
    /// Views, allocations and metadata: no kernel, counted without bytes.
    View,
}

impl OpClass {
    fn parse(s: &str) -> Option<OpClass> {
        Some(match s {
            "gemm" => OpClass::Gemm,
            "attention" => OpClass::Attention,
            "fused" => OpClass::Fused,
            "elementwise" => OpClass::Elementwise,
            "copy" => OpClass::Copy,
            "reduction" => OpClass::Reduction,
            "view" => OpClass::View,
            _ => return None,
        })
    }

    /// The name the report and the JSON use.
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Gemm => "gemm",
            OpClass::Attention => "attention",
            OpClass::Fused => "fused",
            OpClass::Elementwise => "elementwise",
            OpClass::Copy => "copy",
            OpClass::Reduction => "reduction",
            OpClass::View => "view",
        }
    }
}

/// One kernel (or view) of the recorded work, summed over its repetitions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerEntry {
    pub class: OpClass,
    /// `forward`, `backward` or `optimizer`.
    pub phase: String,
    /// The innermost ftx node (`ftx::lora_mlp`, `ftx::lora_linear.backward`, …), else the
    /// autograd node (`autograd::MmBackward0`), else `-`.
    pub node: String,
    /// The kernel: a leaf op (`aten::copy_`) or a fused kernel (`ftx::kernel::rms_norm_forward`).
    pub op: String,
    /// The op the code called, where it is not `op` itself (`aten::to` for its `aten::copy_`).
    pub via: String,
    pub count: u64,
    /// Bytes read and written.
    pub bytes: f64,
    /// GEMM and attention FLOPs (0 elsewhere).
    pub flops: f64,
}

/// What a recorded piece of work moved, entry by entry.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    pub entries: Vec<LedgerEntry>,
}

static RECORDING: AtomicBool = AtomicBool::new(false);

/// Whether a ledger is recording now (scopes cost nothing otherwise).
pub fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

/// Runs `f` with every op it runs recorded — on this thread and, for its backward passes, the
/// autograd engine's threads; one ledger at a time in the process (else [`LedgerError::Start`]).
pub fn record<R>(f: impl FnOnce() -> R) -> Result<(R, Ledger), LedgerError> {
    #[cfg(ftx_torch_shim)]
    {
        shim::start()?;
        RECORDING.store(true, Ordering::Relaxed);
        // Stops on unwind too, so that a panicking step leaves no callback behind.
        struct Stop;
        impl Drop for Stop {
            fn drop(&mut self) {
                if RECORDING.swap(false, Ordering::Relaxed) {
                    let _ = shim::stop();
                }
            }
        }
        let stop = Stop;
        let out = f();
        RECORDING.store(false, Ordering::Relaxed);
        std::mem::forget(stop);
        let text = shim::stop();
        Ok((out, Ledger::parse(&text)))
    }
    #[cfg(not(ftx_torch_shim))]
    {
        let _ = f;
        Err(LedgerError::NotBuilt)
    }
}

/// A scope open until dropped (on the thread that opened it).
pub struct ScopeGuard {
    #[cfg_attr(not(ftx_torch_shim), allow(dead_code))]
    handle: *mut std::ffi::c_void,
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        #[cfg(ftx_torch_shim)]
        if !self.handle.is_null() {
            // SAFETY: a scope ftx_ledger_scope_begin returned, closed once, on its thread
            // (ScopeGuard is neither Send nor Sync: it holds a raw pointer).
            unsafe { shim::ftx_ledger_scope_end(self.handle) }
        }
    }
}

/// Attributes what runs until the guard drops to `name`: an ftx node (`ftx::head_loss`) or a
/// phase of the step (`ftx::phase::optimizer`).
pub fn scope(name: &str) -> ScopeGuard {
    kernel(name, &[], &[])
}

/// A fused kernel's launch, counted as one kernel reading `reads` and writing `writes`, named
/// `ftx::kernel::<name>` (`name` given in full). Open it around the launch only.
pub fn kernel(name: &str, reads: &[&Tensor], writes: &[&Tensor]) -> ScopeGuard {
    #[cfg(ftx_torch_shim)]
    if recording() {
        let Ok(c) = std::ffi::CString::new(name) else { return ScopeGuard { handle: std::ptr::null_mut() } };
        let ptrs = |ts: &[&Tensor]| ts.iter().filter(|t| t.defined()).map(|t| t.as_ptr() as *const std::ffi::c_void).collect::<Vec<_>>();
        let (r, w) = (ptrs(reads), ptrs(writes));
        // SAFETY: live tensors (at::Tensor*), read during the call; the name is copied.
        let handle = unsafe { shim::ftx_ledger_scope_begin(c.as_ptr(), r.as_ptr(), r.len() as i32, w.as_ptr(), w.len() as i32) };
        return ScopeGuard { handle };
    }
    let _ = (name, reads, writes);
    ScopeGuard { handle: std::ptr::null_mut() }
}

impl Ledger {
    /// The shim's lines: `class\tphase\tnode\top\tvia\tcount\tbytes\tflops`.
    fn parse(text: &str) -> Ledger {
        let entries = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                let [class, phase, node, op, via, count, bytes, flops] = f.as_slice() else { return None };
                Some(LedgerEntry {
                    class: OpClass::parse(class)?,
                    phase: phase.to_string(),
                    node: node.to_string(),
                    op: op.to_string(),
                    via: via.to_string(),
                    count: count.parse().ok()?,
                    bytes: bytes.parse().ok()?,
                    flops: flops.parse().ok()?,
                })
            })
            .collect();
        Ledger { entries }
    }

    /// Entries whose op, node and phase satisfy `keep`, summed: (count, bytes, flops).
    pub fn total(&self, keep: impl Fn(&LedgerEntry) -> bool) -> (u64, f64, f64) {
        self.entries.iter().filter(|e| keep(e)).fold((0, 0.0, 0.0), |(c, b, f), e| (c + e.count, b + e.bytes, f + e.flops))
    }

    /// The report at `rates`: per class and per entry, the predicted time.
    pub fn report(&self, rates: Rates) -> LedgerReport {
        let mut classes: BTreeMap<OpClass, ClassTotals> = BTreeMap::new();
        let mut ops: Vec<OpReport> = Vec::new();
        for e in &self.entries {
            let ms = rates.ms(e.class, e.count, e.bytes, e.flops);
            let c = classes.entry(e.class).or_default();
            c.count += e.count;
            c.gib += e.bytes / GIB;
            c.gflop += e.flops / 1e9;
            c.ms += ms;
            if e.class != OpClass::View {
                ops.push(OpReport { entry: e.clone(), gib: e.bytes / GIB, ms });
            }
        }
        ops.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| b.entry.count.cmp(&a.entry.count)));
        let non_gemm_ms = classes.iter().filter(|(k, _)| !matches!(k, OpClass::Gemm | OpClass::Attention)).map(|(_, c)| c.ms).sum();
        let total_ms = classes.values().map(|c| c.ms).sum();
        let kernels = classes.iter().filter(|(k, _)| **k != OpClass::View).map(|(_, c)| c.count).sum();
        LedgerReport { rates, kernels, total_ms, non_gemm_ms, classes: classes.into_iter().map(|(k, v)| (k.name(), v)).collect(), ops }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// The rates a ledger's bytes and FLOPs are turned into time at.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Rates {
    /// Memory bandwidth, TB/s (10¹² bytes a second): 3.0, an H100's achievable HBM3.
    pub bandwidth_tbs: f64,
    /// Dense matmul rate, TFLOP/s: 700, an H100's achievable bf16.
    pub gemm_tflops: f64,
    /// Attention kernels' rate, TFLOP/s: 400 (flash attention on an H100, bf16).
    pub attention_tflops: f64,
    /// The least time a kernel takes on the device, µs: 2 (launch, ramp-up and tail of a small
    /// kernel on an H100, as its profiles show them).
    pub kernel_floor_us: f64,
}

impl Default for Rates {
    fn default() -> Rates {
        Rates { bandwidth_tbs: 3.0, gemm_tflops: 700.0, attention_tflops: 400.0, kernel_floor_us: 2.0 }
    }
}

impl Rates {
    /// Milliseconds of `count` kernels: the bytes at the bandwidth, for GEMMs and attention the
    /// larger of that and the FLOPs at their rate (a roofline per entry), and at least the
    /// kernel floor each. Views take none.
    pub fn ms(&self, class: OpClass, count: u64, bytes: f64, flops: f64) -> f64 {
        if class == OpClass::View {
            return 0.0;
        }
        let memory = bytes / (self.bandwidth_tbs * 1e12) * 1e3;
        let compute = match class {
            OpClass::Gemm => flops / (self.gemm_tflops * 1e12) * 1e3,
            OpClass::Attention => flops / (self.attention_tflops * 1e12) * 1e3,
            _ => 0.0,
        };
        memory.max(compute).max(count as f64 * self.kernel_floor_us * 1e-3)
    }
}

/// A class's totals in a report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClassTotals {
    pub count: u64,
    pub gib: f64,
    pub gflop: f64,
    /// Predicted milliseconds.
    pub ms: f64,
}

/// One entry of a report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpReport {
    #[serde(flatten)]
    pub entry: LedgerEntry,
    pub gib: f64,
    /// Predicted milliseconds.
    pub ms: f64,
}

/// A ledger priced at stated rates.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerReport {
    pub rates: Rates,
    /// Kernels launched (views not counted).
    pub kernels: u64,
    /// Predicted milliseconds of every kernel, run back to back.
    pub total_ms: f64,
    /// Predicted milliseconds of the kernels that are neither GEMMs nor attention.
    pub non_gemm_ms: f64,
    pub classes: BTreeMap<&'static str, ClassTotals>,
    /// Every entry but views, the most expensive first.
    pub ops: Vec<OpReport>,
}

impl LedgerReport {
    /// A table: the classes, then the `top` most expensive entries.
    pub fn table(&self, top: usize) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let r = &self.rates;
        let _ = writeln!(s, "step ledger at {} TB/s, GEMMs at {} TFLOP/s, attention at {} TFLOP/s, {} µs a kernel at least", r.bandwidth_tbs, r.gemm_tflops, r.attention_tflops, r.kernel_floor_us);
        let _ = writeln!(s, "{:<12} {:>8} {:>10} {:>10} {:>9}", "class", "count", "GiB", "GFLOP", "ms");
        for (name, c) in &self.classes {
            let _ = writeln!(s, "{:<12} {:>8} {:>10.3} {:>10.1} {:>9.3}", name, c.count, c.gib, c.gflop, c.ms);
        }
        let _ = writeln!(s, "{} kernels: {:.3} ms predicted, {:.3} ms of it neither GEMM nor attention", self.kernels, self.total_ms, self.non_gemm_ms);
        let _ = writeln!(s, "\n{:>8} {:>6} {:>9} {:<11} {:<9} {:<30} {:<34} via", "ms", "count", "GiB", "class", "phase", "node", "op");
        for o in self.ops.iter().take(top) {
            let e = &o.entry;
            let _ = writeln!(s, "{:>8.3} {:>6} {:>9.4} {:<11} {:<9} {:<30} {:<34} {}", o.ms, e.count, o.gib, e.class.name(), e.phase, e.node, e.op, e.via);
        }
        s
    }
}

#[cfg(ftx_torch_shim)]
mod shim {
    use super::LedgerError;
    use std::ffi::{c_char, c_void, CStr};

    extern "C" {
        fn ftx_ledger_start(err: *mut c_char, err_len: i32) -> i32;
        fn ftx_ledger_stop() -> *mut c_char;
        fn ftx_ledger_free(p: *mut c_char);
        pub fn ftx_ledger_scope_begin(name: *const c_char, reads: *const *const c_void, n_reads: i32, writes: *const *const c_void, n_writes: i32) -> *mut c_void;
        pub fn ftx_ledger_scope_end(scope: *mut c_void);
    }

    pub fn start() -> Result<(), LedgerError> {
        let mut err = [0 as c_char; 512];
        // SAFETY: a buffer of the length given, NUL-terminated by the shim on error.
        let rc = unsafe { ftx_ledger_start(err.as_mut_ptr(), err.len() as i32) };
        if rc != 0 {
            return Err(LedgerError::Start(unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned()));
        }
        Ok(())
    }

    pub fn stop() -> String {
        // SAFETY: the shim returns a malloc'd NUL-terminated string (or null), freed here.
        unsafe {
            let p = ftx_ledger_stop();
            if p.is_null() {
                return String::new();
            }
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            ftx_ledger_free(p);
            s
        }
    }
}
