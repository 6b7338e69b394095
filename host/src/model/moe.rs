//! Mixture-of-experts layers (Mixtral, Qwen3-MoE): the pre-norm block of the Llama-like
//! families whose MLP is a router over `E` gated experts, of which each token uses `k`.
//!
//! Read top to bottom in [`SparseMoe::forward`]: router logits → routing weights (Mixtral:
//! softmax over the top-k logits; Qwen3-MoE: softmax over all experts, top-k, renormalised only
//! with `norm_topk_prob`) → the `N·k` (token, expert) assignments sorted by expert → one
//! gather of the inputs in that order → the experts as grouped GEMMs over the whole sorted
//! buffer (gate/up of every expert as one grouped GEMM, down as another:
//! [`super::grouped_experts`]) → outputs weighted and scattered back to their tokens.
//!
//! Each expert projection is an ordinary [`Linear`] (a view of the layer's stacked
//! `[E, out, in]` weights), so LoRA, DoRA and NF4 (QLoRA) attach to experts exactly as to dense
//! projections, under the names PEFT gives them on the Hub checkpoints' per-expert modules
//! (`block_sparse_moe.experts.3.w1`, `mlp.experts.3.gate_proj`); PEFT converts such adapters
//! to transformers 5's fused experts on load. Checkpoints are read in both layouts:
//! per-expert tensors (what the Hub and transformers' `save_pretrained` write) or
//! transformers 5's fused 3-D `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`.
//!
//! Training adds the router's load-balancing loss as transformers does
//! (`load_balancing_loss_func`): see [`aux_loss`].

use super::block::{FeedForward, GateUp, LayerLoader, Mlp, PreNormBlock};
use super::grouped_experts::{expert_linears, project, SortedAssignments};
use super::linear::Linear;
use super::nodes::swiglu;
use super::{Activation, ModelError};
use std::sync::Mutex;
use tch::{Kind, Tensor};

/// How a family routes tokens and names its expert tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per MoE layer.
    pub experts: i64,
    /// Experts each token uses.
    pub top_k: i64,
    /// Each expert's intermediate width.
    pub expert_intermediate: i64,
    /// Renormalise the top-k routing weights to sum to 1 (always for Mixtral).
    pub norm_topk_prob: bool,
    /// Routing weights multiply the experts' outputs in fp32 (Mixtral) or in the compute dtype
    /// (Qwen3-MoE), as each reference does.
    pub fp32_routing_weights: bool,
    /// Which layers are MoE (the others have a dense MLP of `intermediate` width: Qwen3-MoE's
    /// `mlp_only_layers` / `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
    /// Add `router_aux_loss_coef · load-balancing loss` to the training loss, as transformers
    /// does when `output_router_logits` is set in config.json.
    pub aux_loss: bool,
    pub router_aux_loss_coef: f64,
    /// The tensor names of the family's Hub checkpoints.
    pub naming: ExpertNaming,
}

/// Where a family's Hub checkpoints keep the MoE MLP's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertNaming {
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.N.{w1,w3,w2}` (gate, up, down).
    Mixtral,
    /// `mlp.gate`, `mlp.experts.N.{gate_proj,up_proj,down_proj}`.
    Qwen,
    /// gpt-oss: `mlp.router` and the fused `mlp.experts.gate_up_proj` (gate and up columns
    /// interleaved) / `down_proj`, read by [`super::gpt_oss::GptOssMoe`], not by [`SparseMoe`].
    GptOss,
}

impl ExpertNaming {
    /// The MoE MLP's module prefix within a layer.
    pub fn prefix(self) -> &'static str {
        match self {
            ExpertNaming::Mixtral => "block_sparse_moe",
            ExpertNaming::Qwen | ExpertNaming::GptOss => "mlp",
        }
    }

    /// The (gate, up, down) projection names of one expert.
    pub fn projections(self) -> [&'static str; 3] {
        match self {
            ExpertNaming::Mixtral => ["w1", "w3", "w2"],
            ExpertNaming::Qwen => ["gate_proj", "up_proj", "down_proj"],
            // One interleaved gate/up tensor: gate and up share its name.
            ExpertNaming::GptOss => ["gate_up_proj", "gate_up_proj", "down_proj"],
        }
    }
}

/// The router and experts of one MoE layer.
pub struct SparseMoe {
    /// The router, `[experts, hidden]` (no bias).
    pub gate: Linear,
    /// One gated MLP per expert.
    pub experts: Vec<Mlp>,
    pub top_k: i64,
    pub norm_topk_prob: bool,
    pub fp32_routing_weights: bool,
    pub naming: ExpertNaming,
    /// Keep the router logits of training forwards (when the loss adds the balance term).
    pub record_router_logits: bool,
    /// The router logits of the last training forward (`[N, experts]`), for the
    /// load-balancing loss; taken by [`FeedForward::take_router_logits`].
    pub router_logits: Mutex<Option<Tensor>>,
}

impl SparseMoe {
    /// Loads layer `i`'s router and experts, per-expert tensors first, else transformers 5's
    /// fused ones.
    pub fn load(l: &LayerLoader<'_>, i: usize, moe: &MoeConfig) -> Result<SparseMoe, ModelError> {
        let (h, e) = (l.cfg.hidden, moe.experts);
        let naming = moe.naming;
        let p = format!("model.layers.{i}.{}", naming.prefix());
        let gate = match l.linear(&format!("{p}.gate"), e, h, false) {
            Ok(g) => g,
            // transformers 5 names Mixtral's MoE MLP `mlp` too.
            Err(ModelError::MissingTensor { .. }) if naming == ExpertNaming::Mixtral => {
                l.linear(&format!("model.layers.{i}.mlp.gate"), e, h, false)?
            }
            Err(err) => return Err(err),
        };
        let (gate_up, down) = match Self::load_per_expert(l, &p, moe) {
            Ok(stacked) => stacked,
            Err(ModelError::MissingTensor { name, .. }) if name.starts_with(&format!("{p}.experts.0.")) => Self::load_fused(l, i, moe)?,
            Err(err) => return Err(err),
        };
        Ok(SparseMoe {
            gate,
            experts: experts_of(&gate_up, &down),
            top_k: moe.top_k,
            norm_topk_prob: moe.norm_topk_prob,
            fp32_routing_weights: moe.fp32_routing_weights,
            naming,
            record_router_logits: moe.aux_loss,
            router_logits: Mutex::new(None),
        })
    }

    /// The Hub's layout, one tensor per expert projection (`{p}.experts.N.{w1,w3,w2}` or
    /// `gate_proj`/`up_proj`/`down_proj`), copied into the stacked `gate_up [E, 2·I, H]` (each
    /// expert's gate rows, then its up rows) and `down [E, H, I]`.
    fn load_per_expert(l: &LayerLoader<'_>, p: &str, moe: &MoeConfig) -> Result<(Tensor, Tensor), ModelError> {
        let (h, inter, e) = (l.cfg.hidden, moe.expert_intermediate, moe.experts);
        let [g, u, d] = moe.naming.projections();
        let load = |x: i64, name: &str, shape: [i64; 2]| (l.load)(&format!("{p}.experts.{x}.{name}.weight"), &shape);
        let mut stacked: Option<(Tensor, Tensor)> = None;
        let _g = tch::no_grad_guard();
        // Expert by expert, gate, up, down: the order a random initialiser draws them in.
        for x in 0..e {
            let (gw, uw, dw) = (load(x, g, [inter, h])?, load(x, u, [inter, h])?, load(x, d, [h, inter])?);
            let (gate_up, down) = stacked.get_or_insert_with(|| {
                let opts = (gw.kind(), gw.device());
                (Tensor::empty([e, 2 * inter, h], opts), Tensor::empty([e, h, inter], opts))
            });
            let gu = gate_up.get(x);
            gu.narrow(0, 0, inter).copy_(&gw);
            gu.narrow(0, inter, inter).copy_(&uw);
            down.get(x).copy_(&dw);
        }
        stacked.ok_or_else(|| ModelError::MissingTensor { name: format!("{p}.experts.0.{g}.weight"), files: "(no experts)".to_owned() })
    }

    /// transformers 5's layout: `mlp.experts.gate_up_proj [E, 2·I, H]` (gate rows first) and
    /// `mlp.experts.down_proj [E, H, I]`, already stacked as the experts keep them.
    fn load_fused(l: &LayerLoader<'_>, i: usize, moe: &MoeConfig) -> Result<(Tensor, Tensor), ModelError> {
        let (h, inter, e) = (l.cfg.hidden, moe.expert_intermediate, moe.experts);
        let p = format!("model.layers.{i}.mlp.experts");
        Ok(((l.load)(&format!("{p}.gate_up_proj"), &[e, 2 * inter, h])?, (l.load)(&format!("{p}.down_proj"), &[e, h, inter])?))
    }

    /// Routing of `x [N, H]`: router logits `[N, E]`, the top-k experts `[N, k]` and their
    /// weights `[N, k]` (fp32), as the family's reference computes them.
    pub fn route(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        let logits = self.gate.forward_t(x, train);
        let probs = logits.to_kind(Kind::Float).softmax(-1, Kind::Float);
        let (mut top, idx) = probs.topk(self.top_k, -1, true, true);
        if self.norm_topk_prob {
            top = &top / top.sum_dim_intlist(-1, true, Kind::Float);
        }
        (logits, idx, top)
    }

    /// The MoE MLP of `x [.., H]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let shape = x.size();
        let hidden = *shape.last().expect("hidden states have a last dimension");
        let flat = x.reshape([-1, hidden]);
        let (logits, idx, weights) = self.route(&flat, train);
        if train && self.record_router_logits {
            *self.router_logits.lock().expect("router logits lock") = Some(logits.shallow_clone());
        }
        let y = self.experts_forward(&flat, &idx, &weights, train);
        y.view(shape.as_slice())
    }

    /// The experts' weighted outputs summed per token: assignments sorted by expert, one
    /// gather, the experts as grouped GEMMs over the sorted buffer, one scatter-add back.
    fn experts_forward(&self, x: &Tensor, idx: &Tensor, weights: &Tensor, train: bool) -> Tensor {
        let n = x.size()[0];
        let sorted_by = SortedAssignments::new(idx, self.experts.len() as i64);
        let sorted = x.index_select(0, &sorted_by.token);
        let y = if expert_ablation::on() { sorted } else { self.experts_grouped(&sorted, &sorted_by, train) };
        let w = weights.reshape([-1]).index_select(0, &sorted_by.order).unsqueeze(1);
        let weighted = if self.fp32_routing_weights {
            (y.to_kind(Kind::Float) * w).to_kind(x.kind())
        } else {
            y * w.to_kind(x.kind())
        };
        Tensor::zeros([n, x.size()[1]], (x.kind(), x.device())).index_add(0, &sorted_by.token, &weighted)
    }

    /// Every expert's gated MLP on its rows of `sorted`: gate/up as one grouped GEMM (two when
    /// not fused), the SwiGLU, down as another.
    fn experts_grouped(&self, sorted: &Tensor, by: &SortedAssignments, train: bool) -> Tensor {
        let [mut gates, mut ups, mut downs] = [Vec::new(), Vec::new(), Vec::new()];
        for m in &self.experts {
            let [gate, up] = m.split_gate_up().expect("experts keep gate and up as two projections");
            gates.push(gate);
            ups.push(up);
            downs.push(&m.down_proj);
        }
        let fused = self.experts.first().is_some_and(|m| m.fused);
        let gu = project(&[gates, ups], sorted, &by.rows, fused, train);
        let h = if fused {
            swiglu(&gu.contiguous(), None).0
        } else {
            let half = gu.size()[1] / 2;
            gu.narrow(1, 0, half).silu() * gu.narrow(1, half, half)
        };
        project(&[downs], &h, &by.rows, fused, train)
    }

    /// The expert projections' names within the layer, in [`Mlp::linears`]' order (gate, up,
    /// down), for expert `x`.
    fn expert_names(&self, x: usize) -> [String; 3] {
        let p = self.naming.prefix();
        self.naming.projections().map(|name| format!("{p}.experts.{x}.{name}"))
    }
}

/// The SwiGLU experts of the stacked `gate_up [E, 2·I, H]` (each expert's gate rows, then its
/// up rows) and `down [E, H, I]`: one [`Mlp`] per expert whose projections are views of those
/// tensors (no copy), where the grouped GEMMs find them.
pub fn experts_of(gate_up: &Tensor, down: &Tensor) -> Vec<Mlp> {
    let inter = gate_up.size()[1] / 2;
    let mut gate_up = expert_linears(gate_up, &[inter, inter]).into_iter();
    let (gates, ups) = (gate_up.next().expect("gate"), gate_up.next().expect("up"));
    let downs = expert_linears(down, &[down.size()[1]]).into_iter().next().expect("down");
    gates
        .into_iter()
        .zip(ups)
        .zip(downs)
        .map(|((gate_proj, up_proj), down_proj)| Mlp { gate_up: GateUp::Split { gate_proj, up_proj }, down_proj, act: Activation::Silu, fused: true, block_node: false, recompute: false })
        .collect()
}

impl FeedForward for SparseMoe {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        SparseMoe::forward(self, x, train)
    }

    /// The router and every expert projection under their names within the layer.
    fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = vec![(format!("{}.gate", self.naming.prefix()), &self.gate)];
        for (x, m) in self.experts.iter().enumerate() {
            out.extend(self.expert_names(x).into_iter().zip(m.linears().into_iter().map(|(_, lin)| lin)));
        }
        out
    }

    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let names: Vec<[String; 3]> = (0..self.experts.len()).map(|x| self.expert_names(x)).collect();
        let mut out = vec![(format!("{}.gate", self.naming.prefix()), &mut self.gate)];
        for (names, m) in names.into_iter().zip(self.experts.iter_mut()) {
            out.extend(names.into_iter().zip(m.linears_mut().into_iter().map(|(_, lin)| lin)));
        }
        out
    }

    fn set_fused(&mut self, on: bool) {
        self.experts.iter_mut().for_each(|m| m.fused = on);
    }

    /// The first expert, an MLP of the same kind as every other.
    fn dense(&self) -> Option<&Mlp> {
        self.experts.first()
    }

    fn take_router_logits(&self) -> Option<Tensor> {
        self.router_logits.lock().expect("router logits lock").take()
    }
}

/// Layer `i` of a Mixtral or Qwen3-MoE checkpoint: the pre-norm block with the MoE MLP, or
/// (Qwen3-MoE's `mlp_only_layers`) a dense one.
pub fn load_block(l: &LayerLoader<'_>, i: usize, moe: &MoeConfig) -> Result<PreNormBlock, ModelError> {
    let sparse = moe.sparse_layers.get(i).copied().unwrap_or(true);
    PreNormBlock::with_mlp(l, i, || {
        Ok(if sparse { Box::new(SparseMoe::load(l, i, moe)?) } else { Box::new(l.mlp(i)?) })
    })
}

/// Per-expert assignment counts `[E]` (fp32) of router logits `[N, E]` for top-`k` routing,
/// counting only the tokens `valid [N]` marks (all when `None`), as transformers' histogram.
pub fn expert_counts(logits: &Tensor, k: i64, valid: Option<&Tensor>) -> Tensor {
    let _g = tch::no_grad_guard();
    let e = logits.size()[1];
    let (_, idx) = logits.to_kind(Kind::Float).softmax(-1, Kind::Float).topk(k, -1, true, true);
    let ones = match valid {
        Some(v) => v.to_kind(Kind::Float).unsqueeze(1).expand([-1, k], false).reshape([-1]),
        None => Tensor::ones([idx.numel() as i64], (Kind::Float, logits.device())),
    };
    Tensor::zeros([e], (Kind::Float, logits.device())).index_add(0, &idx.reshape([-1]), &ones)
}

/// transformers' `load_balancing_loss_func` split by layer. With `f_e` = the share of
/// assignments to expert `e` over all MoE layers (`counts [E]` summed over layers, divided by
/// `rows`, the valid tokens summed over layers) and `P_e` = the routing probability of `e`
/// summed over layers and tokens divided by `rows`, the loss is `E · Σ_e f_e · P_e`. `f` has
/// no gradient, so the loss is a sum of one term per layer: this returns layer `logits`' term,
/// `E · Σ_e f_e · Σ_n p_ne / rows`, with its gradient.
pub fn aux_loss_term(logits: &Tensor, counts: &Tensor, rows: f64, valid: Option<&Tensor>) -> Tensor {
    let e = logits.size()[1];
    let probs = logits.softmax(-1, logits.kind()).to_kind(Kind::Float);
    let probs = match valid {
        Some(v) => probs * v.to_kind(Kind::Float).unsqueeze(1),
        None => probs,
    };
    let share = counts.detach() / rows;
    (probs.sum_dim_intlist(0, false, Kind::Float) * share).sum(Kind::Float) * (e as f64 / rows)
}

/// The whole load-balancing loss of the router logits of every MoE layer (`[N, E]` each),
/// for top-`k` routing over the tokens `valid` marks: transformers' `load_balancing_loss_func`.
pub fn aux_loss(layer_logits: &[Tensor], k: i64, valid: Option<&Tensor>) -> Option<Tensor> {
    let first = layer_logits.first()?;
    let e = first.size()[1];
    let mut counts = Tensor::zeros([e], (Kind::Float, first.device()));
    for l in layer_logits {
        counts += expert_counts(l, k, valid);
    }
    let per_layer = match valid {
        Some(v) => v.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]),
        None => first.size()[0] as f64,
    };
    let rows = per_layer * layer_logits.len() as f64;
    let terms: Vec<Tensor> = layer_logits.iter().map(|l| aux_loss_term(l, &counts, rows, valid)).collect();
    Some(Tensor::stack(&terms, 0).sum(Kind::Float))
}

/// The expert MLPs switched off, for `ftx bench train`'s `expert_gemm_share`: while on, every
/// MoE layer treats each expert as the identity (an assignment adds `w · x` instead of
/// `w · MLP_e(x)`), so routing, the sort by expert, the gather, the weighting and the
/// scatter-add run as always and only the experts' own work (their GEMMs, adapters and
/// activation, forward and backward) is missing. Process-wide; off unless a benchmark sets it.
pub mod expert_ablation {
    use std::sync::atomic::{AtomicBool, Ordering};

    static ON: AtomicBool = AtomicBool::new(false);

    /// Whether the expert MLPs are skipped.
    pub fn on() -> bool {
        ON.load(Ordering::Relaxed)
    }

    /// Skips the expert MLPs until the guard drops.
    pub fn skip() -> Guard {
        ON.store(true, Ordering::Relaxed);
        Guard(())
    }

    /// Restores the experts when dropped.
    pub struct Guard(());

    impl Drop for Guard {
        fn drop(&mut self) {
            ON.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic weights (no draw from libtorch's global generator, which other tests share).
    fn values(shape: [i64; 2], phase: f64) -> Tensor {
        (Tensor::arange(shape[0] * shape[1], (Kind::Float, tch::Device::Cpu)) * 0.7 + phase).sin().reshape(shape)
    }

    fn linear(out: i64, inp: i64, phase: f64) -> Linear {
        Linear::new(values([out, inp], phase) * 0.3, None)
    }

    #[test]
    fn expert_ablation_turns_each_expert_into_the_identity() {
        let _g = tch::no_grad_guard();
        let (h, inter, e) = (8, 16, 4);
        let moe = SparseMoe {
            gate: linear(e, h, 0.0),
            experts: experts_of(&(values([e * 2 * inter, h], 0.1) * 0.3).view([e, 2 * inter, h]), &(values([e * h, inter], 0.3) * 0.3).view([e, h, inter])),
            top_k: 2,
            norm_topk_prob: true,
            fp32_routing_weights: false,
            naming: ExpertNaming::Qwen,
            record_router_logits: false,
            router_logits: Mutex::new(None),
        };
        let x = values([5, h], 1.5);
        let with_experts = moe.forward(&x, false);
        let skipped = {
            let _off = expert_ablation::skip();
            moe.forward(&x, false)
        };
        // Renormalised top-2 weights sum to 1 per token: with identity experts, y = Σ_k w_k · x = x.
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(&skipped, &x) < 1e-6, "identity experts give back x (off by {})", diff(&skipped, &x));
        assert!(diff(&with_experts, &x) > 1e-2, "the real experts change x");
        assert!(!expert_ablation::on(), "the guard restores the experts");
        assert!(diff(&moe.forward(&x, false), &with_experts) < 1e-6);
    }
}
