//! `ftx dist-check [--nproc-per-node N …]`: joins the ranks' rendezvous and runs every
//! collective ftx uses on known inputs, like nccl-tests' correctness check: the first thing
//! to run on a new cluster or launcher set-up. Each rank prints one JSON line of what it
//! received and fails when a value differs from the closed form.

use crate::dist::launch::{LaunchArgs, Launched};
use crate::dist::{Backend, DistEnv, ProcessGroup, ReduceOp};
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// Arguments of `ftx dist-check`.
#[derive(clap::Args, Debug)]
pub struct DistCheckArgs {
    /// `gloo` (CPU tensors) or `nccl` (each rank's GPU, `cuda:LOCAL_RANK`).
    #[arg(long, default_value = "gloo")]
    pub backend: String,
    /// Seconds the rendezvous and each collective may wait.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    #[command(flatten)]
    pub launch: LaunchArgs,
}

/// What one rank received from each collective.
#[derive(Debug, serde::Serialize)]
struct Received {
    rank: usize,
    world_size: usize,
    backend: &'static str,
    /// all_reduce(sum) of [r + 1, 2(r + 1)].
    all_reduce_sum: Vec<f64>,
    /// all_reduce(max) and all_reduce(min) of [r].
    all_reduce_max: f64,
    all_reduce_min: f64,
    /// broadcast from the last rank of [10r, 10r + 1, 10r + 2].
    broadcast: Vec<f64>,
    /// all_gather of [r, -r].
    all_gather: Vec<f64>,
    /// reduce_scatter(sum) of [100r + j for j in 0..2·world]: this rank's two sums.
    reduce_scatter: Vec<f64>,
    /// DDP's overlapped reducer: the summed gradients of p0, p1, p2 = 1, 2, 3 in
    /// y = (r + 1)·p0·p1·p2, each in its own bucket, p0's reduced after the backward.
    overlap_grads: Vec<f64>,
    /// Buckets the backward pass launched itself (p2's and p1's).
    overlap_early: usize,
}

pub fn run(a: DistCheckArgs) -> Result<()> {
    match a.launch.launch()? {
        Launched::Done => return Ok(()),
        Launched::Stopped(signal) => return Err(crate::train::interrupt::RanksStopped(signal).into()),
        Launched::RunHere => {}
    }
    let env = DistEnv::from_env()?.context("no rank environment: pass --nproc-per-node N, or start the ranks with torchrun")?;
    let backend = match a.backend.as_str() {
        "gloo" => Backend::Gloo,
        "nccl" => Backend::Nccl,
        b => bail!("--backend {b}: use gloo or nccl"),
    };
    let device = match backend {
        Backend::Gloo => Device::Cpu,
        Backend::Nccl => Device::Cuda(env.local_rank),
    };
    let group = ProcessGroup::init(&env, backend, std::time::Duration::from_secs(a.timeout_s))?;
    let (r, n) = (env.rank as f64, env.world_size);
    let t = |v: &[f64]| Tensor::from_slice(v).to_kind(Kind::Float).to_device(device);
    let back = |x: &Tensor| Vec::<f64>::try_from(x.to_kind(Kind::Double).to_device(Device::Cpu)).expect("f64");

    let sum = t(&[r + 1.0, 2.0 * (r + 1.0)]);
    group.all_reduce(&[&sum], ReduceOp::Sum)?;
    let (max, min) = (t(&[r]), t(&[r]));
    group.all_reduce(&[&max], ReduceOp::Max)?;
    group.all_reduce(&[&min], ReduceOp::Min)?;
    let bcast = t(&[10.0 * r, 10.0 * r + 1.0, 10.0 * r + 2.0]);
    group.broadcast(&bcast, n - 1)?;
    let gathered = Tensor::zeros([2 * n as i64], (Kind::Float, device));
    group.all_gather(&gathered, &t(&[r, -r]))?;
    let scatter_in = t(&(0..2 * n).map(|j| 100.0 * r + j as f64).collect::<Vec<_>>());
    let scattered = Tensor::zeros([2], (Kind::Float, device));
    group.reduce_scatter(&scattered, &scatter_in)?;
    let params: Vec<Tensor> = (1..=3).map(|k| t(&[k as f64]).set_requires_grad(true)).collect();
    let reducer = group.reducer(&params, &[2, 1, 0], &[true, false, false])?;
    reducer.arm(&group)?;
    ((t(&[r + 1.0]) * &params[0]) * &params[1] * &params[2]).sum(Kind::Float).backward();
    let overlap_early = reducer.finish(&group)?;
    drop(reducer);
    let overlap_grads: Vec<f64> = params.iter().flat_map(|p| back(&p.grad())).collect();
    group.barrier()?;

    let got = Received {
        rank: env.rank,
        world_size: n,
        backend: backend.name(),
        all_reduce_sum: back(&sum),
        all_reduce_max: back(&max)[0],
        all_reduce_min: back(&min)[0],
        broadcast: back(&bcast),
        all_gather: back(&gathered),
        reduce_scatter: back(&scattered),
        overlap_grads,
        overlap_early,
    };
    {
        use std::io::Write;
        writeln!(std::io::stdout(), "{}", serde_json::to_string(&got)?).context("writing the result to stdout")?;
    }
    // The closed forms, so a broken set-up fails here too, not only in a reader's eyes.
    let nf = n as f64;
    let ranks_sum = nf * (nf - 1.0) / 2.0;
    let last = nf - 1.0;
    let expect = Received {
        all_reduce_sum: vec![nf * (nf + 1.0) / 2.0, nf * (nf + 1.0)],
        all_reduce_max: last,
        all_reduce_min: 0.0,
        broadcast: vec![10.0 * last, 10.0 * last + 1.0, 10.0 * last + 2.0],
        all_gather: (0..n).flat_map(|q| [q as f64, -(q as f64)]).collect(),
        reduce_scatter: (0..2).map(|k| 100.0 * ranks_sum + nf * (2.0 * r + k as f64)).collect(),
        overlap_grads: [6.0, 3.0, 2.0].iter().map(|g| g * nf * (nf + 1.0) / 2.0).collect(),
        overlap_early: 2,
        ..got
    };
    let got_json = serde_json::to_value(&got)?;
    if got_json != serde_json::to_value(&expect)? {
        bail!("rank {}: collectives returned wrong values: got {got_json}, expected {}", env.rank, serde_json::to_value(&expect)?);
    }
    Ok(())
}
