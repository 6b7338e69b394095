//! The SFT driver: supervised fine-tuning, continued pretraining and chat tuning, and
//! preference training on pairs (the same loop with a [`PreferenceObjective`] in place of the
//! token loss; see [`super::preference`]). Prepare data and model, loop over optimizer steps
//! with accumulation, evaluate, checkpoint, resume, and write the final weights.

use super::preference::preference_objective;
use super::{RunFinished, RunOptions, TrainReport};
use crate::align::PreferenceObjective;
use crate::data::{batch, Batch};
use crate::model::CausalLm;
use crate::peft::{self, LoraSettings};
use crate::train::checkpoint::{self, RunState};
use crate::train::dataset::{collate, epoch_plan, prepare_data, PreparedData};
use crate::train::ddp::Ddp;
use crate::train::fsdp::Fsdp;
use crate::train::metrics::{MetricsLog, StepMetrics};
use crate::train::optim::{clip_coef, lr_factor, AdamW, AdamWConfig};
use crate::train::interrupt::{self, Interrupted};
use crate::train::setup::{build_model, load_tokenizer, resolve_device, start_output, ResolvedConfig};
use crate::train::tracking::{self, RunStatus};
use crate::train::step::{eval_loss, forward_backward, StepPos};
use crate::train::TrainConfig;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

/// Runs (or resumes) the SFT, CPT or preference training described by `cfg`.
pub fn train_sft(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainReport> {
    let (device, kind) = resolve_device(&cfg.model.device, &cfg.model.dtype)?;
    // One of several ranks (torchrun's variables set): data parallel, planned on the global batch.
    let ddp = Ddp::join(cfg, device)?;
    let global_cfg = ddp.as_ref().map(|d| d.global_config(cfg));
    let cfg = global_cfg.as_ref().unwrap_or(cfg);
    let device = ddp.as_ref().map_or(device, |d| d.device);
    let main = ddp.as_ref().is_none_or(Ddp::is_main);
    let t0 = Instant::now();
    let (out, config) = start_output(cfg)?;
    let (mut model, named, lora) = build_model(cfg, device, kind)?;
    let tok = load_tokenizer(cfg, model.config.vocab)?;
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
    let pad_id = tok.pad_token.as_deref().and_then(|p| tok.token_id(p)).unwrap_or(0) as i64;
    let paired = data.paired;
    if let (Some(o), false) = (&cfg.method.objective, paired) {
        bail!("method.objective = \"{o}\" is a loss for preference pairs ({{prompt, chosen, rejected}}; kto: {{prompt, completion, label}}) or, with an [rl] table, prompts; these data are for supervised training: leave method.objective out");
    }
    let per_epoch = epoch_plan(&data.train, cfg, 0, paired).len();
    let accum = cfg.train.grad_accum;
    let total = if cfg.train.max_steps > 0 { cfg.train.max_steps } else { (cfg.train.epochs * per_epoch / accum).max(1) };
    let warmup = if cfg.train.warmup_steps > 0 { cfg.train.warmup_steps } else { (cfg.train.warmup_ratio * total as f64).round() as usize };
    tracing::info!(steps = total, per_epoch, warmup, device = ?device, dtype = ?kind, method = %cfg.method.kind, "training plan");
    let t = &cfg.train;
    let adamw = AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay };
    // Before any sharding: a full fine-tuning reference is computed from the whole initial model.
    let mut objective = if paired {
        Some(preference_objective(cfg, &model, lora.is_some(), &data, pad_id, device)?)
    } else {
        None
    };
    // FSDP: the ranks' slices take the trainable tensors and their optimizer; `opt` stays empty.
    let (named, mut fsdp) = match ddp.as_ref().filter(|d| d.sharded) {
        Some(d) => {
            if paired && cfg.train.grad_checkpointing.enabled() {
                bail!("distributed.strategy = \"fsdp\" trains preference pairs with the whole model gathered for a step, not one layer at a time: set train.grad_checkpointing = false, or use strategy = \"ddp\"");
            }
            // With gradient checkpointing one layer is gathered at a time, else the whole model.
            (Vec::new(), Some(Fsdp::new(&model, named, d, adamw, cfg.train.grad_checkpointing.enabled(), t.optimizer == "adamw-8bit")?))
        }
        None => (named, None),
    };
    let mut opt = AdamW::for_train(named, t);

    // Resume where the newest checkpoint left off.
    let mut start = 0usize;
    let mut tokens = 0i64;
    let mut resumed_from = None;
    // Under DDP rank 0 reads the checkpoint and the others receive its state; under FSDP every
    // rank reads the whole state (joined from the shards of however many ranks wrote them) and
    // keeps its slice.
    if let Some((state, tensors, _)) = if main || fsdp.is_some() { checkpoint::latest(&out)? } else { None } {
        match fsdp.as_mut() {
            Some(f) => f.load_state(&tensors, state.step as i64),
            None => opt.load_state(&tensors, state.step as i64),
        }
        .map_err(anyhow::Error::msg)?;
        start = state.step;
        tokens = state.tokens;
        resumed_from = Some(state.step);
        tracing::info!("resuming from step {}", state.step);
        if main {
            eprintln!("ftx: resuming from the checkpoint at step {}", state.step);
        }
    }
    if let Some(d) = &ddp {
        (start, tokens) = d.sync_from_main(&mut opt, start, tokens)?;
    }
    if opts.refuse_finished {
        let finished = main && checkpoint::finished(&out, total).is_some();
        // Rank 0 read the checkpoints: every rank follows its answer.
        if ddp.as_ref().map_or(Ok(finished), |d| d.sum(&[f64::from(u8::from(finished))]).map(|s| s[0] > 0.0))? {
            return Err(RunFinished { output: out.clone(), steps: total, final_dir: out.join("final") }.into());
        }
    }
    let mut log = if main {
        MetricsLog::open(&out, start)?.tracked(tracking::start(cfg, &out, start).map_err(anyhow::Error::msg)?)
    } else {
        MetricsLog::discard()
    };
    let eval_before = if start == 0 { evaluate(&mut model, objective.as_mut(), &data, cfg, pad_id, device, ddp.as_ref(), fsdp.as_ref())? } else { None };
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
    let _signals = interrupt::install();
    for step in start..total {
        let t_step = Instant::now();
        if cfg.method.kind == "hft" {
            let round = step / cfg.method.hft_round_steps.max(1);
            for p in &mut opt.params {
                p.active = hft_active(&p.name, round, cfg.train.seed);
                let _ = p.tensor.set_requires_grad(p.active);
            }
            if let Some(f) = fsdp.as_mut() {
                f.set_active(|name| hft_active(name, round, cfg.train.seed));
            }
        }
        // This step's micro-batches, their gradients accumulated.
        let (batches, some_rank_idle) = step_batches(&mut plans, &data, cfg, step, per_epoch, pad_id, device, ddp.as_ref());
        if let (Some(d), Some(f)) = (&ddp, &fsdp) {
            f.begin_step(d)?;
        }
        // DDP: the last micro-batch's backward all-reduces the gradients as it goes.
        let arm = || ddp.as_ref().filter(|d| !d.sharded).map_or(Ok(()), |d| d.arm_overlap(&opt));
        let (mut loss, mut step_tokens, mut extra) = accumulate(&mut model, objective.as_mut(), &batches, cfg, step, paired, ddp.as_ref(), fsdp.as_mut(), &arm)?;
        if let (Some(d), Some(f)) = (&ddp, &mut fsdp) {
            f.end_step(d)?;
        }
        if let Some(d) = &ddp {
            (loss, step_tokens) = d.finish_step(&opt, some_rank_idle, loss, step_tokens)?;
        }
        let norm = match (&ddp, &fsdp) {
            (Some(d), Some(f)) => f.grad_norm(d)?,
            _ => opt.grad_norm(),
        };
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
        match fsdp.as_mut() {
            Some(f) => {
                f.step(lr, clip_coef(norm, cfg.train.max_grad_norm));
                f.zero_grad();
            }
            None => {
                opt.step(lr, clip_coef(norm, cfg.train.max_grad_norm));
                opt.zero_grad();
            }
        }
        tokens += step_tokens;
        let tps = step_tokens as f64 / t_step.elapsed().as_secs_f64().max(1e-9);
        first_loss.get_or_insert(loss);
        last_loss = Some(loss);
        let done = step + 1;
        let eval = if cfg.train.eval_every > 0 && done % cfg.train.eval_every == 0 && done < total {
            evaluate(&mut model, objective.as_mut(), &data, cfg, pad_id, device, ddp.as_ref(), fsdp.as_ref())?
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
        if let Some(ms) = throttle {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        // Ctrl-C or SIGTERM: every rank stops after the same step, which is checkpointed.
        let stop = interrupt::agreed_stop(ddp.as_ref())?.filter(|_| done < total);
        if (main || fsdp.is_some()) && (stop.is_some() || cfg.train.checkpoint_due(done, total)) {
            last_good = Some(save_checkpoint(cfg, &mut model, lora.as_ref(), &opt, ddp.as_ref().zip(fsdp.as_ref()), done, tokens, &config)?);
            tracing::info!(step = done, path = %last_good.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), "checkpoint saved");
        }
        if let Some(signal) = stop {
            bar.abandon();
            if let Some(d) = &ddp {
                d.group.barrier()?; // the ranks exit once rank 0 has written the checkpoint
            }
            log.finish(RunStatus::Killed);
            return Err(Interrupted::new(signal, done, total, last_good.as_deref().filter(|_| main)).into());
        }
    }
    bar.finish();
    if let Some(d) = ddp.as_ref().filter(|d| !d.sharded) {
        let (early, buckets) = d.overlap();
        tracing::info!(early, buckets, "gradient buckets all-reduced while the backward pass ran");
    }
    let eval_after = evaluate(&mut model, objective.as_mut(), &data, cfg, pad_id, device, ddp.as_ref(), fsdp.as_ref())?;
    if let Some((l, extra)) = &eval_after {
        log.push(StepMetrics::eval(total, *l, (!paired).then(|| l.exp()), extra.clone()))?;
    }
    let eval_after = eval_after.map(|e| e.0);
    let final_dir = out.join("final");
    if main || fsdp.is_some() {
        save_checkpoint(cfg, &mut model, lora.as_ref(), &opt, ddp.as_ref().zip(fsdp.as_ref()), total, tokens, &config)?;
    }
    // Under FSDP every rank gathers the trained tensors for rank 0 to write.
    if let (Some(d), Some(f)) = (&ddp, &fsdp) {
        f.gather_trainable(d)?;
    }
    if main {
        log.chart(&out.join("loss.svg"), "ftx train: loss").map_err(anyhow::Error::msg)?;
        match &lora {
            Some(s) => peft::save_adapter(&mut model, s, &cfg.model.path.display().to_string(), &final_dir)?,
            None => model.save_pretrained(&cfg.model.path, &final_dir)?,
        }
        if cfg.data.chat_template.is_some() || cfg.data.eot_token.is_some() {
            crate::data::chat_templates::save(&tok, &final_dir)?;
        }
    }
    if let Some(f) = &fsdp {
        f.free_all();
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
        plugins: objective.as_ref().and_then(|o| o.loss.plugin_time()).into_iter().collect(),
    };
    if main {
        write_manifest(cfg, &data, &report)?;
    }
    log.finish(RunStatus::Finished);
    if let Some(d) = &ddp {
        d.group.barrier()?; // the ranks finish together, once rank 0 has written the outputs
    }
    Ok(report)
}

/// The micro-batches of optimizer step `step`: their index in the step, example indices and
/// the collated batch, from the (cached) plans of the epochs they fall in; plans of finished
/// epochs are dropped. Under DDP, this rank's shares (an empty share is left out), and
/// whether some rank has no example in the whole step.
#[allow(clippy::too_many_arguments)]
fn step_batches(
    plans: &mut BTreeMap<usize, Vec<Vec<usize>>>,
    data: &PreparedData,
    cfg: &TrainConfig,
    step: usize,
    per_epoch: usize,
    pad_id: i64,
    device: Device,
    ddp: Option<&Ddp>,
) -> (Vec<(usize, Vec<usize>, Batch)>, bool) {
    let (accum, paired) = (cfg.train.grad_accum, data.paired);
    let packing = (cfg.data.packing && !paired).then_some(cfg.data.max_seq_len);
    let mut batches = Vec::with_capacity(accum);
    let mut globals = Vec::with_capacity(accum);
    for a in 0..accum {
        let m = step * accum + a;
        let (epoch, i) = (m / per_epoch, m % per_epoch);
        let plan = plans.entry(epoch).or_insert_with(|| epoch_plan(&data.train, cfg, epoch, paired));
        let idx = ddp.map_or_else(|| plan[i].clone(), |d| d.share(&plan[i], &data.train, packing, paired));
        if !idx.is_empty() {
            let b = collate(&data.train, &idx, cfg, pad_id, device, paired);
            batches.push((a, idx, b));
        }
        globals.push(plan[i].clone());
    }
    let first_epoch = step * accum / per_epoch;
    plans.retain(|&e, _| e >= first_epoch);
    let globals: Vec<&[usize]> = globals.iter().map(Vec::as_slice).collect();
    let idle = ddp.is_some_and(|d| d.some_rank_idle(&globals, &data.train, packing, paired));
    (batches, idle)
}

/// Forward and backward over a step's micro-batches, gradients accumulated: the token loss
/// over the step's target count (SFT), or the objective's loss and metrics averaged over the
/// micro-batches (pairs). Returns the step's loss, its tokens and the objective's metrics.
/// Under FSDP one layer at a time, every rank going through every micro-batch's collectives.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    model: &mut CausalLm,
    mut objective: Option<&mut PreferenceObjective>,
    batches: &[(usize, Vec<usize>, Batch)],
    cfg: &TrainConfig,
    step: usize,
    paired: bool,
    ddp: Option<&Ddp>,
    fsdp: Option<&mut Fsdp>,
    arm_overlap: &dyn Fn() -> Result<(), crate::dist::DistError>,
) -> Result<(f64, i64, BTreeMap<String, f64>)> {
    let accum = batches.len();
    // The target count of the whole step (of all ranks') is the loss denominator.
    let mut denom: i64 = batches.iter().map(|(_, _, b)| b.n_targets).sum();
    if let Some(d) = ddp {
        denom = d.sum(&[denom as f64])?[0] as i64;
    }
    let mut loss_sum = 0.0;
    let mut step_tokens = 0;
    let mut extra: BTreeMap<String, f64> = BTreeMap::new();
    if let (Some(d), Some(f)) = (ddp, fsdp.filter(|f| f.per_layer())) {
        for a in 0..cfg.train.grad_accum {
            let micro = a + d.env.rank * cfg.train.grad_accum;
            let pos = StepPos { seed: cfg.train.seed, step, micro };
            let batch = batches.iter().find(|(i, _, _)| *i == a).map(|(_, _, b)| b);
            let offload = cfg.train.grad_checkpointing == crate::train::step::Checkpointing::Offload;
            loss_sum += f.forward_backward(d, model, batch, denom.max(1) as f64, pos, offload)?;
            step_tokens += batch.map_or(0, |b| b.n_tokens);
        }
        return Ok((loss_sum / denom.max(1) as f64, step_tokens, extra));
    }
    if let (Some(d), Some(obj)) = (ddp, objective.as_mut()) {
        // Pairs across ranks: every micro-batch's loss over all ranks' pairs (a collective,
        // so every rank goes through every micro-batch, with or without pairs of its own).
        let accum = cfg.train.grad_accum;
        for a in 0..accum {
            crate::train::step::seed_layer(cfg.train.seed, step, a, 0);
            let share = batches.iter().find(|(i, _, _)| *i == a).map(|(_, idx, b)| (b, idx.iter().step_by(2).map(|i| i / 2).collect::<Vec<usize>>()));
            if a + 1 == accum && share.is_some() {
                arm_overlap()?;
            }
            let mut gather = |local: &tch::Tensor| d.gather_columns(local).map_err(anyhow::Error::from);
            let (l, metrics) = obj.step_across(model, share.as_ref().map(|(b, p)| (*b, p.as_slice())), 1.0 / accum as f64, &mut gather)?;
            // Every rank computed the same loss: rank 0 reports it to the step's sum.
            loss_sum += if d.is_main() { l / accum as f64 } else { 0.0 };
            for (k, v) in metrics {
                *extra.entry(k).or_insert(0.0) += v / accum as f64;
            }
            step_tokens += share.map_or(0, |(b, _)| b.n_tokens);
        }
        return Ok((loss_sum, step_tokens, extra));
    }
    for (a, idx, b) in batches {
        let a = *a;
        if a + 1 == cfg.train.grad_accum {
            arm_overlap()?;
        }
        // Each rank draws its own dropout masks (rank 0's are a single process's).
        let micro = a + ddp.map_or(0, |d| d.env.rank * cfg.train.grad_accum);
        let pos = StepPos { seed: cfg.train.seed, step, micro };
        match objective.as_mut() {
            None => loss_sum += forward_backward(model, b, denom.max(1) as f64, pos, cfg.train.grad_checkpointing),
            Some(obj) => {
                crate::train::step::seed_layer(pos.seed, step, a, 0);
                let pairs: Vec<usize> = idx.iter().step_by(2).map(|i| i / 2).collect();
                let (l, metrics) = obj.step(model, b, &pairs, 1.0 / accum as f64, true)?;
                loss_sum += l / accum as f64;
                for (k, v) in metrics {
                    *extra.entry(k).or_insert(0.0) += v / accum as f64;
                }
            }
        }
        step_tokens += b.n_tokens;
    }
    let loss = if paired { loss_sum } else { loss_sum / denom.max(1) as f64 };
    Ok((loss, step_tokens, extra))
}

/// Validation: the mean loss per target token (SFT), or the preference loss and the loss
/// plugin's metrics (pairs). `None` without validation data.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    model: &mut CausalLm,
    objective: Option<&mut PreferenceObjective>,
    data: &PreparedData,
    cfg: &TrainConfig,
    pad_id: i64,
    device: Device,
    ddp: Option<&Ddp>,
    fsdp: Option<&Fsdp>,
) -> Result<Option<(f64, BTreeMap<String, f64>)>> {
    if data.validation.is_empty() {
        return Ok(None);
    }
    if let (Some(d), Some(f)) = (ddp, fsdp.filter(|f| !f.per_layer())) {
        f.gather_all(d)?;
        let result = evaluate(model, objective, data, cfg, pad_id, device, ddp, None);
        f.free_all();
        return result;
    }
    let w = if data.paired { 2 } else { 1 };
    let chunks: Vec<Vec<usize>> = (0..data.validation.len()).collect::<Vec<_>>().chunks(cfg.train.batch_size * w).map(<[usize]>::to_vec).collect();
    let batch_of = |c: &[usize]| batch::pad(&c.iter().map(|&i| &data.validation[i]).collect::<Vec<_>>(), pad_id).to(device);
    if let (Some(d), Some(f)) = (ddp, fsdp) {
        // One layer at a time; the same chunks per rank as below, a rank past its last chunk
        // joining the remaining rounds' gathers without data.
        let (world, rank) = (d.env.world_size, d.env.rank);
        let rounds = chunks.len().div_ceil(world);
        let mine = (0..rounds).map(|k| chunks.get(k * world + rank).map(|c| batch_of(c)));
        let (sum, n) = f.eval_loss(d, model, mine)?;
        let total = d.sum(&[sum, n as f64])?;
        return Ok(Some((total[0] / (total[1] as i64).max(1) as f64, BTreeMap::new())));
    }
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
        let pairs: Vec<usize> = c.iter().step_by(2).map(|i| crate::align::VALIDATION_PAIRS + i / 2).collect();
        let (l, metrics) = obj.step(model, &batch_of(c), &pairs, 1.0, false)?;
        loss += l / chunks.len() as f64;
        for (k, v) in metrics {
            *extra.entry(k).or_insert(0.0) += v / chunks.len() as f64;
        }
    }
    Ok(Some((loss, extra)))
}

/// Saves a checkpoint: on rank 0 (or the only process), or under FSDP on every rank (each
/// writes its shard of the optimizer state).
#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    cfg: &TrainConfig,
    model: &mut CausalLm,
    lora: Option<&LoraSettings>,
    opt: &AdamW,
    sharded: Option<(&Ddp, &Fsdp)>,
    step: usize,
    tokens: i64,
    config: &ResolvedConfig,
) -> Result<PathBuf> {
    let state = RunState { step, micro_batches: step * cfg.train.grad_accum, tokens, config_sha256: config.sha256.clone() };
    let base = cfg.model.path.display().to_string();
    let adapter = |dir: &std::path::Path| match lora {
        Some(s) => peft::save_adapter(model, s, &base, &dir.join("adapter")),
        None => Ok(()),
    };
    let (out, keep) = (&cfg.train.output_dir, cfg.train.keep_last);
    match sharded {
        Some((d, f)) => f.save_checkpoint(d, out, &state, &config.toml, keep, lora.is_some(), adapter),
        None => Ok(checkpoint::save(out, &state, &config.toml, &opt.state(), keep, adapter)?),
    }
}

fn write_manifest(cfg: &TrainConfig, data: &PreparedData, r: &TrainReport) -> Result<()> {
    let inputs: Vec<serde_json::Value> = cfg
        .data
        .train
        .iter()
        .chain(&cfg.data.validation)
        .map(|p| {
            // A hf:// reference is hashed as the file it resolved to (already in the Hub cache).
            let local = crate::hub::resolve_data_file(p).unwrap_or_else(|_| p.clone());
            serde_json::json!({"path": p, "sha256": crate::util::sha256_file(&local).ok()})
        })
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

/// HFT: which parameters train in `round`. Rounds come in pairs: each pair draws, per layer,
/// a seeded split of the seven projections into two halves; the even round trains one half
/// and the layer norms, the odd round the other half and the embeddings and head.
fn hft_active(name: &str, round: usize, seed: u64) -> bool {
    let even = round % 2 == 0;
    let Some(layer) = name.split('.').nth(2).and_then(|s| s.parse::<u64>().ok()) else { return !even };
    // The seven projections of a Llama-like layer; Phi-3's packed ones take the slots of q and
    // gate (matched by whole name component: `gate_up_proj` is not `up_proj`).
    let seven = &peft::ALL_LINEAR[..7];
    fn slot(c: &str) -> &str {
        match c {
            "qkv_proj" => "q_proj",
            "gate_up_proj" => "gate_proj",
            c => c,
        }
    }
    let Some(k) = name.split('.').find_map(|c| seven.iter().position(|p| *p == slot(c))) else { return even };
    let mut order: Vec<usize> = (0..seven.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ (layer << 20) ^ (round as u64 / 2)));
    let in_first = order[..4].contains(&k);
    in_first == even
}
