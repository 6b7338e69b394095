//! `--nproc-per-node N` (with torchrun's `--nnodes`, `--node-rank`, `--master-addr`,
//! `--master-port`): ftx starts its local ranks itself, as torchrun would — the same command
//! again, with torchrun's variables set — forwards Ctrl-C and SIGTERM to them, and stops them
//! all as soon as one fails, naming it.
//!
//! The ranks run in a process group of their own, so a Ctrl-C at the terminal reaches the
//! launcher only, which forwards each signal once: on the first the ranks agree on a step,
//! checkpoint it and exit (130 for SIGINT), and the launcher waits for them; a second one
//! stops them at once. A launcher that dies takes its ranks down (they get SIGTERM).

use super::{DistEnv, DistError};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long stopped ranks get to exit after SIGTERM before they are killed.
const GRACE: Duration = Duration::from_secs(10);

/// torchrun's launch options.
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Start this many ranks on this machine (one per GPU; on the CPU, Gloo processes).
    /// Leave it out when torchrun, srun or another launcher starts the ranks.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Machines in the run; each runs the same command with its own `--node-rank`.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nnodes: usize,
    /// This machine's index among `--nnodes` (0 hosts the rendezvous).
    #[arg(long, default_value_t = 0, value_name = "I")]
    pub node_rank: usize,
    /// Address of the machine with `--node-rank 0`.
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    pub master_addr: String,
    /// Port of the rendezvous store on `--master-addr`.
    #[arg(long, default_value_t = 29500, value_name = "PORT")]
    pub master_port: u16,
}

/// What the process should do after [`LaunchArgs::launch`].
#[derive(Debug, PartialEq, Eq)]
pub enum Launched {
    /// This process is a rank (or a single-process run): do the work here.
    RunHere,
    /// This process started the ranks and they all finished successfully.
    Done,
    /// This process started the ranks, passed them a stopping signal (this one) and they all
    /// stopped as asked (after checkpointing the same step, on the first signal).
    Stopped(i32),
}

/// The newest signal the launcher received, and how many it received.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn note_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

impl LaunchArgs {
    /// Without `--nproc-per-node`, or inside a rank: [`Launched::RunHere`] (after checking that
    /// the environment agrees with the flags). Otherwise starts and supervises the local ranks.
    pub fn launch(&self) -> Result<Launched, DistError> {
        let Some(nproc) = self.nproc_per_node else { return Ok(Launched::RunHere) };
        if nproc == 0 || self.nnodes == 0 || self.node_rank >= self.nnodes {
            return Err(DistError::Config(format!(
                "--nproc-per-node {nproc} --nnodes {} --node-rank {}: need at least one process and node, and a node rank below --nnodes",
                self.nnodes, self.node_rank
            )));
        }
        let world = nproc * self.nnodes;
        if let Some(env) = DistEnv::from_env()? {
            if env.world_size != world || env.local_world_size != nproc {
                return Err(DistError::Config(format!(
                    "WORLD_SIZE={} and LOCAL_WORLD_SIZE={} from the environment (set by torchrun, srun or a parent launcher) disagree \
                     with --nproc-per-node {nproc} × --nnodes {} = {world}: leave out --nproc-per-node when another launcher starts \
                     the ranks, or make them agree",
                    env.world_size, env.local_world_size, self.nnodes
                )));
            }
            return Ok(Launched::RunHere);
        }
        if self.node_rank == 0 {
            check_port_free(self.master_port)?;
        }
        self.supervise(nproc, world)
    }

    fn supervise(&self, nproc: usize, world: usize) -> Result<Launched, DistError> {
        let exe = std::env::current_exe().map_err(|e| DistError::Launch(format!("cannot find the ftx executable to start the ranks: {e}")))?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(libc::SIGINT, note_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, note_signal as *const () as libc::sighandler_t);
        }
        let mut ranks: Vec<(usize, Child)> = Vec::with_capacity(nproc);
        for local in 0..nproc {
            let rank = self.node_rank * nproc + local;
            let mut spawned = Command::new(&exe);
            spawned
                .args(&args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("LOCAL_WORLD_SIZE", nproc.to_string())
                .env("GROUP_RANK", self.node_rank.to_string())
                .env("MASTER_ADDR", &self.master_addr)
                .env("MASTER_PORT", self.master_port.to_string())
                // Terminal signals reach the launcher only (it forwards them once).
                .process_group(0);
            // SAFETY: prctl(2) is async-signal-safe; the child only asks for SIGTERM when its
            // parent (this launcher) dies.
            let spawned = unsafe {
                spawned.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                })
            }
            .spawn();
            match spawned {
                Ok(child) => ranks.push((rank, child)),
                Err(e) => {
                    stop(&mut ranks, libc::SIGTERM);
                    return Err(DistError::Launch(format!("starting rank {rank} failed: {e}")));
                }
            }
        }
        tracing::info!(nproc, world, node_rank = self.node_rank, "started the local ranks");
        let mut running: Vec<(usize, Child)> = ranks;
        // The signals forwarded so far, and the first one (the ranks stop on it).
        let (mut forwarded, mut stopping) = (0usize, None::<i32>);
        loop {
            let received = SIGNALS.load(Ordering::SeqCst);
            if received > forwarded {
                let sig = SIGNAL.load(Ordering::SeqCst);
                forwarded = received;
                stopping.get_or_insert(sig);
                for (_, child) in &running {
                    // SAFETY: plain kill(2) on our own child's pid.
                    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
                }
                tracing::info!(signal = sig, "forwarded a signal to the ranks");
            }
            let mut failed: Vec<(usize, ExitStatus)> = Vec::new();
            let mut still = Vec::with_capacity(running.len());
            for (rank, mut child) in running {
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => {}
                    // A rank that stopped as a forwarded signal asked (128 + signal, or killed by it).
                    Ok(Some(status)) if stopping.is_some() && stopped_by_signal(status) => {}
                    Ok(Some(status)) => failed.push((rank, status)),
                    Ok(None) => still.push((rank, child)),
                    Err(e) => return Err(DistError::Launch(format!("waiting for rank {rank}: {e}"))),
                }
            }
            running = still;
            if !failed.is_empty() {
                // A rank that was killed is the cause; the others' errors follow from it.
                failed.sort_by_key(|(rank, status)| (status.signal().is_none(), *rank));
                let stopped: Vec<String> = running.iter().map(|(r, _)| r.to_string()).collect();
                stop(&mut running, libc::SIGTERM);
                let what: Vec<String> = failed.iter().map(|(r, s)| describe(*r, *s)).collect();
                let rest = if stopped.is_empty() { String::new() } else { format!("; stopped rank(s) {}", stopped.join(", ")) };
                return Err(DistError::Launch(format!("{}{rest}", what.join("; "))));
            }
            if running.is_empty() {
                return Ok(stopping.map_or(Launched::Done, Launched::Stopped));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether a rank ended as SIGINT or SIGTERM asks: exit status 130 or 143 after checkpointing
/// (or the second signal's immediate exit), or killed by the signal itself.
fn stopped_by_signal(status: ExitStatus) -> bool {
    let asked = [libc::SIGINT, libc::SIGTERM];
    status.code().is_some_and(|c| asked.iter().any(|s| c == 128 + s)) || status.signal().is_some_and(|s| asked.contains(&s))
}

/// "rank 1 exited with code 1" / "rank 1 was killed by signal 9 (SIGKILL)".
fn describe(rank: usize, status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("rank {rank} exited with code {code}"),
        (None, Some(sig)) => {
            let name = match sig {
                libc::SIGKILL => " (SIGKILL: killed, perhaps out of memory)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGABRT => " (SIGABRT)",
                _ => "",
            };
            format!("rank {rank} was killed by signal {sig}{name}")
        }
        _ => format!("rank {rank} ended: {status}"),
    }
}

/// Sends `sig` to every rank, waits up to [`GRACE`], then kills those still running.
fn stop(ranks: &mut Vec<(usize, Child)>, sig: libc::c_int) {
    for (_, child) in ranks.iter() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    }
    let t0 = Instant::now();
    while !ranks.is_empty() {
        ranks.retain_mut(|(_, c)| matches!(c.try_wait(), Ok(None)));
        if t0.elapsed() > GRACE {
            for (_, child) in ranks.iter_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            ranks.clear();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Refuses a rendezvous port something on this machine already listens on.
fn check_port_free(port: u16) -> Result<(), DistError> {
    match std::net::TcpListener::bind(("0.0.0.0", port)) {
        Ok(_) => Ok(()),
        Err(e) => Err(DistError::Launch(format!(
            "the rendezvous port {port} on this machine is not free ({e}): another run may hold it; pick a free one with --master-port"
        ))),
    }
}
