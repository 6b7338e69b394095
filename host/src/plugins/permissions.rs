//! Capabilities a sandboxed plugin asks for in its manifest and the user grants (see `grant`
//! for how a request meets a grant). The forms:
//! - `read:/abs/folder` — the folder (and everything under it), read-only, at the same path;
//! - `env:NAME` — the environment variable `NAME`, with the value it has for ftx;
//! - `clock` — the real wall and monotonic clocks.
//!
//! A grant `read:/data` also covers a request for `read:/data/sub`.

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
    pub(super) fn covers(&self, want: &Permission) -> bool {
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
