//! A hostile loss plugin for the sandbox tests (tests/hostile). The `attack` parameter picks
//! the attack, so one component covers them all; attack 0 is an honest loss,
//! `mean(-log σ(chosen − rejected))` of the policy's log-probs.

use ftx_plugin_api::loss::{export_loss, input, param, param_spec, Loss, LossOutput, LossSpec, Tensor};
use std::cell::RefCell;

/// Attack codes (the `attack` parameter).
const HONEST: u32 = 0;
/// `ops` chained `add-scalar` ops in one call, keeping only the end of the chain.
const CHAIN: u32 = 1;
/// Keeps the end of a chain in a static and extends it by `ops` ops in every call, so the
/// autograd graph the host holds grows from step to step.
const KEEP_ACROSS_CALLS: u32 = 2;
/// A constant loss, `Tensor::new(1.0)`: nothing to differentiate.
const CONSTANT: u32 = 3;
/// The honest loss, detached from autograd.
const DETACHED: u32 = 4;
/// The loss of the first call, returned again in later calls (its graph is gone by then).
const STALE_LOSS: u32 = 5;
/// An error string of `bytes` bytes led by terminal escape sequences and a fake success line.
const ESCAPES: u32 = 6;
/// `ops` ops on the input, every result kept alive: the elements allocated add up.
const HOARD: u32 = 7;

thread_local! {
    static KEPT: RefCell<Option<Tensor>> = const { RefCell::new(None) };
}

struct Hostile;

fn honest() -> Result<Tensor, String> {
    let margin = input("policy_chosen_logps")?.sub(&input("policy_rejected_logps")?)?;
    margin.log_sigmoid().neg().mean(&[], false)
}

fn chain(mut t: Tensor, ops: u64) -> Tensor {
    for _ in 0..ops {
        t = t.add_scalar(0.0);
    }
    t
}

impl Loss for Hostile {
    fn describe() -> LossSpec {
        LossSpec {
            inputs: vec!["policy_chosen_logps".into(), "policy_rejected_logps".into()],
            params: vec![
                param_spec("attack", 0.0, "which attack (see the source)"),
                param_spec("ops", 1000.0, "tensor ops per call, for the chain attacks"),
                param_spec("bytes", 1024.0, "size of the error string, for the escapes attack"),
            ],
        }
    }

    fn compute(params: Vec<(String, f64)>) -> Result<LossOutput, String> {
        let attack = param(&params, "attack")? as u32;
        let ops = param(&params, "ops")? as u64;
        let loss = match attack {
            HONEST => honest()?,
            CHAIN => chain(honest()?, ops),
            KEEP_ACROSS_CALLS => {
                let start = match KEPT.with(|k| k.borrow_mut().take()) {
                    Some(t) => t,
                    None => honest()?,
                };
                let end = chain(start, ops);
                let loss = end.add_scalar(0.0);
                KEPT.with(|k| *k.borrow_mut() = Some(end));
                loss
            }
            CONSTANT => Tensor::new(1.0),
            DETACHED => honest()?.detach(),
            STALE_LOSS => {
                if KEPT.with(|k| k.borrow().is_none()) {
                    let first = honest()?;
                    KEPT.with(|k| *k.borrow_mut() = Some(first));
                }
                KEPT.with(|k| k.borrow().as_ref().map(|t| t.add_scalar(0.0))).expect("kept above")
            }
            ESCAPES => {
                let bytes = param(&params, "bytes")? as usize;
                let mut text = String::from("\x1b[2J\x1b[H\rFAKE: ftx: training finished OK\n");
                while text.len() < bytes {
                    text.push('x');
                }
                return Err(text);
            }
            HOARD => {
                let x = input("policy_chosen_logps")?;
                let mut hoard = Vec::new();
                for _ in 0..ops {
                    hoard.push(x.add_scalar(1.0));
                }
                x.mean(&[], false)?
            }
            other => return Err(format!("unknown attack {other}")),
        };
        Ok(LossOutput { loss, metrics: Vec::new() })
    }
}

export_loss!(Hostile);
