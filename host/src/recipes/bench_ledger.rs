//! `ftx bench train --ledger`: one training step of the benchmark (forward, backward and the
//! optimizer, after the warm-up steps) recorded kernel by kernel ([`crate::gpu::ledger`]) and
//! priced at stated rates: what the step moves and computes, per class of work and per op, and
//! the time that takes on the card the rates describe. On the CPU the fused kernels run their
//! reference versions, so the ledger counts the kernels the CUDA step launches.

use super::bench::{block_nodes_run, prepare, train_step, BenchRun, BenchSettings};
use crate::gpu::kernels;
use crate::gpu::ledger::{self, LedgerReport, Rates};
use anyhow::Result;
use tch::Device;

/// How kernels are counted, as the JSON line states it.
pub const COUNTING: &str = "leaf ops of libtorch's dispatcher (composites not counted), GEMM/attention ops even where they call helper kernels, each fused ftx kernel as one; bytes = tensor inputs read + outputs written (broadcast dimensions once, a gather reads what it writes); views counted without bytes";

/// The ledger of one step, as `ftx bench train --ledger` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerResult {
    pub system: &'static str,
    pub shape: String,
    pub method: String,
    pub seq: usize,
    pub batch: usize,
    pub layers: u64,
    pub hidden: u64,
    pub dtype: String,
    pub device: String,
    /// Whether the fused kernels ran (on the CPU: their reference versions, counted as the
    /// CUDA kernels they stand for).
    pub fused_kernels: bool,
    pub block_nodes: bool,
    /// The step recorded (after this many unrecorded warm-up steps).
    pub step: usize,
    /// The recorded step's mean loss.
    pub loss: f64,
    pub counting: &'static str,
    pub ledger: LedgerReport,
}

/// Builds the run `s` describes, runs `s.warmup` steps, and records the next one.
pub fn ledger_train(s: &BenchSettings, rates: Rates) -> Result<LedgerResult> {
    let BenchRun { mut model, mut opt, batch: b, .. } = prepare(s)?;
    model.set_fused_projections(s.fused);
    kernels::set_enabled(s.fused_kernels);
    // The CPU takes the fused kernels' paths through their reference versions (this thread:
    // CPU autograd runs backward on the calling thread).
    let cpu_reference = s.device == Device::Cpu && s.fused_kernels && kernels::built();
    let on_path = |f: &mut dyn FnMut() -> f64| if cpu_reference { kernels::with_cpu_reference(f) } else { f() };
    for step in 0..s.warmup {
        on_path(&mut || train_step(&model, &b, &mut opt, step, s.grad_checkpointing));
    }
    let mut recorded = None;
    let loss = on_path(&mut || match ledger::record(|| train_step(&model, &b, &mut opt, s.warmup, s.grad_checkpointing)) {
        Ok((loss, l)) => {
            recorded = Some(Ok(l));
            loss
        }
        Err(e) => {
            recorded = Some(Err(e));
            f64::NAN
        }
    });
    let recorded = recorded.expect("the step ran")?;
    let fused_kernels = if cpu_reference { kernels::with_cpu_reference(|| kernels::active_for(&model.embed_tokens)) } else { kernels::active_for(&model.embed_tokens) };
    Ok(LedgerResult {
        system: "ftx",
        shape: s.shape.name.clone(),
        method: s.method.clone(),
        seq: s.seq,
        batch: s.batch,
        layers: s.shape.layers,
        hidden: s.shape.hidden,
        dtype: format!("{:?}", s.kind),
        device: format!("{:?}", s.device),
        fused_kernels,
        block_nodes: block_nodes_run(&model),
        step: s.warmup,
        loss,
        counting: COUNTING,
        ledger: recorded.report(rates),
    })
}
