//! ftx: a fine-tuning toolkit for large language models.
//!
//! The crate reads like the pipeline it runs: [`plan`] sizes a run, [`model`] loads and runs
//! Hugging Face checkpoints, and [`cli`] is the `ftx` binary's edge. [`gpu`] finds and picks
//! devices. Stages talk through a few plain types.

pub mod cli;
pub mod gpu;
pub mod model;
pub mod plan;
pub mod util;
