//! What a sandboxed plugin runs with: a plugin gets nothing beyond a frozen clock unless its
//! `plugin.toml` asks for a permission (see `permissions` for the forms) *and* the user grants
//! it (`grant = [...]` in the run's `[[plugins]]` table, or `--grant` on the command line).

use super::manifest::Manifest;
use super::permissions::{Granted, Permission};
use super::PluginError;
use std::path::Path;

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
