//! DPO: `-log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])`, with
//! optional label smoothing (conservative DPO), averaged over the batch — TRL's `sigmoid` loss.

use ftx_plugin_api::loss::{export_loss, input, param, param_spec, Loss, LossOutput, LossSpec, Metric};

struct Dpo;

impl Loss for Dpo {
    fn describe() -> LossSpec {
        LossSpec {
            inputs: ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"].map(String::from).to_vec(),
            params: vec![
                param_spec("beta", 0.1, "strength of the KL penalty towards the reference"),
                param_spec("label_smoothing", 0.0, "probability that a preference label is flipped"),
            ],
        }
    }

    fn compute(params: Vec<(String, f64)>) -> Result<LossOutput, String> {
        let (beta, eps) = (param(&params, "beta")?, param(&params, "label_smoothing")?);
        let chosen = input("policy_chosen_logps")?.sub(&input("reference_chosen_logps")?)?;
        let rejected = input("policy_rejected_logps")?.sub(&input("reference_rejected_logps")?)?;
        let logits = chosen.sub(&rejected)?.mul_scalar(beta);
        let on = logits.log_sigmoid().mul_scalar(-(1.0 - eps));
        let off = logits.neg().log_sigmoid().mul_scalar(-eps);
        let loss = on.add(&off)?.mean(&[], false)?;
        let reward_chosen = chosen.mul_scalar(beta).detach();
        let reward_rejected = rejected.mul_scalar(beta).detach();
        let margin = reward_chosen.sub(&reward_rejected)?;
        let accuracy = reward_chosen.greater(&reward_rejected)?;
        Ok(LossOutput {
            loss,
            metrics: vec![
                Metric { name: "rewards/chosen".into(), value: reward_chosen },
                Metric { name: "rewards/rejected".into(), value: reward_rejected },
                Metric { name: "rewards/margin".into(), value: margin },
                Metric { name: "rewards/accuracy".into(), value: accuracy },
            ],
        })
    }
}

export_loss!(Dpo);
