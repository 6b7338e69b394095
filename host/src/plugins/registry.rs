//! Plugin registries: a static JSON index any HTTP(S) server can host, and installs from it.
//!
//! `index.json`:
//! ```json
//! { "format": 1,
//!   "plugins": { "dpo": { "0.1.0": {
//!       "kind": "loss",
//!       "component": "dpo/0.1.0/dpo.wasm",
//!       "sha256": "…hex SHA-256 of the component…",
//!       "manifest": "dpo/0.1.0/plugin.toml",
//!       "signature": "dpo/0.1.0/plugin.sig" } } } }
//! ```
//! URLs are absolute or relative to the index's own URL. An install downloads the three files
//! into a plugin folder, checks the component against the index's and the manifest's SHA-256,
//! and installs it like a local folder: the ed25519 signature of the manifest must verify
//! against one of the user's trusted keys unless unsigned plugins are explicitly allowed.
//! `ftx plugin publish` writes this layout (files and index entry) into a folder.

use super::manifest::{self, Manifest};
use super::PluginError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Version of the index format this ftx reads and writes.
pub const INDEX_FORMAT: u32 = 1;
/// Largest file a registry download may be.
const MAX_DOWNLOAD: u64 = 512 << 20;

/// `index.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub format: u32,
    /// Plugin name → version → entry.
    pub plugins: BTreeMap<String, BTreeMap<String, Entry>>,
}

/// One published version of a plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: String,
    /// URL of the component (`.wasm`) or native library.
    pub component: String,
    /// Hex SHA-256 of the component.
    pub sha256: String,
    /// URL of its `plugin.toml`.
    pub manifest: String,
    /// URL of `plugin.sig`, the ed25519 signature of the manifest (absent: unsigned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

fn err(plugin: &str, problem: impl Into<String>) -> PluginError {
    PluginError::Load { plugin: plugin.to_owned(), problem: problem.into() }
}

/// `url` resolved against the index URL `base`.
fn resolve(base: &str, url: &str) -> Result<String, String> {
    let base = url::Url::parse(base).map_err(|e| format!("registry URL {base:?}: {e}"))?;
    base.join(url).map(String::from).map_err(|e| format!("URL {url:?}: {e}"))
}

/// The body of `url` (at most [`MAX_DOWNLOAD`] bytes).
fn get(url: &str) -> Result<Vec<u8>, String> {
    let resp = ureq::get(url).timeout(std::time::Duration::from_secs(120)).call().map_err(|e| match e {
        ureq::Error::Status(code, r) => format!("{url}: the server answered {code} {}", r.status_text()),
        ureq::Error::Transport(t) => format!("{url}: {t}"),
    })?;
    let mut body = Vec::new();
    resp.into_reader().take(MAX_DOWNLOAD + 1).read_to_end(&mut body).map_err(|e| format!("{url}: {e}"))?;
    if body.len() as u64 > MAX_DOWNLOAD {
        return Err(format!("{url}: larger than {} MiB", MAX_DOWNLOAD >> 20));
    }
    Ok(body)
}

/// The index at `url`.
pub fn fetch_index(url: &str) -> Result<Index, PluginError> {
    let bytes = get(url).map_err(|e| err("registry", e))?;
    let index: Index = serde_json::from_slice(&bytes).map_err(|e| err("registry", format!("{url}: not a plugin index: {e}")))?;
    if index.format != INDEX_FORMAT {
        return Err(err("registry", format!("{url}: index format {} (this ftx reads format {INDEX_FORMAT})", index.format)));
    }
    Ok(index)
}

/// Orders versions numerically (`0.10.0` after `0.9.0`); non-numeric parts compare as text.
fn version_key(v: &str) -> Vec<(u64, String)> {
    v.split(['.', '-', '+']).map(|p| (p.parse().unwrap_or(0), p.to_owned())).collect()
}

/// The entry for `spec` (`name` or `name@version`; the newest version when none is given).
pub fn pick<'a>(index: &'a Index, spec: &str) -> Result<(String, String, &'a Entry), PluginError> {
    let (name, version) = spec.split_once('@').map_or((spec, None), |(n, v)| (n, Some(v)));
    let versions = index.plugins.get(name).ok_or_else(|| err(name, "is not in the registry's index"))?;
    let (v, e) = match version {
        Some(v) => versions.get_key_value(v).ok_or_else(|| {
            err(name, format!("has no version {v} in the registry (it has: {})", versions.keys().cloned().collect::<Vec<_>>().join(", ")))
        })?,
        None => versions.iter().max_by_key(|(v, _)| version_key(v)).ok_or_else(|| err(name, "has no versions in the registry"))?,
    };
    Ok((name.to_owned(), v.clone(), e))
}

/// Downloads `spec` from the registry whose index is at `index_url`, checks it and installs it
/// into the plugin store; returns the manifest, whether it was signed, and where it went.
pub fn install(index_url: &str, spec: &str, allow_unsigned: bool) -> Result<(Manifest, bool, PathBuf), PluginError> {
    let index = fetch_index(index_url)?;
    let (name, version, entry) = pick(&index, spec)?;
    let fail = |e: String| err(&name, e);
    let staging = tempfile::tempdir().map_err(|e| fail(format!("temporary folder: {e}")))?;
    let manifest_bytes = get(&resolve(index_url, &entry.manifest).map_err(fail)?).map_err(fail)?;
    let m: Manifest = toml::from_str(std::str::from_utf8(&manifest_bytes).map_err(|e| fail(format!("plugin.toml: {e}")))?)
        .map_err(|e| fail(format!("plugin.toml: {e}")))?;
    if m.name != name || m.version != version {
        return Err(fail(format!("the registry lists {name} {version} but its manifest says {} {}", m.name, m.version)));
    }
    if m.sha256 != entry.sha256 {
        return Err(fail(format!("the index says the component's SHA-256 is {}, its manifest says {}", entry.sha256, m.sha256)));
    }
    if Path::new(&m.component).components().count() != 1 {
        return Err(fail(format!("plugin.toml names the component {:?}; it must be a plain file name", m.component)));
    }
    let component = get(&resolve(index_url, &entry.component).map_err(fail)?).map_err(fail)?;
    let write = |f: &str, b: &[u8]| crate::util::write_atomic(&staging.path().join(f), b).map_err(|e| fail(e.to_string()));
    write("plugin.toml", &manifest_bytes)?;
    write(&m.component, &component)?;
    if let Some(sig) = &entry.signature {
        write("plugin.sig", &get(&resolve(index_url, sig).map_err(fail)?).map_err(fail)?)?;
    }
    // Hash (tampered bytes), signature (trusted key) and permissions' syntax, as for a folder.
    let (m, signed) = manifest::verify(staging.path(), allow_unsigned)?;
    let dest = manifest::install(staging.path(), allow_unsigned)?;
    Ok((m, signed, dest))
}

/// Publishes the plugin folder `dir` (a built, usually signed, `dist/`) into the registry
/// folder `registry`: copies its files to `<name>/<version>/` and adds its entry to
/// `index.json` (created if missing). Returns the entry.
pub fn publish(dir: &Path, registry: &Path) -> Result<Entry, PluginError> {
    let m = Manifest::read(dir)?;
    m.check_component(dir)?;
    let io = |e: std::io::Error| err(&m.name, e.to_string());
    let rel = format!("{}/{}", m.name, m.version);
    let signed = dir.join("plugin.sig").exists();
    for f in [m.component.as_str(), "plugin.toml", "plugin.sig"] {
        if dir.join(f).exists() {
            crate::util::write_atomic(&registry.join(&rel).join(f), &std::fs::read(dir.join(f)).map_err(io)?).map_err(io)?;
        }
    }
    let index_path = registry.join("index.json");
    let mut index: Index = match std::fs::read(&index_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| err(&m.name, format!("{}: {e}", index_path.display())))?,
        Err(_) => Index { format: INDEX_FORMAT, plugins: BTreeMap::new() },
    };
    let entry = Entry {
        kind: m.kind.clone(),
        component: format!("{rel}/{}", m.component),
        sha256: m.sha256.clone(),
        manifest: format!("{rel}/plugin.toml"),
        signature: signed.then(|| format!("{rel}/plugin.sig")),
    };
    index.plugins.entry(m.name.clone()).or_default().insert(m.version.clone(), entry.clone());
    let json = serde_json::to_string_pretty(&index).expect("the index serialises");
    crate::util::write_atomic(&index_path, json.as_bytes()).map_err(io)?;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_resolve_against_the_index_and_versions_sort_numerically() {
        assert_eq!(resolve("http://h:1/r/index.json", "dpo/0.1.0/dpo.wasm").unwrap(), "http://h:1/r/dpo/0.1.0/dpo.wasm");
        assert_eq!(resolve("http://h:1/r/index.json", "https://cdn/x.wasm").unwrap(), "https://cdn/x.wasm");
        let e = |v: &str| (v.to_owned(), Entry { kind: "loss".into(), component: v.into(), sha256: String::new(), manifest: String::new(), signature: None });
        let index = Index { format: 1, plugins: [("p".to_owned(), [e("0.9.0"), e("0.10.0")].into_iter().collect())].into_iter().collect() };
        assert_eq!(pick(&index, "p").unwrap().1, "0.10.0");
        assert_eq!(pick(&index, "p@0.9.0").unwrap().1, "0.9.0");
        assert!(pick(&index, "p@1.0.0").unwrap_err().to_string().contains("0.10.0, 0.9.0"));
        assert!(pick(&index, "q").is_err());
    }
}
