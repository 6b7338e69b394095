//! The router's load-balancing loss of mixture-of-experts models in the training step, as
//! transformers adds it to the causal-LM loss when config.json sets `output_router_logits`:
//! `loss = CE + router_aux_loss_coef · load_balancing_loss(router logits of every MoE layer)`.
//!
//! The balance loss is `E · Σ_e f_e · P_e` over all MoE layers together, where the assignment
//! shares `f` carry no gradient: it is a sum of one term per layer once `f` is known
//! ([`crate::model::moe::aux_loss_term`]). The plain step computes it from every layer's
//! logits at once; under gradient checkpointing `f` comes from the no-grad forward pass and each
//! layer's term joins that layer's recomputed backward.
//!
//! A micro-batch's balance loss is weighted by its share of the step's target tokens, so that
//! with gradient accumulation the step adds the target-weighted mean over micro-batches.
//! Tokens that count: every token of a padded batch (transformers, given an attention mask,
//! leaves padding out), the non-padding tokens of a packed one.

use crate::data::Batch;
use crate::model::decoder::Block;
use crate::model::moe::{aux_loss, aux_loss_term, expert_counts};
use crate::model::CausalLm;
use tch::{Kind, Tensor};

/// The balance loss's settings for one micro-batch.
pub struct RouterLoss {
    /// `router_aux_loss_coef × this micro-batch's targets / the step's targets`.
    scale: f64,
    top_k: i64,
    /// `[B·T]` tokens that count (`None`: all).
    valid: Option<Tensor>,
}

impl RouterLoss {
    /// The settings when `model` adds a balance loss (a MoE config with `output_router_logits`).
    pub fn new(model: &CausalLm, batch: &Batch, denom: f64) -> Option<RouterLoss> {
        let moe = model.config.moe.as_ref().filter(|m| m.aux_loss)?;
        let valid = batch.segments.as_ref().map(|s| s.reshape([-1]).ge(0));
        Some(RouterLoss { scale: moe.router_aux_loss_coef * batch.n_targets as f64 / denom, top_k: moe.top_k, valid })
    }

    /// The scaled balance loss of the router logits the layers recorded in their last training
    /// forward, with its gradient (`None` when no layer recorded any).
    pub fn whole(&self, model: &CausalLm) -> Option<Tensor> {
        let logits: Vec<Tensor> = model.layers.iter().filter_map(|l| l.take_router_logits()).collect();
        aux_loss(&logits, self.top_k, self.valid.as_ref()).map(|a| a * self.scale)
    }

    /// The per-expert assignment counts and the row count over every layer, from the logits the
    /// layers recorded (the no-grad pass of checkpointing); `None` when there are none.
    pub fn shares(&self, logits: &[Tensor]) -> Option<Shares> {
        let first = logits.first()?;
        let mut counts = Tensor::zeros([first.size()[1]], (Kind::Float, first.device()));
        let mut rows = 0.0;
        for l in logits {
            counts += expert_counts(l, self.top_k, self.valid.as_ref());
            rows += match &self.valid {
                Some(v) => v.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]),
                None => l.size()[0] as f64,
            };
        }
        Some(Shares { counts, rows })
    }

    /// One layer's scaled term (its recorded logits cover tokens `start..start + n` of the
    /// flattened micro-batch), given the shares of the whole pass; `None` for a dense layer.
    pub fn layer_term(&self, layer: &dyn Block, shares: &Shares, start: i64) -> Option<Tensor> {
        let logits = layer.take_router_logits()?;
        let n = logits.size()[0];
        let valid = self.valid.as_ref().map(|v| v.narrow(0, start, n));
        Some(aux_loss_term(&logits, &shares.counts, shares.rows, valid.as_ref()) * self.scale)
    }
}

/// The balance loss's constants for one micro-batch: assignments per expert over every MoE
/// layer, and the token rows they were counted over.
pub struct Shares {
    counts: Tensor,
    rows: f64,
}
