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
mod prep_web;
mod prep_shard;
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
mod gemma;
mod moe;
mod phi;
mod dist;
mod by_name;
mod adapters;
mod chat_templates;
mod resume;
mod tracking;
mod hub;
mod optim8bit;
mod polish;
