//! Capabilities a sandboxed plugin asks for in its manifest and the user grants.
//!
//! A plugin gets nothing beyond a frozen clock unless its `plugin.toml` asks for a permission
//! *and* the user grants it (`grant = [...]` in the run's `[[plugins]]` table, or `--grant` on
//! the command line). The forms:
//! - `read:/abs/folder` — the folder (and everything under it), read-only, at the same path;
//! - `env:NAME` — the environment variable `NAME`, with the value it has for ftx;
//! - `clock` — the real wall and monotonic clocks.
//!
//! A grant `read:/data` also covers a request for `read:/data/sub`.

use super::manifest::Manifest;
use super::PluginError;
use std::path::{Path, PathBuf};

/// One capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    /// Read-only access to a folder tree.
    Read(PathBuf),
    /// One environment variable.
    Env(String),
    /// The real clocks.
    Clock,
}

impl Permission {
    /// Parses `read:/path`, `env:NAME` or `clock`.
    pub fn parse(s: &str) -> Result<Permission, String> {
        match s.split_once(':') {
            Some(("read", p)) if Path::new(p).is_absolute() => Ok(Permission::Read(PathBuf::from(p))),
            Some(("read", p)) => Err(format!("permission {s:?}: the folder must be an absolute path, not {p:?}")),
            Some(("env", n)) if !n.is_empty() && !n.contains('=') => Ok(Permission::Env(n.to_owned())),
            None if s == "clock" => Ok(Permission::Clock),
            _ => Err(format!("unknown permission {s:?}: use read:/absolute/folder, env:NAME or clock")),
        }
    }

    /// Whether granting `self` covers a request for `want`.
    fn covers(&self, want: &Permission) -> bool {
        match (self, want) {
            (Permission::Read(g), Permission::Read(w)) => w.starts_with(g),
            (a, b) => a == b,
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Permission::Read(p) => write!(f, "read:{}", p.display()),
            Permission::Env(n) => write!(f, "env:{n}"),
            Permission::Clock => f.write_str("clock"),
        }
    }
}

/// The capabilities one plugin instance runs with (all of them requested and granted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Granted(pub Vec<Permission>);

impl Granted {
    /// Nothing: the default sandbox.
    pub fn none() -> Granted {
        Granted(Vec::new())
    }
}

/// What the plugin whose component is `component` asks for: the permissions of the
/// `plugin.toml` beside it when that manifest describes this component, else none.
pub fn requested(component: &Path) -> Result<Vec<String>, PluginError> {
    let Some(dir) = component.parent() else { return Ok(Vec::new()) };
    if !dir.join("plugin.toml").exists() {
        return Ok(Vec::new());
    }
    let m = Manifest::read(dir)?;
    let same = component.file_name().and_then(|n| n.to_str()) == Some(m.component.as_str());
    Ok(if same { m.permissions } else { Vec::new() })
}

/// Checks each requested permission against the user's grants; the error names the plugin, the
/// permission and how to grant it.
pub fn check(plugin: &str, requested: &[String], grants: &[String]) -> Result<Granted, PluginError> {
    let load = |problem: String| PluginError::Load { plugin: plugin.to_owned(), problem };
    let grants: Vec<Permission> = grants.iter().map(|g| Permission::parse(g)).collect::<Result<_, _>>().map_err(|e| load(format!("grant: {e}")))?;
    let mut out = Vec::new();
    for r in requested {
        let want = Permission::parse(r).map_err(|e| load(format!("plugin.toml: {e}")))?;
        if !grants.iter().any(|g| g.covers(&want)) {
            return Err(load(format!(
                "asks for permission {want}, which is not granted: add grant = [\"{want}\"] to its [[plugins]] table in ftx.toml (plugin_grants in a prep config), or pass --grant {want} to ftx train"
            )));
        }
        out.push(want);
    }
    Ok(Granted(out))
}

/// [`requested`] and [`check`] for the plugin at `component`.
pub fn for_component(plugin: &str, component: &Path, grants: &[String]) -> Result<Granted, PluginError> {
    check(plugin, &requested(component)?, grants)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_cover_requests_and_refusals_say_how_to_grant() {
        let ok = check("p", &["read:/data/a".into(), "env:HF_HOME".into()], &["read:/data".into(), "env:HF_HOME".into()]).unwrap();
        assert_eq!(ok.0, vec![Permission::Read("/data/a".into()), Permission::Env("HF_HOME".into())]);
        let e = check("p", &["read:/etc".into()], &["read:/data".into()]).unwrap_err().to_string();
        assert!(e.contains("plugin p") && e.contains("read:/etc") && e.contains("--grant read:/etc"), "{e}");
        assert!(check("p", &["clock".into()], &[]).is_err());
        assert!(check("p", &["read:relative".into()], &["read:relative".into()]).is_err());
        assert!(Permission::parse("net:*").is_err());
    }
}
