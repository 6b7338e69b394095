//! `ftx plan`: the memory a fine-tuning run needs, and the smallest hardware that holds it.

use crate::plan::{plan, Method, ModelShape, Optimizer, PlanRequest};
use anyhow::Context;

/// Arguments of `ftx plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A checkpoint folder (its config.json), a Hub id (org/name[@revision]: only its config.json
    /// is fetched) or a public shape name (e.g. llama-3.1-8b).
    #[arg(long)]
    pub model: String,
    /// full, lora, qlora or dora.
    #[arg(long, default_value = "lora")]
    pub method: Method,
    #[arg(long, default_value_t = 2048)]
    pub seq: u64,
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    /// Recompute activations in the backward pass instead of storing them.
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// adamw, adamw-8bit or sgd.
    #[arg(long, default_value = "adamw")]
    pub optimizer: Optimizer,
    /// LoRA rank (lora, qlora, dora).
    #[arg(long, default_value_t = 16)]
    pub rank: u64,
    /// With --grad-checkpointing: the layer inputs in host memory (`grad_checkpointing = "offload"`).
    #[arg(long, requires = "grad_checkpointing")]
    pub offload: bool,
    /// Selective recompute (`train.recompute`): `mlp` plans the LoRA MLP node without its
    /// gate/up output (recomputed in backward).
    #[arg(long, value_enum, default_value = "none")]
    pub recompute: crate::train::recompute::Recompute,
    /// Plan every token's logits at once (as a trainer without ftx's chunked cross-entropy).
    #[arg(long)]
    pub full_logits: bool,
    /// The frozen base in FP8 (`method.fp8`; lora and dora).
    #[arg(long)]
    pub fp8: bool,
}

pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let dir = std::path::Path::new(&a.model);
    // A Hub id: only its config.json is fetched.
    let hub_config = crate::hub::resolve_model_file(dir, "config.json")?;
    let shape = if let Some(p) = hub_config.or_else(|| Some(dir.join("config.json")).filter(|p| p.exists())) {
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let cfg: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))?;
        let mut s = ModelShape::from_hf_config(&cfg).with_context(|| format!("reading {}", p.display()))?;
        s.name = a.model.clone();
        s
    } else {
        ModelShape::named(&a.model).with_context(|| {
            format!(
                "'{}' is neither a checkpoint folder (no config.json there) nor a known shape ({})",
                a.model,
                ModelShape::known_names().join(", ")
            )
        })?
    };
    let mut req = PlanRequest::new(shape, a.method);
    req.seq_len = a.seq;
    req.batch = a.batch;
    req.grad_checkpointing = a.grad_checkpointing;
    req.optimizer = a.optimizer;
    req.lora_rank = a.rank;
    req.offload = a.offload;
    req.recompute_mlp = a.recompute == crate::train::recompute::Recompute::Mlp;
    req.chunked_ce = !a.full_logits;
    req.fp8_base = a.fp8;
    anyhow::ensure!(
        !a.fp8 || matches!(a.method, crate::plan::Method::Lora | crate::plan::Method::Dora),
        "--fp8 stores the frozen base of a LoRA or DoRA run in FP8; --method {} has none to store (qlora's base is NF4 already)",
        a.method
    );
    anyhow::ensure!(
        !req.recompute_mlp || crate::plan::mlp_recompute_applies(&req),
        "--recompute mlp: selective recompute runs in the LoRA MLP node, for --method lora or qlora on a model with dense MLPs \
         (here --method {} on {}); `ftx train` refuses it elsewhere: use --grad-checkpointing",
        a.method,
        req.shape.name
    );
    let text = plan(&req).to_string();
    // The report ends its last line; a shell prompt must not start on it.
    if text.ends_with('\n') {
        print!("{text}");
    } else {
        println!("{text}");
    }
    Ok(())
}
