//! `ftx eval`: score one or more models (base, fine-tuned, checkpoints) on the same tasks and
//! write a comparison report.

use crate::eval::spec::{ChoiceSpec, GenerationSpec, JudgeSpec, Metric, ModelSpec, PerplexitySpec};
use crate::eval::{EvalSpec, RunOptions};
use crate::gpu::DeviceArg;
use crate::model::decoder::LoadOptions;
use anyhow::Context;
use std::io::IsTerminal;
use std::path::PathBuf;

/// Arguments of `ftx eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint folder or Hub id (org/name[@revision]) to evaluate (repeatable: each is a
    /// column of the report).
    #[arg(long)]
    pub model: Vec<PathBuf>,
    /// A PEFT adapter folder evaluated on the first --model, as NAME=PATH (NAME labels it in
    /// the report) or PATH (labelled by its run: runs/sft/final → sft). Repeatable: one entry
    /// each, beside the bare model.
    #[arg(long, value_name = "[NAME=]PATH")]
    pub adapter: Vec<String>,
    /// Tasks file (eval.toml): [[models]], [perplexity], [[generation]], [[choice]], [judge].
    #[arg(long)]
    pub tasks: Option<PathBuf>,
    /// Held-out data for perplexity (any format `ftx train` reads).
    #[arg(long)]
    pub perplexity: Option<PathBuf>,
    /// A generation task file (JSONL; repeatable).
    #[arg(long)]
    pub generation: Vec<PathBuf>,
    /// Metrics of the --generation tasks (comma-separated): exact_match, json_valid,
    /// json_schema, function_call, judge.
    #[arg(long, value_delimiter = ',', default_value = "exact_match")]
    pub metrics: Vec<String>,
    /// JSON Schema file for the json_schema metric of the --generation tasks.
    #[arg(long)]
    pub schema: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// A string that ends an answer (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// A multiple-choice task file (JSONL; repeatable).
    #[arg(long)]
    pub choice: Vec<PathBuf>,
    /// Judge plugin (.wasm) for the judge metric.
    #[arg(long)]
    pub judge: Option<PathBuf>,
    /// Checkpoint folder of the judge's language model (same as --judge-llm local:<dir>).
    #[arg(long, conflicts_with = "judge_llm")]
    pub judge_model: Option<PathBuf>,
    /// Where the judge's model runs: local:<checkpoint dir> or openai:<base url> (an
    /// OpenAI-compatible endpoint; give --judge-llm-model and, if it needs a key,
    /// --judge-api-key-env).
    #[arg(long)]
    pub judge_llm: Option<String>,
    /// The endpoint's model name (with --judge-llm openai:<url>).
    #[arg(long)]
    pub judge_llm_model: Option<String>,
    /// The environment variable that holds the endpoint's API key.
    #[arg(long)]
    pub judge_api_key_env: Option<String>,
    /// At most this many samples per task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output folder (report.html, report.json, samples.jsonl).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// Compute dtype: fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on GPU).
    #[arg(long)]
    pub dtype: Option<String>,
}

/// `NAME=PATH` or `PATH` (a name has no `/`; a path may hold `=`).
fn parse_adapter(s: &str) -> (Option<String>, PathBuf) {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => (Some(name.to_owned()), PathBuf::from(path)),
        _ => (None, PathBuf::from(s)),
    }
}

fn parse_metric(s: &str) -> anyhow::Result<Metric> {
    serde_json::from_value(serde_json::Value::String(s.trim().to_owned()))
        .map_err(|_| anyhow::anyhow!("unknown metric '{s}': use exact_match, json_valid, json_schema, function_call or judge"))
}

/// The spec the arguments describe: the tasks file, with the flags added.
pub fn spec_from_args(a: &EvalArgs) -> anyhow::Result<EvalSpec> {
    let mut spec = match &a.tasks {
        Some(p) => EvalSpec::load(p)?,
        None => EvalSpec::default(),
    };
    for m in &a.model {
        spec.models.push(ModelSpec { name: None, path: m.clone(), adapter: None });
    }
    if !a.adapter.is_empty() {
        let base = spec.models.first().map(|m| m.path.clone()).context("--adapter needs a --model to apply to")?;
        for ad in &a.adapter {
            let (name, path) = parse_adapter(ad);
            spec.models.push(ModelSpec { name, path: base.clone(), adapter: Some(path) });
        }
    }
    if let Some(p) = &a.perplexity {
        spec.perplexity = Some(PerplexitySpec { data: p.clone(), format: crate::data::DataFormat::Auto, max_seq_len: 1024, batch_size: 8 });
    }
    let metrics = a.metrics.iter().map(|m| parse_metric(m)).collect::<anyhow::Result<Vec<_>>>()?;
    for g in &a.generation {
        spec.generation.push(GenerationSpec {
            name: None,
            file: g.clone(),
            metrics: metrics.clone(),
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            seed: 0,
            stop: a.stop.clone(),
            schema: a.schema.clone(),
            chat: None,
        });
    }
    for c in &a.choice {
        spec.choice.push(ChoiceSpec { name: None, file: c.clone(), delimiter: " ".into(), batch_size: 8 });
    }
    let llm = a.judge_llm.clone().or_else(|| a.judge_model.as_ref().map(|d| format!("local:{}", d.display())));
    match (&a.judge, llm) {
        (Some(plugin), Some(llm)) => {
            spec.judge = Some(JudgeSpec {
                plugin: plugin.clone(),
                llm,
                model: a.judge_llm_model.clone(),
                api_key_env: a.judge_api_key_env.clone(),
                max_tokens: crate::plugins::judge::DEFAULT_MAX_TOKENS,
            });
        }
        (Some(_), None) => anyhow::bail!("--judge needs --judge-model <dir> (the model the judge asks)"),
        (None, Some(llm)) => match &mut spec.judge {
            Some(j) => j.llm = llm,
            None => anyhow::bail!("--judge-model needs --judge <plugin.wasm>"),
        },
        (None, None) => {}
    }
    if a.limit.is_some() {
        spec.limit = a.limit;
    }
    if a.out.is_some() {
        spec.output = a.out.clone();
    }
    Ok(spec)
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let spec = spec_from_args(&a)?;
    let device = a.device.resolve().map_err(anyhow::Error::msg)?;
    let kind = match &a.dtype {
        Some(d) => crate::model::parse_dtype(d)?,
        None if device.is_cuda() => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    };
    let out = spec.output.clone().unwrap_or_else(|| PathBuf::from("runs/eval"));
    let opts = RunOptions { load: LoadOptions { device, kind }, progress: std::io::stderr().is_terminal() };
    let report = crate::eval::run(&spec, &out, opts)?;
    print!("{}", summary_table(&report));
    println!("report: {} (and report.json, samples.jsonl; {:.1}s)", out.join("report.html").display(), report.seconds);
    Ok(())
}

/// The report's numbers as a text table, one row per model.
pub fn summary_table(r: &crate::eval::report::EvalReport) -> String {
    let cols = r.columns();
    let has_ppl = r.models.iter().any(|m| m.perplexity.is_some());
    let width = r.models.iter().map(|m| m.name.len()).max().unwrap_or(5).max(5);
    let mut s = format!("{:<width$}", "model");
    if has_ppl {
        s += &format!(" {:>12}", "perplexity");
    }
    for (t, m) in &cols {
        s += &format!(" {:>w$}", format!("{t}:{m}"), w = (t.len() + m.len() + 1).max(8));
    }
    s += "\n";
    for m in &r.models {
        s += &format!("{:<width$}", m.name);
        if has_ppl {
            s += &format!(" {:>12}", m.perplexity.as_ref().map_or("–".into(), |p| format!("{:.3}", p.perplexity)));
        }
        for (t, k) in &cols {
            let v = m.metric(t, k).map_or("–".into(), |v| format!("{:.1}%", v * 100.0));
            s += &format!(" {:>w$}", v, w = (t.len() + k.len() + 1).max(8));
        }
        s += "\n";
    }
    s
}
