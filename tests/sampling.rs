//! Sampling on the device (`ftx::model::generate::sampling`, used by generate, serve and RL
//! rollouts) against independent references: the noise is splitmix64 bit for bit, greedy is
//! the argmax, sampled frequencies follow softmax(logits / T) with top-k and top-p truncation
//! (chi-square over a fixed set of seeds: deterministic, it cannot flake), a row's draw depends
//! only on its seed, step and logits (not on the batch around it), penalties, constraint
//! masks and log-probabilities match the logits edited by hand, and RL rollouts draw what
//! `generate` draws.

use ftx::model::generate::sampling::{mix64, sample, uniform, uniforms, RowRequest, RowSampling};
use tch::{Device, Kind, Tensor};

/// `rows` as a `[B, V]` fp32 tensor on the CPU.
fn batch(rows: &[Vec<f32>]) -> Tensor {
    let flat: Vec<f32> = rows.concat();
    Tensor::from_slice(&flat).view([rows.len() as i64, -1])
}

fn sampled(temperature: f64, top_k: usize, top_p: f64, seed: u64, step: u64) -> RowRequest {
    RowRequest { sampling: RowSampling { temperature, top_k, top_p, seed, step }, ..RowRequest::default() }
}

fn rev<T: Clone>(v: &[T]) -> Vec<T> {
    v.iter().rev().cloned().collect()
}

fn ids(logits: &Tensor, rows: &[RowRequest]) -> Vec<u32> {
    sample(logits, rows).unwrap().iter().map(|d| d.id).collect()
}

/// The 0.999 quantile of the chi-square distribution with `df` degrees of freedom.
fn chi_square_999(df: usize) -> f64 {
    [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91, 34.53, 36.12, 37.70][df - 1]
}

/// Pearson's statistic of `counts` against `probs`; tokens of probability 0 must never be drawn.
fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
    let n: usize = counts.iter().sum();
    let mut stat = 0.0;
    for (t, (&c, &p)) in counts.iter().zip(probs).enumerate() {
        if p == 0.0 {
            assert_eq!(c, 0, "token {t} is outside the kept set but was drawn {c} times");
        } else {
            let e = p * n as f64;
            stat += (c as f64 - e).powi(2) / e;
        }
    }
    stat
}

/// The distribution sampling should follow, written out in f64: softmax(logits / T) over the
/// `top_k` largest, then the prefix (by descending probability) up to and including the token
/// where the cumulative probability reaches `top_p`, renormalised.
fn reference_probs(logits: &[f32], t: f64, top_k: usize, top_p: f64) -> Vec<f64> {
    let z: Vec<f64> = logits.iter().map(|&l| l as f64 / t).collect();
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let max = z[order[0]];
    let total: f64 = order.iter().map(|&i| (z[i] - max).exp()).sum();
    let mut kept = Vec::new();
    let mut acc = 0.0;
    for &i in &order {
        if top_p < 1.0 && acc >= top_p {
            break;
        }
        let p = (z[i] - max).exp() / total;
        kept.push((i, p));
        acc += p;
    }
    let mass: f64 = kept.iter().map(|k| k.1).sum();
    let mut probs = vec![0.0; z.len()];
    for (i, p) in kept {
        probs[i] = p / mass;
    }
    probs
}

#[test]
fn sampling_noise_is_splitmix64_bit_for_bit() {
    // splitmix64's first output from state 0 (Vigna's reference generator: x += γ, then mix).
    assert_eq!(mix64(0x9E37_79B9_7F4A_7C15), 0xE220_A839_7B1D_CDAF);
    let rows = [(0u64, 0u64), (7, 3), (u64::MAX, 1 << 40), (42, 0)];
    let vocab = 2000usize;
    let check = |device: Device| {
        let u = uniforms(&rows, vocab as i64, device).unwrap().to_device(Device::Cpu);
        assert_eq!(u.size(), [rows.len() as i64, vocab as i64]);
        let got = Vec::<f64>::try_from(&u.view([-1])).unwrap();
        for (r, &(seed, step)) in rows.iter().enumerate() {
            for t in 0..vocab {
                assert_eq!(got[r * vocab + t].to_bits(), uniform(seed, step, t as u32).to_bits(), "{device:?} row {r} token {t}");
            }
        }
        got
    };
    let got = check(Device::Cpu);
    if tch::Cuda::is_available() {
        check(Device::Cuda(0)); // the same bits from CUDA's int64 kernels
    }
    // Uniform on (0, 1): 16 equal bins of the 8,000 values, chi-square under its 0.999 quantile.
    let mut bins = [0usize; 16];
    for &u in &got {
        assert!(u > 0.0 && u < 1.0, "{u}");
        bins[(u * 16.0) as usize] += 1;
    }
    assert!(chi_square(&bins, &[1.0 / 16.0; 16]) < chi_square_999(15), "{bins:?}");
    // Neighbouring seeds and steps give unrelated noise.
    assert_ne!(uniform(1, 0, 5), uniform(0, 0, 5));
    assert_ne!(uniform(0, 1, 5), uniform(0, 0, 5));
}

#[test]
fn greedy_takes_the_first_argmax() {
    let rows: Vec<Vec<f32>> = (0..12).map(|r| (0..50).map(|i| ((i * 7 + r * 13) as f32 * 0.37).sin() * 4.0).collect()).collect();
    let mut with_tie = rows.clone();
    with_tie[3] = vec![0.1, 3.0, -1.0, 3.0, 2.9].into_iter().chain(std::iter::repeat_n(-5.0, 45)).collect();
    let want: Vec<u32> = with_tie
        .iter()
        .map(|r| {
            let mut best = 0;
            for (i, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect();
    // Greedy ignores top-k, top-p and the seed.
    let reqs: Vec<RowRequest> = (0..12).map(|r| sampled(0.0, r % 3, 0.5, r as u64, 9)).collect();
    assert_eq!(ids(&batch(&with_tie), &reqs), want);
    assert_eq!(want[3], 1, "a tie goes to the lower id");
    // bf16 logits are read too.
    assert_eq!(ids(&batch(&with_tie).to_kind(Kind::BFloat16), &reqs)[3], 1);
    // top_k = 1 is greedy even when sampling.
    let top1: Vec<RowRequest> = (0..12).map(|r| sampled(1.5, 1, 1.0, r as u64, 0)).collect();
    assert_eq!(ids(&batch(&with_tie), &top1), want);
}

#[test]
fn sampled_frequencies_follow_the_softmax_with_top_k_and_top_p() {
    let logits = vec![0.5f32, -0.3, 1.2, 0.0, -1.0, 0.7, -2.0, 0.3];
    let n = 8000;
    let rows: Vec<Vec<f32>> = vec![logits.clone(); n];
    let x = batch(&rows);
    // (temperature, top_k, top_p): plain, colder, hotter with top-k, top-p (keeps 5 of 8),
    // both (keeps 3), a top_p below the first token's probability (keeps 1).
    for (t, k, p) in [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8), (0.9, 5, 0.7), (1.0, 0, 0.2)] {
        let want = reference_probs(&logits, t, k, p);
        let kept = want.iter().filter(|&&q| q > 0.0).count();
        // Many seeds at one step, and one seed over many steps: both follow the distribution.
        let by_seed: Vec<RowRequest> = (0..n as u64).map(|s| sampled(t, k, p, s, 3)).collect();
        let by_step: Vec<RowRequest> = (0..n as u64).map(|s| sampled(t, k, p, 11, s)).collect();
        for (what, reqs) in [("seeds", by_seed), ("steps", by_step)] {
            let mut counts = vec![0usize; logits.len()];
            for id in ids(&x, &reqs) {
                counts[id as usize] += 1;
            }
            if kept == 1 {
                assert_eq!(counts[2], n, "T {t} k {k} p {p}: {counts:?}");
                continue;
            }
            let stat = chi_square(&counts, &want);
            assert!(stat < chi_square_999(kept - 1), "T {t} k {k} p {p} over {what}: chi-square {stat:.1}, counts {counts:?}, want {want:?}");
        }
    }
    assert_eq!(reference_probs(&logits, 1.0, 0, 0.8).iter().filter(|&&q| q > 0.0).count(), 5);
    assert_eq!(reference_probs(&logits, 0.9, 5, 0.7).iter().filter(|&&q| q > 0.0).count(), 3);
}

/// Rows of varied logits and settings: greedy, sampled, truncated, penalised, constrained,
/// with log-probabilities.
fn varied(vocab: usize) -> (Vec<Vec<f32>>, Vec<RowRequest>) {
    let rows: Vec<Vec<f32>> = (0..10).map(|r| (0..vocab).map(|i| ((i * 3 + r * 17) as f32 * 0.29).cos() * 2.5).collect()).collect();
    let reqs: Vec<RowRequest> = (0..10u64)
        .map(|r| {
            let mut q = match r % 5 {
                0 => sampled(0.0, 0, 1.0, r, 0),
                1 => sampled(1.0, 0, 1.0, r, 4),
                2 => sampled(0.7, 10, 1.0, r, 1),
                3 => sampled(1.2, 0, 0.9, r, 2),
                _ => sampled(0.8, 20, 0.8, r, 7),
            };
            if r % 2 == 1 {
                q.penalties = vec![(3, 0.5), (r as u32, 1.5)];
            }
            if r % 3 == 0 {
                q.allowed = Some(vec![0xAAAA_AAAA, 0x0000_FFFF]); // odd tokens below 32, then 32..48
            }
            if r % 4 == 1 {
                q.logprobs = Some(3);
            }
            q
        })
        .collect();
    (rows, reqs)
}

#[test]
fn a_rows_draw_depends_only_on_its_seed_step_and_logits() {
    let (rows, reqs) = varied(64);
    let all = sample(&batch(&rows), &reqs).unwrap();
    // Each row alone (batch of one), the rows reversed, the other rows' logits replaced.
    for r in 0..rows.len() {
        let alone = sample(&batch(&rows[r..r + 1]), &reqs[r..r + 1]).unwrap();
        assert_eq!(alone[0], all[r], "row {r} alone");
    }
    let reversed = sample(&batch(&rev(&rows)), &rev(&reqs)).unwrap();
    assert_eq!(rev(&reversed), all);
    let mut others = rows.clone();
    for row in others.iter_mut().skip(1) {
        row.reverse();
    }
    assert_eq!(sample(&batch(&others), &reqs).unwrap()[0], all[0]);
    // The step and the seed are the randomness: moving either changes the draws.
    let one = vec![vec![0.0f32; 1000]; 32];
    let at = |seed: u64, step: u64| ids(&batch(&one), &(0..32).map(|i| sampled(1.0, 0, 1.0, seed + i, step)).collect::<Vec<_>>());
    assert_eq!(at(5, 2), at(5, 2));
    assert_ne!(at(5, 2), at(5, 3));
    assert_ne!(at(5, 2), at(6, 2));
}

#[test]
fn penalties_masks_and_logprobs_match_the_logits_edited_by_hand() {
    let vocab = 40;
    let (rows, reqs) = varied(vocab);
    let got = sample(&batch(&rows), &reqs).unwrap();
    // The same rows with the penalties and masks applied by hand, and no penalties or masks.
    let mut edited = rows.clone();
    let mut plain = reqs.clone();
    for (r, q) in reqs.iter().enumerate() {
        for &(t, v) in &q.penalties {
            edited[r][t as usize] -= v;
        }
        if let Some(words) = &q.allowed {
            for (t, l) in edited[r].iter_mut().enumerate() {
                if words.get(t / 32).is_none_or(|w| w >> (t % 32) & 1 == 0) {
                    *l = f32::NEG_INFINITY; // bit unset, or past the bitset's end
                }
            }
        }
        plain[r].penalties.clear();
        plain[r].allowed = None;
    }
    let by_hand = sample(&batch(&edited), &plain).unwrap();
    for (r, q) in reqs.iter().enumerate() {
        assert_eq!(got[r].id, by_hand[r].id, "row {r}");
        assert!(edited[r][got[r].id as usize].is_finite(), "row {r} drew the forbidden token {}", got[r].id);
        if q.sampling.greedy() {
            let best = (0..vocab).fold(0, |b, i| if edited[r][i] > edited[r][b] { i } else { b });
            assert_eq!(got[r].id as usize, best, "row {r}: greedy is the argmax of the penalised, masked logits");
        }
    }
    // Over many seeds a constrained, penalised row never leaves the mask.
    let masked = &reqs[3];
    let many: Vec<RowRequest> = (0..500).map(|s| RowRequest { sampling: RowSampling { seed: s, ..masked.sampling }, ..masked.clone() }).collect();
    for id in ids(&batch(&vec![rows[3].clone(); 500]), &many) {
        assert!(edited[3][id as usize].is_finite(), "{id}");
    }
    // Log-probabilities: the raw logits' log-softmax (before penalties, temperature, mask), in f64.
    for (r, q) in reqs.iter().enumerate() {
        let Some(n) = q.logprobs else {
            assert!(got[r].logprobs.is_none());
            continue;
        };
        let raw: Vec<f64> = rows[r].iter().map(|&l| l as f64).collect();
        let max = raw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log_z = max + raw.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        let lp = got[r].logprobs.as_ref().unwrap();
        assert!((lp.logprob as f64 - (raw[got[r].id as usize] - log_z)).abs() < 1e-5, "row {r}");
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| raw[b].total_cmp(&raw[a]));
        assert_eq!(lp.top.len(), n);
        for (k, &(t, l)) in lp.top.iter().enumerate() {
            assert_eq!(raw[t as usize], raw[order[k]], "row {r}: the {k}-th most likely");
            assert!((l as f64 - (raw[t as usize] - log_z)).abs() < 1e-5);
        }
    }
    assert!(reqs.iter().any(|q| q.logprobs.is_some() && !q.penalties.is_empty()), "the raw-logits check covers penalised rows");
}

/// RL rollouts sample as `generate` does: row `i` of a group is `generate`'s text with seed
/// `seed + i`, whatever the group's size (the rows share one batch on the paged KV cache).
#[test]
fn rollout_rows_are_generates_draws_with_their_seeds() {
    use ftx::align::rollout::sample_group;
    use ftx::model::decoder::LoadOptions;
    use ftx::model::generate::{generate, GenerateOptions};
    use ftx::model::{CausalLm, TextTokenizer};
    let dir = crate::common::fixture("models/llama3");
    let model = CausalLm::load(&dir, LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let tok = TextTokenizer::load(&dir, model.config.vocab).unwrap();
    let prompt = tok.encode("The sea was calm and", true).unwrap();
    let opts = GenerateOptions { max_new_tokens: 10, temperature: 1.0, top_k: 50, top_p: 0.95, seed: 9, stop_ids: tok.stop_ids.clone(), ..Default::default() };
    let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    let four = sample_group(&model, &tok, &ids, 4, &opts).unwrap();
    let two = sample_group(&model, &tok, &ids, 2, &opts).unwrap();
    for (i, c) in four.iter().enumerate() {
        let alone = generate(&model, &tok, &prompt, &GenerateOptions { seed: 9 + i as u64, ..opts.clone() }, |_| {}).unwrap();
        let drawn: Vec<u32> = c.ids.iter().map(|&t| t as u32).filter(|t| !tok.stop_ids.contains(t)).collect();
        assert_eq!(drawn, alone.ids, "row {i}");
        assert_eq!(c.text, alone.text, "row {i}");
        if i < 2 {
            assert_eq!(two[i].ids, c.ids, "row {i} of a group of 2");
        }
    }
    assert!(four.iter().any(|c| c.ids != four[0].ids), "different seeds, different completions");
}
