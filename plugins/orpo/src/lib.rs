//! ORPO: the SFT loss on the chosen answer plus `−β · log σ(log odds(y_w) − log odds(y_l))`,
//! where `log odds(y) = log p − log(1 − p)` with `p = exp(mean token log-prob)`. No reference
//! model. As TRL's ORPOTrainer: `loss = nll_chosen − β · mean(log σ(ratio))`.

use ftx_plugin_api::loss::{export_loss, input, param, param_spec, Loss, LossOutput, LossSpec, Metric, Tensor};

struct Orpo;

/// `log(1 − exp(x))` for x < 0, as `log(−expm1(x))` would give: computed as log(1 − e^x).
fn log1m_exp(x: &Tensor) -> Result<Tensor, String> {
    Ok(x.exp().neg().add_scalar(1.0).log())
}

impl Loss for Orpo {
    fn describe() -> LossSpec {
        LossSpec {
            // Log-probs averaged over each answer's tokens, and the chosen answer's NLL.
            inputs: ["policy_chosen_mean_logps", "policy_rejected_mean_logps", "chosen_nll"].map(String::from).to_vec(),
            params: vec![param_spec("beta", 0.1, "weight of the odds-ratio term (the guide's default 0.1)")],
        }
    }

    fn compute(params: Vec<(String, f64)>) -> Result<LossOutput, String> {
        let beta = param(&params, "beta")?;
        let chosen = input("policy_chosen_mean_logps")?;
        let rejected = input("policy_rejected_mean_logps")?;
        let log_odds = chosen.sub(&rejected)?.sub(&log1m_exp(&chosen)?.sub(&log1m_exp(&rejected)?)?)?;
        let ratio = log_odds.log_sigmoid();
        let or_loss = ratio.mean(&[], false)?.mul_scalar(-beta);
        let nll = input("chosen_nll")?.mean(&[], false)?;
        let loss = nll.add(&or_loss)?;
        Ok(LossOutput {
            loss,
            metrics: vec![
                Metric { name: "log_odds_ratio".into(), value: ratio.detach() },
                Metric { name: "log_odds".into(), value: log_odds.detach() },
                Metric { name: "nll".into(), value: nll.detach() },
                Metric { name: "rewards/chosen".into(), value: chosen.mul_scalar(beta).detach() },
                Metric { name: "rewards/rejected".into(), value: rejected.mul_scalar(beta).detach() },
            ],
        })
    }
}

export_loss!(Orpo);
