//! Where ftx keeps its own files. Below every module that reads or writes them (plugins,
//! caches, the CLI), so none of those reaches up to the command line for a path.

/// Where ftx keeps caches (compiled plugins, datasets): `$FTX_HOME` or `~/.cache/ftx`.
pub fn ftx_home() -> std::path::PathBuf {
    if let Some(h) = std::env::var_os("FTX_HOME") {
        return h.into();
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(|| ".".into());
    home.join(".cache").join("ftx")
}
