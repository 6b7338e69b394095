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
//! Checkpoints every `train.save_every` rollouts; a run started again resumes where the newest
//! one left off, on the same trajectory as if it had not stopped.

use super::advantage::{gae, group_advantages, token_rewards, whiten, KlController};
use super::rollout::{self, Completion};
use crate::data::{read_examples, Example, TokenizedExample};
use crate::model::generate::GenerateOptions;
use crate::model::{CausalLm, TextTokenizer};
use crate::plugins::loss::LossPlugin;
use crate::plugins::reward::{RewardPlugin, RewardSample};
use crate::plugins::PluginKind;
use crate::train::metrics::{line_chart, plugin_key, MetricsLog, StepMetrics};
use crate::train::optim::{clip_coef, lr_factor, AdamW, AdamWConfig};
use crate::train::{TrainConfig, TrainReport};
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

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
        for (i, ex) in read_examples(p, cfg.data.format)?.into_iter().enumerate() {
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

/// The reward plugins of a run with their weights.
pub struct Rewards {
    pub plugins: Vec<(RewardPlugin, f64)>,
}

impl Rewards {
    /// Weighted sum of every plugin's scores, and each plugin's mean score.
    pub fn score(&mut self, samples: &[RewardSample]) -> Result<(Vec<f64>, Vec<(String, f64)>)> {
        let mut total = vec![0.0; samples.len()];
        let mut means = Vec::new();
        for (p, w) in &mut self.plugins {
            let s = p.score(samples)?;
            for (t, x) in total.iter_mut().zip(&s) {
                *t += *w * f64::from(*x);
            }
            means.push((format!("reward/{}", p.name), s.iter().map(|&x| f64::from(x)).sum::<f64>() / s.len().max(1) as f64));
        }
        Ok((total, means))
    }
}

/// PPO's value head: a linear layer on the final (normed) hidden state, in fp32.
pub struct ValueHead {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl ValueHead {
    /// Zero-initialised (every value starts at 0), trainable.
    pub fn new(hidden: i64, device: Device) -> ValueHead {
        ValueHead {
            weight: Tensor::zeros([1, hidden], (Kind::Float, device)).set_requires_grad(true),
            bias: Tensor::zeros([1], (Kind::Float, device)).set_requires_grad(true),
        }
    }

    /// Values `[B, T]` of hidden states `[B, T, hidden]`.
    pub fn forward(&self, model: &CausalLm, hidden: &Tensor) -> Tensor {
        model.norm.forward(hidden).to_kind(Kind::Float).linear(&self.weight, Some(&self.bias)).squeeze_dim(-1)
    }

    /// Its tensors under the names they are saved with (`value_head.safetensors`).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        vec![("v_head.weight".into(), self.weight.shallow_clone()), ("v_head.bias".into(), self.bias.shallow_clone())]
    }
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

/// Runs (or resumes) GRPO or PPO as `cfg.rl` says.
pub fn train_rl(cfg: &TrainConfig) -> Result<TrainReport> {
    let rl = cfg.rl.clone().expect("[rl] present");
    let t0 = Instant::now();
    let (out, config_sha) = crate::train::trainer::start_output(cfg)?;
    let resume = crate::train::checkpoint::latest(&out, &config_sha)?;

    let (device, kind) = crate::train::trainer::resolve_device(&cfg.model.device, &cfg.model.dtype)?;
    let (mut model, mut named, lora) = crate::train::trainer::build_model(cfg, device, kind)?;
    let tok = TextTokenizer::load(&cfg.model.path, model.config.vocab)?;
    let prompts = read_prompts(cfg, &tok)?;
    let pad_id = tok.pad_token.as_deref().and_then(|p| tok.token_id(p)).unwrap_or(0) as i64;

    // Plugins: one loss, one or more rewards.
    let mut loss: Option<(LossPlugin, Vec<(String, f64)>)> = None;
    let mut rewards = Rewards { plugins: Vec::new() };
    for entry in &cfg.plugins {
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
    let Some((mut loss, params)) = loss else {
        bail!("an [rl] run needs a loss plugin: add [[plugins]] path = \"plugins/target/wasm32-wasip2/release/{}.wasm\"", rl.algorithm);
    };
    if rewards.plugins.is_empty() {
        bail!("an [rl] run needs at least one reward plugin in [[plugins]] (e.g. regex-match, json-valid, exact-match)");
    }
    let ppo = rl.algorithm == "ppo";
    let value_head = ppo.then(|| ValueHead::new(model.config.hidden, device));
    if let Some(v) = &value_head {
        named.extend(v.named());
    }
    let reference = match &lora {
        Some(_) => RlReference::AdaptersOff,
        None => {
            let frozen = CausalLm::load(&cfg.model.path, crate::model::decoder::LoadOptions { device, kind })?;
            RlReference::Frozen(Box::new(frozen))
        }
    };
    let t = &cfg.train;
    let mut opt = AdamW::new(named, AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay });
    let total = t.max_steps.max(1);
    let warmup = if t.warmup_steps > 0 { t.warmup_steps } else { (t.warmup_ratio * total as f64).round() as usize };
    let epochs = if rl.epochs > 0 { rl.epochs } else if ppo { 4 } else { 1 };
    let mut kl_ctl = KlController { value: rl.kl_coef, target: (rl.target_kl > 0.0).then_some(rl.target_kl), horizon: rl.kl_horizon };
    tracing::info!(algorithm = %rl.algorithm, steps = total, prompts = prompts.len(), plugin = %loss.name, "rl plan");

    let n_samples = rl.prompts_per_step * rl.group_size;
    let mut draws = Draws { rng: ChaCha8Rng::seed_from_u64(t.seed ^ 0x72_6c), order: Vec::new() };
    let (mut first_loss, mut last_loss, mut tokens) = (None, None, 0i64);

    // Resume where the newest checkpoint left off: weights and moments from the optimizer
    // state, the adaptive KL coefficient from rl_state.json, the draws replayed. Sampling,
    // dropout and the step's seeds derive from the step number.
    let mut start = 0;
    if let Some((state, tensors, dir)) = &resume {
        // An RL checkpoint's micro-batches are its optimizer updates (epochs × minibatches a rollout).
        opt.load_state(tensors, state.micro_batches as i64).map_err(anyhow::Error::msg)?;
        let saved = dir.join(RL_STATE);
        let rl_state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&saved)?).map_err(|e| anyhow::anyhow!("{}: {e}", saved.display()))?;
        kl_ctl.value = rl_state["kl_coef"].as_f64().ok_or_else(|| anyhow::anyhow!("{}: no kl_coef", saved.display()))?;
        for _ in 0..state.step {
            draws.step(prompts.len(), rl.prompts_per_step, n_samples, epochs);
        }
        (start, tokens) = (state.step, state.tokens);
        tracing::info!("resuming from rollout {start}");
        eprintln!("ftx: resuming from the checkpoint at rollout {start}");
    }

    // Weights (adapter or model) and the value head, for checkpoints and final/.
    let base = cfg.model.path.display().to_string();
    let save_to = |model: &mut CausalLm, dir: &std::path::Path| -> std::io::Result<()> {
        match &lora {
            Some(s) => crate::peft::save_adapter(model, s, &base, dir)?,
            None => model.save_pretrained(&cfg.model.path, dir)?,
        }
        if let Some(v) = &value_head {
            crate::train::checkpoint::write_safetensors(&dir.join("value_head.safetensors"), &v.named())?;
        }
        Ok(())
    };
    let checkpoint = |model: &mut CausalLm, opt: &AdamW, done: usize, tokens: i64, kl: f64| -> std::io::Result<std::path::PathBuf> {
        let state = crate::train::checkpoint::RunState { step: done, micro_batches: opt.step as usize, tokens, config_sha256: config_sha.clone() };
        crate::train::checkpoint::save(&out, &state, &opt.state(), t.keep_last, |dir| {
            crate::util::write_atomic(&dir.join(RL_STATE), serde_json::json!({ "kl_coef": kl }).to_string().as_bytes())?;
            save_to(model, &dir.join("adapter"))
        })
    };

    let mut log = MetricsLog::open(&out, start)?;
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rollouts · {msg} · {elapsed_precise} < {eta_precise}").expect("template"));
    bar.set_position(start as u64);
    for step in start..total {
        let t_step = Instant::now();
        // 1. Rollout.
        let (picked, epoch_orders) = draws.step(prompts.len(), rl.prompts_per_step, n_samples, epochs);
        let gen = GenerateOptions {
            max_new_tokens: rl.max_new_tokens,
            temperature: rl.temperature,
            top_k: rl.top_k,
            top_p: rl.top_p,
            seed: t.seed.wrapping_mul(1_000_003).wrapping_add(step as u64 * 7919),
            stop_ids: tok.stop_ids.clone(),
            stop_strings: Vec::new(),
        };
        let mut completions: Vec<(usize, Completion)> = Vec::new();
        for (k, &p) in picked.iter().enumerate() {
            let opts = GenerateOptions { seed: gen.seed.wrapping_add(k as u64 * 104_729), ..gen.clone() };
            for c in rollout::sample_group(&model, &tok, &prompts[p].ids, rl.group_size, &opts)? {
                completions.push((p, c));
            }
        }
        let reward_in: Vec<RewardSample> = completions
            .iter()
            .map(|(p, c)| RewardSample { prompt: prompts[*p].text.clone(), completion: c.text.clone(), reference: prompts[*p].reference.clone() })
            .collect();
        let (scores, per_plugin) = rewards.score(&reward_in)?;

        // 2. Old, reference log-probs and values, without gradients.
        let mut samples: Vec<Sample> = completions
            .iter()
            .map(|(p, c)| {
                let seq = rollout::sequence(&prompts[*p].ids, &c.ids);
                let span = rollout::spans(&[&seq])[0];
                Sample { seq, span, old_logps: vec![], ref_logps: vec![], old_values: vec![], advantages: vec![], returns: vec![] }
            })
            .collect();
        let chunk = samples.len().div_ceil(rl.minibatches).max(1);
        {
            let _g = tch::no_grad_guard();
            for part in samples.chunks_mut(chunk) {
                let seqs: Vec<&TokenizedExample> = part.iter().map(|s| &s.seq).collect();
                let spans: Vec<(usize, usize)> = part.iter().map(|s| s.span).collect();
                let b = rollout::pad(&seqs, pad_id, device);
                let (lp, h) = rollout::token_logps(&model, &b, false);
                let old = rollout::rows(&lp, &spans);
                let values = value_head.as_ref().map(|v| rollout::rows(&v.forward(&model, &h), &spans));
                let refs = match &reference {
                    RlReference::AdaptersOff => {
                        crate::peft::set_adapters_enabled(&mut model, false);
                        let (lp, _) = rollout::token_logps(&model, &b, false);
                        crate::peft::set_adapters_enabled(&mut model, true);
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
        }

        // 3. Advantages.
        let seq_kl: Vec<f64> = samples.iter().map(|s| s.old_logps.iter().zip(&s.ref_logps).map(|(a, b)| a - b).sum()).collect();
        if ppo {
            for (s, &score) in samples.iter_mut().zip(&scores) {
                let r = token_rewards(&s.old_logps, &s.ref_logps, score, kl_ctl.value);
                (s.advantages, s.returns) = gae(&r, &s.old_values, rl.gamma, rl.lam);
            }
            if rl.whiten_advantages {
                let mut all: Vec<f64> = samples.iter().flat_map(|s| s.advantages.clone()).collect();
                whiten(&mut all);
                let mut it = all.into_iter();
                for s in &mut samples {
                    s.advantages.iter_mut().for_each(|a| *a = it.next().expect("same count"));
                }
            }
        } else {
            let adv = group_advantages(&scores, rl.group_size, rl.scale_rewards);
            for (s, a) in samples.iter_mut().zip(adv) {
                s.advantages = vec![a; s.span.1];
            }
        }

        // 4. Optimisation: `epochs` passes of `minibatches` steps.
        let lr = t.lr * lr_factor(&t.schedule, step, warmup, total);
        let (mut loss_sum, mut n_updates, mut norm) = (0.0, 0usize, 0.0);
        let mut extra: BTreeMap<String, f64> = BTreeMap::new();
        anyhow::ensure!(samples.len() == n_samples, "a rollout gave {} samples, not {n_samples}", samples.len());
        for (epoch, idx) in epoch_orders.iter().enumerate() {
            for (m, mb) in idx.chunks(chunk).enumerate() {
                crate::train::step::seed_layer(t.seed, step, epoch * rl.minibatches + m, 0);
                let part: Vec<&Sample> = mb.iter().map(|&i| &samples[i]).collect();
                let seqs: Vec<&TokenizedExample> = part.iter().map(|s| &s.seq).collect();
                let spans: Vec<(usize, usize)> = part.iter().map(|s| s.span).collect();
                let b = rollout::pad(&seqs, pad_id, device);
                let width = b.input_ids.size()[1] as usize;
                let col = |f: fn(&Sample) -> &[f64]| rollout::place(&part.iter().map(|s| f(s)).collect::<Vec<_>>(), &spans, width, device);
                let ones: Vec<Vec<f64>> = part.iter().map(|s| vec![1.0; s.span.1]).collect();
                let mask = rollout::place(&ones.iter().map(Vec::as_slice).collect::<Vec<_>>(), &spans, width, device);
                let (logps, h) = rollout::token_logps(&model, &b, true);
                let values = value_head.as_ref().map(|v| v.forward(&model, &h));
                let (old, refs, adv) = (col(|s| s.old_logps.as_slice()), col(|s| s.ref_logps.as_slice()), col(|s| s.advantages.as_slice()));
                let (old_values, returns) = (col(|s| s.old_values.as_slice()), col(|s| s.returns.as_slice()));
                let mut inputs: Vec<(&str, &Tensor)> =
                    vec![("logps", &logps), ("old_logps", &old), ("ref_logps", &refs), ("advantages", &adv), ("mask", &mask)];
                if let Some(v) = &values {
                    inputs.extend([("values", v), ("old_values", &old_values), ("returns", &returns)]);
                }
                let out = loss.compute(&inputs, &params)?;
                let value = out.loss.double_value(&[]);
                out.loss.backward();
                norm = opt.grad_norm();
                if !value.is_finite() || !norm.is_finite() {
                    bar.abandon();
                    bail!("the loss became {value} at rollout {} (gradient norm {norm}); lower train.lr", step + 1);
                }
                opt.step(lr, clip_coef(norm, t.max_grad_norm));
                opt.zero_grad();
                loss_sum += value;
                n_updates += 1;
                for (k, v) in out.metrics {
                    *extra.entry(plugin_key(&loss.name, &k)).or_insert(0.0) += v;
                }
                tokens += b.n_tokens;
            }
        }
        extra.values_mut().for_each(|v| *v /= n_updates.max(1) as f64);
        let n = scores.len() as f64;
        let mean = scores.iter().sum::<f64>() / n;
        let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
        let n_tok: usize = samples.iter().map(|s| s.span.1).sum();
        extra.insert("reward".into(), mean);
        extra.insert("reward_std".into(), std);
        extra.insert("kl".into(), seq_kl.iter().sum::<f64>() / n_tok.max(1) as f64);
        extra.insert("completion_length".into(), n_tok as f64 / n);
        extra.extend(per_plugin);
        if ppo {
            extra.insert("kl_coef".into(), kl_ctl.value);
            kl_ctl.update(seq_kl.iter().sum::<f64>() / n, samples.len());
        }
        let step_loss = loss_sum / n_updates.max(1) as f64;
        first_loss.get_or_insert(step_loss);
        last_loss = Some(step_loss);
        let tps = n_tok as f64 / t_step.elapsed().as_secs_f64().max(1e-9);
        log.push(StepMetrics { step: step + 1, loss: Some(step_loss), lr: Some(lr), grad_norm: Some(norm), tokens_per_s: Some(tps), eval_loss: None, eval_ppl: None, extra })?;
        bar.set_message(format!("reward {mean:.3} · loss {step_loss:.4} · lr {lr:.2e}"));
        bar.set_position(step as u64 + 1);
        if t.save_every > 0 && (step + 1) % t.save_every == 0 && step + 1 < total {
            checkpoint(&mut model, &opt, step + 1, tokens, kl_ctl.value)?;
        }
    }
    bar.finish();

    log.chart(&out.join("loss.svg"), "ftx train (rl): loss").map_err(anyhow::Error::msg)?;
    let [reward, kl, len]: [Vec<(f64, f64)>; 3] = log.series(&["reward", "kl", "completion_length"])?.try_into().expect("three series");
    line_chart(&out.join("reward.svg"), "ftx train (rl): mean reward and KL per token", "rollout", "value", &[("mean reward", &reward), ("KL per token", &kl)])
        .map_err(anyhow::Error::msg)?;
    line_chart(&out.join("length.svg"), "ftx train (rl): completion length", "rollout", "tokens", &[("mean completion length", &len)]).map_err(anyhow::Error::msg)?;

    // The last checkpoint, and the weights in final/.
    checkpoint(&mut model, &opt, total, tokens, kl_ctl.value)?;
    let final_dir = out.join("final");
    save_to(&mut model, &final_dir)?;
    let report = TrainReport {
        steps: total,
        first_loss,
        last_loss,
        eval_before: None,
        eval_after: None,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        output: out.clone(),
        final_dir,
        resumed_from: resume.as_ref().map(|(state, _, _)| state.step),
        plugins: std::iter::once(loss.time()).chain(rewards.plugins.iter().map(|(p, _)| p.time())).collect(),
    };
    let manifest = serde_json::json!({"ftx": env!("CARGO_PKG_VERSION"), "model": cfg.model.path, "prompts": prompts.len(), "algorithm": rl.algorithm, "report": report});
    crate::util::write_atomic(&out.join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    Ok(report)
}
