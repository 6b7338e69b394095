//! GRPO (Shao et al., 2024, DeepSeekMath), as TRL's GRPOTrainer with `loss_type="grpo"`. Per
//! token, with `ρ = exp(log π − log π_old)`, the group-normalised advantage `A` (given per token
//! by the host) and `d = log π_ref − log π`:
//!
//! `ℓ_t = −min(ρ·A, clamp(ρ, 1 − ε, 1 + ε)·A) + β·(exp(d) − d − 1)`
//!
//! (the KL term is the k3 estimator of KL(π‖π_ref), unbiased and ≥ 0). As in the paper,
//! `loss = mean over sequences of (Σ_t m_t·ℓ_t / max(1, Σ_t m_t))`: each completion's tokens
//! are averaged first, then the completions (the last dimension is tokens; a 1-D input is one
//! sequence). Metrics are token means over the mask: `kl`, and `clip_ratio`, the fraction of
//! tokens whose clipped term is active (`ρ < 1 − ε` with `A < 0`, or `ρ > 1 + ε` with `A > 0`).

use ftx_plugin_api::loss::{export_loss, input, param, param_spec, Loss, LossOutput, LossSpec, Metric, Tensor};

struct Grpo;

impl Loss for Grpo {
    fn describe() -> LossSpec {
        LossSpec {
            inputs: ["logps", "old_logps", "ref_logps", "advantages", "mask"].map(String::from).to_vec(),
            params: vec![
                param_spec("beta", 0.04, "weight of the KL penalty towards the reference"),
                param_spec("epsilon", 0.2, "ε: the probability ratio is clipped to [1 − ε, 1 + ε]"),
            ],
        }
    }

    fn compute(params: Vec<(String, f64)>) -> Result<LossOutput, String> {
        let (beta, eps) = (param(&params, "beta")?, param(&params, "epsilon")?);
        let (logps, adv, mask) = (input("logps")?, input("advantages")?, input("mask")?);
        let zero = Tensor::new(0.0);
        let ratio = logps.sub(&input("old_logps")?)?.exp();
        let s1 = ratio.mul(&adv)?;
        let s2 = ratio.clamp(Some(1.0 - eps), Some(1.0 + eps)).mul(&adv)?;
        let d = input("ref_logps")?.sub(&logps)?;
        let kl = d.exp().sub(&d)?.add_scalar(-1.0);
        let per_token = s1.minimum(&s2)?.neg().add(&kl.mul_scalar(beta))?;
        let per_seq = per_token.select(&mask, &zero)?.sum(&[-1], false)?.div(&mask.sum(&[-1], false)?.clamp(Some(1.0), None))?;
        let loss = per_seq.mean(&[], false)?;

        let count = mask.sum(&[], false)?.clamp(Some(1.0), None);
        let masked_mean = |x: &Tensor| -> Result<Tensor, String> { x.select(&mask, &zero)?.sum(&[], false)?.div(&count) };
        let ratio = ratio.detach();
        let low = Tensor::new(1.0 - eps).greater(&ratio)?.mul(&zero.greater(&adv)?)?;
        let high = ratio.greater(&Tensor::new(1.0 + eps))?.mul(&adv.greater(&zero)?)?;
        let clip_ratio = masked_mean(&low.maximum(&high)?)?;
        let mean_kl = masked_mean(&kl.detach())?;
        Ok(LossOutput {
            loss,
            metrics: vec![Metric { name: "kl".into(), value: mean_kl }, Metric { name: "clip_ratio".into(), value: clip_ratio }],
        })
    }
}

export_loss!(Grpo);
