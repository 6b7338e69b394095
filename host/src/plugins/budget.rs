//! Each plugin's time over a whole run: a budget its calls draw from, and what they took.
//!
//! The per-call time limit stops one runaway call; it does not stop a plugin that stays just
//! under it on every call (a loss spinning 4.4 s of a 5 s limit made a 0.46 s run take 31 s).
//! So every plugin instance also has a run budget: a call is refused once the budget is spent,
//! and a sandboxed call's deadline is the smaller of the call limit and what is left of the
//! budget. Native plugins are trusted and cannot be interrupted: their calls are timed and
//! refused once the budget is spent, but never stopped midway. What each plugin took is
//! reported in the run's summary ([`PluginTime`]).

use super::PluginError;
use std::time::Duration;

/// The time budget of one plugin over one run, unless the run's config says otherwise.
pub const DEFAULT_RUN_BUDGET: Duration = Duration::from_secs(600);

/// Share of a run's time above which the run's summary warns about a plugin.
const DOMINANT_SHARE: f64 = 0.5;

/// A plugin's calls and time over a run, for the run's summary and manifest.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PluginTime {
    pub plugin: String,
    /// Calls made (a call refused because the budget was spent is not made).
    pub calls: u64,
    /// Seconds its calls took: for a judge its own compute, for every other kind wall time,
    /// host calls included.
    pub seconds: f64,
    /// Its time budget for the run, in seconds.
    pub budget_seconds: f64,
}

/// The clock one plugin instance's calls run against.
#[derive(Debug, Clone)]
pub struct RunClock {
    budget: Duration,
    spent: Duration,
    calls: u64,
}

impl RunClock {
    /// A clock with `budget` to spend.
    pub fn new(budget: Duration) -> RunClock {
        RunClock { budget, spent: Duration::ZERO, calls: 0 }
    }

    /// Time left of the budget.
    pub fn remaining(&self) -> Duration {
        self.budget.saturating_sub(self.spent)
    }

    /// Refuses a call once the budget is spent.
    pub fn ensure(&self, plugin: &str, call: &str) -> Result<(), PluginError> {
        if self.remaining().is_zero() {
            return Err(self.exhausted(plugin, call));
        }
        Ok(())
    }

    /// The error of a call stopped or refused because the budget is spent.
    pub fn exhausted(&self, plugin: &str, call: &str) -> PluginError {
        PluginError::Budget { plugin: plugin.to_owned(), call: call.to_owned(), budget_s: self.budget.as_secs_f64(), calls: self.calls }
    }

    /// Counts one call that took `took`.
    pub fn charge(&mut self, took: Duration) {
        self.spent += took;
        self.calls += 1;
    }

    /// Marks the budget spent: a call was stopped at the budget's deadline, which epoch ticks
    /// reach up to a tick early.
    pub fn exhaust(&mut self) {
        self.spent = self.spent.max(self.budget);
    }

    /// What `plugin` has taken so far.
    pub fn usage(&self, plugin: &str) -> PluginTime {
        PluginTime { plugin: plugin.to_owned(), calls: self.calls, seconds: self.spent.as_secs_f64(), budget_seconds: self.budget.as_secs_f64() }
    }
}

/// A budget in seconds from a config value: positive and finite.
pub fn budget_from_secs(seconds: f64) -> Result<Duration, String> {
    match Duration::try_from_secs_f64(seconds) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("a plugin time budget must be a positive number of seconds, not {seconds}")),
    }
}

/// One line per plugin for a run's summary: calls, seconds, and share of the run's `run_seconds`.
pub fn summary_lines(times: &[PluginTime], run_seconds: f64) -> Vec<String> {
    times
        .iter()
        .map(|t| {
            let share = 100.0 * t.seconds / run_seconds.max(1e-9);
            let calls = if t.calls == 1 { "1 call".to_owned() } else { format!("{} calls", t.calls) };
            format!("plugin {}: {calls}, {:.2} s ({share:.0}% of the run; budget {} s)", t.plugin, t.seconds, t.budget_seconds)
        })
        .collect()
}

/// A warning for every plugin that took more than half of the run's time.
pub fn dominant_warnings(times: &[PluginTime], run_seconds: f64) -> Vec<String> {
    times
        .iter()
        .filter(|t| t.seconds > DOMINANT_SHARE * run_seconds && run_seconds > 0.0)
        .map(|t| {
            format!(
                "warning: plugin {} took {:.0}% of the run's time ({:.2} s of {:.2} s over {} calls)",
                t.plugin,
                100.0 * t.seconds / run_seconds,
                t.seconds,
                run_seconds,
                t.calls
            )
        })
        .collect()
}

/// Prints the summary lines on stdout and the warnings on stderr (the CLI's run summaries).
pub fn print_summary(times: &[PluginTime], run_seconds: f64) {
    for line in summary_lines(times, run_seconds) {
        println!("{line}");
    }
    for w in dominant_warnings(times, run_seconds) {
        eprintln!("ftx: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_budget_refuses_calls_and_names_the_plugin() {
        let mut c = RunClock::new(Duration::from_millis(300));
        assert!(c.ensure("p", "compute").is_ok());
        c.charge(Duration::from_millis(200));
        assert_eq!(c.remaining(), Duration::from_millis(100));
        c.charge(Duration::from_millis(200));
        let e = c.ensure("p", "compute").unwrap_err().to_string();
        assert!(e.contains("plugin p") && e.contains("time budget of 0.3 s") && e.contains("calls made: 2"), "{e}");
        assert_eq!(c.usage("p"), PluginTime { plugin: "p".into(), calls: 2, seconds: 0.4, budget_seconds: 0.3 });
    }

    #[test]
    fn budgets_must_be_positive_and_finite() {
        assert_eq!(budget_from_secs(1.5), Ok(Duration::from_millis(1500)));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(budget_from_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_summary_gives_each_plugin_its_share_and_warns_above_half() {
        let t = |p: &str, s: f64| PluginTime { plugin: p.into(), calls: 3, seconds: s, budget_seconds: 600.0 };
        let times = [t("slow", 3.0), t("fast", 0.4)];
        assert_eq!(summary_lines(&times, 4.0), ["plugin slow: 3 calls, 3.00 s (75% of the run; budget 600 s)", "plugin fast: 3 calls, 0.40 s (10% of the run; budget 600 s)"]);
        let w = dominant_warnings(&times, 4.0);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("plugin slow took 75%"), "{}", w[0]);
    }
}
