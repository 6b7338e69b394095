//! `ftx bench train`: training throughput and memory on a random model of a public shape,
//! through the same step and optimizer code `ftx train` runs. Prints one JSON line, like the
//! peers' scripts in the GPU benchmark, so they can be compared side by side.

use crate::data::batch;
use crate::data::TokenizedExample;
use crate::model::decoder::LoadOptions;
use crate::model::{CausalLm, ModelConfig};
use crate::peft::{self, LoraSettings};
use crate::plan::{ModelShape, Optimizer};
use crate::train::optim::{clip_coef, AdamW, AdamWConfig};
use crate::train::recompute::Recompute;
use crate::train::step::{checkpoint_segment, forward_backward, Checkpointing, StepPos};
use anyhow::{Context, Result};
use std::time::Instant;
use tch::{Device, Kind};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub shape: ModelShape,
    /// lora, qlora, dora or full.
    pub method: String,
    pub seq: usize,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub rank: i64,
    pub grad_checkpointing: Checkpointing,
    pub device: Device,
    pub kind: Kind,
    /// The device's measured matmul rate in FLOP/s, for MFU (None: not reported).
    pub peak_flops: Option<f64>,
    /// Confine the run to this many bytes of device memory once the model is built.
    pub memory_cap: Option<u64>,
    /// Fused q/k/v and gate/up projections and the SwiGLU node (false: each projection on its
    /// own, the reference path, for before/after timings with one binary).
    pub fused: bool,
    /// MoE experts' adapters stored stacked (`peft::stacked`; false: one leaf per expert,
    /// stacked per forward, the reference layout for before/after timings with one binary).
    pub stacked_experts: bool,
    /// Before timing, one step each way (fused and not) from the same weights, and the largest
    /// relative difference of a gradient between them reported; likewise with the fused CUDA
    /// kernels and without.
    pub check_fused: bool,
    /// RMSNorm, rotary embedding and SwiGLU as the fused CUDA kernels (`gpu::kernels`).
    pub fused_kernels: bool,
    /// AdamW with fp32 moments, or 8-bit moments (bitsandbytes' AdamW8bit).
    pub optimizer: Optimizer,
    /// Before timing, one step offloaded and one without checkpointing from the same weights,
    /// and the largest relative difference of a gradient between them reported.
    pub check_offload: bool,
    /// LoRA/DoRA target modules (PEFT's names, or `all-linear`).
    pub target_modules: Vec<String>,
    /// Selective recompute of the LoRA MLP node (`train::recompute`).
    pub recompute: Recompute,
    /// Before timing, count what one forward pass keeps for backward, layer by layer
    /// (`train::saved_tensors`), beside the planner's count.
    pub saved_tensors: bool,
    /// The frozen base in FP8 (`method.fp8`; LoRA and DoRA).
    pub fp8: bool,
}

/// One benchmark result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub system: &'static str,
    pub shape: String,
    pub method: String,
    pub seq: usize,
    pub batch: usize,
    /// Decoder layers built (the public shape's count unless `--layers` cut it).
    pub layers: u64,
    pub grad_checkpointing: Checkpointing,
    /// Selective recompute (`none`, `mlp`: the LoRA MLP node ran gate/up again in backward).
    pub recompute: &'static str,
    /// The frozen base was stored in FP8 (`--fp8`).
    pub fp8: bool,
    pub tokens_per_s: f64,
    /// Peak device memory allocated by tensors (CUDA; as `torch.cuda.max_memory_allocated`).
    pub peak_gib: Option<f64>,
    /// Peak memory the caching allocator reserved from the driver (allocated plus cached).
    pub reserved_gib: Option<f64>,
    /// Model FLOPs utilisation: achieved model FLOP/s over the measured bf16 matmul rate.
    pub mfu: Option<f64>,
    pub first_loss: f64,
    pub last_loss: f64,
    pub trainable_params: i64,
    /// With `check_fused`: max over the trainable tensors of ‖g_fused − g_separate‖ / ‖g_separate‖.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused_grad_rel_diff: Option<f64>,
    /// Whether the fused CUDA kernels ran (CUDA, enabled, and loaded); the system's name says
    /// whether they were asked for.
    pub fused_kernels: bool,
    /// Whether LoRA's q/k/v or MLP ran as the hand-derived block nodes (`model::lora_block`;
    /// off with `FTX_BLOCK_NODE=0`, or where they do not apply).
    pub block_nodes: bool,
    /// With `check_fused` on CUDA: as `fused_grad_rel_diff`, the fused kernels against libtorch's ops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernels_grad_rel_diff: Option<f64>,
    /// With `check_offload`: the same for offloaded checkpointing against none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offload_grad_rel_diff: Option<f64>,
    /// The optimizer (`adamw`, `adamw-8bit`).
    pub optimizer: &'static str,
    /// With checkpointing: layers per checkpointed segment (1: every layer's input kept; more
    /// when the host could not hold every offloaded input).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_segment: Option<usize>,
    /// Host memory the offloaded layer inputs took, GiB (as the planner counts them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_offload_gib: Option<f64>,
    /// What `ftx plan` predicts for this run's device memory, GiB (compare with `peak_gib`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub planned_gib: Option<f64>,
    /// With `saved_tensors`: the bytes each layer's forward pass keeps for backward, counted
    /// by storage (`train::saved_tensors`; the layer's stacked adapter factors included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saved_bytes_per_layer: Option<Vec<u64>>,
    /// With `saved_tensors`: what the planner counts for a layer (`plan::saved_per_token_and_layer`
    /// × tokens; bf16 activations, fp32 statistics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub planned_bytes_per_layer: Option<u64>,
    /// MoE shapes: the share of step time the experts' own work takes (their GEMMs, adapters
    /// and activation, forward and backward): after the timed steps, as many steps again with
    /// every expert the identity (`model::moe::expert_ablation`; routing, gather, weighting and
    /// scatter-add unchanged), and `1 − t_without / t_with`. Noise can push it slightly off
    /// where the experts are cheap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_gemm_share: Option<f64>,
    /// MoE shapes with adapters: how the experts' LoRA factors are stored, `stacked` (one
    /// tensor per layer and projection) or `per-expert` (`--per-expert-adapters`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_adapters: Option<&'static str>,
}

/// Whether some layer's LoRA q/k/v or MLP runs as the block nodes of `model::lora_block`.
pub(crate) fn block_nodes_run(model: &CausalLm) -> bool {
    let kind = model.embed_tokens.kind();
    model.layers.iter().any(|l| l.attention().runs_block_node(kind, true) || l.mlp().is_some_and(|m| m.runs_block_node(kind, true)))
}

/// A benchmark's random model with its adapters (or all weights training), optimizer and batch
/// of random tokens, on the device.
pub struct BenchRun {
    pub model: CausalLm,
    pub opt: AdamW,
    pub batch: batch::Batch,
    /// Trainable parameters.
    pub trainable: i64,
    /// The trainable tensors (handles), which the saved-tensor count leaves out.
    pub params: Vec<tch::Tensor>,
}

/// Builds what `s` describes (the device's memory confined to `s.memory_cap` once built).
pub fn prepare(s: &BenchSettings) -> Result<BenchRun> {
    anyhow::ensure!(
        !s.fp8 || ["lora", "dora"].contains(&s.method.as_str()),
        "--fp8 stores the frozen base of a LoRA or DoRA run in FP8; --method {} has none to store (qlora's base is NF4 already)",
        s.method
    );
    let cfg = ModelConfig::from_json(s.shape.to_hf_config(), std::path::Path::new(&s.shape.name))?;
    let vocab = cfg.vocab;
    let opts = LoadOptions { device: s.device, kind: s.kind };
    let mut model = if s.method == "qlora" {
        // Each layer quantised as soon as it is built: a 70b model is never whole in bf16.
        CausalLm::random_with(cfg, opts, 0, &mut |layer| peft::quantize_layer_nf4(layer, s.kind))
    } else {
        CausalLm::random(cfg, opts, 0)
    }
    .context("building the model")?;
    let named = if s.method == "full" {
        model.named_tensors().into_iter().map(|(n, t)| (n, t.set_requires_grad(true))).collect()
    } else {
        let attach = if s.stacked_experts { peft::attach } else { peft::attach_per_expert };
        attach(&mut model, &lora_settings(s)).map_err(anyhow::Error::msg)?
    };
    let trainable = named.iter().map(|(_, t)| t.numel() as i64).sum();
    let params: Vec<tch::Tensor> = named.iter().map(|(_, t)| t.shallow_clone()).collect();
    let adamw = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let opt = match s.optimizer {
        Optimizer::Adamw => AdamW::new(named, adamw),
        Optimizer::Adamw8bit => AdamW::new_8bit(named, adamw),
        Optimizer::Sgd => anyhow::bail!("ftx bench train runs adamw or adamw-8bit"),
    };
    tch::manual_seed(1);
    let ids = tch::Tensor::randint(vocab, [s.batch as i64, s.seq as i64], (Kind::Int64, Device::Cpu));
    let rows: Vec<TokenizedExample> = (0..s.batch as i64)
        .map(|r| {
            let v = Vec::<i64>::try_from(ids.get(r)).expect("ids");
            TokenizedExample { labels: v.clone(), ids: v }
        })
        .collect();
    let b = batch::pad(&rows.iter().collect::<Vec<_>>(), 0).to(s.device);
    if let Some(cap) = s.memory_cap {
        let held = crate::gpu::cap_memory(s.device, cap).map_err(|e| anyhow::anyhow!("capping device memory at {cap} bytes: {e}"))?;
        eprintln!("ftx bench: the run confined to {:.1} GiB ({:.1} GiB set aside)", gib(Some(cap)).unwrap_or(0.0), gib(Some(held)).unwrap_or(0.0));
    }
    Ok(BenchRun { model, opt, batch: b, trainable, params })
}

/// One optimizer step as `ftx bench train` times it: forward and backward, the clipped AdamW
/// update (under the ledger's `optimizer` phase), gradients cleared. Returns the mean loss.
pub fn train_step(model: &CausalLm, b: &batch::Batch, opt: &mut AdamW, step: usize, checkpointing: Checkpointing) -> f64 {
    let loss = forward_backward(model, b, b.n_targets as f64, StepPos { seed: 0, step, micro: 0 }, checkpointing);
    let _phase = crate::gpu::ledger::scope("ftx::phase::optimizer");
    let norm = opt.grad_norm();
    opt.step(2e-4, clip_coef(norm, 1.0));
    opt.zero_grad();
    loss / b.n_targets as f64
}

/// Runs `steps` optimizer steps (the first `warmup` untimed) on random tokens.
pub fn bench_train(s: &BenchSettings) -> Result<BenchResult> {
    let BenchRun { mut model, mut opt, batch: b, trainable, params } = prepare(s)?;
    let fused_grad_rel_diff = s.check_fused.then(|| fused_gradient_difference(&mut model, &b, &mut opt));
    model.set_fused_projections(s.fused);
    crate::train::recompute::apply(&mut model, s.recompute, &s.method, 0.0)?;
    let kernels_grad_rel_diff = (s.check_fused && s.device.is_cuda()).then(|| kernels_gradient_difference(&model, &b, &mut opt));
    crate::gpu::kernels::set_enabled(s.fused_kernels);
    let fused_kernels = crate::gpu::kernels::active_for(&model.embed_tokens);
    let block_nodes = block_nodes_run(&model);
    let saved_bytes_per_layer = if s.saved_tensors {
        let saved = crate::train::saved_tensors::saved_by_layer(&model, &b, &params)?;
        Some((0..model.layers.len() as i64).map(|l| crate::train::saved_tensors::bytes_of(&saved, l)).collect::<Vec<u64>>())
    } else {
        None
    };
    drop(params);
    let offload_grad_rel_diff = s.check_offload.then(|| offload_gradient_difference(&model, &b, &mut opt));
    crate::gpu::reset_peak_memory(s.device);
    let moe = model.config.moe.is_some();
    let mut losses = Vec::new();
    let mut t0 = Instant::now();
    let mut train_step = |step: usize| train_step(&model, &b, &mut opt, step, s.grad_checkpointing);
    for step in 0..s.steps {
        if step == s.warmup {
            sync(s.device);
            t0 = Instant::now();
        }
        losses.push(train_step(step));
    }
    sync(s.device);
    let dt = t0.elapsed().as_secs_f64();
    let timed = (s.steps - s.warmup).max(1);
    let (peak, reserved) = (crate::gpu::peak_allocated(s.device), crate::gpu::peak_reserved(s.device));
    let expert_gemm_share = moe.then(|| {
        // One untimed step, then as many as were timed, with the expert MLPs skipped.
        let _skip = crate::model::moe::expert_ablation::skip();
        train_step(s.steps);
        sync(s.device);
        let t = Instant::now();
        for step in 0..timed {
            train_step(s.steps + 1 + step);
        }
        sync(s.device);
        1.0 - t.elapsed().as_secs_f64() / dt
    });
    let plan = plan_of(s);
    let segment = s.grad_checkpointing.enabled().then_some(plan.request.segment as usize);
    let tokens_per_s = (s.batch * s.seq * timed) as f64 / dt;
    Ok(BenchResult {
        system: match (s.fused, s.fused_kernels) {
            (true, true) => "ftx",
            (true, false) => "ftx (no fused kernels)",
            (false, true) => "ftx (unfused)",
            (false, false) => "ftx (unfused, no fused kernels)",
        },
        shape: s.shape.name.clone(),
        method: s.method.clone(),
        seq: s.seq,
        batch: s.batch,
        layers: s.shape.layers,
        grad_checkpointing: s.grad_checkpointing,
        recompute: if crate::train::recompute::runs(&model) { Recompute::Mlp.name() } else { Recompute::None.name() },
        fp8: s.fp8,
        tokens_per_s,
        peak_gib: gib(peak),
        reserved_gib: gib(reserved),
        mfu: s.peak_flops.map(|peak| tokens_per_s * flops_per_token(s) / peak),
        first_loss: losses[0],
        last_loss: *losses.last().expect("steps > 0"),
        trainable_params: trainable,
        fused_grad_rel_diff,
        fused_kernels,
        block_nodes,
        kernels_grad_rel_diff,
        offload_grad_rel_diff,
        optimizer: s.optimizer.name(),
        checkpoint_segment: segment,
        host_offload_gib: (s.grad_checkpointing == Checkpointing::Offload).then(|| plan.host_offload_bytes() as f64 / (1u64 << 30) as f64),
        // The planner counts all-linear adapters only.
        planned_gib: if s.target_modules == ["all-linear"] { gib(Some(plan.total)) } else { None },
        saved_bytes_per_layer,
        planned_bytes_per_layer: s.saved_tensors.then(|| crate::plan::saved_per_token_and_layer(&plan.request) * (s.seq * s.batch) as u64),
        expert_gemm_share,
        expert_adapters: (moe && s.method != "full").then_some(if s.stacked_experts { "stacked" } else { "per-expert" }),
    })
}

/// One forward/backward pass with the fused CUDA kernels and one with libtorch's ops, from the
/// same weights and batch: the largest relative difference of a trainable tensor's gradient.
fn kernels_gradient_difference(model: &CausalLm, b: &batch::Batch, opt: &mut AdamW) -> f64 {
    let pos = StepPos { seed: 0, step: 0, micro: 0 };
    let mut grads = Vec::new();
    for on in [true, false] {
        crate::gpu::kernels::set_enabled(on);
        opt.zero_grad();
        forward_backward(model, b, b.n_targets as f64, pos, Checkpointing::Off);
        grads.push(opt.params.iter().map(|p| p.tensor.grad().to_kind(Kind::Float)).collect::<Vec<_>>());
    }
    opt.zero_grad();
    let norm = |t: &tch::Tensor| t.norm().double_value(&[]);
    grads[0].iter().zip(&grads[1]).map(|(f, u)| norm(&(f - u)) / norm(u).max(f64::MIN_POSITIVE)).fold(0.0, f64::max)
}

/// The planner's account of the run `s` describes, with the checkpointed segment the step
/// chooses for it.
pub fn plan_of(s: &BenchSettings) -> crate::plan::Plan {
    let method = s.method.parse().unwrap_or(crate::plan::Method::Lora);
    let mut req = crate::plan::PlanRequest::new(s.shape.clone(), method);
    req.seq_len = s.seq as u64;
    req.batch = s.batch as u64;
    req.grad_checkpointing = s.grad_checkpointing.enabled();
    req.offload = s.grad_checkpointing == Checkpointing::Offload;
    req.recompute_mlp = s.recompute == Recompute::Mlp;
    req.fp8_base = s.fp8;
    req.optimizer = s.optimizer;
    req.lora_rank = s.rank as u64;
    let input_bytes = (s.seq * s.batch) as u64 * s.shape.hidden * s.kind.elt_size_in_bytes() as u64;
    req.segment = checkpoint_segment(s.shape.layers as usize, input_bytes, s.grad_checkpointing, s.device) as u64;
    crate::plan::plan(&req)
}

/// One forward/backward pass with fused projections and one without, from the same weights and
/// batch: the largest relative difference of a trainable tensor's gradient (fp32 norms).
fn fused_gradient_difference(model: &mut CausalLm, b: &batch::Batch, opt: &mut AdamW) -> f64 {
    let mut grads = Vec::new();
    for fused in [true, false] {
        model.set_fused_projections(fused);
        grads.push(gradients(model, b, opt, Checkpointing::Off));
    }
    max_relative_difference(&grads[0], &grads[1])
}

/// One forward/backward pass offloaded (through the side stream where there is one) and one
/// without checkpointing, from the same weights and batch: the largest relative difference of
/// a trainable tensor's gradient. A copy that raced its compute would show here.
fn offload_gradient_difference(model: &CausalLm, b: &batch::Batch, opt: &mut AdamW) -> f64 {
    let offloaded = gradients(model, b, opt, Checkpointing::Offload);
    let plain = gradients(model, b, opt, Checkpointing::Off);
    max_relative_difference(&offloaded, &plain)
}

/// The trainable tensors' gradients (fp32) after one pass on `b`, the gradients zeroed after.
fn gradients(model: &CausalLm, b: &batch::Batch, opt: &mut AdamW, checkpointing: Checkpointing) -> Vec<tch::Tensor> {
    opt.zero_grad();
    forward_backward(model, b, b.n_targets as f64, StepPos { seed: 0, step: 0, micro: 0 }, checkpointing);
    let grads = opt.params.iter().map(|p| p.tensor.grad().to_kind(Kind::Float)).collect();
    opt.zero_grad();
    grads
}

/// max over the tensors of ‖a − b‖ / ‖b‖.
fn max_relative_difference(a: &[tch::Tensor], b: &[tch::Tensor]) -> f64 {
    let norm = |t: &tch::Tensor| t.norm().double_value(&[]);
    a.iter().zip(b).map(|(x, y)| norm(&(x - y)) / norm(y).max(f64::MIN_POSITIVE)).fold(0.0, f64::max)
}

/// The peers' benchmark setting: rank r, alpha 2r, no dropout, the projections `--target-modules`
/// names (default all-linear: all seven).
fn lora_settings(s: &BenchSettings) -> LoraSettings {
    LoraSettings {
        rank: s.rank,
        alpha: 2.0 * s.rank as f64,
        dropout: 0.0,
        target_modules: s.target_modules.clone(),
        rslora: false,
        dora: s.method == "dora",
        quantize_nf4: s.method == "qlora",
        quantize_fp8: s.fp8,
    }
}

/// Model FLOPs per trained token, as the peers' benchmark counts them: 2 per weight for the
/// forward pass, 2 more for the backward pass to the inputs, 2 more for weight gradients when
/// the base trains (full), plus causal attention's `6 · L · T · heads · head_dim`. Adapter
/// FLOPs are left out (under 1% at rank 16).
pub fn flops_per_token(s: &BenchSettings) -> f64 {
    let m = &s.shape;
    let attn_width = (m.heads * m.head_dim) as f64;
    let kv_width = (m.kv_heads * m.head_dim) as f64;
    let (h, i) = (m.hidden as f64, m.intermediate as f64);
    let mlp = match m.layout {
        // A token passes through its top-k experts and the router.
        crate::plan::Layout::Moe(moe) => (moe.top_k * 3 * m.hidden * moe.expert_intermediate + moe.experts * m.hidden) as f64,
        _ => 3.0 * h * i,
    };
    let per_layer = h * attn_width * 2.0 + h * kv_width * 2.0 + mlp;
    let weights = per_layer * m.layers as f64 + h * m.vocab as f64;
    let passes = if s.method == "full" { 6.0 } else { 4.0 };
    passes * weights + 6.0 * (m.layers as f64) * (s.seq as f64) * attn_width
}

fn gib(bytes: Option<u64>) -> Option<f64> {
    bytes.map(|b| b as f64 / (1u64 << 30) as f64)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Preference training steps (pairs of random sequences, LoRA, reference from disabled
/// adapters; the first half of each sequence is the prompt) with each of `losses`, run in
/// alternation step by step on identical copies, so machine noise hits them alike. Tokens/s
/// come from the median step time.
pub fn bench_preference(s: &BenchSettings, losses: Vec<(&'static str, crate::align::PreferenceLoss)>) -> Result<Vec<BenchResult>> {
    use crate::align::{PreferenceObjective, Reference};
    let cfg = ModelConfig::from_json(s.shape.to_hf_config(), std::path::Path::new(&s.shape.name))?;
    let vocab = cfg.vocab;
    let settings = lora_settings(s);
    tch::manual_seed(1);
    // `batch` pairs: rows alternate chosen, rejected; they share the prompt half.
    let half = (s.seq / 2) as i64;
    let random = |n: i64| Vec::<i64>::try_from(tch::Tensor::randint(vocab, [n], (Kind::Int64, Device::Cpu))).expect("ids");
    let mut rows: Vec<TokenizedExample> = Vec::new();
    for _ in 0..s.batch {
        let prompt = random(half);
        for _ in 0..2 {
            let answer = random(half);
            let labels = std::iter::repeat_n(crate::data::tokenize::IGNORE, half as usize).chain(answer.iter().copied()).collect();
            rows.push(TokenizedExample { ids: [prompt.clone(), answer].concat(), labels });
        }
    }
    let b = batch::pad(&rows.iter().collect::<Vec<_>>(), 0).to(s.device);
    let pairs: Vec<usize> = (0..s.batch).collect();
    let mut runs = Vec::new();
    for (name, loss) in losses {
        let mut model = CausalLm::random(cfg.clone(), LoadOptions { device: s.device, kind: s.kind }, 0).context("building the model")?;
        tch::manual_seed(2);
        let named = peft::attach(&mut model, &settings).map_err(anyhow::Error::msg)?;
        let trainable: i64 = named.iter().map(|(_, t)| t.numel() as i64).sum();
        let opt = AdamW::new(named, AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
        let reference = if loss.needs_reference() { Reference::AdaptersOff } else { Reference::None };
        runs.push((name, model, opt, PreferenceObjective { loss, params: Vec::new(), reference }, trainable, Vec::new(), Vec::new()));
    }
    crate::gpu::reset_peak_memory(s.device);
    for _ in 0..s.steps {
        for (_, model, opt, obj, _, times, losses) in runs.iter_mut() {
            sync(s.device);
            let t0 = Instant::now();
            let (loss, _) = obj.step(model, &b, &pairs, 1.0, true)?;
            let norm = opt.grad_norm();
            opt.step(5e-4, clip_coef(norm, 1.0));
            opt.zero_grad();
            sync(s.device);
            times.push(t0.elapsed().as_secs_f64());
            losses.push(loss);
        }
    }
    Ok(runs
        .into_iter()
        .map(|(system, model, _, _, trainable, times, losses)| {
            let mut t: Vec<f64> = times[s.warmup..].to_vec();
            t.sort_by(f64::total_cmp);
            BenchResult {
                system,
                shape: s.shape.name.clone(),
                method: format!("{}+preference", s.method),
                seq: s.seq,
                batch: s.batch,
                layers: s.shape.layers,
                grad_checkpointing: Checkpointing::Off,
                recompute: Recompute::None.name(),
                fp8: s.fp8,
                tokens_per_s: (2 * s.batch * s.seq) as f64 / t[t.len() / 2],
                // Both runs share the device: this is the peak of the pair.
                peak_gib: gib(crate::gpu::peak_allocated(s.device)),
                reserved_gib: gib(crate::gpu::peak_reserved(s.device)),
                mfu: None,
                first_loss: losses[0],
                last_loss: *losses.last().expect("steps > 0"),
                trainable_params: trainable,
                fused_grad_rel_diff: None,
                fused_kernels: crate::gpu::kernels::enabled() && s.device.is_cuda(),
                block_nodes: block_nodes_run(&model),
                saved_bytes_per_layer: None,
                planned_bytes_per_layer: None,
                kernels_grad_rel_diff: None,
                offload_grad_rel_diff: None,
                optimizer: "adamw",
                checkpoint_segment: None,
                host_offload_gib: None,
                planned_gib: None,
                expert_gemm_share: None,
                expert_adapters: None,
            }
        })
        .collect())
}
