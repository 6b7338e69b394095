//! The process group of an ftx built without libtorch's distributed engine (no c10d headers
//! at build time, or the shim did not compile against them): [`ProcessGroup::init`] says so,
//! and since no group can then exist, its other methods cannot be reached. The same API as
//! `group.rs`.

use super::{Backend, DistEnv, DistError, ReduceOp};
use std::convert::Infallible;
use std::time::Duration;
use tch::Tensor;

/// All ranks of one run (never made in this build).
pub struct ProcessGroup {
    never: Infallible,
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// The backend carrying the collectives.
    pub backend: Backend,
}

impl ProcessGroup {
    /// Always [`DistError::NotBuilt`].
    pub fn init(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<ProcessGroup, DistError> {
        let _ = (env, backend, timeout);
        Err(DistError::NotBuilt)
    }

    /// Unreachable: no group exists.
    pub fn all_reduce(&self, _tensors: &[&Tensor], _op: ReduceOp) -> Result<(), DistError> {
        match self.never {}
    }

    /// Unreachable: no group exists.
    pub fn broadcast(&self, _tensor: &Tensor, _root: usize) -> Result<(), DistError> {
        match self.never {}
    }

    /// Unreachable: no group exists.
    pub fn all_gather(&self, _output: &Tensor, _input: &Tensor) -> Result<(), DistError> {
        match self.never {}
    }

    /// Unreachable: no group exists.
    pub fn reduce_scatter(&self, _output: &Tensor, _input: &Tensor) -> Result<(), DistError> {
        match self.never {}
    }

    /// Unreachable: no group exists.
    pub fn all_gather_start(&self, _output: &Tensor, _input: &Tensor) -> Result<Work, DistError> {
        match self.never {}
    }

    /// Unreachable: no group exists.
    pub fn wait(&self, _work: Work) -> Result<(), DistError> {
        match self.never {}
    }

    /// Unreachable: no group exists.
    pub fn barrier(&self) -> Result<(), DistError> {
        match self.never {}
    }

    /// Unreachable: no group exists.
    pub fn reducer(&self, _tensors: &[Tensor], _bucket: &[i64], _late: &[bool]) -> Result<Reducer, DistError> {
        match self.never {}
    }
}

/// A started collective (never made in this build).
pub struct Work {
    _never: Infallible,
}

/// DDP's gradient reducer (never made in this build).
pub struct Reducer {
    never: Infallible,
}

impl Reducer {
    /// Unreachable: no reducer exists.
    pub fn arm(&self, _group: &ProcessGroup) -> Result<(), DistError> {
        match self.never {}
    }

    /// Unreachable: no reducer exists.
    pub fn finish(&self, _group: &ProcessGroup) -> Result<usize, DistError> {
        match self.never {}
    }
}
