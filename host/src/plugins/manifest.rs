//! `plugin.toml`, signatures and the local plugin store.
//!
//! A plugin folder holds the component, its manifest (name, version, kind, API version,
//! SHA-256 of the component, permissions, parameters) and optionally `plugin.sig`: an
//! ed25519 signature of the manifest's bytes, which pins the component through its hash.
//! Installing checks the hash and the signature against the user's trusted keys
//! (`$FTX_HOME/trusted-keys/*.pub`, hex); unsigned or tampered plugins are refused unless
//! the user explicitly allows unsigned ones.

use super::PluginError;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `plugin.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// `data-filter`, `reward`, `loss`, `judge` or `exporter`.
    pub kind: String,
    /// The `ftx:plugin` version it was built against.
    pub api_version: String,
    /// The component's file name, beside the manifest.
    pub component: String,
    /// Hex SHA-256 of the component.
    pub sha256: String,
    /// Capabilities it asks for (`read:/folder`, `env:NAME`, `clock`); the user grants them
    /// per run (see `grant`).
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Parameters a loss takes, with defaults.
    #[serde(default)]
    pub params: Vec<ManifestParam>,
}

/// One parameter in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestParam {
    pub name: String,
    pub default: f64,
    #[serde(default)]
    pub doc: String,
}

pub(super) fn err(plugin: &str, problem: impl Into<String>) -> PluginError {
    PluginError::Load { plugin: plugin.to_owned(), problem: problem.into() }
}

impl Manifest {
    /// Reads `dir/plugin.toml`.
    pub fn read(dir: &Path) -> Result<Manifest, PluginError> {
        let p = dir.join("plugin.toml");
        let text = std::fs::read_to_string(&p).map_err(|e| err(&dir.display().to_string(), format!("{}: {e}", p.display())))?;
        toml::from_str(&text).map_err(|e| err(&dir.display().to_string(), format!("{}: {e}", p.display())))
    }

    /// The manifest as written to disk (the bytes a signature covers).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("manifest serialises")
    }

    /// Checks the component in `dir` against the recorded hash, and the permissions.
    pub fn check_component(&self, dir: &Path) -> Result<PathBuf, PluginError> {
        let path = dir.join(&self.component);
        let bytes = std::fs::read(&path).map_err(|e| err(&self.name, format!("{}: {e}", path.display())))?;
        let actual = crate::util::sha256_hex(&bytes);
        if actual != self.sha256 {
            return Err(err(&self.name, format!("{} was modified: its SHA-256 is {actual}, the manifest says {}", path.display(), self.sha256)));
        }
        for p in &self.permissions {
            super::permissions::Permission::parse(p).map_err(|e| err(&self.name, format!("plugin.toml: {e}")))?;
        }
        Ok(path)
    }
}

/// Where installed plugins and trusted keys live.
pub fn store_dir() -> PathBuf {
    crate::paths::ftx_home().join("plugins")
}

/// The user's trusted signing keys.
pub fn trusted_keys() -> Vec<VerifyingKey> {
    let dir = crate::paths::ftx_home().join("trusted-keys");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|hex| decode_hex(hex.trim()).ok())
        .filter_map(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .filter_map(|b| VerifyingKey::from_bytes(&b).ok())
        .collect()
}

/// A new signing key: (secret hex, public hex).
pub fn keygen() -> (String, String) {
    let mut secret = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut secret);
    let key = SigningKey::from_bytes(&secret);
    (encode_hex(&secret), encode_hex(key.verifying_key().as_bytes()))
}

/// Signs a plugin with a hex secret key: a folder's `plugin.toml` into `plugin.sig`, or a bare
/// component file's bytes into `<file>.sig`. Returns the signature file.
pub fn sign(path: &Path, secret_hex: &str) -> Result<PathBuf, PluginError> {
    let bytes = decode_hex(secret_hex.trim()).map_err(|e| err("signing key", e))?;
    let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| err("signing key", "must be 32 bytes of hex"))?;
    let (signed, out) = if path.is_dir() { (path.join("plugin.toml"), path.join("plugin.sig")) } else { (path.to_owned(), sig_beside(path)) };
    let data = std::fs::read(&signed).map_err(|e| err(&path.display().to_string(), format!("{}: {e}", signed.display())))?;
    let sig = SigningKey::from_bytes(&secret).sign(&data);
    crate::util::write_atomic(&out, encode_hex(&sig.to_bytes()).as_bytes()).map_err(|e| err(&path.display().to_string(), e.to_string()))?;
    Ok(out)
}

/// `x.wasm.sig` beside `x.wasm`.
pub(super) fn sig_beside(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".sig");
    file.with_file_name(name)
}

/// Whether the hex signature file `sig_path` signs `data` with one of the user's trusted keys.
pub(super) fn check_signature(plugin: &str, data: &[u8], sig_path: &Path) -> Result<(), PluginError> {
    let hex = std::fs::read_to_string(sig_path).map_err(|e| err(plugin, format!("{}: {e}", sig_path.display())))?;
    let bytes = decode_hex(hex.trim()).map_err(|e| err(plugin, format!("{}: {e}", sig_path.display())))?;
    let sig = Signature::from_slice(&bytes).map_err(|e| err(plugin, format!("{}: {e}", sig_path.display())))?;
    if !trusted_keys().iter().any(|k| k.verify(data, &sig).is_ok()) {
        return Err(err(plugin, "its signature does not match any trusted key (or the plugin was altered); add the publisher's key to $FTX_HOME/trusted-keys/"));
    }
    Ok(())
}

/// Verifies a plugin folder: the hash, and a signature by a trusted key unless
/// `allow_unsigned`. Returns the manifest and whether it was signed.
pub fn verify(dir: &Path, allow_unsigned: bool) -> Result<(Manifest, bool), PluginError> {
    let m = Manifest::read(dir)?;
    m.check_component(dir)?;
    let manifest = std::fs::read(dir.join("plugin.toml")).map_err(|e| err(&m.name, e.to_string()))?;
    let signed = if dir.join("plugin.sig").exists() {
        check_signature(&m.name, &manifest, &dir.join("plugin.sig"))?;
        true
    } else if allow_unsigned {
        false
    } else {
        return Err(err(&m.name, "is not signed; install it with --allow-unsigned only if you trust its source"));
    };
    Ok((m, signed))
}

/// Installs a verified plugin folder into the store; returns where it went.
pub fn install(dir: &Path, allow_unsigned: bool) -> Result<PathBuf, PluginError> {
    let (m, _) = verify(dir, allow_unsigned)?;
    let dest = store_dir().join(&m.name);
    let io = |e: std::io::Error| err(&m.name, e.to_string());
    std::fs::create_dir_all(&dest).map_err(io)?;
    for f in [m.component.as_str(), "plugin.toml", "plugin.sig"] {
        let src = dir.join(f);
        if src.exists() {
            crate::util::write_atomic(&dest.join(f), &std::fs::read(&src).map_err(io)?).map_err(io)?;
        }
    }
    Ok(dest)
}

/// Installed plugins' manifests.
pub fn installed() -> Vec<(PathBuf, Manifest)> {
    let mut v: Vec<(PathBuf, Manifest)> = std::fs::read_dir(store_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Manifest::read(&e.path()).ok().map(|m| (e.path(), m)))
        .collect();
    v.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    v
}

/// The component of an installed plugin called `name`, verified again before use.
pub fn resolve(name: &str) -> Result<PathBuf, PluginError> {
    let dir = store_dir().join(name);
    let m = Manifest::read(&dir)?;
    m.check_component(&dir)
}

fn encode_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 {
        return Err("odd-length hex".into());
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string())).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(super::decode_hex(&super::encode_hex(&b)).unwrap(), b);
        assert!(super::decode_hex("abc").is_err());
    }
}

/// Whether the user wrote `p` as a path (it contains a `/`, or ends in `.wasm` or a native
/// library's extension) rather than a plugin's name.
pub fn is_explicit_path(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.contains('/') || s.ends_with(".wasm") || super::native::is_native(p)
}

/// A plugin as the user named it (`--plugin`, `[[plugins]] path`, `method.objective`), resolved
/// in this order:
/// 1. an explicit path ([`is_explicit_path`]): a component or native library file, or a plugin
///    folder (its `plugin.toml`; a crate folder's `dist/` after `ftx plugin build`), whose
///    component is checked against the manifest's hash;
/// 2. an installed plugin of that name (`ftx plugin install`), checked the same way;
/// 3. a first-party plugin of that name (embedded in ftx: dpo, orpo, kto, …).
///
/// A bare name never means a file or folder of the working directory, so a plugin's crate
/// folder beside the user does not shadow the plugin installed from it.
pub fn locate(p: &Path) -> Result<PathBuf, PluginError> {
    if is_explicit_path(p) {
        return locate_path(p);
    }
    let name = p.to_string_lossy();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') || name.starts_with('.') {
        return Err(err(&name, "is neither a path (one with a '/', or a .wasm file) nor a plugin name (letters, digits, '-', '_')"));
    }
    if store_dir().join(&*name).join("plugin.toml").exists() {
        if super::first_party::names().contains(&&*name) {
            tracing::info!("plugin {name}: using the installed one, not the first-party one of the same name");
        }
        return resolve(&name);
    }
    if let Some(path) = super::first_party::locate(&name)? {
        return Ok(path);
    }
    Err(err(&name, not_found(&name)))
}

/// A plugin given by its path: a file, or a plugin folder.
fn locate_path(p: &Path) -> Result<PathBuf, PluginError> {
    if p.is_file() {
        return Ok(p.to_owned());
    }
    if p.is_dir() {
        for dir in [p.to_owned(), p.join("dist")] {
            if dir.join("plugin.toml").exists() {
                let m = Manifest::read(&dir)?;
                return m.check_component(&dir);
            }
        }
        return Err(err(
            &p.display().to_string(),
            format!("{} is a folder without a plugin.toml: pass a plugin folder (plugin.toml and its component, e.g. the dist/ that `ftx plugin build` writes), a .wasm file, or an installed plugin's name", p.display()),
        ));
    }
    Err(err(&p.display().to_string(), format!("no file or folder {}", p.display())))
}

/// The message for a name that is neither installed nor first-party: what exists, and what a
/// same-named file or folder here would need.
fn not_found(name: &str) -> String {
    let installed: Vec<String> = installed().into_iter().map(|(_, m)| m.name).collect();
    let first_party = super::first_party::names();
    let mut msg = format!(
        "no installed or first-party plugin of that name. Installed ({}): {}. First-party: {}.",
        store_dir().display(),
        if installed.is_empty() { "none".to_owned() } else { installed.join(", ") },
        if first_party.is_empty() { "none".to_owned() } else { first_party.join(", ") },
    );
    if let Some(why) = super::first_party::not_built() {
        msg.push_str(&format!(" (This ftx was built without its first-party plugins: {why}; `rustup target add wasm32-wasip2` and rebuild.)"));
    }
    if Path::new(name).exists() {
        msg.push_str(&format!(" A file or folder {name} is here: a bare name never means a path, so pass ./{name} to use it."));
    }
    msg
}
