//! `plugin.toml`, signatures and the local plugin store.
//!
//! A plugin folder holds the component, its manifest (name, version, kind, API version,
//! SHA-256 of the component, permissions, parameters) and optionally `plugin.sig`: an
//! ed25519 signature of the manifest's bytes, which pins the component through its hash.
//! Installing checks the hash and the signature against the user's trusted keys
//! (`$FTX_HOME/trusted-keys/*.pub`, hex); unsigned or tampered plugins are refused unless
//! the user explicitly allows unsigned ones.

use super::{PluginError, PluginKind};
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
    /// per run (see `permissions`).
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

fn err(plugin: &str, problem: impl Into<String>) -> PluginError {
    PluginError::Load { plugin: plugin.to_owned(), problem: problem.into() }
}

/// Builds the manifest of a component by inspecting it; it asks for `permissions`.
pub fn describe(component_path: &Path, version: &str, permissions: Vec<String>) -> Result<Manifest, PluginError> {
    let name = super::plugin_name(component_path);
    let bytes = std::fs::read(component_path).map_err(|e| err(&name, e.to_string()))?;
    let (kind, api_version) = super::kind_of(component_path)?;
    let params = if kind == PluginKind::Loss {
        let p = super::loss::LossPlugin::load(component_path, super::Limits::default(), tch::Device::Cpu)?;
        p.params.into_iter().map(|p| ManifestParam { name: p.name, default: p.default, doc: p.doc }).collect()
    } else {
        Vec::new()
    };
    Ok(Manifest {
        name,
        version: version.to_owned(),
        kind: kind.to_string(),
        api_version,
        component: component_path.file_name().and_then(|n| n.to_str()).unwrap_or("plugin.wasm").to_owned(),
        sha256: crate::util::sha256_hex(&bytes),
        permissions,
        params,
    })
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
fn sig_beside(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".sig");
    file.with_file_name(name)
}

/// Whether the hex signature file `sig_path` signs `data` with one of the user's trusted keys.
fn check_signature(plugin: &str, data: &[u8], sig_path: &Path) -> Result<(), PluginError> {
    let hex = std::fs::read_to_string(sig_path).map_err(|e| err(plugin, format!("{}: {e}", sig_path.display())))?;
    let bytes = decode_hex(hex.trim()).map_err(|e| err(plugin, format!("{}: {e}", sig_path.display())))?;
    let sig = Signature::from_slice(&bytes).map_err(|e| err(plugin, format!("{}: {e}", sig_path.display())))?;
    if !trusted_keys().iter().any(|k| k.verify(data, &sig).is_ok()) {
        return Err(err(plugin, "its signature does not match any trusted key (or the plugin was altered); add the publisher's key to $FTX_HOME/trusted-keys/"));
    }
    Ok(())
}

/// Verifies a bare component (or native library) file: signed by `signature` (default:
/// `<file>.sig` beside it) with a trusted key over the file's bytes, or unsigned if allowed. Its
/// manifest is the `plugin.toml` beside it when that one describes this file (whose hash must
/// then match), else made by inspecting it. Returns the manifest, whether it was signed, and the
/// file's bytes.
pub fn verify_file(file: &Path, signature: Option<&Path>, allow_unsigned: bool) -> Result<(Manifest, bool, Vec<u8>), PluginError> {
    let name = super::plugin_name(file);
    let bytes = std::fs::read(file).map_err(|e| err(&name, format!("{}: {e}", file.display())))?;
    let sig = signature.map(Path::to_owned).unwrap_or_else(|| sig_beside(file));
    let signed = if sig.exists() {
        check_signature(&name, &bytes, &sig)?;
        true
    } else if signature.is_some() {
        return Err(err(&name, format!("no signature file {}", sig.display())));
    } else if allow_unsigned {
        false
    } else {
        return Err(err(&name, format!("is not signed (no {}); pass --signature FILE, or --allow-unsigned only if you trust its source", sig.display())));
    };
    let beside = file.parent().map(|d| d.join("plugin.toml")).filter(|p| p.exists());
    let m = match beside.map(|p| Manifest::read(p.parent().expect("has a parent"))).transpose()? {
        Some(m) if Some(m.component.as_str()) == file.file_name().and_then(|n| n.to_str()) => m,
        _ => describe(file, "0.0.0", Vec::new())?,
    };
    if m.sha256 != crate::util::sha256_hex(&bytes) {
        return Err(err(&m.name, format!("{} was modified: its SHA-256 differs from its plugin.toml's", file.display())));
    }
    Ok((m, signed, bytes))
}

/// Verifies (see [`verify_file`]) and installs a bare component (or native library) file.
/// Returns the manifest, whether it was signed, and where it went.
pub fn install_file(file: &Path, signature: Option<&Path>, allow_unsigned: bool) -> Result<(Manifest, bool, PathBuf), PluginError> {
    let (m, signed, bytes) = verify_file(file, signature, allow_unsigned)?;
    let dest = store_dir().join(&m.name);
    let io = |e: std::io::Error| err(&m.name, e.to_string());
    crate::util::write_atomic(&dest.join(&m.component), &bytes).map_err(io)?;
    crate::util::write_atomic(&dest.join("plugin.toml"), m.to_toml().as_bytes()).map_err(io)?;
    let _ = std::fs::remove_file(dest.join("plugin.sig"));
    Ok((m, signed, dest))
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

/// A plugin path as the user wrote it: an existing file, or the name of an installed plugin
/// (whose component is checked against its manifest before use).
pub fn locate(p: &Path) -> Result<PathBuf, PluginError> {
    if p.exists() {
        return Ok(p.to_owned());
    }
    let name = p.to_string_lossy();
    if store_dir().join(&*name).join("plugin.toml").exists() {
        return resolve(&name);
    }
    Err(err(&name, format!("no file {} and no installed plugin of that name (see `ftx plugin list`)", p.display())))
}
