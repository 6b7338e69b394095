//! Selective recompute (`train.recompute = "mlp"`, `--recompute mlp`): between keeping every
//! activation and full gradient checkpointing (which runs each layer again in backward, about a
//! third more arithmetic), Megatron's "selective activation recomputation" applied where a
//! LoRA step's memory is — the MLP's gate/up output, `2 × intermediate` values a token and
//! layer (57 of llama-3.1-8b's 112 KB). The LoRA MLP node (`model::lora_block`) then keeps only
//! its input and the small `x·Aᵀ` products and runs the gate/up GEMM (base plus adapter) again
//! in backward: one more `2·i·h`-FLOP GEMM per token and layer.
//!
//! Only the node does this; where it does not run — full fine-tuning (a trainable base), DoRA
//! (its own node), LoRA dropout > 0 while training (the autograd path), a mixture-of-experts
//! MLP, an MLP whose gate/up/down are not all LoRA targets, `FTX_BLOCK_NODE=0`, unfused
//! projections — the run is
//! refused with what to change, rather than silently keeping gate/up's output: the option
//! promises memory, and `grad_checkpointing = true` is the way that works everywhere.

use crate::model::CausalLm;
use serde::{Deserialize, Serialize};

/// What the backward pass recomputes besides what checkpointing does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep the MLP's gate/up output (fastest).
    #[default]
    None,
    /// The LoRA MLP node keeps only its input and runs gate/up again in backward.
    Mlp,
}

impl Recompute {
    /// True for the default (no selective recompute): what the config leaves unwritten.
    pub fn is_none(&self) -> bool {
        *self == Recompute::None
    }

    /// The name in the config and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Mlp => "mlp",
        }
    }
}

/// Why `train.recompute = "mlp"` cannot apply to a run.
#[derive(Debug, thiserror::Error)]
#[error("train.recompute = \"mlp\": {0}")]
pub struct RecomputeRefused(pub String);

/// Turns `recompute` on for `model`'s MLPs, after checking that every layer's MLP runs as the
/// LoRA MLP node in training (`method`: the run's `method.kind`, `dropout`: its LoRA dropout,
/// for the message). `Recompute::None` turns it off and always succeeds.
pub fn apply(model: &mut CausalLm, recompute: Recompute, method: &str, dropout: f64) -> Result<(), RecomputeRefused> {
    let on = recompute == Recompute::Mlp;
    model.set_mlp_recompute(on);
    if !on {
        return Ok(());
    }
    let why = match method {
        "full" | "hft" => Some(format!("method.kind = \"{method}\" trains the MLP's own weights; selective recompute is for a frozen base (lora, qlora). Use train.grad_checkpointing = true instead")),
        "dora" => Some("DoRA's projections run their own node, not the LoRA MLP node; use method.kind = \"lora\" or train.grad_checkpointing = true".to_owned()),
        _ if dropout > 0.0 => Some(format!("method.dropout = {dropout} runs the adapters through autograd, not the LoRA MLP node; set method.dropout = 0, or use train.grad_checkpointing = true")),
        _ => None,
    };
    let kind = model.kind;
    let not_node = model.layers.iter().position(|l| !l.mlp().is_some_and(|m| m.recompute && m.runs_lora_node(kind, true)));
    match (why, not_node) {
        (_, None) => Ok(()),
        (Some(why), Some(_)) => Err(refuse(model, why)),
        (None, Some(layer)) => Err(refuse(
            model,
            format!(
                "layer {layer}'s MLP does not run as the LoRA MLP node (a mixture-of-experts MLP, gate_proj/up_proj/down_proj not all in method.target_modules, \
                 FTX_BLOCK_NODE=0, or ftx bench train --unfused); use target_modules = [\"all-linear\"] on a dense model, or train.grad_checkpointing = true"
            ),
        )),
    }
}

/// The refusal, with the model's recompute switched back off.
fn refuse(model: &mut CausalLm, why: String) -> RecomputeRefused {
    model.set_mlp_recompute(false);
    RecomputeRefused(why)
}

/// True when some layer's MLP runs with selective recompute (what `ftx bench train` reports).
pub fn runs(model: &CausalLm) -> bool {
    let kind = model.kind;
    model.layers.iter().any(|l| l.mlp().is_some_and(|m| m.recompute && m.runs_lora_node(kind, true)))
}
