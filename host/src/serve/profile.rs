//! Opt-in timing of the model thread's loop by phase (`FTX_SERVE_PROFILE=1`): where a
//! scheduler step's time goes — taking jobs and admitting them, prompt prefill, the decode
//! forward, picking tokens (sampling on the device and the copy back of the ids), and
//! emitting (detokenising, stop strings, events). Logged through `tracing` (info) every
//! ten seconds while busy and once more when the model thread ends, with how many decode steps
//! replayed a CUDA graph ([`super::graphs`]) and ran eagerly, and the captures' time so far.
//!
//! The device runs asynchronously, so while profiling each phase ends with a device
//! synchronisation: a phase is charged the device work it queued. Off (the default), every
//! call is a branch on a bool and no clock is read.

use super::graphs::GraphStats;
use std::time::{Duration, Instant};
use tch::Device;

/// The phases of a scheduler step.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// Taking jobs from the queue, admission, metrics.
    Schedule = 0,
    /// Prompt chunks through the model, and their first tokens.
    Prefill = 1,
    /// The batched decode forward.
    Forward = 2,
    /// Token choice: constraint masks, sampling on the device, the ids' copy back.
    Sample = 3,
    /// Accepting tokens: detokenising, stop strings, events to the clients.
    Emit = 4,
}

const NAMES: [&str; 5] = ["schedule", "prefill", "decode forward", "sample", "emit"];

/// Time per phase over some steps.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    phase: [Duration; 5],
    /// Scheduler steps that ran the model.
    steps: u64,
    /// Decode steps and the rows they decoded.
    decode_steps: u64,
    decode_rows: u64,
}

impl Totals {
    fn line(&self, what: &str, wall: Duration, graphs: &GraphStats) -> String {
        let per_step = |d: Duration| if self.steps == 0 { 0.0 } else { d.as_secs_f64() * 1e3 / self.steps as f64 };
        let phases: Vec<String> = NAMES.iter().zip(self.phase).map(|(n, d)| format!("{n} {:.3}", per_step(d))).collect();
        let total: Duration = self.phase.iter().sum();
        let batch = if self.decode_steps == 0 { 0.0 } else { self.decode_rows as f64 / self.decode_steps as f64 };
        format!(
            "serve profile ({what}, {:.1} s): {} steps, {} decode steps of {batch:.1} rows on average; ms per step: {}; total {:.3} ({:.0} decoded tokens/s); since start: {} decode steps by CUDA graph, {} eager, {} graphs captured in {:.0} ms",
            wall.as_secs_f64(),
            self.steps,
            self.decode_steps,
            phases.join(", "),
            per_step(total),
            self.decode_rows as f64 / wall.as_secs_f64().max(1e-9),
            graphs.replays,
            graphs.eager,
            graphs.captures,
            graphs.capture_time.as_secs_f64() * 1e3,
        )
    }
}

/// The model thread's phase timer.
pub struct Profile {
    on: bool,
    device: Device,
    window: Totals,
    all: Totals,
    window_start: Instant,
    start: Instant,
    graphs: GraphStats,
}

/// How often the running figures are logged.
const EVERY: Duration = Duration::from_secs(10);

impl Profile {
    /// On when `FTX_SERVE_PROFILE` is set to anything but `0` or empty.
    pub fn from_env(device: Device) -> Profile {
        let on = std::env::var("FTX_SERVE_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
        Profile::new(on, device)
    }

    /// A timer that measures only when `on`.
    pub fn new(on: bool, device: Device) -> Profile {
        let now = Instant::now();
        Profile { on, device, window: Totals::default(), all: Totals::default(), window_start: now, start: now, graphs: GraphStats::default() }
    }

    /// Whether it measures.
    pub fn on(&self) -> bool {
        self.on
    }

    /// A phase starts now (`None` when off).
    pub fn begin(&self) -> Option<Instant> {
        self.on.then(|| {
            self.sync();
            Instant::now()
        })
    }

    /// The phase begun at `start` ends: its device work is waited for and its time charged.
    pub fn end(&mut self, phase: Phase, start: Option<Instant>) {
        let Some(start) = start else { return };
        self.sync();
        let d = start.elapsed();
        self.window.phase[phase as usize] += d;
        self.all.phase[phase as usize] += d;
    }

    /// One scheduler step that ran the model ended, having decoded `rows` sequences (0: prefill
    /// only); logs the last window's figures when it is due.
    pub fn step(&mut self, rows: usize) {
        if !self.on {
            return;
        }
        for t in [&mut self.window, &mut self.all] {
            t.steps += 1;
            if rows > 0 {
                t.decode_steps += 1;
                t.decode_rows += rows as u64;
            }
        }
        let wall = self.window_start.elapsed();
        if wall >= EVERY {
            tracing::info!("{}", self.window.line("last window", wall, &self.graphs));
            self.window = Totals::default();
            self.window_start = Instant::now();
        }
    }

    /// The whole run's figures (`None` when off).
    pub fn summary(&self) -> Option<String> {
        self.on.then(|| self.all.line("whole run", self.start.elapsed(), &self.graphs))
    }

    /// The decode graphs' counts so far (reported with the next lines).
    pub fn graphs(&mut self, stats: &GraphStats) {
        self.graphs = *stats;
    }

    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(s) = self.summary() {
            tracing::info!("{s}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off, nothing is measured; on, each phase is charged the time spent in it and a step's
    /// mean divides by the steps.
    #[test]
    fn phases_are_charged_only_when_on() {
        let mut off = Profile::new(false, Device::Cpu);
        let s = off.begin();
        assert!(s.is_none());
        off.end(Phase::Forward, s);
        off.step(3);
        assert!(off.summary().is_none());

        let mut on = Profile::new(true, Device::Cpu);
        let s = on.begin();
        std::thread::sleep(Duration::from_millis(20));
        on.end(Phase::Emit, s);
        on.step(4);
        on.step(0);
        assert!(on.all.phase[Phase::Emit as usize] >= Duration::from_millis(20));
        assert_eq!(on.all.phase[Phase::Forward as usize], Duration::ZERO);
        assert_eq!((on.all.steps, on.all.decode_steps, on.all.decode_rows), (2, 1, 4));
        let line = on.summary().unwrap();
        assert!(line.contains("2 steps, 1 decode steps of 4.0 rows"), "{line}");
        // 20 ms or more over 2 steps: at least 10 ms per step in emit.
        let emit: f64 = line.split("emit ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
        assert!(emit >= 10.0, "{line}");
    }
}
