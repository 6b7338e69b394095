//! Plugins known by their file alone: the manifest made by inspecting a component or native
//! library (its kind, API version and, for a loss, its parameters, which takes loading it), and
//! the verification and install of such a bare file. Above the plugin kinds, since inspecting a
//! loss loads it; `manifest` (`plugin.toml`, signatures, the store) stays below them.

use super::loss::LossPlugin;
use super::manifest::{check_signature, err, sig_beside, store_dir, Manifest, ManifestParam};
use super::{PluginError, PluginKind};
use std::path::{Path, PathBuf};

/// Builds the manifest of a component by inspecting it; it asks for `permissions`.
pub fn describe(component_path: &Path, version: &str, permissions: Vec<String>) -> Result<Manifest, PluginError> {
    let name = super::plugin_name(component_path);
    let bytes = std::fs::read(component_path).map_err(|e| err(&name, e.to_string()))?;
    let (kind, api_version) = super::kind_of(component_path)?;
    let params = if kind == PluginKind::Loss {
        let p = LossPlugin::load(component_path, super::Limits::default(), tch::Device::Cpu)?;
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
