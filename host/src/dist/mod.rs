//! Training beyond one process, on libtorch's own distributed engine (c10d): Gloo between CPU
//! processes, NCCL between GPUs, a TCPStore for the rendezvous — the engine torch.distributed
//! runs on, reached through a small C++ shim (`c10d.cpp`). Nothing here is a hand-written
//! collective or transport.
//!
//! Ranks are started the way the ecosystem starts them: torchrun, Slurm or Kubernetes set
//! torchrun's environment ([`DistEnv`]), or `ftx train --nproc-per-node N` spawns the local
//! ranks itself ([`launch`]). The data-parallel strategy built on it is `train::ddp`.

// The process group over the c10d shim, or (a libtorch without c10d headers at build time)
// a stand-in whose `init` says so: one module either way, no per-function cfg pairs.
#[cfg(ftx_c10d)]
mod group;
#[cfg(not(ftx_c10d))]
#[path = "unbuilt.rs"]
mod group;
pub mod launch;

pub use group::{ProcessGroup, Reducer, Work};

/// Which c10d process group carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors, TCP between processes.
    Gloo,
    /// NCCL: CUDA tensors (libtorch_cuda.so, looked up at run time).
    Nccl,
}

impl Backend {
    /// The name c10d and torch.distributed use.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// How [`ProcessGroup::all_reduce`] combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// What can go wrong between processes; every variant that happens on a rank names it.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A torchrun environment variable is missing or malformed.
    #[error("{var}={value:?}: {why}")]
    Env { var: &'static str, value: String, why: String },
    /// The rendezvous could not be joined within the timeout.
    #[error("rank {rank}: could not join the rendezvous at {addr} within {timeout_s}s: {message}")]
    Rendezvous { rank: usize, addr: String, timeout_s: u64, message: String },
    /// The process group could not be created.
    #[error("rank {rank}: creating the {backend} process group failed: {message}")]
    Group { rank: usize, backend: &'static str, message: String },
    /// A collective failed: usually another rank stopped or lost its connection (`lost` says
    /// which ranks did not report the failure themselves).
    #[error("rank {rank}: {op} failed, {lost}: {message}")]
    Collective { rank: usize, op: &'static str, lost: String, message: String },
    /// The configuration asks for something distributed training cannot do (yet).
    #[error("{0}")]
    Config(String),
    /// Starting or supervising the local ranks failed, or a rank failed.
    #[error("{0}")]
    Launch(String),
    /// This binary was built against a libtorch without the c10d headers.
    #[error("this ftx was built without libtorch's distributed engine: LIBTORCH had no c10d headers at build time, or the c10d shim did not compile against them (see the build's warnings)")]
    NotBuilt,
}

/// Where this process sits in a distributed run: torchrun's environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this process among all.
    pub rank: usize,
    /// `WORLD_SIZE`: processes in the run.
    pub world_size: usize,
    /// `LOCAL_RANK`: this process among those of its machine (picks its GPU).
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE`: processes on this machine.
    pub local_world_size: usize,
    /// `MASTER_ADDR`: the host of rank 0, which serves the rendezvous store.
    pub master_addr: String,
    /// `MASTER_PORT`: the store's port.
    pub master_port: u16,
}

impl DistEnv {
    /// Reads torchrun's variables from the process environment; `None` when neither `RANK`
    /// nor `WORLD_SIZE` is set (a single-process run).
    pub fn from_env() -> Result<Option<DistEnv>, DistError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`DistEnv::from_env`], from any source of variables.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>, DistError> {
        if get("RANK").is_none() && get("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let num = |var: &'static str, default: Option<usize>| -> Result<usize, DistError> {
            match get(var) {
                Some(v) => v.trim().parse().map_err(|_| DistError::Env { var, value: v.clone(), why: "not a whole number".into() }),
                None => default.ok_or_else(|| DistError::Env { var, value: String::new(), why: "must be set beside RANK and WORLD_SIZE (as torchrun sets it)".into() }),
            }
        };
        let world_size = num("WORLD_SIZE", None)?;
        let rank = num("RANK", None)?;
        if world_size == 0 || rank >= world_size {
            return Err(DistError::Env { var: "RANK", value: rank.to_string(), why: format!("must be below WORLD_SIZE={world_size}") });
        }
        let local_rank = num("LOCAL_RANK", Some(rank))?;
        let local_world_size = num("LOCAL_WORLD_SIZE", Some(world_size))?;
        if local_rank >= local_world_size || local_world_size > world_size {
            return Err(DistError::Env {
                var: "LOCAL_RANK",
                value: local_rank.to_string(),
                why: format!("must be below LOCAL_WORLD_SIZE={local_world_size}, itself at most WORLD_SIZE={world_size}"),
            });
        }
        let master_addr = get("MASTER_ADDR").filter(|a| !a.trim().is_empty()).ok_or_else(|| DistError::Env {
            var: "MASTER_ADDR",
            value: String::new(),
            why: "must name the host of rank 0 (as torchrun sets it)".into(),
        })?;
        let port = get("MASTER_PORT").unwrap_or_default();
        let master_port = port.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| DistError::Env {
            var: "MASTER_PORT",
            value: port.clone(),
            why: "must be the TCP port of the rendezvous store on MASTER_ADDR".into(),
        })?;
        Ok(Some(DistEnv { rank, world_size, local_rank, local_world_size, master_addr: master_addr.trim().to_owned(), master_port }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Option<DistEnv>, DistError> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_are_read_and_checked() {
        assert_eq!(env(&[]).unwrap(), None);
        let full = [("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29500")];
        let e = env(&full).unwrap().unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_port), (3, 4, 1, 2, 29500));
        assert_eq!(e.master_addr, "node0");
        // LOCAL_* default to the global values (srun-style single-node launches).
        let e = env(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap().unwrap();
        assert_eq!((e.local_rank, e.local_world_size), (1, 2));
        let err = env(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).unwrap_err().to_string();
        assert!(err.contains("must be below WORLD_SIZE=2"), "{err}");
        let err = env(&[("RANK", "0"), ("WORLD_SIZE", "two")]).unwrap_err().to_string();
        assert!(err.contains("WORLD_SIZE=\"two\""), "{err}");
        let err = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err().to_string();
        assert!(err.contains("MASTER_ADDR"), "{err}");
        let err = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "99999")]).unwrap_err().to_string();
        assert!(err.contains("MASTER_PORT=\"99999\""), "{err}");
    }
}
