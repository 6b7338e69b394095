//! ftx: a fine-tuning toolkit for large language models.
//!
//! The crate reads like the pipeline it runs: [`data`] turns records into batches, [`plan`]
//! sizes a run, [`model`] loads and runs Hugging Face checkpoints, [`peft`] adds adapters,
//! [`train`] owns the training loop, and [`cli`] is the `ftx` binary's edge. [`gpu`] finds
//! and picks devices; [`dist`] spreads training over processes (libtorch's c10d). Stages talk
//! through a few plain types (`Example`, `Batch`, `CausalLm`).

pub mod align;
pub mod cli;
pub mod data;
pub mod dist;
pub mod eval;
pub mod export;
pub mod gpu;
pub mod llm;
pub mod model;
pub mod peft;
pub mod plan;
pub mod plugins;
pub mod serve;
pub mod train;
pub mod util;
