//! ftx: a fine-tuning toolkit for large language models.
//!
//! The crate reads like the pipeline it runs: [`data`] turns records into batches, [`plan`]
//! sizes a run, [`model`] loads and runs Hugging Face checkpoints, [`peft`] adds adapters,
//! [`train`] and [`align`] hold the training engine's parts, [`recipes`] the run drivers
//! (SFT, preference, RL, bench) that put them to work, and [`cli`] is the `ftx` binary's
//! edge. [`gpu`] finds and picks devices; [`dist`] joins processes into one run (libtorch's
//! c10d). Stages talk through a few plain types (`Example`, `Batch`, `CausalLm`). Modules
//! stand on floors and never import one above them (README, "Layout"; tools/import_graph.py
//! checks it).

pub mod align;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod eval;
pub mod export;
pub mod gpu;
pub mod hub;
pub mod llm;
pub mod model;
pub mod paths;
pub mod peft;
pub mod plan;
pub mod plugins;
pub mod recipes;
pub mod serve;
pub mod train;
pub mod util;
