//! KTO, paired: each pair's chosen answer is a desirable example and its rejected answer an
//! undesirable one, with log-ratios `r_w = log π(y_w) − log π_ref(y_w)` and
//! `r_l = log π(y_l) − log π_ref(y_l)` (summed token log-probs). The reference point is
//! `z₀ = max(0, mean_batch(r_l))`, detached from autograd, and
//!
//! `loss = (Σᵢ λ_D · (1 − σ(β(r_w,i − z₀))) + Σᵢ λ_U · (1 − σ(β(z₀ − r_l,i)))) / 2n`
//!
//! — the mean over the 2n examples, as TRL's KTOTrainer (`loss_type="kto"`) computes it.
//! TRL estimates z₀ as `clamp(mean(log π(y′|x) − log π_ref(y′|x)), min=0)`, detached, on
//! mismatched completions y′ (another example's answer to this prompt); the host gives no
//! such completions, so the rejected answers stand in for them: they are answers to the
//! prompt that the policy is not being pushed towards. z₀ is per micro-batch (TRL's is
//! gathered across processes).

use ftx_plugin_api::loss::{export_loss, input, param, param_spec, Loss, LossOutput, LossSpec, Metric};

struct Kto;

impl Loss for Kto {
    fn describe() -> LossSpec {
        LossSpec {
            inputs: ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"].map(String::from).to_vec(),
            params: vec![
                param_spec("beta", 0.1, "strength of the KL penalty towards the reference"),
                param_spec("desirable_weight", 1.0, "λ_D, weight of the desirable (chosen) examples' losses"),
                param_spec("undesirable_weight", 1.0, "λ_U, weight of the undesirable (rejected) examples' losses"),
            ],
        }
    }

    fn compute(params: Vec<(String, f64)>) -> Result<LossOutput, String> {
        let beta = param(&params, "beta")?;
        let (wd, wu) = (param(&params, "desirable_weight")?, param(&params, "undesirable_weight")?);
        let chosen = input("policy_chosen_logps")?.sub(&input("reference_chosen_logps")?)?;
        let rejected = input("policy_rejected_logps")?.sub(&input("reference_rejected_logps")?)?;
        let kl = rejected.mean(&[], false)?.detach().clamp(Some(0.0), None);
        // 1 − σ(x) = σ(−x), the stabler form.
        let chosen_losses = kl.sub(&chosen)?.mul_scalar(beta).sigmoid().mul_scalar(wd);
        let rejected_losses = rejected.sub(&kl)?.mul_scalar(beta).sigmoid().mul_scalar(wu);
        let loss = chosen_losses.add(&rejected_losses)?.mean(&[], false)?.mul_scalar(0.5);
        let reward_chosen = chosen.mul_scalar(beta).detach();
        let reward_rejected = rejected.mul_scalar(beta).detach();
        let margin = reward_chosen.sub(&reward_rejected)?;
        Ok(LossOutput {
            loss,
            metrics: vec![
                Metric { name: "kl".into(), value: kl },
                Metric { name: "rewards/chosen".into(), value: reward_chosen },
                Metric { name: "rewards/rejected".into(), value: reward_rejected },
                Metric { name: "rewards/margin".into(), value: margin },
            ],
        })
    }
}

export_loss!(Kto);
