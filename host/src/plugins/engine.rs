//! The one wasmtime engine of the process: component model on, epoch interruption driven by
//! a background ticker, and a disk cache of compiled components keyed by content hash (whose
//! files are loaded only with this user's tag, see `cache`).

use super::cache::ComponentCache;
use super::{plugin_name, PluginError, PluginKind, API_VERSION};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

/// How often the epoch advances; call deadlines are counted in these ticks.
pub const TICK: Duration = Duration::from_millis(10);

/// The shared engine (created on first use, with its epoch ticker thread).
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut cfg = Config::new();
        cfg.wasm_component_model(true);
        cfg.epoch_interruption(true);
        // Deep recursion traps at 512 KiB of wasm stack instead of touching the host's.
        cfg.max_wasm_stack(512 << 10);
        let engine = Engine::new(&cfg).expect("wasmtime engine configuration is valid");
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("ftx-plugin-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                match ticker.upgrade() {
                    Some(e) => e.increment_epoch(),
                    None => break,
                }
            })
            .expect("spawning the epoch thread");
        engine
    })
}

/// Compiles (or loads from the cache) the component at `path`.
pub fn compile(path: &Path) -> Result<Component, PluginError> {
    let name = plugin_name(path);
    let load_err = |problem: String| PluginError::Load { plugin: name.clone(), problem };
    // A first-party component compiles from the bytes embedded in the binary, not its file.
    let bytes = match super::first_party::embedded_bytes(path) {
        Some(b) => b.to_vec(),
        None => std::fs::read(path).map_err(|e| load_err(format!("{}: {e}", path.display())))?,
    };
    let engine = engine();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let key = format!("{}-{:016x}", crate::util::sha256_hex(&bytes), h.finish());
    // Each component is compiled (or read from disk) once per process: inspecting a plugin and
    // then loading it costs one compile.
    static LOADED: OnceLock<std::sync::Mutex<std::collections::HashMap<String, Component>>> = OnceLock::new();
    let loaded = LOADED.get_or_init(Default::default);
    if let Some(c) = loaded.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(c.clone());
    }
    let component = compile_uncached(&bytes, &key, &name)?;
    loaded.lock().unwrap_or_else(|p| p.into_inner()).insert(key, component.clone());
    Ok(component)
}

/// Loads the compiled component from the disk cache when its tag proves this user's ftx wrote
/// it for these bytes (see `cache`), or compiles it and caches it.
fn compile_uncached(bytes: &[u8], key: &str, name: &str) -> Result<Component, PluginError> {
    let engine = engine();
    let load_err = |problem: String| PluginError::Load { plugin: name.to_owned(), problem };
    let cache = match ComponentCache::open(&crate::paths::ftx_home()) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("not using the compiled-plugin cache: {e}");
            None
        }
    };
    if let Some(cache) = &cache {
        match cache.load(engine, key) {
            Ok(Some(component)) => return Ok(component),
            Ok(None) => {}
            Err(e) => tracing::warn!("plugin {name}: refusing its cached compiled code: {e}; compiling it from its .wasm again"),
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| load_err(format!("not a valid WebAssembly component: {e:#}")))?;
    if let Some(cache) = &cache {
        if let Err(e) = cache.store(key, &component) {
            tracing::warn!("plugin {name}: could not cache its compiled code: {e}");
        }
    }
    Ok(component)
}

/// Compiles the component at `path` and checks it is a `want` plugin; returns the plugin's
/// name and the component.
pub fn compile_kind(path: &Path, want: PluginKind) -> Result<(String, Component), PluginError> {
    let name = plugin_name(path);
    let component = compile(path)?;
    let (kind, _) = inspect(path, &component)?;
    if kind != want {
        return Err(PluginError::Load { plugin: name, problem: format!("is a {kind} plugin, not {}", super::with_article(want)) });
    }
    Ok((name, component))
}

/// The kind a component implements and the `ftx:plugin` version it was built against,
/// read from its exports (`ftx:plugin/filter@0.1.0`, …).
pub fn inspect(path: &Path, component: &Component) -> Result<(PluginKind, String), PluginError> {
    let name = plugin_name(path);
    let ty = component.component_type();
    for (export, _) in ty.exports(engine()) {
        let Some(rest) = export.strip_prefix("ftx:plugin/") else { continue };
        let (iface, version) = rest.split_once('@').unwrap_or((rest, ""));
        let kind = match iface {
            "filter" => PluginKind::DataFilter,
            "reward" => PluginKind::Reward,
            "loss" => PluginKind::Loss,
            "judge" => PluginKind::Judge,
            "exporter" => PluginKind::Exporter,
            _ => continue,
        };
        if !compatible(version) {
            return Err(PluginError::Version { plugin: name, found: version.to_owned() });
        }
        return Ok((kind, version.to_owned()));
    }
    Err(PluginError::Load { plugin: name, problem: "exports no ftx:plugin interface (filter, reward, loss, judge or exporter)".into() })
}

/// Semver compatibility with [`API_VERSION`]: same major, and for 0.x the same minor.
fn compatible(version: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.split('.');
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    match (parse(version), parse(API_VERSION)) {
        (Some((a, b)), Some((x, y))) => a == x && (a > 0 || b == y),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_are_compatible_by_semver() {
        assert!(super::compatible("0.1.0"));
        assert!(super::compatible("0.1.7"));
        assert!(!super::compatible("0.2.0"));
        assert!(!super::compatible("9.0.0"));
        assert!(!super::compatible("x"));
    }
}
