//! A process group over libtorch's c10d, through the C shim in `c10d.cpp`: rendezvous on a
//! TCPStore, then collectives on tch tensors, and DDP's [`Reducer`]. Every failure comes back
//! as a [`DistError`] naming the rank (the shim catches every C++ exception). Compiled when
//! the shim is (`ftx_c10d`); `unbuilt.rs` stands in otherwise.

use super::{Backend, DistEnv, DistError, ReduceOp};
use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;
use tch::Tensor;


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
    #[repr(C)]
    pub struct FtxReducer {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub struct FtxWork {
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
        pub fn ftx_dist_all_gather_start(g: *mut FtxGroup, output: *mut c_void, input: *mut c_void, out: *mut *mut FtxWork) -> *mut c_char;
        pub fn ftx_dist_work_wait(w: *mut FtxWork) -> *mut c_char;
        pub fn ftx_dist_work_free(w: *mut FtxWork);
        pub fn ftx_dist_reducer_new(tensors: *const *mut c_void, n: usize, bucket: *const i64, late: *const u8, out: *mut *mut FtxReducer) -> *mut c_char;
        pub fn ftx_dist_reducer_arm(r: *mut FtxReducer, g: *mut FtxGroup);
        pub fn ftx_dist_reducer_finish(r: *mut FtxReducer, g: *mut FtxGroup, early: *mut usize) -> *mut c_char;
        pub fn ftx_dist_reducer_free(r: *mut FtxReducer);
    }
}

/// Takes the shim's error string (NULL = success).
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
const LOST_RANK_WAIT: Duration = Duration::from_secs(3);

/// All ranks of one run, joined through a TCPStore hosted by rank 0.
pub struct ProcessGroup {
    store: *mut ffi::FtxStore,
    /// Null once closed after a failure (see `lost_ranks`).
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

    /// The group, unless an earlier failure closed it.
    fn live(&self, op: &'static str) -> Result<*mut ffi::FtxGroup, DistError> {
        let g = self.group.load(std::sync::atomic::Ordering::SeqCst);
        if g.is_null() {
            return Err(DistError::Collective { rank: self.rank, op, lost: "the group was closed".into(), message: "an earlier collective failed".into() });
        }
        Ok(g)
    }

    fn check(&self, op: &'static str, e: *mut c_char) -> Result<(), DistError> {
        take_error(e).map_err(|message| DistError::Collective { rank: self.rank, op, lost: self.lost_ranks(), message })
    }

    /// After a failed collective: which ranks are gone. Each rank that saw the failure checks
    /// in at the store; those that have not within a few seconds are named. When the store
    /// itself is unreachable, rank 0 (its host) is the one gone.
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

    fn store_set(&self, key: &str) -> Result<(), String> {
        let (key, one) = (CString::new(key).expect("no NUL"), CString::new("1").expect("no NUL"));
        // SAFETY: live store, valid C strings.
        take_error(unsafe { ffi::ftx_dist_store_set(self.store, key.as_ptr(), one.as_ptr()) })
    }

    /// Waits up to `wait` for `key(r)` of every rank in `ranks`; returns those still missing.
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

    /// Replaces `tensor` on every rank with rank `root`'s, in place.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<(), DistError> {
        // SAFETY: as in all_reduce.
        let e = unsafe { ffi::ftx_dist_broadcast(self.live("broadcast")?, tensor.as_ptr() as *mut c_void, root as i32) };
        self.check("broadcast", e)
    }

    /// Fills `output` (world_size × `input`'s elements) with every rank's `input`, in rank order.
    pub fn all_gather(&self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        // SAFETY: as in all_reduce.
        let e = unsafe { ffi::ftx_dist_all_gather(self.live("all_gather")?, output.as_ptr() as *mut c_void, input.as_ptr() as *mut c_void) };
        self.check("all_gather", e)
    }

    /// Sets `output` to the sum over ranks of this rank's slice of `input` (world_size ×
    /// `output`'s elements; rank r's slice is the r-th).
    pub fn reduce_scatter(&self, output: &Tensor, input: &Tensor) -> Result<(), DistError> {
        // SAFETY: as in all_reduce.
        let e = unsafe { ffi::ftx_dist_reduce_scatter(self.live("reduce_scatter")?, output.as_ptr() as *mut c_void, input.as_ptr() as *mut c_void) };
        self.check("reduce_scatter", e)
    }

    /// Starts [`ProcessGroup::all_gather`] without waiting for it: the collective runs in
    /// the background (Gloo's worker threads, NCCL's stream) until [`ProcessGroup::wait`].
    /// `output` and `input` must stay untouched until then (the work holds them).
    pub fn all_gather_start(&self, output: &Tensor, input: &Tensor) -> Result<Work, DistError> {
        let mut out = std::ptr::null_mut();
        // SAFETY: as in all_reduce; the shim's work keeps its own references to the tensors.
        let e = unsafe { ffi::ftx_dist_all_gather_start(self.live("all_gather")?, output.as_ptr() as *mut c_void, input.as_ptr() as *mut c_void, &mut out) };
        self.check("all_gather", e)?;
        Ok(Work { raw: out })
    }

    /// Waits for a started collective.
    pub fn wait(&self, work: Work) -> Result<(), DistError> {
        let raw = work.raw;
        std::mem::forget(work);
        // SAFETY: a live handle, consumed (freed by the shim) here.
        let e = unsafe { ffi::ftx_dist_work_wait(raw) };
        self.check("all_gather", e)
    }

    /// Returns once every rank has called it (or fails after the timeout).
    pub fn barrier(&self) -> Result<(), DistError> {
        // SAFETY: the group is live.
        let e = unsafe { ffi::ftx_dist_barrier(self.live("barrier")?) };
        self.check("barrier", e)
    }

    /// A gradient reducer over `tensors` (leaf tensors that require grad, the same list on
    /// every rank): tensor i in bucket `bucket[i]` (0, 1, … in launch order, each bucket one
    /// dtype and device), reduced only after the backward pass when `late[i]` (a tensor whose
    /// gradient is written more than once per backward, such as tied embeddings).
    pub fn reducer(&self, tensors: &[Tensor], bucket: &[i64], late: &[bool]) -> Result<Reducer, DistError> {
        assert!(tensors.len() == bucket.len() && bucket.len() == late.len(), "one bucket and flag per tensor");
        let ptrs: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let late: Vec<u8> = late.iter().map(|&l| u8::from(l)).collect();
        let mut out = std::ptr::null_mut();
        // SAFETY: live tensors (the shim keeps its own references), arrays of `n`, out-pointer.
        let e = unsafe { ffi::ftx_dist_reducer_new(ptrs.as_ptr(), ptrs.len(), bucket.as_ptr(), late.as_ptr(), &mut out) };
        self.check("reducer", e)?;
        Ok(Reducer { raw: out })
    }
}

/// A collective started by [`ProcessGroup::all_gather_start`], waited for by
/// [`ProcessGroup::wait`] (dropped unwaited, it completes unobserved).
pub struct Work {
    raw: *mut ffi::FtxWork,
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: a live handle, freed once.
        unsafe { ffi::ftx_dist_work_free(self.raw) }
    }
}

/// DDP's gradient reducer (see [`ProcessGroup::reducer`]): armed before a step's last backward
/// pass, it all-reduces each bucket of gradients asynchronously as soon as the backward has
/// written all of them (post-accumulate-grad hooks), while the backward goes on; [`Reducer::finish`]
/// launches the rest and waits for every bucket. Dropping it removes the hooks.
pub struct Reducer {
    raw: *mut ffi::FtxReducer,
}

impl Reducer {
    /// Lets the next backward pass launch the buckets it completes, on `group` (the one that
    /// made the reducer).
    pub fn arm(&self, group: &ProcessGroup) -> Result<(), DistError> {
        // SAFETY: live reducer and group; the group outlives the backward pass that follows.
        unsafe { ffi::ftx_dist_reducer_arm(self.raw, group.live("all_reduce (overlapped)")?) };
        Ok(())
    }

    /// Launches every bucket not launched yet, in order, waits for all of them, and disarms.
    /// Returns how many buckets the backward pass had launched before (the overlap).
    pub fn finish(&self, group: &ProcessGroup) -> Result<usize, DistError> {
        let mut early = 0usize;
        // SAFETY: live reducer and group, out-pointer.
        let e = unsafe { ffi::ftx_dist_reducer_finish(self.raw, group.live("all_reduce (overlapped)")?, &mut early) };
        group.check("all_reduce (overlapped)", e)?;
        Ok(early)
    }
}

// The shim's reducer guards its state with a mutex (its hooks run on autograd's threads).
unsafe impl Send for Reducer {}

impl Drop for Reducer {
    fn drop(&mut self) {
        // SAFETY: created by the shim, freed once (its hooks first).
        unsafe { ffi::ftx_dist_reducer_free(self.raw) }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
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
