//! Builds the first-party plugin crates of `plugins/` for wasm32-wasip2 and writes
//! `$OUT_DIR/first_party.rs`, which embeds each component with `include_bytes!`.
//!
//! The nested cargo builds the separate plugin workspace into its own target folder
//! (`plugins/target`, the one `tests/run.sh` and the README's set-up use), so it never waits on
//! the lock of the build that runs this script; it inherits that build's jobserver, so it adds
//! no jobs. When it cannot build them (no `wasm32-wasip2` target installed, no network for a
//! first download), ftx still builds, with a warning, and says at run time how to get them.
use std::path::{Path, PathBuf};
use std::process::Command;

/// Variables of the outer build that must not leak into the nested one: a target or target
/// folder meant for the host, host-only flags, and cargo's internal hand-overs.
const SCRUB: &[&str] = &[
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTFLAGS",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_PRIMARY_PACKAGE",
    "__CARGO_DEFAULT_LIB_METADATA",
];

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = here.join("../..");
    let plugins = root.join("plugins");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-env-changed=FTX_NO_FIRST_PARTY");
    let names = first_party_crates(&plugins);
    for p in ["Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", plugins.join(p).display());
    }
    for n in &names {
        println!("cargo:rerun-if-changed={}", plugins.join(n).join("Cargo.toml").display());
        println!("cargo:rerun-if-changed={}", plugins.join(n).join("src").display());
    }
    for p in ["plugin-api/src", "plugin-api/Cargo.toml", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let built = if std::env::var_os("FTX_NO_FIRST_PARTY").is_some() {
        Err("FTX_NO_FIRST_PARTY was set when ftx was built".to_owned())
    } else if names.is_empty() {
        Err(format!("no plugin crates found in {}", plugins.display()))
    } else {
        build(&plugins, &names, &out)
    };
    let mut code = String::from("/// The embedded components.\npub static COMPONENTS: &[Component] = &[\n");
    let not_built = match built {
        Ok(files) => {
            for (name, file) in files {
                code.push_str(&format!("    Component {{ name: {name:?}, bytes: include_bytes!({:?}) }},\n", file.display().to_string()));
            }
            "None".to_owned()
        }
        Err(why) => {
            println!("cargo:warning=ftx: first-party plugins not embedded ({}); `--plugin dpo` by name will not work until they are: `rustup target add wasm32-wasip2`, then rebuild", why.lines().next().unwrap_or(""));
            format!("Some({why:?})")
        }
    };
    code.push_str("];\n/// Why there are none, when there are none.\npub const NOT_BUILT: Option<&str> = ");
    code.push_str(&not_built);
    code.push_str(";\n");
    std::fs::write(out.join("first_party.rs"), code).expect("writing first_party.rs");
}

/// The members of `plugins/Cargo.toml` that are plugin crates of `plugins/` itself (not the
/// hostile or test plugins that build with them).
fn first_party_crates(plugins: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(plugins.join("Cargo.toml")) else { return Vec::new() };
    let Some(line) = text.lines().find(|l| l.trim_start().starts_with("members")) else { return Vec::new() };
    line.split('"').skip(1).step_by(2).filter(|m| !m.contains('/') && plugins.join(m).join("src").is_dir()).map(str::to_owned).collect()
}

/// Runs the nested build; returns (name, component copied into `out`) per crate.
fn build(plugins: &Path, names: &[String], out: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = plugins.join("target");
    // The one way to deadlock: this build itself running in plugins/target, whose lock it holds.
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    if canonical(out).starts_with(canonical(&target_dir)) {
        return Err(format!("this build's target folder is {}, which the nested plugin build needs: use another --target-dir", target_dir.display()));
    }
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "--target", "wasm32-wasip2", "--manifest-path"])
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for n in names {
        cmd.args(["-p", n]);
    }
    for v in SCRUB {
        cmd.env_remove(v);
    }
    let run = cmd.output().map_err(|e| format!("running cargo: {e}"))?;
    if !run.status.success() {
        let err = String::from_utf8_lossy(&run.stderr);
        let tail: Vec<&str> = err.lines().rev().take(12).collect();
        return Err(format!("cargo build --target wasm32-wasip2 of plugins/ failed: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | ")));
    }
    let mut files = Vec::new();
    for n in names {
        let built = target_dir.join("wasm32-wasip2/release").join(format!("{}.wasm", n.replace('-', "_")));
        let copy = out.join(format!("{n}.wasm"));
        std::fs::copy(&built, &copy).map_err(|e| format!("{}: {e}", built.display()))?;
        files.push((n.clone(), copy));
    }
    Ok(files)
}
