//! `ftx demo`: the main job end to end on an embedded default, with nothing downloaded.
//!
//! 1. Generate a function-calling dataset (requests → JSON calls), split train / held-out.
//! 2. Build the base: a byte-level BPE tokenizer trained on the data, a tiny random Llama,
//!    pretrained (full fine-tuning, raw-text objective) on requests and calls as unpaired
//!    lines, so it knows the words and the JSON syntax but not which call answers which request.
//! 3. Score the base on the held-out requests.
//! 4. Train a LoRA adapter with `ftx train` on the chat-formatted pairs.
//! 5. Score base + adapter on the same held-out requests; print and chart the difference, and
//!    write the evaluation report (`ftx eval`'s report.html) comparing the two.

use crate::data::function_calls::{self, CallExample};
use crate::eval::{self, CallScores};
use crate::model::decoder::LoadOptions;
use crate::model::{CausalLm, ModelConfig, TextTokenizer};
use crate::recipes::train;
use crate::train::metrics::bar_chart;
use crate::train::TrainConfig;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// Arguments of `ftx demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Where the demo writes its data, model, run and report.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Optimizer steps of the LoRA run.
    #[arg(long, default_value_t = 1500)]
    pub steps: usize,
    /// Optimizer steps of the base model's pretraining.
    #[arg(long, default_value_t = 400)]
    pub pretrain_steps: usize,
    /// Held-out requests to score before and after.
    #[arg(long, default_value_t = 100)]
    pub heldout: usize,
    /// Optimizer steps of the ORPO preference stage after SFT (0 skips it).
    #[arg(long, default_value_t = 300)]
    pub orpo_steps: usize,
    /// Learning rate of the ORPO stage's fresh LoRA adapter.
    #[arg(long, default_value_t = 5e-4)]
    pub orpo_lr: f64,
    /// Use every core and the CPU's widest kernels: faster on a big machine, but the figures
    /// then vary from machine to machine (the README gives the spread). By default the demo
    /// pins its arithmetic so that it prints the same figures everywhere.
    #[arg(long)]
    pub all_cores: bool,
}

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let numerics = if a.all_cores { "every core, the CPU's own kernels".to_owned() } else { pin_numerics() };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    println!("ftx demo → {} ({numerics})", a.out.display());

    // 1. Data: distinct requests for training and held-out scoring.
    let all = function_calls::generate(3000, 2026);
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<CallExample> = all.into_iter().filter(|e| seen.insert(e.request.clone())).collect();
    let (heldout, train_set) = unique.split_at(a.heldout.min(unique.len() / 4));
    let data_dir = a.out.join("data");
    write_jsonl(&data_dir.join("train.jsonl"), train_set)?;
    write_jsonl(&data_dir.join("heldout.jsonl"), heldout)?;
    println!("[1/5] data: {} training and {} held-out function-call requests", train_set.len(), heldout.len());

    // 2. Tokenizer and base model: random init, then pretraining on unpaired text.
    let random = a.out.join("random-init");
    build_base(&random, train_set)?;
    let cfg = ModelConfig::load(&random)?;
    println!("[2/5] base: a {}-layer Llama ({:.2}M parameters) with a {}-token BPE tokenizer, pretrained on unpaired text", cfg.layers, cfg.num_params() as f64 / 1e6, cfg.vocab);
    let mut lines: Vec<String> = train_set.iter().flat_map(|e| [e.request.clone(), e.call.to_string()]).collect();
    lines.sort(); // unpaired: no request sits next to its call
    let text: String = lines.iter().map(|l| serde_json::json!({"text": l}).to_string() + "\n").collect();
    crate::util::write_atomic(&data_dir.join("pretrain.jsonl"), text.as_bytes())?;
    let pretrain = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nformat = \"text\"\nmax_seq_len = 96\npacking = true\n[method]\nkind = \"full\"\n[train]\nlr = 2e-3\nmax_steps = {}\nbatch_size = 8\nwarmup_steps = 20\nsave_every = 100\noutput_dir = \"{}\"\n",
        random.display(),
        data_dir.join("pretrain.jsonl").display(),
        a.pretrain_steps,
        a.out.join("pretrain").display()
    );
    crate::util::write_atomic(&a.out.join("pretrain.toml"), pretrain.as_bytes())?;
    let pre = train(&TrainConfig::parse(&pretrain, &[]).map_err(anyhow::Error::msg)?)?;
    println!("      pretraining loss {:.3} → {:.3} ({} steps, {:.0}s)", pre.first_loss.unwrap_or(f64::NAN), pre.last_loss.unwrap_or(f64::NAN), pre.steps, pre.seconds);
    let base = pre.final_dir;

    // 3. Before.
    let cases: Vec<_> = heldout.iter().map(|e| (e.prompt(), e.call.clone())).collect();
    let opts = LoadOptions { device: Device::Cpu, kind: Kind::Float };
    let model = CausalLm::load(&base, opts)?;
    let tok = TextTokenizer::load(&base, cfg.vocab)?;
    let (before, _) = eval::function_calls(&model, &tok, &cases, 48)?;
    drop(model);
    println!("[3/5] base model on held-out: exact match {:.0}%", before.exact_match * 100.0);

    // 4. Train a LoRA adapter.
    let run_dir = a.out.join("lora");
    let config_text = format!(
        r#"[model]
path = "{base}"
[data]
train = "{train}"
validation = "{heldout}"
max_seq_len = 96
packing = true
[method]
kind = "lora"
rank = 16
alpha = 32
target_modules = ["all-linear"]
[train]
lr = 3e-3
max_steps = {steps}
batch_size = 8
schedule = "cosine"
warmup_steps = 20
weight_decay = 0.0
eval_every = 50
save_every = 100
output_dir = "{out}"
"#,
        base = base.display(),
        train = data_dir.join("train.jsonl").display(),
        heldout = data_dir.join("heldout.jsonl").display(),
        steps = a.steps,
        out = run_dir.display()
    );
    crate::util::write_atomic(&a.out.join("ftx.toml"), config_text.as_bytes())?;
    println!("[4/5] training a LoRA adapter (config: {})", a.out.join("ftx.toml").display());
    let report = train(&TrainConfig::parse(&config_text, &[]).map_err(anyhow::Error::msg)?)?;
    println!(
        "      train loss {:.3} → {:.3}, held-out loss {:.3} → {:.3} ({} steps, {:.0}s)",
        report.first_loss.unwrap_or(f64::NAN),
        report.last_loss.unwrap_or(f64::NAN),
        report.eval_before.unwrap_or(f64::NAN),
        report.eval_after.unwrap_or(f64::NAN),
        report.steps,
        report.seconds
    );

    // 5. After: the evaluation report compares base and base + adapter on the held-out set.
    let eval_dir = a.out.join("eval");
    let eval_report = final_report(&eval_dir, &base, &[("base + LoRA".to_string(), report.final_dir.clone())], &data_dir.join("heldout.jsonl"))?;
    let call_scores = |m: &crate::eval::report::ModelReport| CallScores {
        exact_match: m.metric("function calls", "call_exact").unwrap_or(0.0),
        valid_call: m.metric("function calls", "call_valid").unwrap_or(0.0),
        name_accuracy: m.metric("function calls", "call_name").unwrap_or(0.0),
        n: heldout.len(),
    };
    let after = call_scores(&eval_report.models[1]);
    println!("[5/5] base + adapter on held-out: exact match {:.0}%", after.exact_match * 100.0);
    print_table(&before, &after);
    let samples = std::fs::read_to_string(eval_dir.join("samples.jsonl")).with_context(|| format!("reading {}", eval_dir.join("samples.jsonl").display()))?;
    let outputs: Vec<String> = samples
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["model"] == "base + LoRA")
        .filter_map(|v| v["output"].as_str().map(str::to_owned))
        .collect();
    for (e, out) in heldout.iter().zip(&outputs).take(3) {
        println!("  {:<40} → {}", e.request, out);
    }
    print!("{}", super::eval::summary_table(&eval_report));
    let names = ["exact match", "valid call", "right function"];
    let values = |s: &CallScores| vec![s.exact_match, s.valid_call, s.name_accuracy];
    bar_chart(&a.out.join("eval.svg"), "held-out function calls: base vs LoRA", &names, &[("base", values(&before)), ("base + LoRA", values(&after))])
        .map_err(anyhow::Error::msg)?;
    let preference = preference_stage(&a, &base, &report.final_dir, train_set, heldout)?;
    let summary = serde_json::json!({"before": before, "after": after, "train": report, "preference": preference, "seconds": t0.elapsed().as_secs_f64()});
    crate::util::write_atomic(&a.out.join("report.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    println!("charts: {} and {}", run_dir.join("loss.svg").display(), a.out.join("eval.svg").display());
    println!("evaluation report: {}", eval_dir.join("report.html").display());
    println!("report: {} ({:.0}s in all)", a.out.join("report.json").display(), t0.elapsed().as_secs_f64());
    Ok(())
}

/// Pins what makes floating-point results differ from one machine to another, so the demo
/// prints the same figures on every x86-64 CPU with AVX2: one intra-op thread (one reduction
/// order), ATen's AVX2 kernels even where AVX-512 is there (`ATEN_CPU_CAPABILITY`), and the
/// AVX2 code paths of MKL's GEMMs (`MKL_CBWR`) and oneDNN (`ONEDNN_MAX_CPU_ISA`). libtorch and
/// its libraries read these once, at their first operation: this runs before any.
fn pin_numerics() -> String {
    for (key, value) in [("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")] {
        std::env::set_var(key, value);
    }
    tch::set_num_threads(1);
    "1 thread, AVX2 kernels: the same figures on every machine; --all-cores for speed".to_owned()
}

/// The demo's last stage: `ftx eval` on the base and each `(name, adapter folder)` against the
/// held-out function-call set (perplexity on it as training scores it, and the model's own
/// calls scored for exact match, JSON validity, schema conformance and call accuracy), written
/// as report.html, report.json and samples.jsonl into `dir`. The task is named "function calls".
pub fn final_report(dir: &Path, base: &Path, adapters: &[(String, PathBuf)], heldout: &Path) -> Result<crate::eval::report::EvalReport> {
    use crate::eval::spec::{EvalSpec, GenerationSpec, Metric, ModelSpec, PerplexitySpec};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let schema = serde_json::json!({
        "type": "object", "required": ["name", "arguments"], "additionalProperties": false,
        "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}},
    });
    let schema_path = dir.join("call.schema.json");
    crate::util::write_atomic(&schema_path, serde_json::to_string_pretty(&schema)?.as_bytes())?;
    let mut models = vec![ModelSpec { name: Some("base".into()), path: base.to_owned(), adapter: None }];
    models.extend(adapters.iter().map(|(name, dir)| ModelSpec { name: Some(name.clone()), path: base.to_owned(), adapter: Some(dir.clone()) }));
    let spec = EvalSpec {
        output: Some(dir.to_owned()),
        limit: None,
        models,
        perplexity: Some(PerplexitySpec { data: heldout.to_owned(), format: crate::data::DataFormat::Chat, max_seq_len: 96, batch_size: 8 }),
        generation: vec![GenerationSpec {
            name: Some("function calls".into()),
            file: heldout.to_owned(),
            metrics: vec![Metric::ExactMatch, Metric::JsonValid, Metric::JsonSchema, Metric::FunctionCall],
            max_new_tokens: 48,
            temperature: 0.0,
            seed: 0,
            stop: Vec::new(),
            schema: Some(schema_path),
            chat: Some(true),
        }],
        choice: Vec::new(),
        judge: None,
    };
    let opts = crate::eval::RunOptions { load: LoadOptions { device: Device::Cpu, kind: Kind::Float }, progress: std::io::IsTerminal::is_terminal(&std::io::stderr()) };
    Ok(crate::eval::run(&spec, dir, opts)?)
}

/// The ORPO stage (see demo_orpo), with its before/after win rates printed.
fn preference_stage(a: &DemoArgs, base: &Path, adapter: &Path, train_set: &[CallExample], heldout: &[CallExample]) -> Result<Option<super::demo_orpo::PreferenceReport>> {
    if a.orpo_steps == 0 {
        return Ok(None);
    }
    println!("[+] preference stage: ORPO (orpo plugin) on the SFT model's own mistakes (right call chosen, its wrong call rejected), {} steps", a.orpo_steps);
    let r = super::demo_orpo::preference_stage(&a.out, base, adapter, train_set, heldout, a.orpo_steps, a.orpo_lr)?;
    println!(
        "      {} training pairs ({} of the SFT model's own mistakes); loss {:.3} → {:.3} ({:.0}s)",
        r.train_pairs,
        r.on_policy_pairs,
        r.train.first_loss.unwrap_or(f64::NAN),
        r.train.last_loss.unwrap_or(f64::NAN),
        r.train.seconds
    );
    println!(
        "      held-out: right call preferred over the SFT model's own mistake {:.1}% → {:.1}% by summed log-prob, {:.1}% → {:.1}% by mean ({} pairs)",
        r.win_rate_before * 100.0,
        r.win_rate_after * 100.0,
        r.mean_win_rate_before * 100.0,
        r.mean_win_rate_after * 100.0,
        r.heldout_pairs,
    );
    println!(
        "      held-out greedy answers, SFT → SFT + ORPO: exact match {:.1}% → {:.1}%, arguments {:.1}% → {:.1}%, right function {:.1}% → {:.1}%",
        r.calls_before.exact_match * 100.0,
        r.calls_after.exact_match * 100.0,
        r.calls_before.arguments * 100.0,
        r.calls_after.arguments * 100.0,
        r.calls_before.name_accuracy * 100.0,
        r.calls_after.name_accuracy * 100.0,
    );
    Ok(Some(r))
}

fn print_table(before: &CallScores, after: &CallScores) {
    println!("\n  {:<16} {:>8} {:>12}", "held-out metric", "base", "base + LoRA");
    for (name, b, a) in [
        ("exact match", before.exact_match, after.exact_match),
        ("valid call", before.valid_call, after.valid_call),
        ("right function", before.name_accuracy, after.name_accuracy),
    ] {
        println!("  {:<16} {:>7.1}% {:>11.1}%", name, b * 100.0, a * 100.0);
    }
    println!();
}

fn write_jsonl(path: &Path, examples: &[CallExample]) -> Result<()> {
    let text: String = examples.iter().map(|e| serde_json::json!({"messages": e.messages()}).to_string() + "\n").collect();
    crate::util::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Writes a Hugging Face checkpoint folder: BPE tokenizer trained on the data, ChatML
/// template, and a random tiny Llama sized to the vocabulary.
fn build_base(dir: &Path, examples: &[CallExample]) -> Result<()> {
    if dir.join("model.safetensors").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let corpus: Vec<String> = examples.iter().flat_map(|e| [e.request.clone(), e.call.to_string(), function_calls::SYSTEM.to_owned()]).collect();
    let tok = train_bpe(&corpus, 512)?;
    tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("saving the tokenizer: {e}"))?;
    let id = |t: &str| tok.token_to_id(t).expect("special token");
    let vocab = tok.get_vocab_size(true).div_ceil(8) * 8;
    let tok_cfg = serde_json::json!({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": null,
        "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast",
    });
    crate::util::write_atomic(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&tok_cfg)?.as_bytes())?;
    let gen = serde_json::json!({"eos_token_id": [id("<|im_end|>"), id("<|endoftext|>")], "pad_token_id": id("<|endoftext|>")});
    crate::util::write_atomic(&dir.join("generation_config.json"), serde_json::to_string_pretty(&gen)?.as_bytes())?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
        "vocab_size": vocab, "tie_word_embeddings": true, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 512,
        "bos_token_id": null, "eos_token_id": id("<|im_end|>"), "torch_dtype": "float32",
    });
    crate::util::write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    let cfg = ModelConfig::from_json(config, &dir.join("config.json"))?;
    let model = CausalLm::random(cfg, LoadOptions { device: Device::Cpu, kind: Kind::Float }, 7)?;
    crate::model::weights::write_safetensors(&dir.join("model.safetensors"), &model.named_tensors())?;
    Ok(())
}

/// A byte-level BPE tokenizer trained on `corpus`, with the ChatML special tokens.
fn train_bpe(corpus: &[String], vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder};
    let specials: Vec<AddedToken> = SPECIALS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))))
        .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(false, true, true))))
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.train(&mut trainer, corpus.iter()).map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    tok.add_special_tokens(&specials);
    Ok(tokenizers::Tokenizer::from(tok))
}
