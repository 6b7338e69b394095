//! A run's training data: the configured files read, tokenised (preference pairs and KTO's
//! unpaired answers as neighbouring rows) and split, and each epoch's micro-batches, seeded;
//! for RL, the prompts.

use super::TrainConfig;
use crate::data::{batch, read_examples, Batch, Example, TokenizedExample, Tokenizing};
use crate::model::TextTokenizer;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::Device;

/// Training examples after tokenisation, with the records that could not be used.
pub struct PreparedData {
    /// Examples; for preference data, pairs stored as (chosen, rejected) neighbours.
    pub train: Vec<TokenizedExample>,
    pub validation: Vec<TokenizedExample>,
    /// True when the data are preference pairs.
    pub paired: bool,
    /// reason → count of records dropped.
    pub dropped: BTreeMap<String, usize>,
    pub records: usize,
}

/// Reads, tokenises and splits the configured data.
pub fn prepare_data(cfg: &TrainConfig, tok: &TextTokenizer) -> Result<PreparedData> {
    let tz = Tokenizing { tok, max_len: cfg.data.max_seq_len, train_on_inputs: cfg.data.train_on_inputs };
    let mut dropped = BTreeMap::new();
    let mut records = 0;
    let (mut singles, mut pairs) = (0usize, 0usize);
    // A preference pair trains as two conversations that share the prompt.
    let as_chat = |prompt: &str, answer: &str| match tok.chat_template {
        Some(_) => Example::Chat { messages: crate::data::tokenize::prompt_messages(cfg.data.system.as_deref(), prompt, Some(answer)) },
        None => Example::Alpaca { instruction: prompt.to_owned(), input: String::new(), output: answer.to_owned() },
    };
    let mut load = |key: &str, paths: &[PathBuf]| -> Result<Vec<TokenizedExample>> {
        let mut out = Vec::new();
        // KTO's unpaired records: (desirable, undesirable) answers, paired up below.
        let mut labelled: [Vec<TokenizedExample>; 2] = [Vec::new(), Vec::new()];
        for p in paths {
            for (i, ex) in read_examples(p, cfg.data.format).map_err(|e| anyhow::anyhow!("{key}: {e}"))?.iter().enumerate() {
                records += 1;
                if let Example::Unpaired { prompt, completion, label } = ex {
                    match tz.example(&as_chat(prompt, completion)) {
                        Ok(t) => labelled[usize::from(!*label)].push(t),
                        Err(reason) => {
                            tracing::warn!("{}: record {}: dropped: {reason}", p.display(), i + 1);
                            *dropped.entry(reason).or_insert(0) += 1;
                        }
                    }
                    continue;
                }
                let result = match ex {
                    Example::Preference { prompt, chosen, rejected } => tz
                        .example(&as_chat(prompt, chosen))
                        .and_then(|c| Ok(vec![c, tz.example(&as_chat(prompt, rejected))?])),
                    other => tz.example(other).map(|t| vec![t]),
                };
                match result {
                    Ok(ts) => {
                        if ts.len() == 2 { pairs += 1 } else { singles += 1 }
                        out.extend(ts);
                    }
                    Err(reason) => {
                        tracing::warn!("{}: record {}: dropped: {reason}", p.display(), i + 1);
                        *dropped.entry(reason).or_insert(0) += 1;
                    }
                }
            }
        }
        let [good, bad] = labelled;
        if !good.is_empty() || !bad.is_empty() {
            let units = unpaired_units(good, bad, cfg.train.seed)
                .ok_or_else(|| anyhow::anyhow!("KTO's unpaired data need both desirable (label true) and undesirable (label false) answers"))?;
            pairs += units.len() / 2;
            out.extend(units);
        }
        Ok(out)
    };
    let mut train = load("data.train", &cfg.data.train)?;
    let mut validation = load("data.validation", &cfg.data.validation)?;
    if pairs > 0 && singles > 0 {
        bail!("the data mix {pairs} preference pairs with {singles} other records; train them in separate runs");
    }
    let paired = pairs > 0;
    let w = if paired { 2 } else { 1 };
    if validation.is_empty() && cfg.data.validation_split > 0.0 {
        let mut units: Vec<usize> = (0..train.len() / w).collect();
        units.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.train.seed ^ 0x5eed));
        let n = ((units.len() as f64) * cfg.data.validation_split).round().max(1.0) as usize;
        let n = n.min(units.len().saturating_sub(1));
        let take = |us: &[usize]| us.iter().flat_map(|&u| train[u * w..(u + 1) * w].iter().cloned()).collect::<Vec<_>>();
        validation = take(&units[..n]);
        train = take(&units[n..]);
    }
    if train.is_empty() {
        bail!("no usable training examples ({records} records read, all dropped: {dropped:?})");
    }
    Ok(PreparedData { train, validation, paired, dropped, records })
}

/// KTO's unpaired examples as (desirable, undesirable) units, so they flow through the paired
/// path: the chosen slot holds a desirable answer and the rejected slot an undesirable one,
/// to whatever prompts. Each class is shuffled (seeded) and the smaller one cycled, so every
/// example of the larger class is seen once per epoch. The two answers of a unit are not a
/// comparison: KTO's loss treats them separately, and its reference point z₀ comes from the
/// micro-batch's undesirable answers (see plugins/kto). `None` when a class is empty.
pub fn unpaired_units(mut good: Vec<TokenizedExample>, mut bad: Vec<TokenizedExample>, seed: u64) -> Option<Vec<TokenizedExample>> {
    if good.is_empty() || bad.is_empty() {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4b70);
    good.shuffle(&mut rng);
    bad.shuffle(&mut rng);
    let n = good.len().max(bad.len());
    Some((0..n).flat_map(|i| [good[i % good.len()].clone(), bad[i % bad.len()].clone()]).collect())
}

/// Micro-batches of one epoch: example indices per micro-batch, in a seeded order.
pub fn epoch_plan(data: &[TokenizedExample], cfg: &TrainConfig, epoch: usize, paired: bool) -> Vec<Vec<usize>> {
    let w = if paired { 2 } else { 1 };
    let mut order: Vec<usize> = (0..data.len() / w).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed.wrapping_add(epoch as u64 * 7919));
    order.shuffle(&mut rng);
    let bs = cfg.train.batch_size;
    if paired || !cfg.data.packing {
        // Pairs stay whole and in order (chosen, rejected), and are never packed.
        return order.chunks(bs).map(|c| c.iter().flat_map(|&u| u * w..(u + 1) * w).collect()).collect();
    }
    let rows = batch::pack_rows(order.iter().map(|&i| data[i].ids.len()), cfg.data.max_seq_len);
    let rows: Vec<Vec<usize>> = rows.into_iter().map(|r| r.into_iter().map(|k| order[k]).collect()).collect();
    // A micro-batch is `batch_size` packed rows.
    rows.chunks(bs).map(|c| c.concat()).collect()
}

/// One micro-batch of `data` (rows `idx`) on `device`: packed rows for SFT with packing,
/// padded rows otherwise (pairs are never packed).
pub fn collate(data: &[TokenizedExample], idx: &[usize], cfg: &TrainConfig, pad_id: i64, device: Device, paired: bool) -> Batch {
    let exs: Vec<&TokenizedExample> = idx.iter().map(|&i| &data[i]).collect();
    let b = if cfg.data.packing && !paired { batch::pack(&exs, cfg.data.max_seq_len, pad_id) } else { batch::pad(&exs, pad_id) };
    b.to(device)
}

/// One prompt of the RL data.
#[derive(Debug, Clone)]
pub struct RlPrompt {
    /// The prompt as the user wrote it (reward plugins see this).
    pub text: String,
    /// Passed to reward plugins (an expected answer, a pattern…).
    pub reference: Option<String>,
    /// Its tokens, rendered with the chat template (or the Alpaca prompt) up to the answer.
    pub ids: Vec<i64>,
}

/// Reads the prompt records of `cfg.data.train`.
pub fn read_prompts(cfg: &TrainConfig, tok: &TextTokenizer) -> Result<Vec<RlPrompt>> {
    let mut out = Vec::new();
    for p in &cfg.data.train {
        for (i, ex) in read_examples(p, cfg.data.format).map_err(|e| anyhow::anyhow!("data.train: {e}"))?.into_iter().enumerate() {
            let Example::Prompt { prompt, reference } = ex else {
                bail!("{}: record {}: an [rl] run needs prompt records ({{\"prompt\": …, \"reference\"?: …}})", p.display(), i + 1);
            };
            let ids: Vec<u32> = match tok.chat_template {
                Some(_) => tok.encode_chat(&crate::data::tokenize::prompt_messages(cfg.data.system.as_deref(), &prompt, None), true)?,
                None => tok.encode(&crate::data::tokenize::alpaca_prompt(&prompt, ""), true)?,
            };
            let mut ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
            ids.truncate(cfg.data.max_seq_len);
            if ids.is_empty() {
                bail!("{}: record {}: the prompt renders to no tokens", p.display(), i + 1);
            }
            out.push(RlPrompt { text: prompt, reference, ids });
        }
    }
    if out.is_empty() {
        bail!("no prompts in {:?}", cfg.data.train);
    }
    Ok(out)
}
