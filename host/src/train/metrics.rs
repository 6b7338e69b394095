//! Training metrics: one JSON line per step (`metrics.jsonl`) and a loss-curve chart
//! (`loss.svg`) beside the checkpoints.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    /// Mean training loss per target token of this step (None for evaluation-only lines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_ppl: Option<f64>,
    /// Objective-specific metrics (e.g. a preference loss plugin's rewards and accuracy).
    #[serde(flatten, default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, f64>,
}

impl StepMetrics {
    /// A line holding only a validation result.
    pub fn eval(step: usize, loss: f64, ppl: Option<f64>, extra: std::collections::BTreeMap<String, f64>) -> StepMetrics {
        StepMetrics { step, loss: None, lr: None, grad_norm: None, tokens_per_s: None, eval_loss: Some(loss), eval_ppl: ppl, extra }
    }
}

/// Appends metrics and redraws the chart.
pub struct MetricsLog {
    /// `None` for a log that keeps records in memory only (the non-zero ranks of a run).
    path: Option<PathBuf>,
    pub records: Vec<StepMetrics>,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`, keeping only records up to `resume_step` (a resumed run
    /// rewrites what the interrupted one logged past its last checkpoint).
    pub fn open(dir: &Path, resume_step: usize) -> std::io::Result<MetricsLog> {
        let path = dir.join("metrics.jsonl");
        let records: Vec<StepMetrics> = match std::fs::read_to_string(&path) {
            Ok(t) => t.lines().filter_map(|l| serde_json::from_str(l).ok()).filter(|m: &StepMetrics| m.step <= resume_step).collect(),
            Err(_) => Vec::new(),
        };
        let text: String = records.iter().map(|r| serde_json::to_string(r).expect("serialises") + "\n").collect();
        crate::util::write_atomic(&path, text.as_bytes())?;
        Ok(MetricsLog { path: Some(path), records })
    }

    /// A log that writes nothing (the ranks other than 0 of a distributed run).
    pub fn discard() -> MetricsLog {
        MetricsLog { path: None, records: Vec::new() }
    }

    /// Appends one record (flushed at once, so a killed run keeps what it logged).
    pub fn push(&mut self, m: StepMetrics) -> std::io::Result<()> {
        if let Some(path) = &self.path {
            let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
            writeln!(f, "{}", serde_json::to_string(&m).expect("serialises"))?;
        }
        self.records.push(m);
        Ok(())
    }

    /// Draws training and validation loss against step into `path` (SVG).
    pub fn chart(&self, path: &Path, title: &str) -> Result<(), String> {
        let train: Vec<(f64, f64)> = self.records.iter().filter_map(|r| Some((r.step as f64, r.loss?))).collect();
        let eval: Vec<(f64, f64)> = self.records.iter().filter_map(|r| Some((r.step as f64, r.eval_loss?))).collect();
        line_chart(path, title, "step", "loss", &[("train loss", &train), ("validation loss", &eval)])
    }
}

/// A line chart of named series, as SVG (written atomically).
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[(&str, &[(f64, f64)])]) -> Result<(), String> {
    use plotters::prelude::*;
    let pts: Vec<&(f64, f64)> = series.iter().flat_map(|(_, s)| s.iter()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(|e| e.to_string())?;
        let colors = [BLUE, RED, GREEN, MAGENTA];
        for (i, (name, s)) in series.iter().enumerate().filter(|(_, (_, s))| !s.is_empty()) {
            let c = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(s.iter().copied(), c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            if s.len() < 30 {
                chart.draw_series(s.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(|e| e.to_string())?;
            }
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    crate::util::write_atomic(path, svg.as_bytes()).map_err(|e| e.to_string())
}

/// Grouped bars: for each metric (x), one bar per series (e.g. before / after), values in [0, 1].
pub fn bar_chart(path: &Path, title: &str, metrics: &[&str], series: &[(&str, Vec<f64>)]) -> Result<(), String> {
    let svg = bar_chart_svg(title, metrics, series, 1.05, "score")?;
    crate::util::write_atomic(path, svg.as_bytes()).map_err(|e| e.to_string())
}

/// Grouped bars as an SVG string: for each metric (x), one bar per series, on a y axis from 0
/// to `y_max` labelled `y_desc`.
pub fn bar_chart_svg(title: &str, metrics: &[&str], series: &[(&str, Vec<f64>)], y_max: f64, y_desc: &str) -> Result<String, String> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let n = metrics.len();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..n as f64, 0f64..y_max)
            .map_err(|e| e.to_string())?;
        let labels: Vec<String> = metrics.iter().map(|m| m.to_string()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.01 && i < labels.len() { labels[i].clone() } else { String::new() }
            })
            .y_desc(y_desc)
            .draw()
            .map_err(|e| e.to_string())?;
        let colors = [RGBColor(160, 160, 160), BLUE, RED, GREEN, MAGENTA, CYAN, RGBColor(230, 140, 0), BLACK];
        let width = 0.8 / series.len().max(1) as f64;
        for (k, (name, values)) in series.iter().enumerate() {
            let c = colors[k % colors.len()];
            chart
                .draw_series(values.iter().enumerate().map(|(i, &v)| {
                    let x0 = i as f64 + 0.1 + k as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.95, v)], c.filled())
                }))
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}
