//! `ftx bench train`: throughput and memory of training steps on a random model.

use crate::gpu::DeviceArg;
use crate::plan::ModelShape;
use crate::train::bench::{bench_train, BenchSettings};
use anyhow::Context;

/// `ftx bench …`
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Train steps on a random model of a public shape; prints one JSON line.
    Train(BenchTrainArgs),
}

/// Arguments of `ftx bench train`.
#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {
    /// A public shape (llama-3.2-1b, llama-3.1-8b, …); `tiny` is a small Llama for CPU checks.
    #[arg(long, default_value = "llama-3.2-1b")]
    pub shape: String,
    /// lora, qlora, dora or full.
    #[arg(long, default_value = "lora")]
    pub method: String,
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 12)]
    pub steps: usize,
    /// Untimed steps at the start.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: i64,
    #[arg(long)]
    pub grad_checkpointing: bool,
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let BenchCommand::Train(a) = cmd;
    let shape = if a.shape == "tiny" {
        // The baseline script's "tiny" shape.
        let mut s = ModelShape::named("llama-3.2-1b").expect("known");
        (s.name, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.vocab) =
            ("tiny".into(), 256, 1024, 4, 8, 4, 32, 32000);
        s
    } else {
        ModelShape::named(&a.shape).with_context(|| format!("unknown shape '{}': {}", a.shape, ModelShape::known_names().join(", ")))?
    };
    let device = a.device.resolve().map_err(anyhow::Error::msg)?;
    let kind = match &a.dtype {
        Some(d) => super::parse_dtype(d)?,
        None if device.is_cuda() => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    };
    anyhow::ensure!(a.steps > a.warmup, "--steps must exceed --warmup");
    let r = bench_train(&BenchSettings {
        shape,
        method: a.method,
        seq: a.seq,
        batch: a.batch,
        steps: a.steps,
        warmup: a.warmup,
        rank: a.rank,
        grad_checkpointing: a.grad_checkpointing,
        device,
        kind,
    })?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
