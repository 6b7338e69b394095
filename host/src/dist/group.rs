//! A process group over libtorch's c10d, through the C shim in `c10d.cpp`: rendezvous on a
//! TCPStore, then collectives on tch tensors. Every failure comes back as a [`DistError`]
//! naming the rank (the shim catches every C++ exception).

use super::{DistEnv, DistError};
#[cfg(ftx_c10d)]
use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;
use tch::Tensor;

/// Which c10d process group carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo: CPU tensors, TCP between processes.
    Gloo,
    /// NCCL: CUDA tensors (libtorch_cuda.so, looked up at run time).
    Nccl,
}

impl Backend {
    /// The name c10d and torch.distributed use.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// How [`ProcessGroup::all_reduce`] combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

#[cfg(ftx_c10d)]
mod ffi {
    use std::ffi::{c_char, c_void};
    #[repr(C)]
    pub struct FtxStore {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub struct FtxGroup {
        _private: [u8; 0],
    }
    extern "C" {
        pub fn ftx_dist_free_string(s: *mut c_char);
        pub fn ftx_dist_store_new(host: *const c_char, port: u16, is_server: i32, world: i32, timeout_ms: i64, out: *mut *mut FtxStore) -> *mut c_char;
        pub fn ftx_dist_store_free(s: *mut FtxStore);
        pub fn ftx_dist_store_set(s: *mut FtxStore, key: *const c_char, value: *const c_char) -> *mut c_char;
        pub fn ftx_dist_store_check(s: *mut FtxStore, key: *const c_char, exists: *mut i32) -> *mut c_char;
        pub fn ftx_dist_group_new(
            store: *mut FtxStore,
            backend: i32,
            rank: i32,
            world: i32,
            timeout_ms: i64,
            gloo_hostname: *const c_char,
            out: *mut *mut FtxGroup,
        ) -> *mut c_char;
        pub fn ftx_dist_group_free(g: *mut FtxGroup);
        pub fn ftx_dist_all_reduce(g: *mut FtxGroup, tensors: *const *mut c_void, n: usize, op: i32) -> *mut c_char;
        pub fn ftx_dist_broadcast(g: *mut FtxGroup, tensor: *mut c_void, root: i32) -> *mut c_char;
        pub fn ftx_dist_all_gather(g: *mut FtxGroup, output: *mut c_void, input: *mut c_void) -> *mut c_char;
        pub fn ftx_dist_reduce_scatter(g: *mut FtxGroup, output: *mut c_void, input: *mut c_void) -> *mut c_char;
        pub fn ftx_dist_barrier(g: *mut FtxGroup) -> *mut c_char;
    }
}

/// Takes the shim's error string (NULL = success).
#[cfg(ftx_c10d)]
fn take_error(e: *mut c_char) -> Result<(), String> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string, freed here exactly once.
    let msg = unsafe { CStr::from_ptr(e) }.to_string_lossy().trim().to_owned();
    unsafe { ffi::ftx_dist_free_string(e) };
    Err(msg)
}

/// How long a rank that saw a collective fail waits for the others to report it too.
#[cfg(ftx_c10d)]
const LOST_RANK_WAIT: Duration = Duration::from_secs(3);

/// All ranks of one run, joined through a TCPStore hosted by rank 0.
pub struct ProcessGroup {
    #[cfg(ftx_c10d)]
    store: *mut ffi::FtxStore,
    /// Null once closed after a failure (see `lost_ranks`).
    #[cfg(ftx_c10d)]
    group: std::sync::atomic::AtomicPtr<ffi::FtxGroup>,
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// The backend carrying the collectives.
    pub backend: Backend,
}

// The c10d objects are thread-safe for the sequential use ftx makes of them.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the rendezvous at `MASTER_ADDR:MASTER_PORT` (rank 0 hosts it) and creates the
    /// process group. Waits at most `timeout` for every rank to arrive; collectives then fail
    /// after `timeout` instead of hanging.
    #[cfg(ftx_c10d)]
    pub fn init(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<ProcessGroup, DistError> {
        let rank = env.rank;
        let ms = timeout.as_millis().min(i64::MAX as u128) as i64;
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let host = CString::new(env.master_addr.as_str())
            .map_err(|_| DistError::Env { var: "MASTER_ADDR", value: env.master_addr.clone(), why: "contains a NUL byte".into() })?;
        let mut store = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer; the shim never unwinds.
        let e = unsafe { ffi::ftx_dist_store_new(host.as_ptr(), env.master_port, i32::from(rank == 0), env.world_size as i32, ms, &mut store) };
        take_error(e).map_err(|message| DistError::Rendezvous { rank, addr: addr.clone(), timeout_s: timeout.as_secs(), message })?;
        // On one machine Gloo binds to loopback, so runs do not depend on the hostname resolving.
        let loopback = ["127.0.0.1", "localhost", "::1"].contains(&env.master_addr.as_str());
        let gloo_host = CString::new(if loopback { "127.0.0.1" } else { "" }).expect("no NUL");
        let mut group = std::ptr::null_mut();
        let code = match backend {
            Backend::Gloo => 0,
            Backend::Nccl => 1,
        };
        // SAFETY: `store` is live; valid C string and out-pointer.
        let e = unsafe { ffi::ftx_dist_group_new(store, code, rank as i32, env.world_size as i32, ms, gloo_host.as_ptr(), &mut group) };
        if let Err(message) = take_error(e) {
            unsafe { ffi::ftx_dist_store_free(store) };
            return Err(DistError::Group { rank, backend: backend.name(), message });
        }
        Ok(ProcessGroup { store, group: group.into(), rank, world_size: env.world_size, backend })
    }

    /// Without the shim (a libtorch without c10d headers at build time): always an error.
    #[cfg(not(ftx_c10d))]
    pub fn init(env: &DistEnv, backend: Backend, _timeout: Duration) -> Result<ProcessGroup, DistError> {
        let _ = (env, backend);
        Err(DistError::NotBuilt)
    }

    /// The group, unless an earlier failure closed it.
    #[cfg(ftx_c10d)]
    fn live(&self, op: &'static str) -> Result<*mut ffi::FtxGroup, DistError> {
        let g = self.group.load(std::sync::atomic::Ordering::SeqCst);
        if g.is_null() {
            return Err(DistError::Collective { rank: self.rank, op, lost: "the group was closed".into(), message: "an earlier collective failed".into() });
        }
        Ok(g)
    }

    #[cfg(ftx_c10d)]
    fn check(&self, op: &'static str, e: *mut c_char) -> Result<(), DistError> {
        take_error(e).map_err(|message| DistError::Collective { rank: self.rank, op, lost: self.lost_ranks(), message })
    }

    /// After a failed collective: which ranks are gone. Each rank that saw the failure checks
    /// in at the store; those that have not within a few seconds are named. When the store
    /// itself is unreachable, rank 0 (its host) is the one gone.
    #[cfg(ftx_c10d)]
    fn lost_ranks(&self) -> String {
        static FAILURES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = FAILURES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // Close this rank's connections first: peers blocked on it then fail at once and check
        // in too, instead of being taken for lost.
        let g = self.group.swap(std::ptr::null_mut(), std::sync::atomic::Ordering::SeqCst);
        if !g.is_null() {
            // SAFETY: created by the shim; swapped out, so freed exactly once.
            unsafe { ffi::ftx_dist_group_free(g) };
        }
        const STORE_GONE: &str = "rank 0 is gone (its rendezvous store does not answer)";
        // Phase 1: check in, and see who else does within the wait.
        let failed = |rank: usize| format!("ftx/failed/{n}/{rank}");
        if self.store_set(&failed(self.rank)).is_err() {
            return STORE_GONE.into();
        }
        let Ok(missing) = self.store_wait(&failed, (0..self.world_size).collect(), LOST_RANK_WAIT) else { return STORE_GONE.into() };
        // Phase 2: rank 0 hosts the store, so it leaves only after the others have read it.
        let done = |rank: usize| format!("ftx/done/{n}/{rank}");
        if self.store_set(&done(self.rank)).is_err() {
            return STORE_GONE.into();
        }
        if self.rank == 0 {
            let up: Vec<usize> = (0..self.world_size).filter(|r| !missing.contains(r)).collect();
            let _ = self.store_wait(&done, up, LOST_RANK_WAIT);
        }
        if missing.is_empty() {
            return "every rank is still up".into();
        }
        let names: Vec<String> = missing.iter().map(usize::to_string).collect();
        format!("lost rank(s) {} (no word from them within {}s)", names.join(", "), LOST_RANK_WAIT.as_secs())
    }

    #[cfg(ftx_c10d)]
    fn store_set(&self, key: &str) -> Result<(), String> {
        let (key, one) = (CString::new(key).expect("no NUL"), CString::new("1").expect("no NUL"));
        // SAFETY: live store, valid C strings.
        take_error(unsafe { ffi::ftx_dist_store_set(self.store, key.as_ptr(), one.as_ptr()) })
    }

    /// Waits up to `wait` for `key(r)` of every rank in `ranks`; returns those still missing.
    #[cfg(ftx_c10d)]
    fn store_wait(&self, key: &dyn Fn(usize) -> String, mut ranks: Vec<usize>, wait: Duration) -> Result<Vec<usize>, String> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let mut still = Vec::new();
            for r in ranks {
                let (k, mut exists) = (CString::new(key(r)).expect("no NUL"), 0);
                // SAFETY: live store, valid C string and out-pointer.
                take_error(unsafe { ffi::ftx_dist_store_check(self.store, k.as_ptr(), &mut exists) })?;
                if exists == 0 {
                    still.push(r);
                }
            }
            ranks = still;
            if ranks.is_empty() || std::time::Instant::now() >= deadline {
                return Ok(ranks);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Combines `tensors` (contiguous, one dtype and device) across ranks, in place; several
    /// go as one coalesced collective (one bucket).
    pub fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<(), DistError> {
        #[cfg(ftx_c10d)]
        {
            if tensors.is_empty() {
                return Ok(());
            }
            let ptrs: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
            let code = match op {
                ReduceOp::Sum => 0,
                ReduceOp::Max => 1,
                ReduceOp::Min => 2,
            };
            // SAFETY: live tensors for the duration of the call; the group is live.
            let e = unsafe { ffi::ftx_dist_all_reduce(self.live("all_reduce")?, ptrs.as_ptr(), ptrs.len(), code) };
            self.check("all_reduce", e)
        }
        #[cfg(not(ftx_c10d))]
        {
            let _ = (tensors, op);
            Err(DistError::NotBuilt)
        }
    }

    /// Replaces `tensor` on every rank with rank `root`'s, in place.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<(), DistError> {
        #[cfg(ftx_c10d)]
        {
            // SAFETY: as in all_reduce.
            let e = unsafe { ffi::ftx_dist_broadcast(self.live("broadcast")?, tensor.as_ptr() as *mut c_void, root as i32) };
            self.check("broadcast", e)
        }
        #[cfg(not(ftx_c10d))]
        {
            let _ = (tensor, root);
            Err(DistError::NotBuilt)
        }
    }

    /// Fills `output` (world_size × `input`'s elements) with every rank's `input`, in rank order.
    pub fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        #[cfg(ftx_c10d)]
        {
            // SAFETY: as in all_reduce.
            let e = unsafe { ffi::ftx_dist_all_gather(self.live("all_gather")?, output.as_ptr() as *mut c_void, input.as_ptr() as *mut c_void) };
            self.check("all_gather", e)
        }
        #[cfg(not(ftx_c10d))]
        {
            let _ = (output, input);
            Err(DistError::NotBuilt)
        }
    }

    /// Sets `output` to the sum over ranks of this rank's slice of `input` (world_size ×
    /// `output`'s elements; rank r's slice is the r-th).
    pub fn reduce_scatter(&self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        #[cfg(ftx_c10d)]
        {
            // SAFETY: as in all_reduce.
            let e = unsafe { ffi::ftx_dist_reduce_scatter(self.live("reduce_scatter")?, output.as_ptr() as *mut c_void, input.as_ptr() as *mut c_void) };
            self.check("reduce_scatter", e)
        }
        #[cfg(not(ftx_c10d))]
        {
            let _ = (output, input);
            Err(DistError::NotBuilt)
        }
    }

    /// Returns once every rank has called it (or fails after the timeout).
    pub fn barrier(&self) -> Result<(), DistError> {
        #[cfg(ftx_c10d)]
        {
            // SAFETY: the group is live.
            let e = unsafe { ffi::ftx_dist_barrier(self.live("barrier")?) };
            self.check("barrier", e)
        }
        #[cfg(not(ftx_c10d))]
        {
            Err(DistError::NotBuilt)
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        #[cfg(ftx_c10d)]
        // SAFETY: created by the shim, freed once; the group before the store it uses.
        unsafe {
            let g = *self.group.get_mut();
            if !g.is_null() {
                ffi::ftx_dist_group_free(g);
            }
            ffi::ftx_dist_store_free(self.store);
        }
    }
}
