//! A hostile loss plugin for the sandbox tests. Its loss is an honest one, `mean(−log σ(π_c − π_r))`
//! on the mean token log-probs; its params pick the attack (all off by default):
//! - `forge = 1`: metrics named like the host's own keys (`step` 999999, `loss` 0, `lr`,
//!   `grad_norm`, `eval_loss`), to pass forged values off as the host's;
//! - `huge = N`: N metrics with names of `name_bytes` bytes (default 8000), to blow up the
//!   metrics file;
//! - `nonfinite = 1`: metrics `nan`, `inf` and `ninf` of those values (and an ordinary `one`);
//! - `spin = 1`: spins forever in every `compute`, to use up its time.

use ftx_plugin_api::loss::{export_loss, input, param, param_spec, Loss, LossOutput, LossSpec, Metric, Tensor};
use std::hint::black_box;

struct Hostile;

impl Loss for Hostile {
    fn describe() -> LossSpec {
        LossSpec {
            inputs: ["policy_chosen_mean_logps", "policy_rejected_mean_logps"].map(String::from).to_vec(),
            params: vec![
                param_spec("forge", 0.0, "1: metrics named like the host's keys"),
                param_spec("huge", 0.0, "this many metrics with long names"),
                param_spec("name_bytes", 8000.0, "bytes of each of those names"),
                param_spec("nonfinite", 0.0, "1: NaN and infinite metrics"),
                param_spec("spin", 0.0, "1: spin forever"),
            ],
        }
    }

    fn compute(params: Vec<(String, f64)>) -> Result<LossOutput, String> {
        if param(&params, "spin")? != 0.0 {
            loop {
                black_box(0);
            }
        }
        let margin = input("policy_chosen_mean_logps")?.sub(&input("policy_rejected_mean_logps")?)?;
        let loss = margin.log_sigmoid().neg().mean(&[], false)?;
        let mut metrics = vec![Metric { name: "margin".into(), value: margin.detach() }];
        let constant = |name: &str, v: f64| Metric { name: name.into(), value: Tensor::new(v) };
        if param(&params, "forge")? != 0.0 {
            for (name, v) in [("step", 999_999.0), ("loss", 0.0), ("lr", 123.0), ("grad_norm", 0.0), ("eval_loss", 0.0)] {
                metrics.push(constant(name, v));
            }
        }
        let name_bytes = param(&params, "name_bytes")? as usize;
        for i in 0..param(&params, "huge")? as usize {
            let mut name = format!("m{i}-");
            name.extend(std::iter::repeat_n('x', name_bytes.saturating_sub(name.len())));
            metrics.push(constant(&name, i as f64));
        }
        if param(&params, "nonfinite")? != 0.0 {
            for (name, v) in [("nan", f64::NAN), ("inf", f64::INFINITY), ("ninf", f64::NEG_INFINITY), ("one", 1.0)] {
                metrics.push(constant(name, v));
            }
        }
        Ok(LossOutput { loss, metrics })
    }
}

export_loss!(Hostile);
