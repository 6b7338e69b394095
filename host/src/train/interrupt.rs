//! Ctrl-C and SIGTERM during a training run: the first signal asks the run to stop once the
//! current step is done (the driver writes a checkpoint, prints the command that resumes and
//! ends with [`Interrupted`]); a second one ends the process at once, keeping the checkpoints
//! already written.
//!
//! The handler only touches atomics (and, for the second signal, `write(2)` and `_exit(2)`,
//! both async-signal-safe); the driver polls [`requested`] between steps. Under data
//! parallelism the ranks agree on the stopping step through a collective (see
//! `recipes::sft`), so they checkpoint the same step.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// The first stopping signal received since [`install`] (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Stopping signals received since [`install`].
static COUNT: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if COUNT.fetch_add(1, Ordering::SeqCst) == 0 {
        SIGNAL.store(sig, Ordering::SeqCst);
        const MSG: &[u8] = b"\nftx: stopping after this step and writing a checkpoint (press Ctrl-C again to stop at once)\n";
        // SAFETY: write(2) is async-signal-safe; the buffer is static.
        unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
        return;
    }
    const MSG: &[u8] = b"\nftx: stopped at once (second signal); the checkpoints already written are kept\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(128 + sig);
    }
}

/// While alive, SIGINT and SIGTERM ask the run to stop after the current step; when the last
/// guard is dropped the previous handlers are back. (Guards nest: runs in one process, such as
/// tests, share the handler.)
pub struct SignalGuard(());

/// Live guards, and the handlers the first one replaced.
static INSTALLED: std::sync::Mutex<(usize, Vec<(libc::c_int, libc::sigaction)>)> = std::sync::Mutex::new((0, Vec::new()));

/// Installs the stopping handler for SIGINT and SIGTERM and clears any earlier request.
/// SIGINT stays ignored in a process started with it ignored.
pub fn install() -> SignalGuard {
    let mut installed = INSTALLED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    installed.0 += 1;
    if installed.0 > 1 {
        return SignalGuard(());
    }
    SIGNAL.store(0, Ordering::SeqCst);
    COUNT.store(0, Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler only does
        // async-signal-safe work; SA_RESTART keeps blocking calls from failing with EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, &action, &mut old) != 0 {
                continue;
            }
            // A process started with SIGINT ignored (a background job of a script) keeps
            // ignoring it, as shells expect of their commands; SIGTERM still stops it.
            if sig == libc::SIGINT && old.sa_sigaction == libc::SIG_IGN {
                libc::sigaction(sig, &old, std::ptr::null_mut());
                continue;
            }
            installed.1.push((sig, old));
        }
    }
    SignalGuard(())
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        let mut installed = INSTALLED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        installed.0 -= 1;
        if installed.0 == 0 {
            for (sig, old) in installed.1.drain(..) {
                // SAFETY: restores the action sigaction(2) returned.
                unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
            }
        }
    }
}

/// The signal that asked the run to stop, if one did.
pub fn requested() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Whether the run stops after this step, and on which signal. Under data parallelism the
/// ranks agree (a signal any rank received stops them all after the same step; SIGINT wins
/// over SIGTERM for the exit status): one small all-reduce per step.
pub fn agreed_stop(ddp: Option<&super::ddp::Ddp>) -> Result<Option<i32>, crate::dist::DistError> {
    let local = requested();
    let Some(d) = ddp else { return Ok(local) };
    let votes = d.sum(&[f64::from(u8::from(local == Some(libc::SIGINT))), f64::from(u8::from(local.is_some_and(|s| s != libc::SIGINT)))])?;
    Ok(if votes[0] > 0.0 {
        Some(libc::SIGINT)
    } else if votes[1] > 0.0 {
        Some(libc::SIGTERM)
    } else {
        None
    })
}

/// "SIGINT" / "SIGTERM" / "signal N".
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT (Ctrl-C)".into(),
        libc::SIGTERM => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
}

/// The command line of this process, quoted for a POSIX shell: run again from the same
/// folder, it resumes the run from its newest checkpoint.
pub fn resume_command() -> String {
    let args: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    shlex::try_join(args.iter().map(String::as_str)).unwrap_or_else(|_| args.join(" "))
}

/// A run stopped by a signal after writing a checkpoint: the CLI prints it and exits with
/// `128 + signal` (130 for Ctrl-C, 143 for SIGTERM).
#[derive(Debug, thiserror::Error)]
#[error("{}", self.message())]
pub struct Interrupted {
    /// The signal that stopped the run.
    pub signal: i32,
    /// Optimizer steps (or RL rollouts) done and saved.
    pub step: usize,
    /// Steps the run plans.
    pub total: usize,
    /// The checkpoint written for `step` (None on the ranks that do not write it).
    pub checkpoint: Option<PathBuf>,
    /// The command that resumes the run.
    pub command: String,
    /// The folder the command must run in.
    pub cwd: PathBuf,
}

impl Interrupted {
    /// A run stopped by `signal` after `step` of `total` steps, its checkpoint in `checkpoint`.
    pub fn new(signal: i32, step: usize, total: usize, checkpoint: Option<&Path>) -> Interrupted {
        Interrupted {
            signal,
            step,
            total,
            checkpoint: checkpoint.map(Path::to_path_buf),
            command: resume_command(),
            cwd: std::env::current_dir().unwrap_or_default(),
        }
    }

    /// The process exit status: 128 + the signal, as a shell reports a process it stopped.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }

    fn message(&self) -> String {
        let saved = self.checkpoint.as_ref().map_or(String::new(), |c| format!("; checkpoint saved in {}", c.display()));
        format!(
            "stopped by {} after step {} of {}{saved}\nftx: to resume, run (in {}):\n  {}",
            signal_name(self.signal),
            self.step,
            self.total,
            self.cwd.display(),
            self.command
        )
    }
}

/// The ranks a launcher started all stopped on a signal, as it asked (rank 0 of a training run
/// printed its checkpoint and the command that resumes).
#[derive(Debug, thiserror::Error)]
#[error("every rank stopped on {}", signal_name(*.0))]
pub struct RanksStopped(pub i32);

impl RanksStopped {
    /// The process exit status: 128 + the signal.
    pub fn exit_code(&self) -> i32 {
        128 + self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_step_the_checkpoint_and_the_command() {
        let i = Interrupted {
            signal: libc::SIGINT,
            step: 4,
            total: 12,
            checkpoint: Some("runs/x/checkpoints/step-0000004".into()),
            command: "ftx train --config 'my run.toml'".into(),
            cwd: "/work".into(),
        };
        let m = i.to_string();
        assert!(m.contains("SIGINT") && m.contains("after step 4 of 12") && m.contains("runs/x/checkpoints/step-0000004"), "{m}");
        assert!(m.ends_with("\n  ftx train --config 'my run.toml'"), "{m}");
        assert_eq!(i.exit_code(), 130);
    }
}
