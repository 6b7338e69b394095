//! `ftx export --model BASE --adapter DIR --format merged --out DIR [--dtype bf16]`

use std::path::PathBuf;

/// Arguments of `ftx export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The base checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder (e.g. a run's `final/`).
    #[arg(long)]
    pub adapter: PathBuf,
    /// `merged`: a standalone Hugging Face checkpoint with the adapter folded in.
    #[arg(long, default_value = "merged")]
    pub format: String,
    #[arg(long)]
    pub out: PathBuf,
    /// fp32, bf16 or fp16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.format == "merged", "unknown export format '{}': merged (adapter, gguf: not yet)", a.format);
    let kind = super::parse_dtype(&a.dtype)?;
    let out = crate::export::export_merged(&a.model, &a.adapter, &a.out, kind)?;
    println!("wrote {}", out.display());
    Ok(())
}
