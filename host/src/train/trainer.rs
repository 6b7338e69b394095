//! The training run: prepare data and model, loop over optimizer steps with accumulation,
//! evaluate, checkpoint, resume, and write the final weights.

use super::checkpoint::{self, RunState};
use super::metrics::{MetricsLog, StepMetrics};
use super::optim::{clip_coef, lr_factor, AdamW, AdamWConfig};
use super::step::{eval_loss, forward_backward, StepPos};
use super::TrainConfig;
use crate::align::{PreferenceObjective, Reference};
use crate::data::{batch, read_examples, Batch, Example, TokenizedExample, Tokenizing};
use crate::dist::ddp::Ddp;
use crate::plugins::loss::LossPlugin;
use crate::gpu::DeviceArg;
use crate::model::decoder::LoadOptions;
use crate::model::{CausalLm, TextTokenizer};
use crate::peft::{self, LoraSettings};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind};

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
    pub tokens: i64,
    pub seconds: f64,
    pub output: PathBuf,
    /// Where the final weights went (adapter folder or model folder).
    pub final_dir: PathBuf,
    pub resumed_from: Option<usize>,
}

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
    let tz = Tokenizing { tok, max_len: cfg.data.max_seq_len };
    let mut dropped = BTreeMap::new();
    let mut records = 0;
    let (mut singles, mut pairs) = (0usize, 0usize);
    // A preference pair trains as two conversations that share the prompt.
    let as_chat = |prompt: &str, answer: &str| match tok.chat_template {
        Some(_) => Example::Chat { messages: crate::data::tokenize::prompt_messages(cfg.data.system.as_deref(), prompt, Some(answer)) },
        None => Example::Alpaca { instruction: prompt.to_owned(), input: String::new(), output: answer.to_owned() },
    };
    let mut load = |paths: &[PathBuf]| -> Result<Vec<TokenizedExample>> {
        let mut out = Vec::new();
        // KTO's unpaired records: (desirable, undesirable) answers, paired up below.
        let mut labelled: [Vec<TokenizedExample>; 2] = [Vec::new(), Vec::new()];
        for p in paths {
            for (i, ex) in read_examples(p, cfg.data.format)?.iter().enumerate() {
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
    let mut train = load(&cfg.data.train)?;
    let mut validation = load(&cfg.data.validation)?;
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

fn collate(data: &[TokenizedExample], idx: &[usize], cfg: &TrainConfig, pad_id: i64, device: Device, paired: bool) -> Batch {
    let exs: Vec<&TokenizedExample> = idx.iter().map(|&i| &data[i]).collect();
    let b = if cfg.data.packing && !paired { batch::pack(&exs, cfg.data.max_seq_len, pad_id) } else { batch::pad(&exs, pad_id) };
    b.to(device)
}

/// Resolves `auto` device and dtype.
pub fn resolve_device(device: &str, dtype: &str) -> Result<(Device, Kind)> {
    let device = device.parse::<DeviceArg>().map_err(anyhow::Error::msg)?.resolve().map_err(anyhow::Error::msg)?;
    let kind = match dtype {
        "auto" if device.is_cuda() => Kind::BFloat16,
        "auto" => Kind::Float,
        d => crate::cli::parse_dtype(d)?,
    };
    Ok((device, kind))
}

/// The model with its trainable tensors marked, and the LoRA settings when adapters are used.
pub fn build_model(cfg: &TrainConfig, device: Device, kind: Kind) -> Result<(CausalLm, Vec<(String, tch::Tensor)>, Option<LoraSettings>)> {
    let mut model = CausalLm::load(&cfg.model.path, LoadOptions { device, kind })
        .with_context(|| format!("loading the model from {}", cfg.model.path.display()))?;
    let m = &cfg.method;
    tch::manual_seed(cfg.train.seed as i64);
    match m.kind.as_str() {
        "full" | "hft" => {
            let named: Vec<(String, tch::Tensor)> = model
                .named_tensors()
                .into_iter()
                .map(|(n, t)| {
                    let t = t.set_requires_grad(true);
                    (n, t)
                })
                .collect();
            Ok((model, named, None))
        }
        kind => {
            let s = LoraSettings {
                rank: m.rank,
                alpha: m.alpha,
                dropout: m.dropout,
                target_modules: m.target_modules.clone(),
                rslora: m.rslora,
                dora: kind == "dora",
                quantize_nf4: kind == "qlora",
            };
            let named = peft::attach(&mut model, &s).map_err(anyhow::Error::msg)?;
            Ok((model, named, Some(s)))
        }
    }
}

/// HFT: which parameters train in `round`. Rounds come in pairs: each pair draws, per layer,
/// a seeded split of the seven projections into two halves; the even round trains one half
/// and the layer norms, the odd round the other half and the embeddings and head.
fn hft_active(name: &str, round: usize, seed: u64) -> bool {
    let even = round % 2 == 0;
    let Some(layer) = name.split('.').nth(2).and_then(|s| s.parse::<u64>().ok()) else { return !even };
    let Some(k) = peft::ALL_LINEAR.iter().position(|p| name.contains(p)) else { return even };
    let mut order: Vec<usize> = (0..peft::ALL_LINEAR.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ (layer << 20) ^ (round as u64 / 2)));
    let in_first = order[..4].contains(&k);
    in_first == even
}

/// Creates the run's output folder and writes the resolved config into it; returns the folder
/// and the config's SHA-256 (which a resume must match).
pub(crate) fn start_output(cfg: &TrainConfig) -> Result<(PathBuf, String)> {
    let out = cfg.train.output_dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let resolved = cfg.to_toml();
    crate::util::write_atomic(&out.join("config.toml"), resolved.as_bytes())?;
    Ok((out, crate::util::sha256_hex(resolved.as_bytes())))
}

/// Runs (or resumes) the training described by `cfg`.
pub fn train(cfg: &TrainConfig) -> Result<TrainReport> {
    let (device, kind) = resolve_device(&cfg.model.device, &cfg.model.dtype)?;
    // One of several ranks (torchrun's variables set): data parallel, planned on the global batch.
    let ddp = Ddp::join(cfg, device)?;
    if cfg.rl.is_some() {
        return crate::align::rl::train_rl(cfg);
    }
    let global_cfg = ddp.as_ref().map(|d| d.global_config(cfg));
    let cfg = global_cfg.as_ref().unwrap_or(cfg);
    let device = ddp.as_ref().map_or(device, |d| d.device);
    let main = ddp.as_ref().is_none_or(Ddp::is_main);
    let t0 = Instant::now();
    let (out, config_sha) = start_output(cfg)?;

    let (mut model, named, lora) = build_model(cfg, device, kind)?;
    let tok = TextTokenizer::load(&cfg.model.path, model.config.vocab)?;
    let data = prepare_data(cfg, &tok)?;
    tracing::info!(
        records = data.records,
        train = data.train.len(),
        validation = data.validation.len(),
        dropped = data.dropped.values().sum::<usize>(),
        "data prepared"
    );
    for (reason, n) in data.dropped.iter().filter(|_| main) {
        eprintln!("ftx: dropped {n} record(s): {reason}");
    }
    if let Some(d) = &ddp {
        d.check_objective(data.paired)?;
    }
    let pad_id = tok.pad_token.as_deref().and_then(|p| tok.token_id(p)).unwrap_or(0) as i64;
    let paired = data.paired;
    let per_epoch = epoch_plan(&data.train, cfg, 0, paired).len();
    let accum = cfg.train.grad_accum;
    let total = if cfg.train.max_steps > 0 { cfg.train.max_steps } else { (cfg.train.epochs * per_epoch / accum).max(1) };
    let warmup = if cfg.train.warmup_steps > 0 { cfg.train.warmup_steps } else { (cfg.train.warmup_ratio * total as f64).round() as usize };
    tracing::info!(steps = total, per_epoch, warmup, device = ?device, dtype = ?kind, method = %cfg.method.kind, "training plan");
    let t = &cfg.train;
    let mut opt = AdamW::new(named, AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay });

    let mut objective = if paired {
        Some(preference_objective(cfg, &model, lora.is_some(), &data, pad_id, device)?)
    } else {
        None
    };

    // Resume where the newest checkpoint left off.
    let mut start = 0usize;
    let mut tokens = 0i64;
    let mut resumed_from = None;
    // Under DDP rank 0 reads the checkpoint and the others receive its state.
    if let Some((state, tensors, _)) = if main { checkpoint::latest(&out, &config_sha)? } else { None } {
        opt.load_state(&tensors, state.step as i64).map_err(anyhow::Error::msg)?;
        start = state.step;
        tokens = state.tokens;
        resumed_from = Some(state.step);
        tracing::info!("resuming from step {}", state.step);
        eprintln!("ftx: resuming from the checkpoint at step {}", state.step);
    }
    if let Some(d) = &ddp {
        (start, tokens) = d.sync_from_main(&mut opt, start, tokens)?;
    }
    let mut log = if main { MetricsLog::open(&out, start)? } else { MetricsLog::discard() };
    let eval_before = if start == 0 { evaluate(&mut model, objective.as_mut(), &data, cfg, pad_id, device, ddp.as_ref())? } else { None };
    if let Some((l, extra)) = &eval_before {
        log.push(StepMetrics::eval(0, *l, (!paired).then(|| l.exp()), extra.clone()))?;
    }
    let eval_before = eval_before.map(|e| e.0);

    let bar = (if main { indicatif::ProgressBar::new(total as u64) } else { indicatif::ProgressBar::hidden() }).with_position(start as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps · {msg} · {elapsed_precise} < {eta_precise}")
            .expect("template"),
    );
    let throttle = std::env::var("FTX_STEP_DELAY_MS").ok().and_then(|v| v.parse::<u64>().ok());
    let mut plans: BTreeMap<usize, Vec<Vec<usize>>> = BTreeMap::new();
    let mut last_loss = None;
    let mut first_loss = None;
    let mut last_good: Option<PathBuf> = checkpoint::list(&out).pop().map(|(_, p)| p);
    for step in start..total {
        let t_step = Instant::now();
        if cfg.method.kind == "hft" {
            let round = step / cfg.method.hft_round_steps.max(1);
            for p in &mut opt.params {
                p.active = hft_active(&p.name, round, cfg.train.seed);
                let _ = p.tensor.set_requires_grad(p.active);
            }
        }
        // The micro-batches of this step and their target count (the loss denominator).
        let mut batches = Vec::with_capacity(accum);
        let mut globals = Vec::new();
        let packing = (cfg.data.packing && !paired).then_some(cfg.data.max_seq_len);
        for a in 0..accum {
            let m = step * accum + a;
            let (epoch, i) = (m / per_epoch, m % per_epoch);
            let plan = plans.entry(epoch).or_insert_with(|| epoch_plan(&data.train, cfg, epoch, paired));
            let idx = match &ddp {
                Some(d) => d.share(&plan[i], &data.train, packing),
                None => plan[i].clone(),
            };
            globals.push(plan[i].clone());
            if !idx.is_empty() {
                let b = collate(&data.train, &idx, cfg, pad_id, device, paired);
                batches.push((a, idx, b));
            }
        }
        let first_epoch = step * accum / per_epoch;
        plans.retain(|&e, _| e >= first_epoch);
        let mut denom: i64 = batches.iter().map(|(_, _, b)| b.n_targets).sum();
        if let Some(d) = &ddp {
            denom = d.sum(&[denom as f64])?[0] as i64;
        }
        let mut loss_sum = 0.0;
        let mut step_tokens = 0;
        let mut extra: BTreeMap<String, f64> = BTreeMap::new();
        for (a, idx, b) in &batches {
            let a = *a;
            // Each rank draws its own dropout masks (rank 0's are a single process's).
            let micro = a + ddp.as_ref().map_or(0, |d| d.env.rank * accum);
            let pos = StepPos { seed: cfg.train.seed, step, micro };
            match objective.as_mut() {
                None => loss_sum += forward_backward(&model, b, denom.max(1) as f64, pos, cfg.train.grad_checkpointing),
                Some(obj) => {
                    crate::train::step::seed_layer(pos.seed, step, a, 0);
                    let pairs: Vec<usize> = idx.iter().step_by(2).map(|i| i / 2).collect();
                    let (l, metrics) = obj.step(&mut model, b, &pairs, 1.0 / accum as f64, true)?;
                    loss_sum += l / accum as f64;
                    for (k, v) in metrics {
                        *extra.entry(k).or_insert(0.0) += v / accum as f64;
                    }
                }
            }
            step_tokens += b.n_tokens;
        }
        if let Some(d) = &ddp {
            let globals: Vec<&[usize]> = globals.iter().map(Vec::as_slice).collect();
            d.reduce_gradients(&opt, d.some_rank_idle(&globals, &data.train, packing))?;
            let sums = d.sum(&[loss_sum, step_tokens as f64])?;
            (loss_sum, step_tokens) = (sums[0], sums[1] as i64);
        }
        let loss = if paired { loss_sum } else { loss_sum / denom.max(1) as f64 };
        let norm = opt.grad_norm();
        if !loss.is_finite() || !norm.is_finite() {
            bar.abandon();
            let keep = last_good.as_ref().map_or("none was saved yet".into(), |p| p.display().to_string());
            bail!(
                "the loss became {} at step {} (gradient norm {norm}); the weights were not updated. \
                 Last good checkpoint: {keep}. Lower train.lr, check the data, or use fp32/bf16 instead of fp16.",
                if loss.is_nan() { "NaN" } else { "infinite" },
                step + 1
            );
        }
        let lr = cfg.train.lr * lr_factor(&cfg.train.schedule, step, warmup, total);
        opt.step(lr, clip_coef(norm, cfg.train.max_grad_norm));
        opt.zero_grad();
        tokens += step_tokens;
        let tps = step_tokens as f64 / t_step.elapsed().as_secs_f64().max(1e-9);
        first_loss.get_or_insert(loss);
        last_loss = Some(loss);
        let done = step + 1;
        let eval = if cfg.train.eval_every > 0 && done % cfg.train.eval_every == 0 && done < total {
            evaluate(&mut model, objective.as_mut(), &data, cfg, pad_id, device, ddp.as_ref())?
        } else {
            None
        };
        if let Some((_, e)) = &eval {
            extra.extend(e.iter().map(|(k, v)| (format!("eval/{k}"), *v)));
        }
        let eval = eval.map(|e| e.0);
        log.push(StepMetrics {
            step: done,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: Some(norm),
            tokens_per_s: Some(tps),
            eval_loss: eval,
            eval_ppl: eval.filter(|_| !paired).map(f64::exp),
            extra,
        })?;
        bar.set_message(format!("loss {loss:.4} · lr {lr:.2e} · {tps:.0} tok/s"));
        bar.set_position(done as u64);
        if main && cfg.train.save_every > 0 && done % cfg.train.save_every == 0 && done < total {
            last_good = Some(save_checkpoint(cfg, &mut model, lora.as_ref(), &opt, done, tokens, &config_sha)?);
            tracing::info!(step = done, path = %last_good.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), "checkpoint saved");
        }
        if let Some(ms) = throttle {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
    bar.finish();
    let eval_after = evaluate(&mut model, objective.as_mut(), &data, cfg, pad_id, device, ddp.as_ref())?;
    if let Some((l, extra)) = &eval_after {
        log.push(StepMetrics::eval(total, *l, (!paired).then(|| l.exp()), extra.clone()))?;
    }
    let eval_after = eval_after.map(|e| e.0);
    let final_dir = out.join("final");
    if main {
        save_checkpoint(cfg, &mut model, lora.as_ref(), &opt, total, tokens, &config_sha)?;
        log.chart(&out.join("loss.svg"), "ftx train: loss").map_err(anyhow::Error::msg)?;
        match &lora {
            Some(s) => peft::save_adapter(&mut model, s, &cfg.model.path.display().to_string(), &final_dir)?,
            None => model.save_pretrained(&cfg.model.path, &final_dir)?,
        }
    }
    let report = TrainReport {
        steps: total,
        first_loss,
        last_loss,
        eval_before,
        eval_after,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        output: out.clone(),
        final_dir,
        resumed_from,
    };
    if main {
        write_manifest(cfg, &data, &report)?;
    }
    if let Some(d) = &ddp {
        d.group.barrier()?; // the ranks finish together, once rank 0 has written the outputs
    }
    Ok(report)
}

/// Validation: the mean loss per target token (SFT), or the preference loss and the loss
/// plugin's metrics (pairs). `None` without validation data.
fn evaluate(
    model: &mut CausalLm,
    objective: Option<&mut PreferenceObjective>,
    data: &PreparedData,
    cfg: &TrainConfig,
    pad_id: i64,
    device: Device,
    ddp: Option<&Ddp>,
) -> Result<Option<(f64, BTreeMap<String, f64>)>> {
    if data.validation.is_empty() {
        return Ok(None);
    }
    let w = if data.paired { 2 } else { 1 };
    let chunks: Vec<Vec<usize>> = (0..data.validation.len()).collect::<Vec<_>>().chunks(cfg.train.batch_size * w).map(<[usize]>::to_vec).collect();
    let batch_of = |c: &[usize]| batch::pad(&c.iter().map(|&i| &data.validation[i]).collect::<Vec<_>>(), pad_id).to(device);
    let Some(obj) = objective else {
        // Under DDP each rank scores every world-size-th chunk and the sums are combined.
        let mine = chunks.iter().enumerate().filter(|(i, _)| ddp.is_none_or(|d| i % d.env.world_size == d.env.rank));
        let (mut sum, mut n) = eval_loss(model, mine.map(|(_, c)| batch_of(c)));
        if let Some(d) = ddp {
            let total = d.sum(&[sum, n as f64])?;
            (sum, n) = (total[0], total[1] as i64);
        }
        return Ok(Some((sum / n.max(1) as f64, BTreeMap::new())));
    };
    let (mut loss, mut extra) = (0.0, BTreeMap::new());
    for c in &chunks {
        let pairs: Vec<usize> = c.iter().step_by(2).map(|i| i / 2).collect();
        let (l, metrics) = obj.step(model, &batch_of(c), &pairs, 1.0, false)?;
        loss += l / chunks.len() as f64;
        for (k, v) in metrics {
            *extra.entry(k).or_insert(0.0) += v / chunks.len() as f64;
        }
    }
    Ok(Some((loss, extra)))
}

/// The loss plugin of a preference run, with its reference log-probs arranged.
fn preference_objective(cfg: &TrainConfig, model: &CausalLm, adapters: bool, data: &PreparedData, pad_id: i64, device: Device) -> Result<PreferenceObjective> {
    let mut loss = None;
    for entry in &cfg.plugins {
        let path = crate::plugins::manifest::locate(&entry.path)?;
        // The kind first (the component is compiled once per process; loading reuses it).
        let (kind, _) = crate::plugins::kind_of(&path)?;
        if kind == crate::plugins::PluginKind::Loss {
            let plugin = LossPlugin::load_granted(&path, crate::plugins::Limits::default(), device, &entry.grant)?;
            loss = Some((plugin, entry.params.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>()));
            break;
        }
    }
    let Some((plugin, params)) = loss else {
        bail!("the data are preference pairs: name a loss plugin (`ftx --plugin plugins/target/wasm32-wasip2/release/dpo.wasm train …` or a [[plugins]] table)");
    };
    let name = plugin.name.clone();
    let loss = crate::align::PreferenceLoss::Plugin(plugin);
    let reference = if !loss.needs_reference() {
        Reference::None
    } else if adapters {
        Reference::AdaptersOff
    } else {
        // Full fine-tuning: the initial model's log-probs, computed once (no frozen copy).
        let units: Vec<usize> = (0..data.train.len() / 2).collect();
        let batches = units.chunks(cfg.train.batch_size).map(|c| {
            let idx: Vec<usize> = c.iter().flat_map(|&u| [2 * u, 2 * u + 1]).collect();
            (c.to_vec(), collate(&data.train, &idx, cfg, pad_id, device, true))
        });
        Reference::Precomputed(crate::align::precompute_reference(model, batches))
    };
    tracing::info!(plugin = %name, reference = ?std::mem::discriminant(&reference), "preference objective");
    Ok(PreferenceObjective { loss, params, reference })
}

fn save_checkpoint(
    cfg: &TrainConfig,
    model: &mut CausalLm,
    lora: Option<&LoraSettings>,
    opt: &AdamW,
    step: usize,
    tokens: i64,
    config_sha: &str,
) -> Result<PathBuf> {
    let state = RunState { step, micro_batches: step * cfg.train.grad_accum, tokens, config_sha256: config_sha.to_owned() };
    let base = cfg.model.path.display().to_string();
    let path = checkpoint::save(&cfg.train.output_dir, &state, &opt.state(), cfg.train.keep_last, |dir| match lora {
        Some(s) => peft::save_adapter(model, s, &base, &dir.join("adapter")),
        None => Ok(()),
    })?;
    Ok(path)
}

fn write_manifest(cfg: &TrainConfig, data: &PreparedData, r: &TrainReport) -> Result<()> {
    let inputs: Vec<serde_json::Value> = cfg
        .data
        .train
        .iter()
        .chain(&cfg.data.validation)
        .map(|p| serde_json::json!({"path": p, "sha256": crate::util::sha256_file(p).ok()}))
        .collect();
    let manifest = serde_json::json!({
        "ftx": env!("CARGO_PKG_VERSION"),
        "inputs": inputs,
        "model": cfg.model.path,
        "records": data.records,
        "train_examples": data.train.len(),
        "validation_examples": data.validation.len(),
        "dropped": data.dropped,
        "report": r,
    });
    crate::util::write_atomic(&r.output.join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    Ok(())
}
