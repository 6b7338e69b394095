//! What a plugin may report as metrics: a bounded number of short, plain names per call. The host
//! files them under the plugin's own namespace (`plugin/<name>/<metric>` in `metrics.jsonl`, see
//! `train::metrics::plugin_key`), so they can neither take the place of the host's own keys
//! (`step`, `loss`, …) nor grow the metrics file without bound.

use super::PluginError;

/// Metrics one call may report.
pub const MAX_METRICS: usize = 64;
/// Bytes of one metric name.
pub const MAX_METRIC_NAME: usize = 64;

/// Checks the names of the metrics one call reported: at most [`MAX_METRICS`], each 1 to
/// [`MAX_METRIC_NAME`] bytes of ASCII letters, digits, `_`, `-`, `.` and `/`, no name twice.
pub fn check_names<'a>(plugin: &str, call: &str, names: impl ExactSizeIterator<Item = &'a str>) -> Result<(), PluginError> {
    let invalid = |problem: String| PluginError::Invalid { plugin: plugin.to_owned(), call: call.to_owned(), problem };
    if names.len() > MAX_METRICS {
        return Err(invalid(format!("reported {} metrics; a call may report at most {MAX_METRICS}", names.len())));
    }
    let mut seen = std::collections::HashSet::new();
    for name in names {
        let plain = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b));
        if name.is_empty() || name.len() > MAX_METRIC_NAME || !plain {
            let shown: String = name.chars().take(MAX_METRIC_NAME).flat_map(char::escape_default).collect();
            return Err(invalid(format!(
                "reported a metric named \"{shown}\"{} ({} bytes); a metric name is 1 to {MAX_METRIC_NAME} bytes of ASCII letters, digits, '_', '-', '.' and '/'",
                if name.chars().count() > MAX_METRIC_NAME { "…" } else { "" },
                name.len()
            )));
        }
        if !seen.insert(name) {
            return Err(invalid(format!("reported the metric \"{name}\" twice")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_short_distinct_names_pass_and_others_are_refused_by_name() {
        let ok = ["rewards/accuracy", "log_odds", "clip-ratio.mean", "loss"];
        assert!(check_names("dpo", "compute", ok.into_iter()).is_ok());
        let long = "x".repeat(MAX_METRIC_NAME + 1);
        let e = check_names("p", "compute", [long.as_str()].into_iter()).unwrap_err().to_string();
        assert!(e.contains("plugin p: compute") && e.contains("65 bytes") && e.contains("1 to 64 bytes"), "{e}");
        let e = check_names("p", "compute", ["a\u{1b}[2J"].into_iter()).unwrap_err().to_string();
        assert!(e.contains("a\\u{1b}[2J") && !e.contains('\u{1b}'), "{e}");
        assert!(check_names("p", "compute", [""].into_iter()).is_err());
        assert!(check_names("p", "compute", ["a", "a"].into_iter()).unwrap_err().to_string().contains("\"a\" twice"));
        let many: Vec<String> = (0..=MAX_METRICS).map(|i| format!("m{i}")).collect();
        let e = check_names("p", "compute", many.iter().map(String::as_str)).unwrap_err().to_string();
        assert!(e.contains("reported 65 metrics") && e.contains("at most 64"), "{e}");
    }
}
