//! GRPO and PPO over several ranks (DDP): what [`super::rl`] does differently when torchrun's
//! variables make it one rank of several.
//!
//! Every rank draws the same prompts and minibatch orders (one seeded stream). Rank r samples,
//! scores and takes the log-probs of a contiguous run of the step's prompts — whole groups, so
//! GRPO's group advantages need nothing from the other ranks — and each prompt's completions
//! are seeded by the prompt's place in the step, so they are the single process's. What needs
//! the whole rollout (PPO's whitening, the KL controller, the metrics) gathers it, in rank
//! order, which is the rollout's order. Each minibatch's loss is computed on every rank over
//! the whole minibatch, with this rank's rows the ones that carry gradients; the summed
//! gradients are the single process's.

use crate::train::ddp::{rank_range, Ddp};
use anyhow::Result;
use std::ops::Range;
use tch::{Kind, Tensor};

/// This rank's part of every rollout: prompts `prompts` of the step's picks, samples `samples`
/// (`group_size` per prompt, in order).
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub prompts: Range<usize>,
    pub samples: Range<usize>,
}

impl Share {
    /// The whole rollout (one process), or rank `d`'s contiguous part of its `per_step` prompts.
    pub fn of(d: Option<&Ddp>, per_step: usize, group_size: usize) -> Share {
        let prompts = d.map_or(0..per_step, |d| rank_range(per_step, d.env.rank, d.env.world_size));
        let samples = prompts.start * group_size..prompts.end * group_size;
        Share { prompts, samples }
    }
}

/// The whole rollout's columns: every rank's `local` values (one row each, this rank's samples
/// or tokens), joined in rank order. One process: `local` itself.
pub fn gather_all(d: Option<&Ddp>, local: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
    let Some(d) = d else { return Ok(local.to_vec()) };
    let k = local.first().map_or(0, Vec::len);
    let rows: Vec<Tensor> = local.iter().map(|r| Tensor::from_slice(r).to_kind(Kind::Double)).collect();
    let stacked = if k == 0 { Tensor::zeros([local.len() as i64, 0], (Kind::Double, tch::Device::Cpu)) } else { Tensor::stack(&rows, 0) };
    let (all, _) = d.gather_columns(&stacked)?;
    let all = all.to_kind(Kind::Double).to_device(tch::Device::Cpu);
    Ok((0..local.len() as i64).map(|i| Vec::<f64>::try_from(all.get(i).contiguous()).expect("f64 row")).collect())
}

/// PPO's whitening across the whole rollout: this rank's advantages (flattened, in order)
/// whitened with the statistics of every rank's.
pub fn whiten_across(d: Option<&Ddp>, mine: &mut [f64]) -> Result<()> {
    let all = gather_all(d, &[mine.to_vec()])?.remove(0);
    let mut all = all;
    crate::align::advantage::whiten(&mut all);
    let offset = match d {
        None => 0,
        Some(d) => {
            let mut counts = vec![0.0; d.env.world_size];
            counts[d.env.rank] = mine.len() as f64;
            d.sum(&counts)?[..d.env.rank].iter().sum::<f64>() as usize
        }
    };
    mine.copy_from_slice(&all[offset..offset + mine.len()]);
    Ok(())
}

/// A minibatch's `[rows, T]` loss inputs over every rank's rows, in the minibatch's order:
/// `columns` are this rank's (`rows_here` rows, any width; the live ones keep their graph),
/// `order[i]` is the place in the minibatch of the i-th row in rank order. Returns the
/// minibatch's columns, padded with zeros to the widest row (as one process pads them).
pub fn minibatch_columns(d: &Ddp, columns: &[Tensor], rows_here: i64, order: &[i64]) -> Result<Vec<Tensor>> {
    let device = columns[0].device();
    let width = if rows_here > 0 { columns[0].size()[1] } else { 0 };
    let mut widths = vec![0.0; d.env.world_size];
    widths[d.env.rank] = width as f64;
    let widest = d.sum(&widths)?.into_iter().fold(0.0, f64::max) as i64;
    let pad = |t: &Tensor| -> Tensor {
        let t = t.to_kind(Kind::Float);
        if width == widest {
            t
        } else {
            Tensor::cat(&[t, Tensor::zeros([rows_here, widest - width], (Kind::Float, device))], 1)
        }
    };
    let padded: Vec<Tensor> = if rows_here > 0 { columns.iter().map(pad).collect() } else { columns.iter().map(|_| Tensor::zeros([0, widest], (Kind::Float, device))).collect() };
    let flat = tch::no_grad(|| Tensor::stack(&padded.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0));
    let (all, offset) = d.gather_columns(&flat)?;
    let all = all.to_device(device);
    let total = all.size()[1] / widest.max(1);
    let (start, n) = (offset / widest.max(1), rows_here);
    let perm = Tensor::from_slice(&inverse(order)).to_device(device);
    Ok(padded
        .iter()
        .enumerate()
        .map(|(c, mine)| {
            let every = all.get(c as i64).view([total, widest]);
            let rows = Tensor::cat(&[every.narrow(0, 0, start), mine.shallow_clone(), every.narrow(0, start + n, total - start - n)], 0);
            rows.index_select(0, &perm)
        })
        .collect())
}

/// A minibatch's rows (`minibatch`: sample indices of the rollout) split by rank: this rank's
/// (its samples, in the minibatch's order), and for every row in rank order its place in the
/// minibatch (see [`minibatch_columns`]).
pub fn by_rank(d: &Ddp, minibatch: &[usize], per_step: usize, group_size: usize) -> (Vec<usize>, Vec<i64>) {
    let world = d.env.world_size;
    let owner = |i: usize| (0..world).find(|&r| rank_range(per_step, r, world).contains(&(i / group_size.max(1)))).unwrap_or(world - 1);
    let mut order = Vec::with_capacity(minibatch.len());
    for r in 0..world {
        order.extend(minibatch.iter().enumerate().filter(|(_, &i)| owner(i) == r).map(|(place, _)| place as i64));
    }
    let mine = minibatch.iter().copied().filter(|&i| owner(i) == d.env.rank).collect();
    (mine, order)
}

/// For `order` (place of each rank-order row), the rank-order row of each place.
fn inverse(order: &[i64]) -> Vec<i64> {
    let mut inv = vec![0i64; order.len()];
    for (i, &p) in order.iter().enumerate() {
        inv[p as usize] = i as i64;
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_whole_groups_in_order() {
        assert_eq!(Share::of(None, 3, 4), Share { prompts: 0..3, samples: 0..12 });
        assert_eq!(inverse(&[2, 0, 1]), vec![1, 2, 0]);
    }
}
