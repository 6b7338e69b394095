//! SimPO: `−log σ(β · (m(y_w) − m(y_l) − γ/β))`, where `m(y) = (1/|y|) log π(y)` is the
//! answer's mean token log-prob, averaged over the batch. No reference model. This is the
//! paper's `−log σ(β/|y_w| · log π(y_w) − β/|y_l| · log π(y_l) − γ)` written with the margin
//! as the ratio `γ/β`, like the SimPO authors' trainer: the parameter is `gamma_beta_ratio`
//! (the default 0.5 with β = 2 means γ = 1), not γ itself. TRL's CPOTrainer
//! (`loss_type="simpo"`) takes γ itself as `simpo_gamma` and divides it by β: to reproduce
//! such a run, set `gamma_beta_ratio = simpo_gamma / beta`.

use ftx_plugin_api::loss::{export_loss, input, param, param_spec, Loss, LossOutput, LossSpec, Metric};

struct Simpo;

impl Loss for Simpo {
    fn describe() -> LossSpec {
        LossSpec {
            inputs: ["policy_chosen_mean_logps", "policy_rejected_mean_logps"].map(String::from).to_vec(),
            params: vec![
                param_spec("beta", 2.0, "scale of the length-normalised reward (the paper uses 2.0–2.5)"),
                param_spec("gamma_beta_ratio", 0.5, "target reward margin divided by beta (γ/β): logits = m_w − m_l − gamma_beta_ratio"),
            ],
        }
    }

    fn compute(params: Vec<(String, f64)>) -> Result<LossOutput, String> {
        let (beta, ratio) = (param(&params, "beta")?, param(&params, "gamma_beta_ratio")?);
        let chosen = input("policy_chosen_mean_logps")?;
        let rejected = input("policy_rejected_mean_logps")?;
        let logits = chosen.sub(&rejected)?.add_scalar(-ratio);
        let loss = logits.mul_scalar(beta).log_sigmoid().neg().mean(&[], false)?;
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

export_loss!(Simpo);
