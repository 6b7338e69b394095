//! Issue 13, item 2: a loss plugin cannot grow the host's memory through tensor handles — not by
//! keeping them from step to step, not by long op chains, not by large results.

use super::{both, hostile_loss, train_with};
use ftx::plugins::loss::LossPlugin;
use ftx::plugins::Limits;
use tch::{Device, Tensor};

#[test]
fn a_loss_that_keeps_the_end_of_an_op_chain_across_steps_is_stopped_by_name_at_the_next_step() {
    let _rng = crate::common::torch_rng_lock();
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Unchecked, every step would add its 2,000-node chain to one autograd graph the host holds.
    let run = train_with(home.path(), work.path(), &hostile_loss(), "attack = 2, ops = 2000", 4);
    let out = both(&run);
    assert_eq!(run.status.code(), Some(1), "{out}");
    assert!(out.contains("plugin hostile_loss: compute: used a tensor handle kept from an earlier call"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn one_call_running_more_ops_than_its_budget_is_stopped_by_name() {
    let _rng = crate::common::torch_rng_lock();
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let run = train_with(home.path(), work.path(), &hostile_loss(), "attack = 1, ops = 20000", 1);
    let out = both(&run);
    assert_eq!(run.status.code(), Some(1), "{out}");
    assert!(out.contains("plugin hostile_loss: compute: ran more than 10000 tensor ops in one call"), "{out}");
}

#[test]
fn results_past_the_element_budget_are_refused_before_they_are_made_and_the_plugin_goes_on() {
    let limits = Limits { max_tensor_elements: 1 << 20, ..Limits::default() };
    let mut plugin = LossPlugin::load(&crate::plugins::wasm("hostile-loss"), limits, Device::Cpu).unwrap();
    let x = Tensor::zeros([1 << 16], (tch::Kind::Float, Device::Cpu)).set_requires_grad(true);
    let inputs = [("policy_chosen_logps", &x), ("policy_rejected_logps", &x)];
    let hoard = |ops: f64| vec![("attack".to_owned(), 7.0), ("ops".to_owned(), ops)];
    // 100 results of 65,536 elements kept alive: 6.5 M elements, past a budget of 2^20. Sixteen
    // fill it exactly; the 17th would cross it and is refused before it is made.
    let e = plugin.compute(&inputs, &hoard(100.0)).err().expect("refused").to_string();
    assert!(e.contains("plugin hostile_loss: compute: made tensors of more than 1048576 elements in one call"), "{e}");
    assert!(e.contains("this op would add 65536 to 1048576"), "{e}");
    // Within the budget (15 × 65,536 + the loss's reductions) the same instance works.
    let out = plugin.compute(&inputs, &hoard(15.0)).unwrap();
    assert_eq!(out.loss.double_value(&[]), 0.0);
}
