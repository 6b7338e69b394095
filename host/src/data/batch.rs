//! Collating tokenized examples into model inputs: padded rows, or packed rows in which
//! several examples share a row without seeing each other (positions restart, attention is
//! block-diagonal, no target crosses a boundary).

use super::tokenize::{TokenizedExample, IGNORE};
use crate::model::decoder::AttnMask;
use tch::{Device, Kind, Tensor};

/// One micro-batch, ready for the model.
pub struct Batch {
    /// `[B, T]` token ids.
    pub input_ids: Tensor,
    /// `[B, T]` the id each position must predict (labels shifted left), or `IGNORE`.
    pub targets: Tensor,
    /// `[B, T]` position ids (restart at 0 for each packed example).
    pub positions: Tensor,
    /// `[B, T]` example number of each token when packed; `None` when padded.
    pub segments: Option<Tensor>,
    /// Positions that take loss.
    pub n_targets: i64,
    /// Tokens that are not padding.
    pub n_tokens: i64,
}

impl Batch {
    /// The attention mask this batch needs.
    pub fn mask(&self, window: Option<i64>) -> AttnMask {
        match &self.segments {
            Some(s) => AttnMask::packed(s, window),
            None => {
                let t = self.input_ids.size()[1];
                AttnMask::causal_with_offset(t, 0, window, self.input_ids.device())
            }
        }
    }

    /// Moves every tensor to `device`.
    pub fn to(self, device: Device) -> Batch {
        Batch {
            input_ids: self.input_ids.to_device(device),
            targets: self.targets.to_device(device),
            positions: self.positions.to_device(device),
            segments: self.segments.map(|s| s.to_device(device)),
            ..self
        }
    }
}

/// Next-token targets of one example: `labels[i + 1]`, and nothing after its last token.
fn shifted(ex: &TokenizedExample) -> impl Iterator<Item = i64> + '_ {
    ex.labels.iter().skip(1).copied().chain(std::iter::once(IGNORE))
}

fn tensor2(rows: &[Vec<i64>]) -> Tensor {
    let t = rows[0].len() as i64;
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, t]).to_kind(Kind::Int64)
}

/// Right-padded rows, one example each. Right padding needs no mask beyond causal: real
/// tokens only look left, and padded positions take no loss.
pub fn pad(examples: &[&TokenizedExample], pad_id: i64) -> Batch {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(1);
    let mut ids = Vec::new();
    let mut targets = Vec::new();
    let mut positions = Vec::new();
    for e in examples {
        let n = e.ids.len();
        ids.push(e.ids.iter().copied().chain(std::iter::repeat_n(pad_id, t - n)).collect());
        targets.push(shifted(e).chain(std::iter::repeat_n(IGNORE, t - n)).collect());
        positions.push((0..t as i64).collect());
    }
    let n_tokens = examples.iter().map(|e| e.ids.len() as i64).sum();
    finish(ids, targets, positions, None, n_tokens)
}

/// Packs examples, in order, into rows of `seq_len` (first fit into the current row; an
/// example never spans two rows). Padding at a row's end is its own segment.
pub fn pack(examples: &[&TokenizedExample], seq_len: usize, pad_id: i64) -> Batch {
    let rows = pack_rows(examples.iter().map(|e| e.ids.len()), seq_len);
    let mut ids = Vec::new();
    let mut targets = Vec::new();
    let mut positions = Vec::new();
    let mut segments = Vec::new();
    for row in rows {
        let (mut i, mut tg, mut p, mut s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (seg, &k) in row.iter().enumerate() {
            let e = examples[k];
            i.extend(&e.ids);
            tg.extend(shifted(e));
            p.extend(0..e.ids.len() as i64);
            s.extend(std::iter::repeat_n(seg as i64, e.ids.len()));
        }
        let fill = seq_len - i.len();
        i.extend(std::iter::repeat_n(pad_id, fill));
        tg.extend(std::iter::repeat_n(IGNORE, fill));
        p.extend(0..fill as i64);
        s.extend(std::iter::repeat_n(-1, fill));
        ids.push(i);
        targets.push(tg);
        positions.push(p);
        segments.push(s);
    }
    let n_tokens = examples.iter().map(|e| e.ids.len().min(seq_len) as i64).sum();
    finish(ids, targets, positions, Some(segments), n_tokens)
}

/// Groups example lengths into rows of at most `seq_len` tokens, in order.
pub fn pack_rows(lengths: impl Iterator<Item = usize>, seq_len: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = seq_len; // forces a new row first
    for (k, len) in lengths.enumerate() {
        let len = len.min(seq_len);
        if used + len > seq_len {
            rows.push(Vec::new());
            used = 0;
        }
        rows.last_mut().expect("a row exists").push(k);
        used += len;
    }
    rows
}

fn finish(
    ids: Vec<Vec<i64>>,
    targets: Vec<Vec<i64>>,
    positions: Vec<Vec<i64>>,
    segments: Option<Vec<Vec<i64>>>,
    n_tokens: i64,
) -> Batch {
    let n_targets = targets.iter().flatten().filter(|&&t| t != IGNORE).count() as i64;
    Batch {
        input_ids: tensor2(&ids),
        targets: tensor2(&targets),
        positions: tensor2(&positions),
        segments: segments.map(|s| tensor2(&s)),
        n_targets,
        n_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[i64], labels: &[i64]) -> TokenizedExample {
        TokenizedExample { ids: ids.to_vec(), labels: labels.to_vec() }
    }

    #[test]
    fn packing_restarts_positions_and_never_predicts_across_examples() {
        let a = ex(&[1, 2, 3], &[IGNORE, 2, 3]);
        let b = ex(&[4, 5], &[4, 5]);
        let batch = pack(&[&a, &b], 6, 0);
        let v = |t: &Tensor| Vec::<i64>::try_from(t.flatten(0, -1)).unwrap();
        assert_eq!(v(&batch.input_ids), [1, 2, 3, 4, 5, 0]);
        assert_eq!(v(&batch.targets), [2, 3, IGNORE, 5, IGNORE, IGNORE]);
        assert_eq!(v(&batch.positions), [0, 1, 2, 0, 1, 0]);
        assert_eq!(v(batch.segments.as_ref().unwrap()), [0, 0, 0, 1, 1, -1]);
        assert_eq!(batch.n_targets, 3);
    }

    #[test]
    fn rows_fill_in_order_and_overflow_to_a_new_row() {
        assert_eq!(pack_rows([3, 3, 2, 5, 1].into_iter(), 6), vec![vec![0, 1], vec![2], vec![3, 4]]);
    }

    #[test]
    fn padding_shifts_labels_and_ignores_pads() {
        let a = ex(&[1, 2, 3], &[1, 2, 3]);
        let b = ex(&[4], &[4]);
        let batch = pad(&[&a, &b], 9);
        let v = |t: &Tensor| Vec::<i64>::try_from(t.flatten(0, -1)).unwrap();
        assert_eq!(v(&batch.input_ids), [1, 2, 3, 4, 9, 9]);
        assert_eq!(v(&batch.targets), [2, 3, IGNORE, IGNORE, IGNORE, IGNORE]);
        assert_eq!(batch.n_targets, 2);
    }
}
