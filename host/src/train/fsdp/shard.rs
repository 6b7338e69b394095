//! How FSDP lays the model's tensors out in flat groups and splits each group into the ranks'
//! slices (see [`super`]): which tensors share a group, where each one starts, how long a
//! slice is, and what a rank holds between steps.

use super::super::adamw8bit::{self, MIN_8BIT_SIZE};
use super::super::checkpoint::packed_offsets;
use super::super::ddp::unit_of;
use crate::model::linear::Weight;
use crate::model::CausalLm;
use std::collections::{BTreeMap, HashSet};
use tch::{Device, Kind, Tensor};

/// One flat group before sharding: tensors of one unit, one dtype, all trainable or all frozen,
/// and for the 8-bit optimizer all with 8-bit moments or all with fp32 ones.
pub struct GroupSpec {
    /// 0 for the root, `l + 1` for decoder layer `l`.
    pub unit: usize,
    /// Whether the optimizer updates these tensors.
    pub trainable: bool,
    /// `train.optimizer = "adamw-8bit"` keeps these tensors' moments in 8 bits (each has at
    /// least [`MIN_8BIT_SIZE`] values): every tensor then starts on a quantisation block and
    /// every slice is whole blocks, so a rank's blocks are the single-process optimizer's.
    pub eight_bit: bool,
    /// Their dtype.
    pub kind: Kind,
    /// Names, in flat order.
    pub names: Vec<String>,
    /// The model's own tensors (handles sharing their storage), in flat order.
    pub tensors: Vec<Tensor>,
}

impl GroupSpec {
    /// Elements each tensor starts at, past any padding that aligns it (see [`GroupSpec::eight_bit`]).
    pub fn offsets(&self) -> Vec<i64> {
        packed_offsets(self.tensors.iter().map(|t| t.numel() as i64), self.eight_bit)
    }

    /// Elements from the group's start to its last tensor's end.
    pub fn span(&self) -> i64 {
        let offsets = self.offsets();
        offsets.last().zip(self.tensors.last()).map_or(0, |(o, t)| o + t.numel() as i64)
    }

    /// Elements of each rank's slice among `world` ranks (whole blocks for an 8-bit group).
    pub fn per(&self, world: usize) -> i64 {
        let w = world.max(1) as i64;
        let per = (self.span() + w - 1) / w;
        if self.eight_bit {
            adamw8bit::blocks_of(per) * adamw8bit::BLOCK
        } else {
            per
        }
    }
}

/// Splits the model's dense tensors and the trainable ones into flat groups (see [`GroupSpec`]);
/// `eight_bit`: the optimizer keeps 8-bit moments. Within a group tensors keep the model's
/// order with the biases moved last, so q/k/v (and gate/up) weights, side by side for the
/// fused projections, stay side by side once gathered. QLoRA's NF4 weights are frozen groups
/// of their own dtypes ([`nf4_tensors`]), gathered per layer like a dense base.
pub fn group_specs(model: &CausalLm, trainable: Vec<(String, Tensor)>, eight_bit: bool) -> Vec<GroupSpec> {
    let train_names: HashSet<String> = trainable.iter().map(|(n, _)| n.clone()).collect();
    let dense = model.named_tensors().into_iter().filter(|(n, _)| !train_names.contains(n));
    let frozen = dense.chain(nf4_tensors(model)).map(|(n, t)| (n, t, false));
    let mut groups: BTreeMap<(usize, bool, bool, String), Vec<(String, Tensor)>> = BTreeMap::new();
    for (name, t, is_trainable) in trainable.into_iter().map(|(n, t)| (n, t, true)).chain(frozen) {
        let in_8bit = eight_bit && is_trainable && t.numel() as i64 >= MIN_8BIT_SIZE;
        groups.entry((unit_of(&name), is_trainable, in_8bit, format!("{:?}", t.kind()))).or_default().push((name, t));
    }
    groups
        .into_iter()
        .map(|((unit, trainable, eight_bit, _), mut members)| {
            // Name order, biases last: the same on every rank (memory addresses are not).
            members.sort_by_key(|(n, _)| n.ends_with(".bias"));
            let kind = members[0].1.kind();
            let (names, tensors) = members.into_iter().unzip();
            GroupSpec { unit, trainable, eight_bit, kind, names, tensors }
        })
        .collect()
}

/// The tensors of QLoRA's NF4 base weights (packed codes, absmax codes and their scales),
/// under their projection's name: handles sharing their storage, as for dense tensors.
fn nf4_tensors(model: &CausalLm) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, linear) in layer.linears() {
            if let Weight::Nf4(q) = &linear.base.weight {
                for (part, t) in [("nf4_packed", &q.packed), ("nf4_absmax_codes", &q.absmax_codes), ("nf4_absmax_scales", &q.absmax_scales)] {
                    out.push((format!("model.layers.{i}.{name}.weight.{part}"), t.shallow_clone()));
                }
            }
        }
    }
    out
}

/// Bytes one of `world` ranks holds between steps: its slice of every group's values, and
/// for trainable groups the gradient slice (in the group's dtype) and the optimizer state
/// (fp32 moments, or 8-bit ones with a scale per block, and an fp32 master when the dtype is
/// not fp32). This is what `ftx plan`'s multi-GPU rows count as the sharded state.
pub fn per_rank_state_bytes(specs: &[GroupSpec], world: usize) -> u64 {
    specs.iter().map(|g| slice_bytes(g, g.per(world))).sum()
}

/// Bytes of a slice of `per` elements of group `g` (see [`per_rank_state_bytes`]).
pub(super) fn slice_bytes(g: &GroupSpec, per: i64) -> u64 {
    let e = g.kind.elt_size_in_bytes() as u64;
    let per = per as u64;
    if !g.trainable {
        return per * e;
    }
    let master = if g.kind == Kind::Float { 0 } else { 4 };
    let moments = if g.eight_bit { 2 * per + 8 * per.div_ceil(adamw8bit::BLOCK as u64) } else { 8 * per };
    per * (2 * e + master) + moments
}

/// A flat buffer of `len` elements holding `pieces` at `offsets` (zeros elsewhere).
pub(super) fn place(pieces: impl IntoIterator<Item = Tensor>, offsets: &[i64], len: i64, kind: Kind, device: Device) -> Tensor {
    let flat = Tensor::zeros([len], (kind, device));
    for (piece, &o) in pieces.into_iter().zip(offsets) {
        let n = piece.numel() as i64;
        flat.narrow(0, o, n).copy_(&piece.reshape([-1]).to_kind(kind));
    }
    flat
}

/// `flat`'s `rank`-th slice of `per` elements (zero-padded past its end), as a new tensor.
pub(super) fn slice_of(flat: &Tensor, per: i64, rank: usize) -> Tensor {
    let out = Tensor::zeros([per], (flat.kind(), flat.device()));
    let (start, n) = (rank as i64 * per, flat.numel() as i64);
    if start < n {
        let k = per.min(n - start);
        out.narrow(0, 0, k).copy_(&flat.narrow(0, start, k));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(sizes: &[i64], eight_bit: bool) -> GroupSpec {
        let tensors: Vec<Tensor> = sizes.iter().map(|&n| Tensor::zeros([n], (Kind::Float, Device::Cpu))).collect();
        let names = (0..sizes.len()).map(|i| format!("t{i}")).collect();
        GroupSpec { unit: 1, trainable: true, eight_bit, kind: Kind::Float, names, tensors }
    }

    #[test]
    fn slices_are_padded_with_zeros() {
        let flat = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0]);
        let slices: Vec<Vec<f32>> = (0..3).map(|r| Vec::<f32>::try_from(slice_of(&flat, 2, r)).unwrap()).collect();
        assert_eq!(slices, vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 0.0]]);
    }

    #[test]
    fn eight_bit_groups_start_every_tensor_and_slice_on_a_block() {
        // 4100 values: 17 blocks (the last of 4); the next tensor starts at block 17.
        let g = spec(&[4100, 5000], true);
        assert_eq!(g.offsets(), vec![0, 17 * 256]);
        assert_eq!(g.span(), 17 * 256 + 5000);
        // 9352 over 3 ranks: 3118 each, rounded up to 13 blocks.
        assert_eq!(g.per(3), 13 * 256);
        assert_eq!(g.per(1), 37 * 256);
        // fp32 moments: packed, slices as long as they need be.
        let g = spec(&[4100, 5000], false);
        assert_eq!((g.offsets(), g.per(3)), (vec![0, 4100], 3034));
        let placed = Vec::<f32>::try_from(place([Tensor::ones([2], (Kind::Float, Device::Cpu)), Tensor::full([1], 3.0, (Kind::Float, Device::Cpu))], &[0, 4], 6, Kind::Float, Device::Cpu)).unwrap();
        assert_eq!(placed, vec![1.0, 1.0, 0.0, 0.0, 3.0, 0.0]);
    }
}
