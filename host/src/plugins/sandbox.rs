//! The store every plugin call runs in: WASI with no capabilities (no files, no network, no
//! environment, no arguments, a frozen clock), a memory limit, and a deadline per call.

use super::{Limits, PluginError};
use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};
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

/// A fresh store under `limits`.
pub fn store(limits: &Limits, device: tch::Device) -> Store<State> {
    let mut b = WasiCtxBuilder::new();
    b.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false).wall_clock(FrozenClock).monotonic_clock(FrozenClock);
    let state = State {
        wasi: b.build(),
        table: ResourceTable::new(),
        limits: StoreLimitsBuilder::new().memory_size(limits.memory_bytes).instances(4).trap_on_grow_failure(true).build(),
        device,
        live: 0,
        inputs: Vec::new(),
    };
    let mut store = Store::new(super::engine::engine(), state);
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_trap();
    store
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

/// Arms the deadline for one call.
pub fn arm(store: &mut Store<State>, limits: &Limits) {
    let ticks = (limits.call_timeout.as_millis() / super::engine::TICK.as_millis()).max(1) as u64;
    store.set_epoch_deadline(ticks);
}

/// Turns a wasmtime error from a call into a [`PluginError`] naming the plugin and call.
pub fn classify(e: wasmtime::Error, plugin: &str, call: &str, limits: &Limits) -> PluginError {
    let (plugin, call) = (plugin.to_owned(), call.to_owned());
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
        _ => PluginError::Trap { plugin, call, detail: text },
    }
}
