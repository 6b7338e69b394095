//! `ftx.toml` for training: every key, its default, and what it does. Unknown keys are
//! rejected with the nearest known key suggested; `--set section.key=value` overrides.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A whole training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub method: MethodSection,
    #[serde(default)]
    pub train: TrainSection,
    /// `[[plugins]]`: plugins this run uses (a loss plugin for preference data and RL; reward
    /// plugins for RL).
    #[serde(default)]
    pub plugins: Vec<PluginEntry>,
    /// `[rl]`: present for reinforcement learning from rewards (GRPO or PPO) on prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rl: Option<RlSection>,
    /// `[distributed]`: how a run started on several processes trains (see `super::ddp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<DistributedSection>,
}

/// `[rl]`: GRPO or PPO on prompt records (`{"prompt", "reference"?}`), scored by the reward
/// plugins of `[[plugins]]` (their scores, times each plugin's `weight`, are summed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlSection {
    /// `grpo` (group-normalised advantages, no value head) or `ppo` (value head, GAE).
    pub algorithm: String,
    /// Prompts per rollout (one rollout per optimizer step for GRPO; `epochs` passes for PPO).
    #[serde(default = "two")]
    pub prompts_per_step: usize,
    /// Completions sampled per prompt (GRPO's group size G).
    #[serde(default = "four")]
    pub group_size: usize,
    /// Longest completion, in tokens.
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    /// Sampling temperature of the rollouts (must be > 0).
    #[serde(default = "one_f")]
    pub temperature: f64,
    /// Keep only the k most likely tokens when sampling (0 = off).
    #[serde(default)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1.0 = off).
    #[serde(default = "one_f")]
    pub top_p: f64,
    /// Passes over each rollout's samples (GRPO's μ, PPO's `num_ppo_epochs`); 0 = the
    /// algorithm's default (1 for GRPO, 4 for PPO).
    #[serde(default)]
    pub epochs: usize,
    /// Minibatches per pass (an optimizer step each).
    #[serde(default = "one")]
    pub minibatches: usize,
    /// GRPO: divide the group-centred rewards by the group's standard deviation.
    #[serde(default = "yes")]
    pub scale_rewards: bool,
    /// PPO: discount γ of GAE.
    #[serde(default = "one_f")]
    pub gamma: f64,
    /// PPO: λ of GAE.
    #[serde(default = "default_lam")]
    pub lam: f64,
    /// PPO: initial weight of the per-token KL penalty in the rewards.
    #[serde(default = "default_kl_coef")]
    pub kl_coef: f64,
    /// PPO: target KL per sequence for the adaptive controller (Ziegler et al.); 0 = fixed `kl_coef`.
    #[serde(default)]
    pub target_kl: f64,
    /// PPO: horizon of the adaptive KL controller.
    #[serde(default = "default_horizon")]
    pub kl_horizon: f64,
    /// PPO: whiten the advantages of each rollout (mean 0, variance 1).
    #[serde(default = "yes")]
    pub whiten_advantages: bool,
}

/// `[[plugins]]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// The plugin's `.wasm` component.
    pub path: PathBuf,
    /// Parameter values (the plugin's defaults apply to the others).
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, f64>,
    /// Permissions granted to this plugin (`read:/folder`, `env:NAME`, `clock`); it is refused
    /// at load if its manifest asks for one not granted here or by `--grant`.
    #[serde(default)]
    pub grant: Vec<String>,
    /// A reward plugin's weight in the summed reward of an RL run.
    #[serde(default = "one_f")]
    pub weight: f64,
    /// Seconds all of this plugin's calls may take over the run (see `plugins::budget`).
    #[serde(default = "default_plugin_budget", skip_serializing_if = "is_default_plugin_budget")]
    pub time_budget_s: f64,
}

impl PluginEntry {
    /// An entry for `path` with every other key at its default.
    pub fn new(path: PathBuf) -> PluginEntry {
        PluginEntry { path, params: Default::default(), grant: Vec::new(), weight: 1.0, time_budget_s: default_plugin_budget() }
    }

    /// The sandbox limits of this plugin: the defaults, with this entry's time budget.
    pub fn limits(&self) -> crate::plugins::Limits {
        let run_budget = crate::plugins::budget::budget_from_secs(self.time_budget_s).unwrap_or(crate::plugins::budget::DEFAULT_RUN_BUDGET);
        crate::plugins::Limits { run_budget, ..Default::default() }
    }
}

fn default_plugin_budget() -> f64 {
    crate::plugins::budget::DEFAULT_RUN_BUDGET.as_secs_f64()
}

// Left out of the resolved config when it is the default, so the checkpoints of runs from before
// the key existed still match their config.
fn is_default_plugin_budget(s: &f64) -> bool {
    *s == default_plugin_budget()
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face checkpoint folder to start from.
    pub path: PathBuf,
    /// Compute dtype: `auto` (bf16 on GPU, fp32 on CPU), `fp32`, `bf16`, `fp16`.
    #[serde(default = "auto")]
    pub dtype: String,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[serde(default = "auto")]
    pub device: String,
    /// A PEFT adapter folder (e.g. `runs/sft/final`) to start from: its weights are the
    /// starting point of the LoRA/DoRA trained, its r, alpha and targets are used (a
    /// `[method]` that sets other values is refused). A preference or RL run on top of it uses
    /// base + this adapter, frozen, as its reference model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

/// `[data]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// JSONL (or JSON array) files of training records.
    pub train: Vec<PathBuf>,
    /// Held-out records; when absent, `validation_split` of `train` is held out.
    #[serde(default)]
    pub validation: Vec<PathBuf>,
    /// Fraction of the training records held out for validation when no file is given.
    #[serde(default)]
    pub validation_split: f64,
    /// `auto`, `text` (continued pretraining), `alpaca` (SFT), `chat` (messages/ShareGPT).
    #[serde(default = "auto_format")]
    pub format: crate::data::DataFormat,
    /// Examples are cut to this many tokens.
    #[serde(default = "default_seq")]
    pub max_seq_len: usize,
    /// Pack several examples into each row of `max_seq_len` (no cross-contamination).
    #[serde(default)]
    pub packing: bool,
    /// System message put before the prompt of records that carry only a prompt string
    /// (preference, unpaired and [rl] prompt records), so they render as the SFT chats did.
    #[serde(default)]
    pub system: Option<String>,
    /// The chat template to render chats with instead of the checkpoint's: a named one
    /// (`chatml`, `llama3`, `mistral`, `qwen`, `gemma`) or a Jinja file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Train on the whole conversation (system and user turns and the template's markup too),
    /// not only the assistant's turns.
    #[serde(default, skip_serializing_if = "is_false")]
    pub train_on_inputs: bool,
    /// The token that ends an assistant turn in the chat template (e.g. `<|im_end|>`), when it
    /// is neither the tokenizer's EOS nor in generation_config.json's `eos_token_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eot_token: Option<String>,
}

/// `[method]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSection {
    /// `full`, `lora`, `qlora` (NF4 base + LoRA), `dora`, `hft` (half fine-tuning).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// LoRA rank.
    #[serde(default = "default_rank")]
    pub rank: i64,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input.
    #[serde(default)]
    pub dropout: f64,
    /// Projections to adapt: names (`q_proj`, `v_proj`, …) or `all-linear`.
    #[serde(default = "all_linear")]
    pub target_modules: Vec<String>,
    /// Scale by alpha / √rank (rank-stabilised LoRA).
    #[serde(default)]
    pub rslora: bool,
    /// LoRA / DoRA on a frozen base stored in FP8 (e4m3, one scale per output row): half the
    /// base's bytes, and on Hopper GPUs its GEMMs run on FP8 tensor cores (README "FP8 base").
    #[serde(default)]
    pub fp8: bool,
    /// HFT: optimizer steps per round; each round trains a different half of the weights.
    #[serde(default = "default_round")]
    pub hft_round_steps: usize,
    /// The loss plugin of a preference or RL run by name (`dpo`, `orpo`, `kto`, `simpo`,
    /// `grpo`, `ppo`, an installed plugin) or path: the same as a `[[plugins]]` entry with that
    /// path (which, when present, gives its parameters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<String>,
}

impl Default for MethodSection {
    fn default() -> Self {
        crate::config::serde_defaults()
    }
}

/// `[train]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Passes over the training data (when `max_steps` is 0).
    #[serde(default = "one")]
    pub epochs: usize,
    /// Optimizer steps to run; 0 = as many as `epochs` give.
    #[serde(default)]
    pub max_steps: usize,
    /// Examples (or packed rows) per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step; the loss is normalised by the target tokens of all of them.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// `constant`, `linear` or `cosine` (after warmup).
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// Linear warmup steps (or use `warmup_ratio`).
    #[serde(default)]
    pub warmup_steps: usize,
    /// Warmup as a fraction of all steps, when `warmup_steps` is 0.
    #[serde(default)]
    pub warmup_ratio: f64,
    /// `adamw` (fp32 moments) or `adamw-8bit` (bitsandbytes' 8-bit blockwise moments: about
    /// 2 bytes per trained parameter instead of 8).
    #[serde(default = "default_optimizer")]
    pub optimizer: String,
    /// AdamW decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[serde(default = "one_f")]
    pub max_grad_norm: f64,
    /// Recompute each layer's activations in the backward pass instead of storing them
    /// (`true`), also keeping the layer inputs in host memory (`"offload"`).
    #[serde(default)]
    pub grad_checkpointing: super::step::Checkpointing,
    /// Selective recompute (`super::recompute`): `"mlp"` keeps only the LoRA MLP node's input
    /// and `x·Aᵀ` products and runs gate/up again in backward; `"none"` (the default) keeps
    /// gate/up's output.
    #[serde(default, skip_serializing_if = "super::recompute::Recompute::is_none")]
    pub recompute: super::recompute::Recompute,
    /// On CUDA, RMSNorm (with the residual add), rotary embedding, SwiGLU (`gpu::kernels`) and
    /// the LM head's cross-entropy (`gpu::cross_entropy`) as fused NVRTC kernels; `false` runs
    /// libtorch's ops (`--no-fused-kernels`).
    #[serde(default = "yes")]
    pub fused_kernels: bool,
    /// Seeds data order, adapter init and dropout.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Evaluate the validation split every N steps (0 = only at the start and end).
    #[serde(default)]
    pub eval_every: usize,
    /// Save a checkpoint every N steps (0 = only at the end); unset: about ten per run
    /// (see [`TrainSection::checkpoint_interval`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_every: Option<usize>,
    /// Checkpoints to keep (older ones are deleted).
    #[serde(default = "default_keep")]
    pub keep_last: usize,
    /// Where metrics go besides metrics.jsonl: `tensorboard` (event files in
    /// `<output_dir>/tensorboard`), `mlflow` (a tracking server's REST API, `MLFLOW_TRACKING_URI`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub report_to: Vec<String>,
    /// Where checkpoints, metrics, charts and the final weights go.
    #[serde(default = "default_out")]
    pub output_dir: PathBuf,
}

impl Default for TrainSection {
    fn default() -> Self {
        crate::config::serde_defaults()
    }
}

impl TrainSection {
    /// Steps between checkpoints in a run of `total` steps: `save_every`, or when unset
    /// ⌈total / 10⌉ (about ten checkpoints a run, so an interruption loses at most a tenth of
    /// it); `None` for only the final one.
    pub fn checkpoint_interval(&self, total: usize) -> Option<usize> {
        match self.save_every {
            Some(0) => None,
            Some(n) => Some(n),
            None => Some(total.div_ceil(10).max(1)),
        }
    }

    /// Whether a checkpoint is due after `done` of `total` steps (the final one is written
    /// apart, with the outputs).
    pub fn checkpoint_due(&self, done: usize, total: usize) -> bool {
        done < total && self.checkpoint_interval(total).is_some_and(|n| done % n == 0)
    }
}

/// The tracking backends `train.report_to` accepts.
pub const REPORT_TO: &[&str] = &["tensorboard", "mlflow"];

/// `[distributed]` in ftx.toml: how a run started on several processes trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedSection {
    /// `ddp`: every rank holds the whole model and trains on its slice of each global batch;
    /// `fsdp`: the same data split, with the model, gradients and optimizer state sharded
    /// across the ranks (`super::fsdp`).
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// `auto` (NCCL on CUDA devices, Gloo on the CPU), `gloo` or `nccl`.
    #[serde(default = "auto")]
    pub backend: String,
    /// Seconds the rendezvous and each collective may wait before the rank gives up.
    #[serde(default = "default_dist_timeout")]
    pub timeout_s: u64,
    /// Gradients are all-reduced in buckets of about this many MiB.
    #[serde(default = "default_bucket_mib")]
    pub bucket_mib: f64,
    /// FSDP: keep the optimizer state (fp32 master, moments) in host memory and update it there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cpu_offload: bool,
}

impl Default for DistributedSection {
    fn default() -> Self {
        crate::config::serde_defaults()
    }
}

impl DistributedSection {
    /// Checks the values; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        match self.strategy.as_str() {
            "ddp" | "fsdp" => {}
            s => return Err(format!("distributed.strategy = \"{s}\" is not one of ddp, fsdp")),
        }
        if !["auto", "gloo", "nccl"].contains(&self.backend.as_str()) {
            return Err(format!("distributed.backend = \"{}\" is not one of auto, gloo, nccl", self.backend));
        }
        if self.timeout_s == 0 {
            return Err("distributed.timeout_s must be at least 1".into());
        }
        if !(self.bucket_mib > 0.0 && self.bucket_mib.is_finite()) {
            return Err(format!("distributed.bucket_mib must be a positive number, got {}", self.bucket_mib));
        }
        if self.cpu_offload && self.strategy != "fsdp" {
            return Err("distributed.cpu_offload = true offloads FSDP's sharded optimizer state: set strategy = \"fsdp\"".into());
        }
        Ok(())
    }

    /// The backend for tensors on `device`.
    pub fn backend_for(&self, device: tch::Device) -> crate::dist::Backend {
        use crate::dist::Backend;
        match self.backend.as_str() {
            "gloo" => Backend::Gloo,
            "nccl" => Backend::Nccl,
            _ if device.is_cuda() => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }
}

fn auto() -> String { "auto".into() }
fn is_false(b: &bool) -> bool { !*b }
fn auto_format() -> crate::data::DataFormat { crate::data::DataFormat::Auto }
fn default_seq() -> usize { 1024 }
fn default_kind() -> String { "lora".into() }
fn default_rank() -> i64 { 16 }
fn default_alpha() -> f64 { 32.0 }
fn all_linear() -> Vec<String> { vec!["all-linear".into()] }
fn default_round() -> usize { 50 }
fn default_lr() -> f64 { 2e-4 }
fn one() -> usize { 1 }
fn one_f() -> f64 { 1.0 }
fn default_batch() -> usize { 4 }
fn default_schedule() -> String { "cosine".into() }
fn default_optimizer() -> String { "adamw".into() }
fn default_beta1() -> f64 { 0.9 }
fn default_beta2() -> f64 { 0.999 }
fn default_eps() -> f64 { 1e-8 }
fn default_seed() -> u64 { 42 }
fn two() -> usize { 2 }
fn four() -> usize { 4 }
fn yes() -> bool { true }
fn default_new_tokens() -> usize { 32 }
fn default_lam() -> f64 { 0.95 }
fn default_kl_coef() -> f64 { 0.05 }
fn default_horizon() -> f64 { 10_000.0 }
fn default_keep() -> usize { 3 }
fn default_out() -> PathBuf { "runs/ftx".into() }
fn default_strategy() -> String { "ddp".into() }
fn default_dist_timeout() -> u64 { 600 }
fn default_bucket_mib() -> f64 { 25.0 }

impl TrainConfig {
    /// The run's plugins: `method.objective` first (unless a `[[plugins]]` entry names the same
    /// plugin, which then gives its parameters), then the `[[plugins]]` entries.
    pub fn plugin_entries(&self) -> Vec<PluginEntry> {
        let mut v = Vec::with_capacity(self.plugins.len() + 1);
        if let Some(o) = &self.method.objective {
            if !self.plugins.iter().any(|p| p.path == Path::new(o)) {
                v.push(PluginEntry::new(o.into()));
            }
        }
        v.extend(self.plugins.iter().cloned());
        v
    }

    /// Reads `path`, applies `--set key=value` overrides, and validates. Relative paths in the
    /// file are taken relative to the file's folder.
    pub fn load(path: &Path, overrides: &[String]) -> Result<TrainConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut cfg = Self::parse(&text, overrides).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.exists() && base.join(&*p).exists() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.model.path);
        cfg.model.adapter.iter_mut().for_each(fix);
        cfg.data.train.iter_mut().for_each(fix);
        cfg.data.validation.iter_mut().for_each(fix);
        // A bare plugin name is a name, never a path beside the config.
        cfg.plugins.iter_mut().filter(|p| crate::plugins::manifest::is_explicit_path(&p.path)).for_each(|p| fix(&mut p.path));
        if let Some(t) = cfg.data.chat_template.as_mut().filter(|t| !crate::data::chat_templates::is_named(t)) {
            let mut p = PathBuf::from(&*t);
            fix(&mut p);
            *t = p.display().to_string();
        }
        Ok(cfg)
    }

    /// Parses TOML text with overrides.
    pub fn parse(text: &str, overrides: &[String]) -> Result<TrainConfig, String> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        // A single string is accepted where a list is expected (in the file and in --set).
        for (section, key) in [("data", "train"), ("data", "validation"), ("train", "report_to")] {
            if let Some(toml::Value::Table(d)) = table.get_mut(section) {
                if let Some(v @ toml::Value::String(_)) = d.get_mut(key) {
                    *v = toml::Value::Array(vec![v.clone()]);
                }
            }
        }
        let cfg: TrainConfig = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| crate::config::did_you_mean(&e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.train;
        let kinds = ["full", "lora", "qlora", "dora", "hft"];
        if !kinds.contains(&self.method.kind.as_str()) {
            return Err(format!("method.kind = \"{}\" is not one of {}", self.method.kind, kinds.join(", ")));
        }
        if !["constant", "linear", "cosine"].contains(&t.schedule.as_str()) {
            return Err(format!("train.schedule = \"{}\" is not one of constant, linear, cosine", t.schedule));
        }
        if !["adamw", "adamw-8bit"].contains(&t.optimizer.as_str()) {
            return Err(format!("train.optimizer = \"{}\" is not one of adamw, adamw-8bit", t.optimizer));
        }
        if t.batch_size == 0 || t.grad_accum == 0 {
            return Err("train.batch_size and train.grad_accum must be at least 1".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(format!("train.lr must be a positive number, got {}", t.lr));
        }
        if !(0.0..1.0).contains(&self.data.validation_split) {
            return Err("data.validation_split must be in [0, 1)".into());
        }
        if self.data.train.is_empty() {
            return Err("data.train names no file".into());
        }
        if self.method.fp8 && !["lora", "dora"].contains(&self.method.kind.as_str()) {
            return Err(format!(
                "method.fp8 = true stores the frozen base in FP8 under LoRA or DoRA, but method.kind = \"{}\": use kind = \"lora\" or \"dora\" (QLoRA's base is NF4 already; full fine-tuning trains the base)",
                self.method.kind
            ));
        }
        if self.method.fp8 && self.distributed.as_ref().is_some_and(|d| d.strategy == "fsdp") {
            return Err("method.fp8 = true with distributed.strategy = \"fsdp\": FSDP shards dense and NF4 bases, not FP8 ones yet; use strategy = \"ddp\" (each rank holds the FP8 base, half a bf16 one) or fp8 = false".into());
        }
        if self.model.adapter.is_some() && !["lora", "qlora", "dora"].contains(&self.method.kind.as_str()) {
            return Err(format!(
                "model.adapter continues a LoRA/DoRA adapter, but method.kind = \"{}\": use lora, qlora or dora (for full fine-tuning, merge the adapter first: ftx export --model BASE --adapter DIR --out merged/)",
                self.method.kind
            ));
        }
        if let Some(t) = &self.data.chat_template {
            crate::data::chat_templates::check_spec(t)?;
        }
        if let Some(d) = &self.distributed {
            d.validate()?;
        }
        if let Some(r) = t.report_to.iter().find(|r| !REPORT_TO.contains(&r.as_str())) {
            return Err(format!("train.report_to: \"{r}\" is not one of {}", REPORT_TO.join(", ")));
        }
        for p in &self.plugins {
            crate::plugins::budget::budget_from_secs(p.time_budget_s).map_err(|e| format!("[[plugins]] {}: time_budget_s: {e}", p.path.display()))?;
        }
        if let Some(rl) = &self.rl {
            if !["grpo", "ppo"].contains(&rl.algorithm.as_str()) {
                return Err(format!("rl.algorithm = \"{}\" is not one of grpo, ppo", rl.algorithm));
            }
            if rl.prompts_per_step == 0 || rl.group_size == 0 || rl.max_new_tokens == 0 || rl.minibatches == 0 {
                return Err("rl.prompts_per_step, rl.group_size, rl.max_new_tokens and rl.minibatches must be at least 1".into());
            }
            if rl.algorithm == "grpo" && rl.group_size < 2 {
                return Err("rl.group_size must be at least 2 for grpo: advantages are relative to the group".into());
            }
            if !(rl.temperature > 0.0) {
                return Err(format!("rl.temperature must be > 0 (rollouts sample), got {}", rl.temperature));
            }
        }
        Ok(())
    }

    /// The resolved configuration as TOML (saved beside the outputs).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// `section.key=value`: the value is read as TOML (number, bool, array, string), or as a
/// bare string when it is not valid TOML.
fn apply_override(table: &mut toml::Table, o: &str) -> Result<(), String> {
    let (key, raw) = o.split_once('=').ok_or_else(|| format!("--set {o}: expected section.key=value"))?;
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, path) = parts.split_last().ok_or("--set needs a key")?;
    let mut cur = table;
    for p in path {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| format!("--set {o}: {p} is not a section"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[model]\npath = \"m\"\n[data]\ntrain = \"d.jsonl\"\n";

    #[test]
    fn defaults_fill_everything_not_given() {
        let c = TrainConfig::parse(MIN, &[]).unwrap();
        assert_eq!(c.method.kind, "lora");
        assert_eq!(c.train.lr, 2e-4);
        assert_eq!(c.data.train, vec![PathBuf::from("d.jsonl")]);
    }

    #[test]
    fn unknown_keys_are_rejected_with_a_suggestion() {
        let e = TrainConfig::parse(&format!("{MIN}[train]\nlearning_rat = 1e-4\n"), &[]).unwrap_err();
        assert!(e.contains("unknown field `learning_rat`"), "{e}");
        let e = TrainConfig::parse(&format!("{MIN}[train]\nbatch_sise = 2\n"), &[]).unwrap_err();
        assert!(e.contains("did you mean `batch_size`?"), "{e}");
    }

    #[test]
    fn set_overrides_keys_with_typed_values() {
        let c = TrainConfig::parse(MIN, &["train.lr=1e-3".into(), "method.kind=full".into(), "data.packing=true".into()])
            .unwrap();
        assert_eq!(c.train.lr, 1e-3);
        assert_eq!(c.method.kind, "full");
        assert!(c.data.packing);
        let e = TrainConfig::parse(MIN, &["method.kind=ia3".into()]).unwrap_err();
        assert!(e.contains("ia3"), "{e}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = TrainConfig::parse(MIN, &["train.seed=7".into()]).unwrap();
        assert_eq!(TrainConfig::parse(&c.to_toml(), &[]).unwrap(), c);
    }

    #[test]
    fn the_new_keys_stay_out_of_a_resolved_config_that_does_not_set_them() {
        // Checkpoints of earlier runs hold the hash of their resolved config: unchanged.
        let text = TrainConfig::parse(MIN, &[]).unwrap().to_toml();
        for key in ["adapter", "objective", "chat_template", "train_on_inputs", "eot_token"] {
            assert!(!text.contains(key), "{key} in {text}");
        }
        let set = ["model.adapter=\"runs/sft/final\"", "method.objective=orpo", "data.chat_template=chatml", "data.train_on_inputs=true", "data.eot_token=\"<|im_end|>\""];
        let c = TrainConfig::parse(MIN, &set.map(String::from)).unwrap();
        assert_eq!(TrainConfig::parse(&c.to_toml(), &[]).unwrap(), c);
    }

    #[test]
    fn the_objective_is_the_first_plugin_unless_an_entry_names_it() {
        let c = TrainConfig::parse(&format!("{MIN}[[plugins]]\npath = \"json-valid\"\n"), &["method.objective=grpo".into()]).unwrap();
        let paths: Vec<_> = c.plugin_entries().into_iter().map(|p| p.path).collect();
        assert_eq!(paths, [PathBuf::from("grpo"), PathBuf::from("json-valid")]);
        let c = TrainConfig::parse(&format!("{MIN}[method]\nobjective = \"dpo\"\n[[plugins]]\npath = \"dpo\"\nparams = {{ beta = 0.3 }}\n"), &[]).unwrap();
        let e = c.plugin_entries();
        assert_eq!((e.len(), e[0].params["beta"]), (1, 0.3));
    }

    #[test]
    fn adapters_need_a_lora_method_and_templates_a_name_or_a_file() {
        let e = TrainConfig::parse(MIN, &["model.adapter=\"a\"".into(), "method.kind=full".into()]).unwrap_err();
        assert!(e.contains("model.adapter") && e.contains("ftx export"), "{e}");
        let e = TrainConfig::parse(MIN, &["data.chat_template=vicuna".into()]).unwrap_err();
        assert!(e.contains("chatml, gemma, llama3, mistral, qwen"), "{e}");
        TrainConfig::parse(MIN, &["data.chat_template=\"t.jinja\"".into()]).unwrap();
    }

    #[test]
    fn a_plugin_name_is_not_taken_for_a_folder_beside_the_config() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("dpo")).unwrap();
        std::fs::write(d.path().join("t.jinja"), "x").unwrap();
        std::fs::write(d.path().join("dpo/x.wasm"), "x").unwrap();
        let cfg = d.path().join("ftx.toml");
        std::fs::write(&cfg, "[model]\npath = \"m\"\n[data]\ntrain = \"d.jsonl\"\nchat_template = \"t.jinja\"\n[[plugins]]\npath = \"dpo\"\n[[plugins]]\npath = \"dpo/x.wasm\"\n").unwrap();
        let c = TrainConfig::load(&cfg, &[]).unwrap();
        assert_eq!(c.plugins[0].path, PathBuf::from("dpo"), "a name stays a name");
        assert_eq!(c.plugins[1].path, d.path().join("dpo/x.wasm"), "a path is taken from the config's folder");
        assert_eq!(c.data.chat_template.as_deref(), Some(d.path().join("t.jinja").to_str().unwrap()));
    }

    #[test]
    fn the_section_refuses_what_is_not_built() {
        let s: DistributedSection = toml::from_str("strategy = \"fsdp\"").unwrap();
        s.validate().unwrap();
        let s: DistributedSection = toml::from_str("strategy = \"zero2\"").unwrap();
        assert!(s.validate().unwrap_err().contains("not one of ddp, fsdp"));
        let s: DistributedSection = toml::from_str("backend = \"mpi\"").unwrap();
        assert!(s.validate().unwrap_err().contains("backend"));
        let s = DistributedSection::default();
        s.validate().unwrap();
        assert_eq!(s.backend_for(tch::Device::Cpu), crate::dist::Backend::Gloo);
        assert_eq!(s.backend_for(tch::Device::Cuda(0)), crate::dist::Backend::Nccl);
    }
}
