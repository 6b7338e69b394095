//! Reinforcement learning from rewards: GRPO and PPO (`[rl]` in the training config).
//!
//! Each step samples a rollout: `prompts_per_step` prompts, `group_size` completions each,
//! from the current policy; the reward plugins score them (one batched call per plugin, the
//! weighted scores summed). Log-probs of the policy at sampling time ("old"), of the
//! reference (adapters off for LoRA, a frozen copy for full fine-tuning) and, for PPO, the
//! value head's values are taken without gradients. Advantages: GRPO normalises rewards
//! within each group; PPO runs GAE over per-token rewards `−kl_coef·(log π − log π_ref)`
//! plus the score at the last token. Then `epochs` passes of `minibatches` optimizer steps
//! feed the loss plugin (grpo / ppo, or the user's own) the inputs it declared.
//! Checkpoints every `train.save_every` rollouts (about ten a run by default) and when Ctrl-C
//! or SIGTERM stops the run; a run started again resumes where the newest one left off, on the
//! same trajectory as if it had not stopped. Under torchrun (DDP) each rank takes its share
//! of every rollout's prompts ([`super::rl_ranks`]); `rl.prompts_per_step` is the global count.

use super::rl_ranks::{self, Share};
use super::{RunFinished, RunOptions, TrainReport};
use crate::align::advantage::{gae, group_advantages, token_rewards, KlController};
use crate::align::rewards::Rewards;
use crate::align::rollout::{self, Completion};
use crate::align::value_head::ValueHead;
use crate::data::TokenizedExample;
use crate::model::generate::GenerateOptions;
use crate::model::{CausalLm, TextTokenizer};
use crate::peft::LoraSettings;
use crate::plugins::loss::LossPlugin;
use crate::plugins::reward::{RewardPlugin, RewardSample};
use crate::plugins::PluginKind;
use crate::train::checkpoint::{self, RunState};
use crate::train::config::RlSection;
use crate::train::ddp::Ddp;
use crate::train::dataset::{read_prompts, RlPrompt};
use crate::train::metrics::{line_chart, plugin_key, MetricsLog, StepMetrics};
use crate::train::optim::{clip_coef, lr_factor, AdamW};
use crate::train::interrupt::{self, Interrupted};
use crate::train::setup::{build_model, resolve_device, start_output, ResolvedConfig};
use crate::train::tracking::{self, RunStatus};
use crate::train::TrainConfig;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Tensor};

/// Runs (or resumes) GRPO or PPO as `cfg.rl` says.
pub fn train_rl(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainReport> {
    let rl = cfg.rl.clone().expect("[rl] present");
    let t0 = Instant::now();
    let (device, kind) = resolve_device(&cfg.model.device, &cfg.model.dtype)?;
    // One of several ranks (torchrun's variables set): each samples its share of the prompts.
    let ddp = Ddp::join(cfg, device)?;
    if ddp.as_ref().is_some_and(|d| d.sharded) {
        bail!("distributed.strategy = \"fsdp\" does not run [rl] (GRPO/PPO) yet: rollouts sample from the whole model on every rank; use strategy = \"ddp\"");
    }
    let device = ddp.as_ref().map_or(device, |d| d.device);
    let main = ddp.as_ref().is_none_or(Ddp::is_main);
    let (out, config) = start_output(cfg)?;
    let total = cfg.train.max_steps.max(1);
    if opts.refuse_finished {
        let finished = main && checkpoint::finished(&out, total).is_some();
        // Rank 0's answer holds for every rank.
        if ddp.as_ref().map_or(Ok(finished), |d| d.sum(&[f64::from(u8::from(finished))]).map(|s| s[0] > 0.0))? {
            return Err(RunFinished { output: out.clone(), steps: total, final_dir: out.join("final") }.into());
        }
    }
    // Every rank reads the checkpoint (the draws and the KL coefficient); the weights and
    // moments then come from rank 0's.
    let resume = checkpoint::latest(&out)?;
    let (mut model, mut named, lora) = build_model(cfg, device, kind)?;
    let tok = crate::train::setup::load_tokenizer(cfg, model.config.vocab)?;
    let prompts = read_prompts(cfg, &tok)?;
    let pad_id = tok.pad_token.as_deref().and_then(|p| tok.token_id(p)).unwrap_or(0) as i64;
    let (mut loss, params, mut rewards) = load_plugins(cfg, &rl, device)?;
    let ppo = rl.algorithm == "ppo";
    let value_head = ppo.then(|| ValueHead::new(model.config.hidden, device));
    if let Some(v) = &value_head {
        named.extend(v.named());
    }
    let reference = match (&lora, &cfg.model.adapter) {
        (Some(_), None) => RlReference::AdaptersOff,
        (_, adapter) => {
            // Full fine-tuning: the initial weights; on top of model.adapter: base + that adapter.
            let mut frozen = CausalLm::load(&cfg.model.path, crate::model::decoder::LoadOptions { device, kind })?;
            if let Some(dir) = adapter {
                crate::peft::load_adapter(&mut frozen, dir).map_err(|e| anyhow::anyhow!("model.adapter = {}: {e}", dir.display()))?;
            }
            RlReference::Frozen(Box::new(frozen))
        }
    };
    let t = &cfg.train;
    let mut opt = AdamW::for_train(named, t);
    let warmup = if t.warmup_steps > 0 { t.warmup_steps } else { (t.warmup_ratio * total as f64).round() as usize };
    let epochs = if rl.epochs > 0 { rl.epochs } else if ppo { 4 } else { 1 };
    let mut kl_ctl = KlController { value: rl.kl_coef, target: (rl.target_kl > 0.0).then_some(rl.target_kl), horizon: rl.kl_horizon };
    tracing::info!(algorithm = %rl.algorithm, steps = total, prompts = prompts.len(), plugin = %loss.name, "rl plan");
    let n_samples = rl.prompts_per_step * rl.group_size;
    let run = Run { cfg, rl, ppo, epochs, n_samples, tok, prompts, pad_id, device, value_head, reference, lora, out, config };

    let mut draws = Draws { rng: ChaCha8Rng::seed_from_u64(t.seed ^ 0x72_6c), order: Vec::new() };
    let (mut first_loss, mut last_loss, mut tokens) = (None, None, 0i64);
    let mut start = 0;
    if let Some((state, tensors, dir)) = &resume {
        restore(&run, state, tensors, dir, &mut opt, &mut kl_ctl, &mut draws)?;
        (start, tokens) = (state.step, state.tokens);
        tracing::info!("resuming from rollout {start}");
        if main {
            eprintln!("ftx: resuming from the checkpoint at rollout {start}");
        }
    }
    if let Some(d) = &ddp {
        // Rank 0's weights, moments and update count (the value head starts the same too).
        let updates = opt.step as usize;
        (_, tokens) = d.sync_from_main(&mut opt, updates, tokens)?;
    }
    let share = Share::of(ddp.as_ref(), run.rl.prompts_per_step, run.rl.group_size);

    let mut log = if main {
        MetricsLog::open(&run.out, start)?.tracked(tracking::start(cfg, &run.out, start).map_err(anyhow::Error::msg)?)
    } else {
        MetricsLog::discard()
    };
    let _signals = interrupt::install();
    let bar = if main { indicatif::ProgressBar::new(total as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rollouts · {msg} · {elapsed_precise} < {eta_precise}").expect("template"));
    bar.set_position(start as u64);
    for step in start..total {
        let t_step = Instant::now();
        let (picked, epoch_orders) = draws.step(run.prompts.len(), run.rl.prompts_per_step, run.n_samples, run.epochs);
        // 1. Rollout: completions of (this rank's share of) the step's prompts from the current policy.
        let t_rollout = Instant::now();
        let completions = sample_completions(&run, &model, &picked, share.prompts.clone(), step)?;
        let rollout_s = t_rollout.elapsed().as_secs_f64();
        // 2. Scoring: the reward plugins' scores; old and reference log-probs and values.
        let (scores, mut per_plugin) = score_rewards(&mut rewards, &run.prompts, &completions)?;
        let mut samples = score_tokens(&run, &mut model, &completions);
        // 3. Advantages.
        let seq_kl: Vec<f64> = samples.iter().map(|s| s.old_logps.iter().zip(&s.ref_logps).map(|(a, b)| a - b).sum()).collect();
        advantages(&run, &mut samples, &scores, kl_ctl.value, ddp.as_ref())?;
        // 4. Update: `epochs` passes of `minibatches` optimizer steps.
        let lr = t.lr * lr_factor(&t.schedule, step, warmup, total);
        let update = match update(&run, &model, &mut opt, &mut loss, &params, &samples, &epoch_orders, step, lr, ddp.as_ref(), &share) {
            Ok(u) => u,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        // The whole rollout's numbers, in its order (every rank's share, gathered).
        let lens: Vec<f64> = samples.iter().map(|s| s.span.1 as f64).collect();
        let [all_scores, all_kl, all_lens]: [Vec<f64>; 3] = rl_ranks::gather_all(ddp.as_ref(), &[scores.clone(), seq_kl, lens])?.try_into().expect("three rows");
        if let Some(d) = &ddp {
            let here = scores.len() as f64;
            let sums = d.sum(&per_plugin.iter().map(|(_, m)| m * here).collect::<Vec<_>>())?;
            per_plugin.iter_mut().zip(sums).for_each(|((_, m), s)| *m = s / all_scores.len().max(1) as f64);
        }
        let step_tokens = ddp.as_ref().map_or(Ok(update.tokens as f64), |d| d.sum(&[update.tokens as f64]).map(|s| s[0]))?;
        tokens += step_tokens as i64;
        let step_loss = update.loss_sum / update.n_updates.max(1) as f64;
        let (mut extra, mean, n_tok) = rollout_metrics(&run, update.extra, &all_scores, &all_lens, &all_kl, per_plugin, kl_ctl.value);
        // Sampling speed alone (phase 1): this rank's generated tokens over its rollout's wall time.
        let rollout_tokens: usize = completions.iter().map(|(_, c)| c.ids.len()).sum();
        extra.insert("rollout_tokens_per_s".into(), rollout_tokens as f64 / rollout_s.max(1e-9));
        if run.ppo {
            kl_ctl.update(all_kl.iter().sum::<f64>() / all_scores.len() as f64, all_scores.len());
        }
        first_loss.get_or_insert(step_loss);
        last_loss = Some(step_loss);
        let tps = n_tok as f64 / t_step.elapsed().as_secs_f64().max(1e-9);
        log.push(StepMetrics { step: step + 1, loss: Some(step_loss), lr: Some(lr), grad_norm: Some(update.norm), tokens_per_s: Some(tps), eval_loss: None, eval_ppl: None, extra })?;
        bar.set_message(format!("reward {mean:.3} · loss {step_loss:.4} · lr {lr:.2e}"));
        bar.set_position(step as u64 + 1);
        // 5. Checkpoint (rank 0): on schedule, or when Ctrl-C or SIGTERM asks the run to stop
        // (every rank after the same rollout).
        let stop = interrupt::agreed_stop(ddp.as_ref())?.filter(|_| step + 1 < total);
        if stop.is_some() || t.checkpoint_due(step + 1, total) {
            let saved = if main { Some(save_checkpoint(&run, &mut model, &opt, step + 1, tokens, kl_ctl.value)?) } else { None };
            if let Some(signal) = stop {
                bar.abandon();
                if let Some(d) = &ddp {
                    d.group.barrier()?; // the ranks exit once rank 0 has written the checkpoint
                }
                log.finish(RunStatus::Killed);
                return Err(Interrupted::new(signal, step + 1, total, saved.as_deref()).into());
            }
        }
    }
    bar.finish();

    let final_dir = run.out.join("final");
    if main {
        charts(&log, &run.out)?;
        // The last checkpoint, and the weights in final/.
        save_checkpoint(&run, &mut model, &opt, total, tokens, kl_ctl.value)?;
        save_weights(&run, &mut model, &final_dir)?;
        if cfg.data.chat_template.is_some() || cfg.data.eot_token.is_some() {
            crate::data::chat_templates::save(&run.tok, &final_dir)?;
        }
    }
    let report = TrainReport {
        steps: total,
        first_loss,
        last_loss,
        eval_before: None,
        eval_after: None,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        output: run.out.clone(),
        final_dir,
        resumed_from: resume.as_ref().map(|(state, _, _)| state.step),
        plugins: std::iter::once(loss.time()).chain(rewards.plugins.iter().map(|(p, _)| p.time())).collect(),
    };
    if main {
        let manifest = serde_json::json!({"ftx": env!("CARGO_PKG_VERSION"), "model": cfg.model.path, "prompts": run.prompts.len(), "algorithm": run.rl.algorithm, "report": report});
        crate::util::write_atomic(&run.out.join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    }
    log.finish(RunStatus::Finished);
    if let Some(d) = &ddp {
        d.group.barrier()?; // the ranks finish together, once rank 0 has written the outputs
    }
    Ok(report)
}

/// What the phases of every rollout share: the run's settings and its fixed parts.
struct Run<'a> {
    cfg: &'a TrainConfig,
    rl: RlSection,
    ppo: bool,
    /// Passes over each rollout's samples.
    epochs: usize,
    /// Completions per rollout (`prompts_per_step × group_size`).
    n_samples: usize,
    tok: TextTokenizer,
    prompts: Vec<RlPrompt>,
    pad_id: i64,
    device: Device,
    value_head: Option<ValueHead>,
    reference: RlReference,
    lora: Option<LoraSettings>,
    out: PathBuf,
    config: ResolvedConfig,
}

/// The run's plugins: one loss (with its parameters) and one or more rewards.
fn load_plugins(cfg: &TrainConfig, rl: &RlSection, device: Device) -> Result<(LossPlugin, Vec<(String, f64)>, Rewards)> {
    let mut loss: Option<(LossPlugin, Vec<(String, f64)>)> = None;
    let mut rewards = Rewards { plugins: Vec::new() };
    for entry in &cfg.plugin_entries() {
        let path = crate::plugins::manifest::locate(&entry.path)?;
        let (k, _) = crate::plugins::inspect_file(&path)?;
        match k {
            PluginKind::Loss if loss.is_none() => {
                loss = Some((LossPlugin::load(&path, entry.limits(), device)?, entry.params.iter().map(|(k, v)| (k.clone(), *v)).collect()))
            }
            PluginKind::Loss => bail!("{}: an RL run takes one loss plugin", entry.path.display()),
            PluginKind::Reward => rewards.plugins.push((RewardPlugin::load(&path, entry.limits())?, entry.weight)),
            other => bail!("{}: a {other} plugin has no part in an RL run (it takes a loss and reward plugins)", entry.path.display()),
        }
    }
    let Some((loss, params)) = loss else {
        bail!("an [rl] run needs a loss plugin: method.objective = \"{}\" (first-party, by name), or a [[plugins]] entry", rl.algorithm);
    };
    if rewards.plugins.is_empty() {
        bail!("an [rl] run needs at least one reward plugin in [[plugins]] (e.g. regex-match, json-valid, exact-match)");
    }
    Ok((loss, params, rewards))
}

/// Puts a resumed run where its newest checkpoint left off: weights and moments from the
/// optimizer state, the adaptive KL coefficient from rl_state.json, the draws replayed.
/// Sampling, dropout and the step's seeds derive from the step number.
fn restore(run: &Run, state: &RunState, tensors: &[(String, Tensor)], dir: &Path, opt: &mut AdamW, kl_ctl: &mut KlController, draws: &mut Draws) -> Result<()> {
    // An RL checkpoint's micro-batches are its optimizer updates (epochs × minibatches a rollout).
    opt.load_state(tensors, state.micro_batches as i64).map_err(anyhow::Error::msg)?;
    let saved = dir.join(RL_STATE);
    let rl_state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&saved)?).map_err(|e| anyhow::anyhow!("{}: {e}", saved.display()))?;
    kl_ctl.value = rl_state["kl_coef"].as_f64().ok_or_else(|| anyhow::anyhow!("{}: no kl_coef", saved.display()))?;
    for _ in 0..state.step {
        draws.step(run.prompts.len(), run.rl.prompts_per_step, run.n_samples, run.epochs);
    }
    Ok(())
}

/// Phase 1: `group_size` completions of each picked prompt in `ks` (this rank's share),
/// sampled from the current policy with seeds derived from the step (prompt `k` of the step,
/// row `i`: its own stream, whichever rank samples it).
fn sample_completions(run: &Run, model: &CausalLm, picked: &[usize], ks: std::ops::Range<usize>, step: usize) -> Result<Vec<(usize, Completion)>> {
    let rl = &run.rl;
    let gen = GenerateOptions {
        max_new_tokens: rl.max_new_tokens,
        temperature: rl.temperature,
        top_k: rl.top_k,
        top_p: rl.top_p,
        seed: run.cfg.train.seed.wrapping_mul(1_000_003).wrapping_add(step as u64 * 7919),
        stop_ids: run.tok.stop_ids.clone(),
        stop_strings: Vec::new(),
    };
    let mut completions: Vec<(usize, Completion)> = Vec::new();
    for (k, &p) in picked.iter().enumerate().filter(|(k, _)| ks.contains(k)) {
        let opts = GenerateOptions { seed: gen.seed.wrapping_add(k as u64 * 104_729), ..gen.clone() };
        for c in rollout::sample_group(model, &run.tok, &run.prompts[p].ids, rl.group_size, &opts)? {
            completions.push((p, c));
        }
    }
    Ok(completions)
}

/// Phase 2a: the reward plugins' weighted scores of the completions, and each plugin's mean.
fn score_rewards(rewards: &mut Rewards, prompts: &[RlPrompt], completions: &[(usize, Completion)]) -> Result<(Vec<f64>, Vec<(String, f64)>)> {
    if completions.is_empty() {
        // A rank without prompts in this rollout (fewer prompts than ranks).
        return Ok((Vec::new(), rewards.plugins.iter().map(|(p, _)| (format!("reward/{}", p.name), 0.0)).collect()));
    }
    let reward_in: Vec<RewardSample> = completions
        .iter()
        .map(|(p, c)| RewardSample { prompt: prompts[*p].text.clone(), completion: c.text.clone(), reference: prompts[*p].reference.clone() })
        .collect();
    rewards.score(&reward_in)
}

/// Phase 2b: each completion's log-probs under the policy at sampling time ("old") and under
/// the reference, and (PPO) its values, without gradients, a minibatch at a time.
fn score_tokens(run: &Run, model: &mut CausalLm, completions: &[(usize, Completion)]) -> Vec<Sample> {
    let mut samples: Vec<Sample> = completions
        .iter()
        .map(|(p, c)| {
            let seq = rollout::sequence(&run.prompts[*p].ids, &c.ids);
            let span = rollout::spans(&[&seq])[0];
            Sample { seq, span, old_logps: vec![], ref_logps: vec![], old_values: vec![], advantages: vec![], returns: vec![] }
        })
        .collect();
    let chunk = samples.len().div_ceil(run.rl.minibatches).max(1);
    let _g = tch::no_grad_guard();
    for part in samples.chunks_mut(chunk) {
        let seqs: Vec<&TokenizedExample> = part.iter().map(|s| &s.seq).collect();
        let spans: Vec<(usize, usize)> = part.iter().map(|s| s.span).collect();
        let b = rollout::pad(&seqs, run.pad_id, run.device);
        let (lp, h) = rollout::token_logps(model, &b, false);
        let old = rollout::rows(&lp, &spans);
        let values = run.value_head.as_ref().map(|v| rollout::rows(&v.forward(model, &h), &spans));
        let refs = match &run.reference {
            RlReference::AdaptersOff => {
                crate::peft::set_adapters_enabled(model, false);
                let (lp, _) = rollout::token_logps(model, &b, false);
                crate::peft::set_adapters_enabled(model, true);
                rollout::rows(&lp, &spans)
            }
            RlReference::Frozen(m) => rollout::rows(&rollout::token_logps(m, &b, false).0, &spans),
        };
        for (k, s) in part.iter_mut().enumerate() {
            s.old_logps = old[k].clone();
            s.ref_logps = refs[k].clone();
            s.old_values = values.as_ref().map_or_else(Vec::new, |v| v[k].clone());
        }
    }
    samples
}

/// Phase 3: advantages (and PPO's returns). GRPO: rewards normalised within each group, one
/// value for every token of a completion. PPO: GAE over per-token rewards with the KL
/// penalty at `kl_coef`, whitened across the rollout when configured.
fn advantages(run: &Run, samples: &mut [Sample], scores: &[f64], kl_coef: f64, ddp: Option<&Ddp>) -> Result<()> {
    let rl = &run.rl;
    if run.ppo {
        for (s, &score) in samples.iter_mut().zip(scores) {
            let r = token_rewards(&s.old_logps, &s.ref_logps, score, kl_coef);
            (s.advantages, s.returns) = gae(&r, &s.old_values, rl.gamma, rl.lam);
        }
        if rl.whiten_advantages {
            let mut all: Vec<f64> = samples.iter().flat_map(|s| s.advantages.clone()).collect();
            rl_ranks::whiten_across(ddp, &mut all)?;
            let mut it = all.into_iter();
            for s in samples.iter_mut() {
                s.advantages.iter_mut().for_each(|a| *a = it.next().expect("same count"));
            }
        }
    } else {
        let adv = group_advantages(scores, rl.group_size, rl.scale_rewards);
        for (s, a) in samples.iter_mut().zip(adv) {
            s.advantages = vec![a; s.span.1];
        }
    }
    Ok(())
}

/// What one rollout's optimisation did.
struct Update {
    loss_sum: f64,
    n_updates: usize,
    /// The gradient norm of the last update.
    norm: f64,
    /// The loss plugin's metrics (`loss/…`), averaged over the updates.
    extra: BTreeMap<String, f64>,
    tokens: i64,
}

/// Phase 4: `epochs` passes over the rollout's samples in the drawn orders, `minibatches`
/// optimizer steps each; the loss plugin gets the inputs it declared. Under DDP `samples` are
/// this rank's `share` of the rollout: each minibatch's loss is over every rank's rows.
#[allow(clippy::too_many_arguments)]
fn update(
    run: &Run,
    model: &CausalLm,
    opt: &mut AdamW,
    loss: &mut LossPlugin,
    params: &[(String, f64)],
    samples: &[Sample],
    epoch_orders: &[Vec<usize>],
    step: usize,
    lr: f64,
    ddp: Option<&Ddp>,
    share: &Share,
) -> Result<Update> {
    let (rl, t) = (&run.rl, &run.cfg.train);
    let chunk = run.n_samples.div_ceil(rl.minibatches).max(1);
    let mut u = Update { loss_sum: 0.0, n_updates: 0, norm: 0.0, extra: BTreeMap::new(), tokens: 0 };
    anyhow::ensure!(samples.len() == share.samples.len(), "a rollout gave {} samples, not {}", samples.len(), share.samples.len());
    for (epoch, idx) in epoch_orders.iter().enumerate() {
        for (m, mb) in idx.chunks(chunk).enumerate() {
            crate::train::step::seed_layer(t.seed, step, epoch * rl.minibatches + m, 0);
            // This rank's rows of the minibatch, and where every rank's go in it.
            let (mine, order) = match ddp {
                Some(d) => rl_ranks::by_rank(d, mb, rl.prompts_per_step, rl.group_size),
                None => (mb.to_vec(), Vec::new()),
            };
            let part: Vec<&Sample> = mine.iter().map(|&i| &samples[i - share.samples.start]).collect();
            let seqs: Vec<&TokenizedExample> = part.iter().map(|s| &s.seq).collect();
            let spans: Vec<(usize, usize)> = part.iter().map(|s| s.span).collect();
            let (mut columns, n_tokens) = if part.is_empty() {
                ((0..if run.value_head.is_some() { 8 } else { 5 }).map(|_| Tensor::zeros([0, 0], (tch::Kind::Float, run.device))).collect(), 0)
            } else {
                let b = rollout::pad(&seqs, run.pad_id, run.device);
                let width = b.input_ids.size()[1] as usize;
                let col = |f: fn(&Sample) -> &[f64]| rollout::place(&part.iter().map(|s| f(s)).collect::<Vec<_>>(), &spans, width, run.device);
                let ones: Vec<Vec<f64>> = part.iter().map(|s| vec![1.0; s.span.1]).collect();
                let mask = rollout::place(&ones.iter().map(Vec::as_slice).collect::<Vec<_>>(), &spans, width, run.device);
                let (logps, h) = rollout::token_logps(model, &b, true);
                let mut columns = vec![logps, col(|s| s.old_logps.as_slice()), col(|s| s.ref_logps.as_slice()), col(|s| s.advantages.as_slice()), mask];
                if let Some(v) = &run.value_head {
                    columns.extend([v.forward(model, &h), col(|s| s.old_values.as_slice()), col(|s| s.returns.as_slice())]);
                }
                (columns, b.n_tokens)
            };
            if let Some(d) = ddp {
                columns = rl_ranks::minibatch_columns(d, &columns, part.len() as i64, &order)?;
            }
            let names = ["logps", "old_logps", "ref_logps", "advantages", "mask", "values", "old_values", "returns"];
            let inputs: Vec<(&str, &Tensor)> = names.iter().copied().zip(&columns).collect();
            let out = loss.compute(&inputs, params)?;
            let value = out.loss.double_value(&[]);
            // A rank without rows in this minibatch has nothing to backpropagate into.
            if !part.is_empty() {
                out.loss.backward();
            }
            if let Some(d) = ddp {
                d.reduce_gradients(opt, true)?;
            }
            u.norm = opt.grad_norm();
            if !value.is_finite() || !u.norm.is_finite() {
                bail!("the loss became {value} at rollout {} (gradient norm {}); lower train.lr", step + 1, u.norm);
            }
            opt.step(lr, clip_coef(u.norm, t.max_grad_norm));
            opt.zero_grad();
            u.loss_sum += value;
            u.n_updates += 1;
            for (k, v) in out.metrics {
                *u.extra.entry(plugin_key(&loss.name, &k)).or_insert(0.0) += v;
            }
            u.tokens += n_tokens;
        }
    }
    u.extra.values_mut().for_each(|v| *v /= u.n_updates.max(1) as f64);
    Ok(u)
}

/// A rollout's metrics: the loss plugin's, the mean reward and its spread, KL per token,
/// completion length, each reward plugin's mean and (PPO) the KL coefficient it ran with.
/// Returns them with the mean reward and the completion tokens.
fn rollout_metrics(
    run: &Run,
    mut extra: BTreeMap<String, f64>,
    scores: &[f64],
    lens: &[f64],
    seq_kl: &[f64],
    per_plugin: Vec<(String, f64)>,
    kl_coef: f64,
) -> (BTreeMap<String, f64>, f64, usize) {
    let n = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
    let n_tok = lens.iter().sum::<f64>() as usize;
    extra.insert("reward".into(), mean);
    extra.insert("reward_std".into(), std);
    extra.insert("kl".into(), seq_kl.iter().sum::<f64>() / n_tok.max(1) as f64);
    extra.insert("completion_length".into(), n_tok as f64 / n);
    extra.extend(per_plugin);
    if run.ppo {
        extra.insert("kl_coef".into(), kl_coef);
    }
    (extra, mean, n_tok)
}

/// Phase 5: a checkpoint after `done` rollouts: the optimizer state (its update count as the
/// micro-batches), the KL coefficient in rl_state.json, and the weights.
fn save_checkpoint(run: &Run, model: &mut CausalLm, opt: &AdamW, done: usize, tokens: i64, kl: f64) -> std::io::Result<PathBuf> {
    let state = RunState { step: done, micro_batches: opt.step as usize, tokens, config_sha256: run.config.sha256.clone() };
    checkpoint::save(&run.out, &state, &run.config.toml, &opt.state(), run.cfg.train.keep_last, |dir| {
        crate::util::write_atomic(&dir.join(RL_STATE), serde_json::json!({ "kl_coef": kl }).to_string().as_bytes())?;
        save_weights(run, model, &dir.join("adapter"))
    })
}

/// The trained weights (adapter or model) and the value head, for checkpoints and final/.
fn save_weights(run: &Run, model: &mut CausalLm, dir: &Path) -> std::io::Result<()> {
    let cfg = run.cfg;
    match &run.lora {
        Some(s) => crate::peft::save_adapter(model, s, &cfg.model.path.display().to_string(), dir)?,
        None => model.save_pretrained(&cfg.model.path, dir)?,
    }
    if let Some(v) = &run.value_head {
        crate::model::weights::write_safetensors(&dir.join("value_head.safetensors"), &v.named())?;
    }
    Ok(())
}

/// loss.svg, reward.svg (mean reward and KL per token) and length.svg of the run's log.
fn charts(log: &MetricsLog, out: &Path) -> Result<()> {
    log.chart(&out.join("loss.svg"), "ftx train (rl): loss").map_err(anyhow::Error::msg)?;
    let [reward, kl, len]: [Vec<(f64, f64)>; 3] = log.series(&["reward", "kl", "completion_length"])?.try_into().expect("three series");
    line_chart(&out.join("reward.svg"), "ftx train (rl): mean reward and KL per token", "rollout", "value", &[("mean reward", &reward), ("KL per token", &kl)])
        .map_err(anyhow::Error::msg)?;
    line_chart(&out.join("length.svg"), "ftx train (rl): completion length", "rollout", "tokens", &[("mean completion length", &len)]).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// What the rollout knows of one completion.
struct Sample {
    seq: TokenizedExample,
    span: (usize, usize),
    old_logps: Vec<f64>,
    ref_logps: Vec<f64>,
    old_values: Vec<f64>,
    advantages: Vec<f64>,
    returns: Vec<f64>,
}

/// Where reference log-probs come from in an RL run.
enum RlReference {
    AdaptersOff,
    Frozen(Box<CausalLm>),
}

/// The file in an RL checkpoint with what the optimizer state does not hold.
const RL_STATE: &str = "rl_state.json";

/// The random draws of a run, from one seeded stream in a fixed order: each rollout's prompts
/// (passes over the prompts in shuffled order), then each epoch's minibatch order. A resumed
/// run replays the draws of the rollouts it skips.
struct Draws {
    rng: ChaCha8Rng,
    /// What is left of the current pass over the prompts.
    order: Vec<usize>,
}

impl Draws {
    /// One rollout's prompt indices and, per epoch, the order of its `n_samples` samples.
    fn step(&mut self, n_prompts: usize, per_step: usize, n_samples: usize, epochs: usize) -> (Vec<usize>, Vec<Vec<usize>>) {
        let mut picked = Vec::with_capacity(per_step);
        while picked.len() < per_step {
            if self.order.is_empty() {
                self.order = (0..n_prompts).collect();
                self.order.shuffle(&mut self.rng);
            }
            picked.push(self.order.pop().expect("refilled"));
        }
        let mut idx: Vec<usize> = (0..n_samples).collect();
        let orders = (0..epochs)
            .map(|_| {
                idx.shuffle(&mut self.rng);
                idx.clone()
            })
            .collect();
        (picked, orders)
    }
}
