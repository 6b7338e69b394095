//! `ftx train`: supervised fine-tuning, continued pretraining and chat tuning with full
//! fine-tuning, LoRA, QLoRA, DoRA or half fine-tuning; packing, gradient accumulation and
//! checkpointing; exact resume from checkpoints.
//!
//! The pieces: [`config`] (ftx.toml), [`optim`] (AdamW, schedules, clipping; [`adamw8bit`] its 8-bit moments), [`step`]
//! (one micro-batch forward/backward), [`recompute`] (selective MLP recompute), [`checkpoint`], [`metrics`], [`dataset`] (the run's
//! examples and micro-batches), [`setup`] (device, model, output folder), [`ddp`] (data
//! parallel over several processes), [`fsdp`] (the same, sharded), [`interrupt`] (Ctrl-C: stop
//! after the step, checkpoint) and [`tracking`] (TensorBoard, MLflow). The drivers that
//! run them live a floor up, in [`crate::recipes`].

pub mod adamw8bit;
pub mod bar_chart;
pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod ddp;
pub mod fsdp;
pub mod head_loss;
pub mod interrupt;
pub mod metrics;
pub mod offload;
pub mod optim;
pub mod recompute;
pub mod router_loss;
pub mod saved_tensors;
pub mod setup;
pub mod step;
pub mod tracking;

pub use config::TrainConfig;
