//! Training metrics: one JSON line per step (`metrics.jsonl`), streamed to disk as the run goes
//! (the history is never held in memory), and a loss-curve chart (`loss.svg`) beside the
//! checkpoints.
//!
//! Keys: the host's own (`step`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, `eval_loss`,
//! `eval_ppl`, and for RL `reward`, `kl`, …), and a plugin's metrics under its own namespace,
//! `plugin/<plugin>/<metric>` (validation values: `eval/plugin/<plugin>/<metric>`), which no
//! host key starts with. JSON has no NaN or infinity: such values are written as the strings
//! `"NaN"`, `"inf"` and `"-inf"`, and read back as the numbers they stand for.

use super::tracking::{RunStatus, Tracker};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    /// Mean training loss per target token of this step (None for evaluation-only lines).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number::opt")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number::opt")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number::opt")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number::opt")]
    pub tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number::opt")]
    pub eval_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "number::opt")]
    pub eval_ppl: Option<f64>,
    /// Objective-specific metrics: the host's (an RL run's rewards, KL, …) and, under
    /// [`plugin_key`], the plugins' (e.g. a preference loss plugin's rewards and accuracy).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty", with = "number::map")]
    pub extra: BTreeMap<String, f64>,
}

impl StepMetrics {
    /// A line holding only a validation result; `extra` (validation metrics) gets the `eval/` prefix.
    pub fn eval(step: usize, loss: f64, ppl: Option<f64>, extra: BTreeMap<String, f64>) -> StepMetrics {
        let extra = extra.into_iter().map(|(k, v)| (format!("eval/{k}"), v)).collect();
        StepMetrics { step, loss: None, lr: None, grad_norm: None, tokens_per_s: None, eval_loss: Some(loss), eval_ppl: ppl, extra }
    }
}

impl StepMetrics {
    /// Every value of the line under its metrics.jsonl key (`loss`, `lr`, …, then `extra`'s).
    pub fn values(&self) -> Vec<(String, f64)> {
        let named = [
            ("loss", self.loss),
            ("lr", self.lr),
            ("grad_norm", self.grad_norm),
            ("tokens_per_s", self.tokens_per_s),
            ("eval_loss", self.eval_loss),
            ("eval_ppl", self.eval_ppl),
        ];
        let own = named.into_iter().filter_map(|(k, v)| Some((k.to_owned(), v?)));
        own.chain(self.extra.iter().map(|(k, v)| (k.clone(), *v))).collect()
    }
}

/// The key of metric `metric` reported by plugin `plugin`: `plugin/<plugin>/<metric>`.
pub fn plugin_key(plugin: &str, metric: &str) -> String {
    format!("plugin/{plugin}/{metric}")
}

/// A metric value as `metrics.jsonl` holds it: a number, or `"NaN"`, `"inf"`, `"-inf"` (and
/// `null`, which ftx before 0.1 wrote for any of those, as NaN). `None` for anything else.
pub fn read_number(v: &serde_json::Value) -> Option<f64> {
    number::from_json(v)
}

/// Non-finite numbers as strings, both ways.
mod number {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;
    use std::collections::BTreeMap;

    pub fn to_json(v: f64) -> Value {
        match serde_json::Number::from_f64(v) {
            Some(n) => Value::Number(n),
            None if v.is_nan() => Value::from("NaN"),
            None if v > 0.0 => Value::from("inf"),
            None => Value::from("-inf"),
        }
    }

    pub fn from_json(v: &Value) -> Option<f64> {
        match v {
            Value::Number(n) => n.as_f64(),
            Value::Null => Some(f64::NAN),
            Value::String(s) => match s.as_str() {
                "NaN" | "nan" => Some(f64::NAN),
                "inf" | "+inf" | "Infinity" => Some(f64::INFINITY),
                "-inf" | "-Infinity" => Some(f64::NEG_INFINITY),
                _ => None,
            },
            _ => None,
        }
    }

    pub mod opt {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(x) => s.serialize_some(&to_json(*x)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
            let v = Value::deserialize(d)?;
            from_json(&v).map(Some).ok_or_else(|| serde::de::Error::custom(format!("{v} is not a number")))
        }
    }

    pub mod map {
        use super::*;

        pub fn serialize<S: Serializer>(m: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(m.iter().map(|(k, v)| (k, to_json(*v))))
        }

        /// Keys whose value is not a number (a newer ftx's objects, say) are left out.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
            let m = BTreeMap::<String, Value>::deserialize(d)?;
            Ok(m.into_iter().filter_map(|(k, v)| Some((k, from_json(&v)?))).collect())
        }
    }
}

/// Appends metrics to `metrics.jsonl` and reads them back for charts; passes every line on to
/// the run's trackers (`train.report_to`: TensorBoard, MLflow).
pub struct MetricsLog {
    /// `None` for a log that writes nothing (the ranks other than 0 of a distributed run).
    path: Option<PathBuf>,
    trackers: Vec<Box<dyn Tracker>>,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`. A resumed run (from `resume_step`) keeps every earlier line as
    /// it is, and drops only those its interrupted predecessor logged past the checkpoint (they
    /// are logged again). A line that is not a metrics record is kept too, with a warning. The
    /// file is streamed through, not read into memory, and replaced atomically.
    pub fn open(dir: &Path, resume_step: usize) -> std::io::Result<MetricsLog> {
        let path = dir.join("metrics.jsonl");
        match std::fs::File::open(&path) {
            Ok(f) => keep_until(&path, f, resume_step)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => crate::util::write_atomic(&path, b"")?,
            Err(e) => return Err(e),
        }
        Ok(MetricsLog { path: Some(path), trackers: Vec::new() })
    }

    /// A log that writes nothing (the ranks other than 0 of a distributed run).
    pub fn discard() -> MetricsLog {
        MetricsLog { path: None, trackers: Vec::new() }
    }

    /// The same log, every record also sent to `trackers`.
    pub fn tracked(mut self, trackers: Vec<Box<dyn Tracker>>) -> MetricsLog {
        self.trackers = trackers;
        self
    }

    /// Appends one record (flushed at once, so a killed run keeps what it logged) and hands it
    /// to the trackers.
    pub fn push(&mut self, m: StepMetrics) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let mut f = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
        writeln!(f, "{}", serde_json::to_string(&m).expect("metrics serialise"))?;
        if !self.trackers.is_empty() {
            let values = m.values();
            self.trackers.iter_mut().for_each(|t| t.log(m.step, &values));
        }
        Ok(())
    }

    /// Ends the trackers' run with `status` (a log dropped without it ends them as failed).
    pub fn finish(&mut self, status: RunStatus) {
        self.trackers.drain(..).for_each(|mut t| t.finish(status));
    }

    /// The (step, value) points of each of `keys` (finite values only), read back from the file.
    pub fn series(&self, keys: &[&str]) -> std::io::Result<Vec<Vec<(f64, f64)>>> {
        let mut out = vec![Vec::new(); keys.len()];
        let Some(path) = &self.path else { return Ok(out) };
        for line in std::io::BufReader::new(std::fs::File::open(path)?).split(b'\n') {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line?) else { continue };
            let Some(step) = v.get("step").and_then(serde_json::Value::as_u64) else { continue };
            for (k, points) in keys.iter().zip(&mut out) {
                if let Some(x) = v.get(*k).and_then(read_number).filter(|x| x.is_finite()) {
                    points.push((step as f64, x));
                }
            }
        }
        Ok(out)
    }

    /// Draws training and validation loss against step into `path` (SVG).
    pub fn chart(&self, path: &Path, title: &str) -> Result<(), String> {
        let file = self.path.as_deref().unwrap_or(Path::new("(discarded metrics)"));
        let s = self.series(&["loss", "eval_loss"]).map_err(|e| format!("{}: {e}", file.display()))?;
        line_chart(path, title, "step", "loss", &[("train loss", &s[0]), ("validation loss", &s[1])])
    }
}

impl Drop for MetricsLog {
    fn drop(&mut self) {
        self.finish(RunStatus::Failed);
    }
}

/// Rewrites `path` (open as `file`) with its lines up to `resume_step`, through a temporary
/// file beside it.
fn keep_until(path: &Path, file: std::fs::File, resume_step: usize) -> std::io::Result<()> {
    #[derive(Deserialize)]
    struct Step {
        step: usize,
    }
    let tmp = path.with_file_name(format!(".metrics.jsonl.tmp-{}", std::process::id()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let mut unreadable = Vec::new();
    for (i, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Step>(&line) {
            Ok(s) if s.step > resume_step => continue,
            Ok(_) => {}
            Err(_) => unreadable.push(i + 1),
        }
        out.write_all(&line)?;
        out.write_all(b"\n")?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if !unreadable.is_empty() {
        let lines: Vec<String> = unreadable.iter().take(5).map(usize::to_string).collect();
        let more = if unreadable.len() > 5 { format!(" and {} more", unreadable.len() - 5) } else { String::new() };
        eprintln!("ftx: warning: {}: line(s) {}{more} are not metrics records; kept as they are", path.display(), lines.join(", "));
    }
    Ok(())
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

pub use super::bar_chart::bar_chart_svg;

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: usize, extra: &[(&str, f64)]) -> StepMetrics {
        let extra = extra.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        StepMetrics { step, loss: Some(0.5), lr: Some(1e-3), grad_norm: Some(f64::NAN), tokens_per_s: None, eval_loss: None, eval_ppl: None, extra }
    }

    #[test]
    fn non_finite_values_are_written_as_strings_and_read_back() {
        let m = line(3, &[("plugin/p/nan", f64::NAN), ("plugin/p/inf", f64::INFINITY), ("plugin/p/ninf", f64::NEG_INFINITY), ("kl", 0.25)]);
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"step":3,"loss":0.5,"lr":0.001,"grad_norm":"NaN","kl":0.25,"plugin/p/inf":"inf","plugin/p/nan":"NaN","plugin/p/ninf":"-inf"}"#
        );
        let back: StepMetrics = serde_json::from_str(&text).unwrap();
        assert!(back.grad_norm.unwrap().is_nan() && back.extra["plugin/p/nan"].is_nan());
        assert_eq!((back.extra["plugin/p/inf"], back.extra["plugin/p/ninf"], back.extra["kl"]), (f64::INFINITY, f64::NEG_INFINITY, 0.25));
        // What ftx wrote before: null for a non-finite value.
        let old: StepMetrics = serde_json::from_str(r#"{"step":1,"loss":null,"rewards/x":null}"#).unwrap();
        assert!(old.loss.unwrap().is_nan() && old.extra["rewards/x"].is_nan());
    }

    #[test]
    fn a_resume_keeps_every_earlier_line_verbatim_and_drops_only_later_ones() {
        let d = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(d.path(), 0).unwrap();
        for s in 1..=5 {
            log.push(line(s, &[("plugin/p/m", if s % 2 == 0 { f64::NAN } else { s as f64 })])).unwrap();
        }
        let path = d.path().join("metrics.jsonl");
        // A line no reader understands, and a torn last line without its newline.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n{\"step\": 6, \"lo").unwrap();
        let before = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = before.lines().collect();
        MetricsLog::open(d.path(), 3).unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        assert_eq!(after.lines().collect::<Vec<_>>(), [lines[0], lines[1], lines[2], "not json", r#"{"step": 6, "lo"#]);
        assert!(after.ends_with('\n'));
        let log = MetricsLog::open(d.path(), 3).unwrap();
        let s = log.series(&["loss", "plugin/p/m"]).unwrap();
        assert_eq!(s[0], [(1.0, 0.5), (2.0, 0.5), (3.0, 0.5)]);
        assert_eq!(s[1], [(1.0, 1.0), (3.0, 3.0)], "the NaN of step 2 is no point of a chart");
    }
}
