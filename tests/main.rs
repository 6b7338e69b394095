//! Integration tests of ftx against reference fixtures (tests/fixtures, made by HF
//! transformers, PEFT and bitsandbytes: see tests/fixtures/README.md).

mod common;
mod models;
mod peft_parity;
mod engine;
mod cli;
mod plugins;
mod align;
mod prep;
mod plugin_losses;
mod plugin_kinds;
mod export;
mod plugin_registry;
mod eval;
mod serve;
mod gguf;
mod merge;
mod llm;
mod rl;
mod hostile;
mod layout;
mod fused;
mod dist;
mod optim8bit;
mod polish;
