//! PPO (Schulman et al., 2017), token level, as TRL's PPOTrainer. With `ρ = exp(log π − log π_old)`,
//! advantages `A`, values `v`, old values `v_old`, returns `R` and the mask `m` (all of one
//! shape), and `mean_m(x) = Σ m·x / max(1, Σ m)`:
//!
//! `pg_loss = mean_m(max(−A·ρ, −A·clamp(ρ, 1 − ε, 1 + ε)))`
//! `vf_loss = 0.5 · mean_m(max((v − R)², (clamp(v, v_old − ε_v, v_old + ε_v) − R)²))`
//! `loss = pg_loss + vf_coef · vf_loss`
//!
//! Metrics: `clipfrac = mean_m(−A·clamp(ρ) > −A·ρ)` (the clipped term is the larger),
//! `approx_kl = mean_m(½(log π − log π_old)²)` (TRL's estimator), `vf_clipfrac`, `pg_loss`,
//! `vf_loss`. Masked-out positions are excluded with a select, not a product, so whatever
//! sits there (padding) never reaches the value.

use ftx_plugin_api::loss::{export_loss, input, param, param_spec, Loss, LossOutput, LossSpec, Metric, Tensor};

struct Ppo;

/// Means over the unmasked positions.
struct Masked {
    mask: Tensor,
    count: Tensor,
    zero: Tensor,
}

impl Masked {
    fn new(mask: Tensor) -> Result<Masked, String> {
        let count = mask.sum(&[], false)?.clamp(Some(1.0), None);
        Ok(Masked { mask, count, zero: Tensor::new(0.0) })
    }
    fn mean(&self, x: &Tensor) -> Result<Tensor, String> {
        x.select(&self.mask, &self.zero)?.sum(&[], false)?.div(&self.count)
    }
}

impl Loss for Ppo {
    fn describe() -> LossSpec {
        LossSpec {
            inputs: ["logps", "old_logps", "advantages", "values", "old_values", "returns", "mask"].map(String::from).to_vec(),
            params: vec![
                param_spec("clip_range", 0.2, "ε: the probability ratio is clipped to [1 − ε, 1 + ε]"),
                param_spec("clip_range_value", 0.2, "ε_v: the value is clipped to within ε_v of the old value"),
                param_spec("vf_coef", 0.1, "weight of the value loss"),
            ],
        }
    }

    fn compute(params: Vec<(String, f64)>) -> Result<LossOutput, String> {
        let (eps, eps_v, vf_coef) = (param(&params, "clip_range")?, param(&params, "clip_range_value")?, param(&params, "vf_coef")?);
        let m = Masked::new(input("mask")?)?;
        let log_ratio = input("logps")?.sub(&input("old_logps")?)?;
        let ratio = log_ratio.exp();
        let neg_adv = input("advantages")?.neg();
        let pg1 = neg_adv.mul(&ratio)?;
        let pg2 = neg_adv.mul(&ratio.clamp(Some(1.0 - eps), Some(1.0 + eps)))?;
        let pg_loss = m.mean(&pg1.maximum(&pg2)?)?;

        let (values, old_values, returns) = (input("values")?, input("old_values")?, input("returns")?);
        let clipped = values.maximum(&old_values.add_scalar(-eps_v))?.minimum(&old_values.add_scalar(eps_v))?;
        let vf1 = values.sub(&returns)?.pow_scalar(2.0);
        let vf2 = clipped.sub(&returns)?.pow_scalar(2.0);
        let vf_loss = m.mean(&vf1.maximum(&vf2)?)?.mul_scalar(0.5);

        let loss = pg_loss.add(&vf_loss.mul_scalar(vf_coef))?;
        let clipfrac = m.mean(&pg2.detach().greater(&pg1.detach())?)?;
        let vf_clipfrac = m.mean(&vf2.detach().greater(&vf1.detach())?)?;
        let approx_kl = m.mean(&log_ratio.detach().pow_scalar(2.0).mul_scalar(0.5))?;
        Ok(LossOutput {
            loss,
            metrics: vec![
                Metric { name: "clipfrac".into(), value: clipfrac },
                Metric { name: "approx_kl".into(), value: approx_kl },
                Metric { name: "pg_loss".into(), value: pg_loss.detach() },
                Metric { name: "vf_loss".into(), value: vf_loss.detach() },
                Metric { name: "vf_clipfrac".into(), value: vf_clipfrac },
            ],
        })
    }
}

export_loss!(Ppo);
