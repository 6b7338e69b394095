//! The comparison report: `report.json` (every number), `samples.jsonl` (every answer and
//! its scores) and `report.html` (self-contained: tables and inline SVG bar charts).

use super::likelihood::Perplexity;
use crate::train::metrics::bar_chart_svg;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Scores of one task for one model.
#[derive(Debug, Clone, Serialize)]
pub struct TaskScores {
    pub task: String,
    /// `generation` or `choice`.
    pub kind: String,
    /// Samples scored.
    pub n: usize,
    /// Metric means (in [0, 1]).
    pub metrics: BTreeMap<String, f64>,
    /// Samples the judge could not grade (left out of the judge mean).
    #[serde(skip_serializing_if = "is_zero")]
    pub judge_errors: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Everything measured for one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub name: String,
    pub path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<Perplexity>,
    pub tasks: Vec<TaskScores>,
}

impl ModelReport {
    /// The mean of `metric` on `task`, if measured.
    pub fn metric(&self, task: &str, metric: &str) -> Option<f64> {
        self.tasks.iter().find(|t| t.task == task)?.metrics.get(metric).copied()
    }
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub models: Vec<ModelReport>,
    /// Held-out file of the perplexity, if measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity_data: Option<PathBuf>,
    pub seconds: f64,
}

impl EvalReport {
    /// (task, metric) columns in first-seen order.
    pub fn columns(&self) -> Vec<(String, String)> {
        let mut cols: Vec<(String, String)> = Vec::new();
        for m in &self.models {
            for t in &m.tasks {
                for k in t.metrics.keys() {
                    let c = (t.task.clone(), k.clone());
                    if !cols.contains(&c) {
                        cols.push(c);
                    }
                }
            }
        }
        cols
    }

    /// Writes report.json, samples.jsonl and report.html into `dir`.
    pub fn write(&self, dir: &Path, samples: &[serde_json::Value]) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
        let json = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        let p = dir.join("report.json");
        crate::util::write_atomic(&p, json.as_bytes()).map_err(|e| io(&p, e))?;
        let lines: String = samples.iter().map(|s| s.to_string() + "\n").collect();
        let p = dir.join("samples.jsonl");
        crate::util::write_atomic(&p, lines.as_bytes()).map_err(|e| io(&p, e))?;
        let p = dir.join("report.html");
        crate::util::write_atomic(&p, self.html(samples)?.as_bytes()).map_err(|e| io(&p, e))
    }

    /// The bar charts: task metrics (0..1) and, when measured, perplexity.
    fn charts(&self) -> Result<Vec<String>, String> {
        let mut charts = Vec::new();
        let cols = self.columns();
        if !cols.is_empty() {
            let labels: Vec<String> = cols.iter().map(|(t, m)| format!("{t}: {m}")).collect();
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            let series: Vec<(&str, Vec<f64>)> =
                self.models.iter().map(|m| (m.name.as_str(), cols.iter().map(|(t, k)| m.metric(t, k).unwrap_or(0.0)).collect())).collect();
            charts.push(bar_chart_svg("task metrics", &labels, &series, 1.05, "score")?);
        }
        if self.models.iter().any(|m| m.perplexity.is_some()) {
            let series: Vec<(&str, Vec<f64>)> =
                self.models.iter().map(|m| (m.name.as_str(), vec![m.perplexity.as_ref().map_or(0.0, |p| p.perplexity)])).collect();
            let top = series.iter().map(|s| s.1[0]).filter(|v| v.is_finite()).fold(1.0f64, f64::max) * 1.1;
            charts.push(bar_chart_svg("held-out perplexity (lower is better)", &["perplexity"], &series, top, "perplexity")?);
        }
        Ok(charts)
    }

    /// The report as one self-contained HTML page.
    pub fn html(&self, samples: &[serde_json::Value]) -> Result<String, String> {
        let cols = self.columns();
        let rows: Vec<serde_json::Value> = self
            .models
            .iter()
            .map(|m| {
                let cells: Vec<String> = cols.iter().map(|(t, k)| m.metric(t, k).map_or("–".into(), |v| format!("{:.1}%", v * 100.0))).collect();
                serde_json::json!({
                    "name": m.name,
                    "source": match &m.adapter { Some(a) => format!("{} + {}", m.path.display(), a.display()), None => m.path.display().to_string() },
                    "perplexity": m.perplexity.as_ref().map(|p| format!("{:.4}", p.perplexity)),
                    "nll": m.perplexity.as_ref().map(|p| format!("{:.4}", p.mean_nll)),
                    "targets": m.perplexity.as_ref().map(|p| p.n_targets),
                    "cells": cells,
                    "errors": m.tasks.iter().filter(|t| t.judge_errors > 0).map(|t| format!("{}: {} samples the judge could not grade", t.task, t.judge_errors)).collect::<Vec<_>>(),
                })
            })
            .collect();
        let examples: Vec<&serde_json::Value> = samples.iter().filter(|s| s.get("output").is_some()).take(50 * self.models.len().max(1)).collect();
        let mut env = minijinja::Environment::new();
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
        env.add_template("report", TEMPLATE).map_err(|e| e.to_string())?;
        let ctx = minijinja::context! {
            models => rows,
            columns => cols.iter().map(|(t, m)| format!("{t}: {m}")).collect::<Vec<_>>(),
            has_ppl => self.models.iter().any(|m| m.perplexity.is_some()),
            ppl_data => self.perplexity_data.as_ref().map(|p| p.display().to_string()),
            charts => self.charts()?,
            examples => examples,
            seconds => format!("{:.1}", self.seconds),
        };
        env.get_template("report").and_then(|t| t.render(ctx)).map_err(|e| e.to_string())
    }
}

const TEMPLATE: &str = r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ftx eval report</title>
<style>
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.text { text-align: left; font-family: monospace; white-space: pre-wrap; overflow-wrap: anywhere; word-break: break-word; max-width: 40em; }
table.samples { table-layout: fixed; width: 100%; }
table.samples th:nth-child(1), table.samples th:nth-child(2) { width: 8em; }
table.samples th:nth-child(6) { width: 10em; }
.chart { margin: 1em 0; }
.note { color: #a33; }
</style></head><body>
<h1>ftx eval report</h1>
<p>{{ models|length }} model(s), {{ seconds }} s.</p>
<h2>Models</h2>
<table><tr><th>model</th><th>weights</th></tr>
{% for m in models %}<tr><td>{{ m.name }}</td><td class="text">{{ m.source }}</td></tr>
{% endfor %}</table>
{% if has_ppl %}<h2>Perplexity</h2>
<p>Held-out data: {{ ppl_data }} (loss on the tokens training scores).</p>
<table><tr><th>model</th><th>perplexity</th><th>mean NLL</th><th>target tokens</th></tr>
{% for m in models %}<tr><td>{{ m.name }}</td><td>{{ m.perplexity or "–" }}</td><td>{{ m.nll or "–" }}</td><td>{{ m.targets or "–" }}</td></tr>
{% endfor %}</table>{% endif %}
{% if columns %}<h2>Task metrics</h2>
<table><tr><th>model</th>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for m in models %}<tr><td>{{ m.name }}</td>{% for v in m.cells %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% for m in models %}{% for e in m.errors %}<p class="note">{{ m.name }} — {{ e }}</p>{% endfor %}{% endfor %}{% endif %}
<h2>Charts</h2>
{% for c in charts %}<div class="chart">{{ c|safe }}</div>
{% endfor %}
{% if examples %}<h2>Sample answers</h2>
<table class="samples"><tr><th>model</th><th>task</th><th>prompt</th><th>answer</th><th>reference</th><th>scores</th></tr>
{% for s in examples %}<tr><td class="text">{{ s.model }}</td><td class="text">{{ s.task }}</td><td class="text">{{ s.prompt }}</td><td class="text">{{ s.output }}</td><td class="text">{{ s.reference or "" }}</td><td class="text">{% for k, v in s.scores|items %}{{ k }}={{ v }} {% endfor %}</td></tr>
{% endfor %}</table>{% endif %}
</body></html>
"#;
