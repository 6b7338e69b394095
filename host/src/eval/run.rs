//! Running an evaluation: every task file is read (and checked) first, then each model is
//! loaded in turn and scored on every task, then the judge grades the answers, then the
//! report is written. One progress bar covers it all.

use super::generation::{mean_metrics, GenerationTask};
use super::judging::Judge;
use super::likelihood::{multiple_choice, pad_id, perplexity, prepare_perplexity};
use super::report::{EvalReport, ModelReport, TaskScores};
use super::spec::{task_name, EvalSpec, Metric, ModelSpec};
use super::tasks::{read_choice, ChoiceSample};
use super::EvalError;
use crate::model::decoder::LoadOptions;
use crate::model::{CausalLm, TextTokenizer};
use crate::plugins::judge::JudgeSample;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// How to run.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Device and dtype of the evaluated models (and of a local judge model).
    pub load: LoadOptions,
    /// Draw a progress bar on the terminal.
    pub progress: bool,
}

struct ChoiceTask {
    name: String,
    delimiter: String,
    batch_size: usize,
    samples: Vec<ChoiceSample>,
}

/// Loads a model and, when it has one, its adapter.
pub fn load_model(m: &ModelSpec, opts: LoadOptions) -> Result<(CausalLm, TextTokenizer), EvalError> {
    let mut model = CausalLm::load(&m.path, opts)?;
    if let Some(a) = &m.adapter {
        crate::peft::load_adapter(&mut model, a).map_err(|e| EvalError::Other(format!("loading the adapter {}: {e}", a.display())))?;
    }
    let mut tok = TextTokenizer::load(&m.path, model.config.vocab)?;
    if let Some(a) = &m.adapter {
        // The chat template (and stop tokens) the adapter was trained with, when it chose one.
        crate::data::chat_templates::adopt(&mut tok, a).map_err(EvalError::Other)?;
    }
    Ok((model, tok))
}

/// Runs `spec` and writes report.html, report.json and samples.jsonl into `out`.
pub fn run(spec: &EvalSpec, out: &Path, opts: RunOptions) -> Result<EvalReport, EvalError> {
    run_with_judge(spec, out, opts, None)
}

/// [`run`], grading with `judge` when given (else with the one `spec.judge` describes, loaded
/// when a task asks for the judge metric).
pub fn run_with_judge(spec: &EvalSpec, out: &Path, opts: RunOptions, judge: Option<Judge>) -> Result<EvalReport, EvalError> {
    let t0 = std::time::Instant::now();
    spec.check().map_err(EvalError::Other)?;
    let gen_tasks: Vec<GenerationTask> = spec
        .generation
        .iter()
        .map(|g| GenerationTask::load(task_name(&g.name, &g.file), g.clone(), spec.limit))
        .collect::<Result<_, _>>()?;
    let choice_tasks: Vec<ChoiceTask> = spec
        .choice
        .iter()
        .map(|c| {
            Ok(ChoiceTask { name: task_name(&c.name, &c.file), delimiter: c.delimiter.clone(), batch_size: c.batch_size, samples: read_choice(&c.file, spec.limit)? })
        })
        .collect::<Result<_, EvalError>>()?;
    let mut names: Vec<&str> = gen_tasks.iter().map(|t| t.name.as_str()).chain(choice_tasks.iter().map(|t| t.name.as_str())).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(EvalError::Other(format!("two tasks are named '{}': give them distinct `name`s", w[0])));
    }
    let ppl_n = match &spec.perplexity {
        Some(p) => crate::data::read_examples(&p.data, p.format)?.len().min(spec.limit.unwrap_or(usize::MAX)),
        None => 0,
    };
    let judged: Vec<usize> = (0..gen_tasks.len()).filter(|&i| gen_tasks[i].spec.metrics.contains(&Metric::Judge)).collect();
    let per_model = ppl_n
        + choice_tasks.iter().map(|t| t.samples.len()).sum::<usize>()
        + gen_tasks.iter().map(|t| t.samples.len()).sum::<usize>()
        + judged.iter().map(|&i| gen_tasks[i].samples.len()).sum::<usize>();
    let bar = progress_bar(opts.progress, (per_model * spec.models.len()) as u64);

    let mut reports = Vec::new();
    let mut samples: Vec<serde_json::Value> = Vec::new();
    // Per model, per generation task: (answers, per-sample scores).
    let mut answers: Vec<Vec<(Vec<String>, Vec<BTreeMap<String, f64>>)>> = Vec::new();
    for m in &spec.models {
        let name = m.display_name();
        bar.set_message(format!("{name}: loading"));
        let (model, tok) = load_model(m, opts.load).map_err(|e| EvalError::Other(format!("model '{name}' ({}): {e}", m.path.display())))?;
        let mut report = ModelReport { name: name.clone(), path: m.path.clone(), adapter: m.adapter.clone(), perplexity: None, tasks: Vec::new() };
        if let Some(p) = &spec.perplexity {
            bar.set_message(format!("{name}: perplexity"));
            let data = prepare_perplexity(&tok, p, spec.limit)?;
            report.perplexity = Some(perplexity(&model, &data, p.batch_size, pad_id(&tok), |n| bar.inc(n as u64)));
        }
        for t in &choice_tasks {
            bar.set_message(format!("{name}: {}", t.name));
            let (scores, outcomes) = multiple_choice(&model, &tok, &t.samples, &t.delimiter, t.batch_size, |n| bar.inc(n as u64))
                .map_err(|e| EvalError::Other(format!("task {}: {e}", t.name)))?;
            for (s, o) in t.samples.iter().zip(&outcomes) {
                samples.push(json!({"model": name, "task": t.name, "line": s.line, "loglik": o.loglik, "pred": o.pred, "pred_norm": o.pred_norm, "gold": o.gold}));
            }
            let metrics = BTreeMap::from([("acc".to_string(), scores.acc), ("acc_norm".to_string(), scores.acc_norm)]);
            report.tasks.push(TaskScores { task: t.name.clone(), kind: "choice".into(), n: scores.n, metrics, judge_errors: 0 });
        }
        let mut model_answers = Vec::new();
        for t in &gen_tasks {
            bar.set_message(format!("{name}: {}", t.name));
            let a = t.answer(&model, &tok, || bar.inc(1))?;
            let scores = t.score(&a);
            model_answers.push((a, scores));
        }
        answers.push(model_answers);
        reports.push(report);
    }

    // The judge runs after the evaluated models are gone (one model in memory at a time).
    let mut grades: BTreeMap<(usize, usize), Vec<super::judging::Grade>> = BTreeMap::new();
    if let (Some(j), false) = (&spec.judge, judged.is_empty()) {
        bar.set_message("loading the judge");
        let mut judge = match judge {
            Some(given) => given,
            None => Judge::load(j, opts.load)?,
        };
        for (mi, m) in spec.models.iter().enumerate() {
            for &ti in &judged {
                bar.set_message(format!("{}: judging {}", m.display_name(), gen_tasks[ti].name));
                let t = &gen_tasks[ti];
                let js: Vec<JudgeSample> = t
                    .samples
                    .iter()
                    .zip(&answers[mi][ti].0)
                    .map(|(s, a)| JudgeSample { prompt: s.prompt.as_text(), response: a.clone(), reference: s.reference_text() })
                    .collect();
                grades.insert((mi, ti), judge.grade(&js, |n| bar.inc(n as u64)));
            }
        }
    }
    for (mi, report) in reports.iter_mut().enumerate() {
        for (ti, t) in gen_tasks.iter().enumerate() {
            let (a, mut scores) = std::mem::take(&mut answers[mi][ti]);
            let g = grades.remove(&(mi, ti));
            let mut errors = 0;
            for (i, (s, out)) in t.samples.iter().zip(&a).enumerate() {
                let mut rec = json!({"model": report.name, "task": t.name, "line": s.line, "prompt": s.prompt.as_text(), "output": out, "reference": s.reference_text()});
                match g.as_ref().map(|g| &g[i]) {
                    Some(Ok((score, rationale))) => {
                        scores[i].insert("judge".into(), *score);
                        rec["judge_rationale"] = json!(rationale);
                    }
                    Some(Err(e)) => {
                        errors += 1;
                        rec["judge_error"] = json!(e);
                    }
                    None => {}
                }
                rec["scores"] = json!(scores[i]);
                samples.push(rec);
            }
            report.tasks.push(TaskScores { task: t.name.clone(), kind: "generation".into(), n: t.samples.len(), metrics: mean_metrics(&scores), judge_errors: errors });
        }
    }
    bar.finish_and_clear();
    let report = EvalReport { models: reports, perplexity_data: spec.perplexity.as_ref().map(|p| p.data.clone()), seconds: t0.elapsed().as_secs_f64() };
    report.write(out, &samples).map_err(EvalError::Other)?;
    Ok(report)
}

fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} samples [{elapsed_precise}<{eta_precise}] {msg}") {
        bar.set_style(style);
    }
    bar
}
