//! `ftx generate`: load a checkpoint, render the prompt (raw or through the chat template),
//! and stream the continuation to the terminal.

use crate::gpu::DeviceArg;
use crate::model::decoder::LoadOptions;
use crate::model::generate::{generate, GenerateOptions};
use crate::model::tokenizer::Message;
use crate::model::{CausalLm, TextTokenizer};
use anyhow::Context;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `ftx generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint folder (config.json, *.safetensors, tokenizer.json), or a Hub id: org/name[@revision].
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder (e.g. a run's `final/`) applied to --model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Raw text to continue (the tokenizer adds BOS where the model expects it).
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// A system message to go before --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// Compute dtype: fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on GPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Print the token ids instead of streaming text.
    #[arg(long)]
    pub ids: bool,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let device = a.device.resolve().map_err(anyhow::Error::msg)?;
    let kind = match &a.dtype {
        Some(d) => crate::model::parse_dtype(d)?,
        None if device.is_cuda() => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    };
    let mut model = CausalLm::load(&a.model, LoadOptions { device, kind })
        .with_context(|| format!("loading the model from {}", a.model.display()))?;
    if let Some(dir) = &a.adapter {
        crate::peft::load_adapter(&mut model, dir).map_err(|e| anyhow::anyhow!("--adapter {}: {e}", dir.display()))?;
    }
    let mut tok = TextTokenizer::load(&a.model, model.config.vocab)?;
    if let Some(dir) = &a.adapter {
        // The chat template (and stop tokens) the adapter was trained with, when it chose one.
        crate::data::chat_templates::adopt(&mut tok, dir).map_err(anyhow::Error::msg)?;
    }
    let prompt = match (&a.prompt, &a.chat) {
        (Some(p), _) => tok.encode(p, true)?,
        (None, Some(c)) => {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::new("user", c));
            tok.encode_chat(&msgs, true)?
        }
        (None, None) => anyhow::bail!("give --prompt or --chat"),
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        stop_ids: tok.stop_ids.clone(),
        stop_strings: a.stop.clone(),
    };
    let mut out = std::io::stdout().lock();
    let show = !a.ids;
    let g = generate(&model, &tok, &prompt, &opts, |piece| {
        if show {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    })?;
    if a.ids {
        println!("{}", g.ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
    } else {
        println!();
    }
    Ok(())
}
