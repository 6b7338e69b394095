//! The store every plugin call runs in: WASI with no capabilities (no files, no network, no
//! environment, no arguments, a frozen clock) beyond those granted (see `permissions`), a
//! memory limit, and a deadline per call; and [`Sandboxed`], the instance every kind calls
//! through, rebuilt after a trap, whose calls draw on the plugin's run budget (see `budget`).

use super::budget::RunClock;
use super::permissions::{Granted, Permission};
use super::{Limits, PluginError};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Host state of one plugin instance.
pub struct State {
    wasi: WasiCtx,
    pub table: ResourceTable,
    limits: StoreLimits,
    /// Device of the tensors a loss plugin creates.
    pub device: tch::Device,
    /// Host resources the guest holds right now (bounded, see `MAX_LIVE`).
    pub live: usize,
    /// A loss call's inputs, handed out by `tensor-ops.input` during that call.
    pub inputs: Vec<(String, tch::Tensor)>,
    /// What the current loss call has spent on host tensors, and the handles it made.
    pub tensor_call: super::tensor_budget::TensorCall,
    /// Time the current call has spent in host functions that may block (see [`arm_guest_time`]).
    pub host_time: Duration,
    /// A judge's language model.
    pub llm: Option<super::judge::Llm>,
    /// An exporter's model and output folder, lent for one `export` call.
    pub export: Option<super::exporter::ExportCtx>,
}

impl State {
    /// Runs a host function that may block, counting its time in `host_time`.
    pub fn timed<R>(&mut self, f: impl FnOnce(&mut State) -> R) -> R {
        let t0 = Instant::now();
        let out = f(self);
        self.host_time += t0.elapsed();
        out
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// A clock that never moves: plugins get no timing side channel and stay deterministic.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
    fn now(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// A fresh store under `limits` with the `granted` capabilities.
pub fn store(limits: &Limits, device: tch::Device, granted: &Granted) -> Result<Store<State>, String> {
    let mut b = WasiCtxBuilder::new();
    b.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
    if !granted.0.contains(&Permission::Clock) {
        b.wall_clock(FrozenClock).monotonic_clock(FrozenClock);
    }
    for p in &granted.0 {
        match p {
            Permission::Read(dir) => {
                let guest = dir.to_str().ok_or_else(|| format!("{}: not UTF-8", dir.display()))?;
                b.preopened_dir(dir, guest, wasmtime_wasi::FsPerms::ReadOnly).map_err(|e| format!("granted folder {}: {e}", dir.display()))?;
            }
            Permission::Env(name) => {
                if let Ok(v) = std::env::var(name) {
                    b.env(name, v);
                }
            }
            Permission::Clock => {}
        }
    }
    let state = State {
        wasi: b.build(),
        table: ResourceTable::new(),
        limits: StoreLimitsBuilder::new().memory_size(limits.memory_bytes).instances(4).trap_on_grow_failure(true).build(),
        device,
        live: 0,
        inputs: Vec::new(),
        tensor_call: super::tensor_budget::TensorCall::new(limits),
        host_time: Duration::ZERO,
        llm: None,
        export: None,
    };
    let mut store = Store::new(super::engine::engine(), state);
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_trap();
    Ok(store)
}

/// A linker with the (locked-down) WASI imports every Rust guest pulls in.
pub fn linker() -> Linker<State> {
    let mut linker = Linker::new(super::engine::engine());
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).expect("WASI links");
    linker
}

/// Pre-instantiates `component` with `linker`, naming the plugin in errors.
pub fn pre(linker: &Linker<State>, component: &Component, plugin: &str) -> Result<InstancePre<State>, PluginError> {
    linker.instantiate_pre(component).map_err(|e| PluginError::Load {
        plugin: plugin.to_owned(),
        problem: format!("its imports cannot be satisfied by this host: {e:#}"),
    })
}

/// Epoch ticks in `d` (at least one).
fn ticks(d: Duration) -> u64 {
    (d.as_millis() / super::engine::TICK.as_millis()).max(1) as u64
}

/// Arms the deadline for one call.
pub fn arm(store: &mut Store<State>, limits: &Limits) {
    store.set_epoch_deadline(ticks(limits.call_timeout));
}

/// Arms the deadline for one call of a judge, whose host function (the judge's model) may block
/// for long: only the plugin's own compute counts against `limits.call_timeout`. wasmtime cannot
/// interrupt a host call, and epochs keep ticking while one runs; without this, a judge would be
/// stopped as soon as it came back from a long completion. The model's time is bounded by the
/// host itself (max-tokens, completions per sample), which runs it through [`State::timed`].
/// Exporters do not get this: their reads and writes count against their deadline.
pub fn arm_guest_time(store: &mut Store<State>, limits: &Limits) {
    store.data_mut().host_time = Duration::ZERO;
    let (start, limit) = (Instant::now(), limits.call_timeout);
    store.epoch_deadline_callback(move |ctx| {
        let guest = start.elapsed().saturating_sub(ctx.data().host_time);
        Ok(if guest >= limit { UpdateDeadline::Interrupt } else { UpdateDeadline::Continue(ticks(limit - guest)) })
    });
    store.set_epoch_deadline(ticks(limit));
}

/// Turns a wasmtime error from a call into a [`PluginError`] naming the plugin and call.
pub fn classify(e: wasmtime::Error, plugin: &str, call: &str, limits: &Limits) -> PluginError {
    let (plugin, call) = (plugin.to_owned(), call.to_owned());
    if let Some(refusal) = e.downcast_ref::<super::tensor_budget::HostRefusal>() {
        return PluginError::Invalid { plugin, call, problem: refusal.0.clone() };
    }
    let text = format!("{e:#}");
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => {
            PluginError::Timeout { plugin, call, limit_ms: limits.call_timeout.as_millis() }
        }
        Some(wasmtime::Trap::StackOverflow) => {
            PluginError::Trap { plugin, call, detail: "stack overflow (recursion too deep)".into() }
        }
        _ if text.contains("growing memory") || text.contains("memory growth failure") => {
            PluginError::Memory { plugin, call, limit_mib: limits.memory_bytes >> 20 }
        }
        // A trap's text holds the guest's own words (a panic message, its function names).
        _ => PluginError::Trap { plugin, call, detail: super::untrusted::plugin_text(&text) },
    }
}

/// Makes a fresh instance of a plugin in a store (a kind's `…Pre::instantiate`).
pub type Instantiate<I> = Box<dyn Fn(&mut Store<State>) -> wasmtime::Result<I> + Send + Sync>;

/// A sandboxed plugin instance of any kind: its store, its instance, and how to make them
/// again. A trap poisons a store, so after one the next call gets a fresh instance.
pub struct Sandboxed<I> {
    pub name: String,
    pub limits: Limits,
    pub store: Store<State>,
    pub instance: I,
    granted: Granted,
    device: tch::Device,
    /// Judges: only the plugin's own compute counts against the time limit.
    guest_time: bool,
    instantiate: Instantiate<I>,
    /// The plugin's run budget and what its calls took.
    pub clock: RunClock,
}

impl<I> Sandboxed<I> {
    /// Instantiates the plugin (its start code runs under the limits too).
    pub fn new(
        name: String,
        limits: Limits,
        granted: Granted,
        device: tch::Device,
        guest_time: bool,
        instantiate: impl Fn(&mut Store<State>) -> wasmtime::Result<I> + Send + Sync + 'static,
    ) -> Result<Self, PluginError> {
        let instantiate: Instantiate<I> = Box::new(instantiate);
        let (store, instance) = fresh(&name, &limits, &granted, device, guest_time, &instantiate, None)?;
        let clock = RunClock::new(limits.run_budget);
        Ok(Sandboxed { name, limits, store, instance, granted, device, guest_time, instantiate, clock })
    }

    /// Runs `f` as the call named `call` under a fresh deadline. A trap becomes an error naming
    /// the plugin and the call, and the instance is rebuilt (a judge's model moves over).
    pub fn call<R>(&mut self, call: &str, f: impl FnOnce(&I, &mut Store<State>) -> wasmtime::Result<R>) -> Result<R, PluginError> {
        self.call_with_allowance(call, Duration::ZERO, f)
    }

    /// [`Sandboxed::call`] with `allowance` added to the deadline (an exporter's time for the
    /// host to read and write the model). The deadline is the call limit or what is left of the
    /// run budget, whichever is smaller, plus the allowance; a call once the budget is spent is
    /// refused, and one stopped by the budget's deadline is reported as such.
    pub fn call_with_allowance<R>(
        &mut self,
        call: &str,
        allowance: Duration,
        f: impl FnOnce(&I, &mut Store<State>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        self.clock.ensure(&self.name, call)?;
        let remaining = self.clock.remaining();
        let by_budget = remaining < self.limits.call_timeout;
        let limits = Limits { call_timeout: remaining.min(self.limits.call_timeout) + allowance, ..self.limits };
        if self.guest_time {
            arm_guest_time(&mut self.store, &limits);
        } else {
            arm(&mut self.store, &limits);
        }
        let t0 = Instant::now();
        let result = f(&self.instance, &mut self.store);
        let took = t0.elapsed();
        self.clock.charge(if self.guest_time { took.saturating_sub(self.store.data().host_time) } else { took });
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                let err = match classify(e, &self.name, call, &limits) {
                    PluginError::Timeout { .. } if by_budget => {
                        self.clock.exhaust();
                        self.clock.exhausted(&self.name, call)
                    }
                    err => err,
                };
                let llm = self.store.data_mut().llm.take();
                (self.store, self.instance) = fresh(&self.name, &self.limits, &self.granted, self.device, self.guest_time, &self.instantiate, llm)?;
                Err(err)
            }
        }
    }
}

fn fresh<I>(
    name: &str,
    limits: &Limits,
    granted: &Granted,
    device: tch::Device,
    guest_time: bool,
    instantiate: &Instantiate<I>,
    llm: Option<super::judge::Llm>,
) -> Result<(Store<State>, I), PluginError> {
    let mut store = store(limits, device, granted).map_err(|problem| PluginError::Load { plugin: name.to_owned(), problem })?;
    store.data_mut().llm = llm;
    if guest_time {
        arm_guest_time(&mut store, limits);
    } else {
        arm(&mut store, limits);
    }
    let instance = instantiate(&mut store).map_err(|e| classify(e, name, "instantiate", limits))?;
    Ok((store, instance))
}
