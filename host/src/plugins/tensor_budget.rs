//! What one call of a loss plugin may spend on host tensors. Every op a plugin asks for makes a
//! host tensor (and an autograd node) in host memory, outside the plugin's own memory limit, so
//! each call gets a budget of ops and of elements its results may hold, and every handle the
//! call made expires when it returns: a plugin cannot grow the host's memory from step to step
//! by keeping handles (say, the end of a long op chain) in a static.

use super::Limits;

/// Tensor ops one loss call may run (a loss needs tens: DPO with its metrics makes about 20).
pub const MAX_OPS_PER_CALL: u64 = 10_000;
/// Elements the results of one loss call's ops may hold in all: 2^26, 256 MiB of fp32.
pub const MAX_ELEMENTS_PER_CALL: u64 = 1 << 26;

/// A host function refused what the plugin asked (a budget spent, an expired handle). It ends
/// the call like a trap, but is reported as the plugin's misuse, in the host's words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HostRefusal(pub String);

/// The tensor ops and elements spent so far in the current call, and the handles it made.
#[derive(Debug, Default)]
pub struct TensorCall {
    ops: u64,
    elements: u64,
    max_ops: u64,
    max_elements: u64,
    /// Resource-table slots of the handles this call made (expired when it ends).
    pub created: Vec<u32>,
}

impl TensorCall {
    /// A fresh budget for one call under `limits`.
    pub fn new(limits: &Limits) -> TensorCall {
        TensorCall { max_ops: limits.max_tensor_ops, max_elements: limits.max_tensor_elements, ..TensorCall::default() }
    }

    /// Counts one op whose result holds at most `bound` elements; refused, before it runs, when
    /// it would spend more than the call's budget.
    pub fn begin_op(&mut self, bound: u64) -> Result<(), HostRefusal> {
        if self.ops >= self.max_ops {
            return Err(HostRefusal(format!(
                "ran more than {} tensor ops in one call (the per-call budget of host ops; a loss needs tens, so build it from whole-tensor ops rather than loops)",
                self.max_ops
            )));
        }
        if self.elements.saturating_add(bound) > self.max_elements {
            return Err(HostRefusal(format!(
                "made tensors of more than {} elements in one call (the per-call budget of host memory for op results; this op would add {bound} to {})",
                self.max_elements, self.elements
            )));
        }
        self.ops += 1;
        Ok(())
    }

    /// Records the elements an op's result actually holds.
    pub fn charge(&mut self, elements: u64) {
        self.elements = self.elements.saturating_add(elements);
    }
}

/// The most elements the broadcast of tensors of `shapes` can hold: an elementwise op's result
/// has exactly this many, a reduction's fewer.
pub fn broadcast_bound(shapes: &[Vec<i64>]) -> u64 {
    let rank = shapes.iter().map(Vec::len).max().unwrap_or(0);
    (0..rank)
        .map(|i| shapes.iter().filter_map(|s| s.len().checked_sub(rank - i).map(|j| s[j].max(0) as u64)).max().unwrap_or(1))
        .fold(1u64, u64::saturating_mul)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_bounds_are_the_broadcast_sizes() {
        assert_eq!(broadcast_bound(&[vec![]]), 1);
        assert_eq!(broadcast_bound(&[vec![3], vec![]]), 3);
        assert_eq!(broadcast_bound(&[vec![4, 1], vec![5]]), 20);
        assert_eq!(broadcast_bound(&[vec![2, 1, 3], vec![7, 1], vec![3]]), 42);
    }

    #[test]
    fn the_budget_refuses_the_op_past_either_limit() {
        let limits = Limits { max_tensor_ops: 3, max_tensor_elements: 10, ..Limits::default() };
        let mut call = TensorCall::new(&limits);
        for _ in 0..3 {
            call.begin_op(1).unwrap();
            call.charge(1);
        }
        assert!(call.begin_op(1).unwrap_err().0.contains("more than 3 tensor ops"));
        let mut call = TensorCall::new(&limits);
        call.begin_op(8).unwrap();
        call.charge(8);
        assert!(call.begin_op(3).unwrap_err().0.contains("more than 10 elements"));
        call.begin_op(2).unwrap();
    }
}
