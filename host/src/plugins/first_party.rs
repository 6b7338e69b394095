//! First-party plugins by name: the components of `plugins/` embedded in the binary (crate
//! `ftx-first-party`), so `--plugin dpo` or `method.objective = "orpo"` works with nothing
//! installed.
//!
//! Trust: an embedded component is pinned by the binary itself, as an installed plugin is pinned
//! by its signed manifest's hash. It is written to `$FTX_HOME/first-party/<sha>/<name>.wasm`
//! so that every path-based part of the host (kind, grants, messages) treats it like any other
//! component, but the engine compiles the embedded bytes whenever it is asked for that path, so a
//! file altered on disk is never what runs. It runs in the same sandbox, under the same limits,
//! and asks for no permission.

use super::PluginError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The names of the embedded first-party plugins, sorted.
pub fn names() -> Vec<&'static str> {
    let mut v: Vec<&str> = ftx_first_party::components().iter().map(|c| c.name).collect();
    v.sort_unstable();
    v
}

/// Why this binary has no first-party plugins, when it has none.
pub fn not_built() -> Option<&'static str> {
    ftx_first_party::not_built()
}

/// Each embedded component by name, with the hex SHA-256 of its bytes (computed once).
fn table() -> &'static HashMap<&'static str, (&'static [u8], String)> {
    static TABLE: OnceLock<HashMap<&'static str, (&'static [u8], String)>> = OnceLock::new();
    TABLE.get_or_init(|| ftx_first_party::components().iter().map(|c| (c.name, (c.bytes, crate::util::sha256_hex(c.bytes)))).collect())
}

/// `exact_match` and `exact-match` name the same plugin (the crate's name and its file's).
fn normalise(name: &str) -> String {
    name.replace('_', "-")
}

/// Where the component of `name` with content hash `sha` is placed.
fn placement(name: &str, sha: &str) -> PathBuf {
    crate::paths::ftx_home().join("first-party").join(&sha[..16]).join(format!("{name}.wasm"))
}

/// The path of the first-party plugin `name`, placed on disk if it is not there yet (or was
/// altered); `None` when no first-party plugin has that name.
pub fn locate(name: &str) -> Result<Option<PathBuf>, PluginError> {
    let name = normalise(name);
    let Some((name, (bytes, sha))) = table().get_key_value(name.as_str()) else { return Ok(None) };
    let path = placement(name, sha);
    let current = std::fs::read(&path).ok().is_some_and(|b| b == *bytes);
    if !current {
        crate::util::write_atomic(&path, bytes)
            .map_err(|e| PluginError::Load { plugin: (*name).to_owned(), problem: format!("placing the first-party component at {}: {e}", path.display()) })?;
    }
    Ok(Some(path))
}

/// The embedded bytes when `path` is where [`locate`] places a first-party component: the engine
/// compiles these, never the file.
pub fn embedded_bytes(path: &Path) -> Option<&'static [u8]> {
    let name = path.file_stem()?.to_str()?;
    let (bytes, sha) = table().get(name)?;
    (path == placement(name, sha)).then_some(*bytes)
}
