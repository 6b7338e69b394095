//! Preference optimisation (DPO, ORPO, SimPO, …) through loss plugins.
//!
//! A preference pair is tokenised as two chats (prompt + chosen, prompt + rejected) whose
//! responses are the targets. One batched forward gives every sequence's summed and mean
//! token log-probability; the reference model's come from the same weights with adapters
//! switched off (LoRA family: no second copy in memory), or were computed once before
//! training from the initial weights (full fine-tuning). The plugin turns the inputs it
//! declared into a loss, which the host backpropagates.
//!
//! The RL parts live beside it: [`rollout`] (sampling and token log-probs), [`advantage`]
//! (GRPO's group advantages, PPO's GAE and KL control), [`rewards`] and [`value_head`]. The
//! drivers that use them are in [`crate::recipes`].

pub mod advantage;
pub mod rewards;
pub mod rollout;
pub mod value_head;

use crate::data::tokenize::IGNORE;
use crate::data::Batch;
use crate::model::CausalLm;
use crate::plugins::loss::LossPlugin;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Per-sequence log-probabilities of a batch: summed over target tokens, and their count.
pub fn sequence_logps(model: &CausalLm, b: &Batch, train: bool) -> (Tensor, Tensor) {
    let inp = model.attn_inputs(&b.positions, |w| b.mask(w));
    let h = model.hidden(&b.input_ids, &inp, None, train);
    let logp = model.head(&h).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
    let mask = b.targets.ne(IGNORE);
    let tok = logp.gather(2, &b.targets.clamp_min(0).unsqueeze(-1), false).squeeze_dim(-1) * mask.to_kind(Kind::Float);
    let count = mask.sum_dim_intlist([1].as_slice(), false, Kind::Float).clamp_min(1.0);
    (tok.sum_dim_intlist([1].as_slice(), false, Kind::Float), count)
}

/// Rows 0, 2, 4, … (chosen) and 1, 3, 5, … (rejected) of a pair batch.
fn split_pairs(t: &Tensor) -> (Tensor, Tensor) {
    let n = t.size()[0];
    let even = Tensor::arange_start_step(0, n, 2, (Kind::Int64, t.device()));
    let odd = Tensor::arange_start_step(1, n, 2, (Kind::Int64, t.device()));
    (t.index_select(0, &even), t.index_select(0, &odd))
}

/// Where reference log-probs come from.
pub enum Reference {
    /// The plugin declared no reference input (ORPO, SimPO): none is computed.
    None,
    /// The same model with its adapters switched off.
    AdaptersOff,
    /// Computed once from the initial weights, by pair index: (chosen sum, rejected sum, chosen mean, rejected mean).
    Precomputed(HashMap<usize, [f64; 4]>),
}

/// The loss of a preference objective.
pub enum PreferenceLoss {
    /// A sandboxed loss plugin (DPO, ORPO, SimPO, KTO, or the user's own).
    Plugin(LossPlugin),
    /// DPO's sigmoid loss written in the host: the yardstick for the plugin path's overhead
    /// and correctness.
    BuiltinDpo { beta: f64 },
    /// ORPO (as plugins/orpo) written in the host, the same yardstick for ORPO.
    BuiltinOrpo { beta: f64 },
}

impl PreferenceLoss {
    /// Whether the loss needs reference log-probs.
    pub fn needs_reference(&self) -> bool {
        match self {
            PreferenceLoss::Plugin(p) => p.inputs.iter().any(|i| i.starts_with("reference_")),
            PreferenceLoss::BuiltinDpo { .. } => true,
            PreferenceLoss::BuiltinOrpo { .. } => false,
        }
    }

    /// The loss plugin's calls and time so far (none for a built-in loss).
    pub fn plugin_time(&self) -> Option<crate::plugins::budget::PluginTime> {
        match self {
            PreferenceLoss::Plugin(p) => Some(p.time()),
            _ => None,
        }
    }

    fn compute(&mut self, inputs: &[(&str, &Tensor)], params: &[(String, f64)]) -> anyhow::Result<(Tensor, Vec<(String, f64)>)> {
        match self {
            PreferenceLoss::Plugin(p) => {
                let out = p.compute(inputs, params)?;
                let metrics = out.metrics.into_iter().map(|(k, v)| (crate::train::metrics::plugin_key(&p.name, &k), v)).collect();
                Ok((out.loss, metrics))
            }
            PreferenceLoss::BuiltinDpo { beta } => {
                let get = |n: &str| inputs.iter().find(|(k, _)| *k == n).map(|(_, t)| *t).ok_or_else(|| anyhow::anyhow!("missing {n}"));
                let chosen = get("policy_chosen_logps")? - get("reference_chosen_logps")?;
                let rejected = get("policy_rejected_logps")? - get("reference_rejected_logps")?;
                let loss = -((chosen - rejected) * *beta).log_sigmoid().mean(Kind::Float);
                Ok((loss, Vec::new()))
            }
            PreferenceLoss::BuiltinOrpo { beta } => {
                let get = |n: &str| inputs.iter().find(|(k, _)| *k == n).map(|(_, t)| *t).ok_or_else(|| anyhow::anyhow!("missing {n}"));
                let (c, r) = (get("policy_chosen_mean_logps")?, get("policy_rejected_mean_logps")?);
                let log1m_exp = |x: &Tensor| (-x.exp() + 1.0).log();
                let log_odds = (c - r) - (log1m_exp(c) - log1m_exp(r));
                let loss = get("chosen_nll")?.mean(Kind::Float) - log_odds.log_sigmoid().mean(Kind::Float) * *beta;
                Ok((loss, Vec::new()))
            }
        }
    }
}

/// Where validation pair `i` is keyed in a precomputed reference (`VALIDATION_PAIRS + i`):
/// validation and training pairs are numbered from 0 each, and must not share reference values.
pub const VALIDATION_PAIRS: usize = 1 << 40;

/// A preference objective: its loss and how to feed it.
pub struct PreferenceObjective {
    pub loss: PreferenceLoss,
    pub params: Vec<(String, f64)>,
    pub reference: Reference,
}

impl PreferenceObjective {

    fn reference_logps(&self, model: &mut CausalLm, b: &Batch, pairs: &[usize]) -> Option<[Tensor; 4]> {
        let device = b.input_ids.device();
        match &self.reference {
            Reference::None => None,
            Reference::AdaptersOff => {
                let _g = tch::no_grad_guard();
                crate::peft::set_adapters_enabled(model, false);
                let (sum, count) = sequence_logps(model, b, false);
                crate::peft::set_adapters_enabled(model, true);
                let (sc, sr) = split_pairs(&sum);
                let (cc, cr) = split_pairs(&count);
                Some([sc.shallow_clone(), sr.shallow_clone(), sc / cc, sr / cr])
            }
            Reference::Precomputed(map) => {
                let col = |k: usize| {
                    let v: Vec<f32> = pairs.iter().map(|p| map[p][k] as f32).collect();
                    Tensor::from_slice(&v).to_device(device)
                };
                Some([col(0), col(1), col(2), col(3)])
            }
        }
    }

    /// Loss of one micro-batch of pairs (rows alternate chosen, rejected); backpropagates
    /// `loss · scale` when `backward`. Returns the loss and the plugin's metrics (keyed by
    /// `train::metrics::plugin_key`).
    pub fn step(&mut self, model: &mut CausalLm, b: &Batch, pairs: &[usize], scale: f64, backward: bool) -> anyhow::Result<(f64, Vec<(String, f64)>)> {
        let columns = self.columns(model, b, pairs, backward);
        self.loss_of(&columns, scale, backward)
    }

    /// [`PreferenceObjective::step`] for one rank's share of a micro-batch split across ranks,
    /// as the single process computes it over the whole micro-batch: this rank's per-pair
    /// inputs (`None` when its share is empty) go through `gather`, which returns every
    /// rank's (detached, in rank order, `[columns, all pairs]`) and where this rank's start;
    /// the loss plugin then sees the whole micro-batch, with this rank's columns the live ones.
    /// Every rank gets the same loss and metrics; backpropagating reaches only this rank's
    /// pairs, so the ranks' summed gradients are the single process's. Works for any loss,
    /// including those that are not a mean over pairs (KTO's batch reference point).
    pub fn step_across(
        &mut self,
        model: &mut CausalLm,
        share: Option<(&Batch, &[usize])>,
        scale: f64,
        gather: &mut dyn FnMut(&Tensor) -> anyhow::Result<(Tensor, i64)>,
    ) -> anyhow::Result<(f64, Vec<(String, f64)>)> {
        let local = match share {
            Some((b, pairs)) => self.columns(model, b, pairs, true),
            None => {
                let n = INPUTS.len() + if matches!(self.reference, Reference::None) { 0 } else { REFERENCE_INPUTS.len() };
                (0..n).map(|_| Tensor::zeros([0], (Kind::Float, Device::Cpu))).collect()
            }
        };
        let device = local[0].device();
        let k = local[0].size()[0];
        let stacked = tch::no_grad(|| Tensor::stack(&local.iter().map(|c| c.to_kind(Kind::Float)).collect::<Vec<_>>(), 0));
        let (all, offset) = gather(&stacked)?;
        let all = all.to_device(device);
        let n = all.size()[1];
        let columns: Vec<Tensor> = local
            .iter()
            .enumerate()
            .map(|(i, mine)| {
                let row = all.get(i as i64);
                Tensor::cat(&[row.narrow(0, 0, offset), mine.to_kind(Kind::Float), row.narrow(0, offset + k, n - offset - k)], 0)
            })
            .collect();
        // A rank without pairs has nothing to backpropagate into.
        self.loss_of(&columns, scale, k > 0)
    }

    /// The loss plugin's inputs for one micro-batch, in [`INPUTS`] order then (with a
    /// reference) [`REFERENCE_INPUTS`] order: one value per pair each.
    fn columns(&mut self, model: &mut CausalLm, b: &Batch, pairs: &[usize], backward: bool) -> Vec<Tensor> {
        let reference = self.reference_logps(model, b, pairs);
        let (sum, count) = if backward { sequence_logps(model, b, true) } else { tch::no_grad(|| sequence_logps(model, b, false)) };
        let (sc, sr) = split_pairs(&sum);
        let (cc, cr) = split_pairs(&count);
        let (mc, mr) = (&sc / &cc, &sr / &cr);
        let nll = -&mc;
        let mut columns = vec![sc, sr, mc, mr, nll, cc, cr];
        columns.extend(reference.into_iter().flatten());
        columns
    }

    /// The loss over a micro-batch's [`PreferenceObjective::columns`]; backpropagates
    /// `loss · scale` when `backward`.
    fn loss_of(&mut self, columns: &[Tensor], scale: f64, backward: bool) -> anyhow::Result<(f64, Vec<(String, f64)>)> {
        let inputs: Vec<(&str, &Tensor)> = INPUTS.iter().chain(REFERENCE_INPUTS.iter()).copied().zip(columns).collect();
        let (loss, metrics) = self.loss.compute(&inputs, &self.params)?;
        let value = loss.double_value(&[]);
        if backward {
            (loss * scale).backward();
        }
        Ok((value, metrics))
    }
}

/// The policy's inputs a loss plugin may declare, one value per pair each.
const INPUTS: [&str; 7] = [
    "policy_chosen_logps",
    "policy_rejected_logps",
    "policy_chosen_mean_logps",
    "policy_rejected_mean_logps",
    "chosen_nll",
    "chosen_lengths",
    "rejected_lengths",
];

/// The reference model's inputs, when the objective has a reference.
const REFERENCE_INPUTS: [&str; 4] = ["reference_chosen_logps", "reference_rejected_logps", "reference_chosen_mean_logps", "reference_rejected_mean_logps"];

/// Reference log-probs of every pair under the current (initial) weights, for full fine-tuning.
pub fn precompute_reference(model: &CausalLm, batches: impl Iterator<Item = (Vec<usize>, Batch)>) -> HashMap<usize, [f64; 4]> {
    let _g = tch::no_grad_guard();
    let mut out = HashMap::new();
    for (pairs, b) in batches {
        let (sum, count) = sequence_logps(model, &b, false);
        let v = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).to_device(Device::Cpu)).expect("f64");
        let (s, c) = (v(&sum), v(&count));
        for (k, p) in pairs.iter().enumerate() {
            let (i, j) = (2 * k, 2 * k + 1);
            out.insert(*p, [s[i], s[j], s[i] / c[i], s[j] / c[j]]);
        }
    }
    out
}
