//! `ftx plugin …`: scaffold, build, inspect, sign, verify, install, list and remove plugins.

use crate::plugins::inspect;
use crate::plugins::manifest::{self, Manifest};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// `ftx plugin` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum PluginCommand {
    /// Create a plugin crate that builds (kinds: filter, reward, loss, judge, exporter).
    New {
        kind: String,
        name: String,
        /// Folder to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Build a plugin crate into `<crate>/dist/` (component + plugin.toml).
    Build { dir: PathBuf },
    /// Show a component's or plugin folder's (or an installed or first-party plugin's) kind,
    /// API version, parameters, hash.
    Inspect { path: PathBuf },
    /// Make a signing key pair: `<out>.secret` and `<out>.pub` (hex).
    Keygen { out: PathBuf },
    /// Sign a plugin folder's manifest (→ plugin.sig), or a bare component file (→ <file>.sig),
    /// with a secret key file.
    Sign { path: PathBuf, #[arg(long)] key: PathBuf },
    /// Check a plugin folder's hash and signature, or a bare component file's signature
    /// (`<file>.sig` beside it, or `--signature`) and, when a plugin.toml beside it describes
    /// it, its hash.
    Verify {
        path: PathBuf,
        /// Signature of a bare component file (default: `<file>.sig` beside it).
        #[arg(long)]
        signature: Option<PathBuf>,
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// Verify and install a plugin: a folder (plugin.toml + component), a bare component file
    /// (signed by `--signature` or `<file>.sig`), or `name[@version]` from `--registry URL`.
    Install {
        source: String,
        /// URL of a registry's index.json; SOURCE is then `name` or `name@version`.
        #[arg(long)]
        registry: Option<String>,
        /// Signature of a bare component file (default: `<file>.sig` beside it).
        #[arg(long)]
        signature: Option<PathBuf>,
        /// Install even without a signature by a trusted key (the hash is still checked).
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// Add a built (and signed) plugin folder to a registry folder: its files under
    /// `<name>/<version>/` and its entry in `index.json`. Serve the folder with any static
    /// web server.
    Publish {
        dir: PathBuf,
        #[arg(long)]
        registry: PathBuf,
    },
    /// List installed plugins.
    List,
    /// Remove an installed plugin.
    Remove { name: String },
}

pub fn run(cmd: PluginCommand) -> Result<()> {
    match cmd {
        PluginCommand::New { kind, name, dir } => new(&kind, &name, &dir),
        PluginCommand::Build { dir } => build(&dir).map(|_| ()),
        PluginCommand::Inspect { path } => inspect(&path),
        PluginCommand::Keygen { out } => {
            let (secret, public) = manifest::keygen();
            crate::util::write_atomic(&out.with_extension("secret"), secret.as_bytes())?;
            crate::util::write_atomic(&out.with_extension("pub"), public.as_bytes())?;
            println!("secret key: {} (keep it private)\npublic key: {} (users copy it into {})", out.with_extension("secret").display(), out.with_extension("pub").display(), crate::paths::ftx_home().join("trusted-keys").display());
            Ok(())
        }
        PluginCommand::Sign { path, key } => {
            let secret = std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
            let sig = manifest::sign(&path, &secret)?;
            println!("signed {} → {}", path.display(), sig.display());
            Ok(())
        }
        PluginCommand::Verify { path, signature, allow_unsigned } => {
            let (m, signed) = if path.is_dir() {
                manifest::verify(&path, allow_unsigned)?
            } else if path.is_file() {
                let (m, signed, _) = inspect::verify_file(&path, signature.as_deref(), allow_unsigned)?;
                (m, signed)
            } else {
                bail!("{}: no such plugin folder or file", path.display());
            };
            println!("{} {} ({}): hash ok, {}", m.name, m.version, m.kind, if signed { "signature ok (trusted key)" } else { "UNSIGNED" });
            Ok(())
        }
        PluginCommand::Install { source, registry, signature, allow_unsigned } => {
            let (m, signed, dest) = match registry {
                Some(url) => crate::plugins::registry::install(&url, &source, allow_unsigned)?,
                None if Path::new(&source).is_dir() => {
                    let (m, signed) = manifest::verify(Path::new(&source), allow_unsigned)?;
                    (m, signed, manifest::install(Path::new(&source), allow_unsigned)?)
                }
                None if Path::new(&source).is_file() => inspect::install_file(Path::new(&source), signature.as_deref(), allow_unsigned)?,
                None => bail!("{source}: no such plugin folder or file (to install from a registry, pass --registry URL)"),
            };
            println!("installed {} {} ({}, {}) → {}", m.name, m.version, m.kind, if signed { "signed by a trusted key" } else { "UNSIGNED" }, dest.display());
            if !m.permissions.is_empty() {
                println!("it asks for permissions {}: grant them per run (grant = [...] in its [[plugins]] table, or --grant)", m.permissions.join(", "));
            }
            Ok(())
        }
        PluginCommand::Publish { dir, registry } => {
            let e = crate::plugins::registry::publish(&dir, &registry)?;
            println!("published {} ({}) into {}; serve that folder and install with `ftx plugin install NAME --registry <url>/index.json`", e.component, if e.signature.is_some() { "signed" } else { "unsigned" }, registry.join("index.json").display());
            Ok(())
        }
        PluginCommand::List => {
            let all = manifest::installed();
            if all.is_empty() {
                println!("no plugins installed in {}", manifest::store_dir().display());
            }
            for (dir, m) in all {
                println!("{:<20} {:<8} {:<12} ftx:plugin@{}  {}", m.name, m.version, m.kind, m.api_version, dir.display());
            }
            // Built into ftx: usable by name (`--plugin dpo`) unless an installed one has the name.
            match crate::plugins::first_party::not_built() {
                None => println!("first-party (built in, by name): {}", crate::plugins::first_party::names().join(", ")),
                Some(why) => println!("first-party: none in this build ({why})"),
            }
            Ok(())
        }
        PluginCommand::Remove { name } => {
            let dir = manifest::store_dir().join(&name);
            if !dir.join("plugin.toml").exists() {
                bail!("no installed plugin called {name} (see `ftx plugin list`)");
            }
            std::fs::remove_dir_all(&dir)?;
            println!("removed {name}");
            Ok(())
        }
    }
}

fn inspect(path: &Path) -> Result<()> {
    // A name that is no file here: an installed or first-party plugin (`ftx plugin inspect dpo`).
    let located;
    let path = if !path.exists() && !crate::plugins::manifest::is_explicit_path(path) {
        located = crate::plugins::manifest::locate(path)?;
        located.as_path()
    } else {
        path
    };
    let m = if path.is_dir() { Manifest::read(path)? } else { inspect::describe(path, "?", crate::plugins::grant::requested(path)?)? };
    print!("{}", m.to_toml());
    Ok(())
}

/// The SDK's location: this source tree's plugin-api (ftx is built from it).
fn sdk_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("plugin-api").canonicalize().unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api"))
}

fn new(kind: &str, name: &str, dir: &Path) -> Result<()> {
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') || name.is_empty() {
        bail!("plugin names use letters, digits, '-' and '_'");
    }
    let body = match kind {
        "filter" => FILTER_TEMPLATE,
        "reward" => REWARD_TEMPLATE,
        "loss" => LOSS_TEMPLATE,
        "judge" => JUDGE_TEMPLATE,
        "exporter" => EXPORTER_TEMPLATE,
        other => bail!("unknown plugin kind '{other}': filter, reward, loss, judge or exporter"),
    };
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    std::fs::create_dir_all(root.join("src"))?;
    let cargo = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nftx-plugin-api = {{ path = \"{}\" }}\n\n# A plugin is its own workspace.\n[workspace]\n\n[profile.release]\nopt-level = \"s\"\nstrip = true\n",
        sdk_path().display()
    );
    std::fs::write(root.join("Cargo.toml"), cargo)?;
    std::fs::write(root.join("src/lib.rs"), body)?;
    println!("created {} — build it with `ftx plugin build {}`", root.display(), root.display());
    Ok(())
}

/// Builds the crate for wasm32-wasip2 and writes `dist/` with the component and manifest.
pub fn build(dir: &Path) -> Result<PathBuf> {
    let cargo_toml = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&cargo_toml).with_context(|| format!("reading {}", cargo_toml.display()))?;
    let pkg: toml::Table = text.parse().with_context(|| format!("{}: not valid TOML", cargo_toml.display()))?;
    let package = pkg.get("package").and_then(|p| p.as_table()).context("Cargo.toml has no [package]")?;
    let name = package.get("name").and_then(|n| n.as_str()).context("[package] has no name")?.to_owned();
    let version = package.get("version").and_then(|n| n.as_str()).unwrap_or("0.0.0").to_owned();
    let status = std::process::Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-wasip2", "--manifest-path"])
        .arg(&cargo_toml)
        .status()
        .context("running cargo (is the Rust toolchain installed? `rustup target add wasm32-wasip2`)")?;
    if !status.success() {
        bail!("cargo build of {} failed", dir.display());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| dir.join("target"));
    let wasm = target.join("wasm32-wasip2/release").join(format!("{}.wasm", name.replace('-', "_")));
    let dist = dir.join("dist");
    std::fs::create_dir_all(&dist)?;
    let component = dist.join(format!("{name}.wasm"));
    crate::util::write_atomic(&component, &std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?)?;
    // Permissions the plugin asks for: `[package.metadata.ftx] permissions = ["read:/data"]`.
    let permissions: Vec<String> = package
        .get("metadata")
        .and_then(|m| m.get("ftx"))
        .and_then(|f| f.get("permissions"))
        .and_then(|p| p.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let m = inspect::describe(&component, &version, permissions)?;
    crate::util::write_atomic(&dist.join("plugin.toml"), m.to_toml().as_bytes())?;
    println!("built {} ({}, ftx:plugin@{}) → {}", m.name, m.kind, m.api_version, dist.display());
    Ok(dist)
}

const FILTER_TEMPLATE: &str = r#"//! A data filter: keep, drop (with a reason) or rewrite each record.

use ftx_plugin_api::filter::{export_filter, Filter, Item, Verdict};

struct Plugin;

impl Filter for Plugin {
    fn filter(items: Vec<Item>) -> Vec<Verdict> {
        items
            .iter()
            .map(|item| if item.json.trim().is_empty() { Verdict::Drop("empty record".into()) } else { Verdict::Keep })
            .collect()
    }
}

export_filter!(Plugin);
"#;

const REWARD_TEMPLATE: &str = r#"//! A reward: one score per (prompt, completion, reference) sample.

use ftx_plugin_api::reward::{export_reward, Reward, Sample};

struct Plugin;

impl Reward for Plugin {
    fn score(samples: Vec<Sample>) -> Vec<f32> {
        samples.iter().map(|s| if s.completion.trim().is_empty() { 0.0 } else { 1.0 }).collect()
    }
}

export_reward!(Plugin);
"#;

const LOSS_TEMPLATE: &str = r#"//! A preference loss built from host tensor ops (here: DPO's sigmoid loss).

use ftx_plugin_api::loss::{export_loss, input, param, param_spec, Loss, LossOutput, LossSpec, Metric};

struct Plugin;

impl Loss for Plugin {
    fn describe() -> LossSpec {
        LossSpec {
            inputs: ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"]
                .map(String::from)
                .to_vec(),
            params: vec![param_spec("beta", 0.1, "strength of the pull towards the reference")],
        }
    }

    fn compute(params: Vec<(String, f64)>) -> Result<LossOutput, String> {
        let beta = param(&params, "beta")?;
        let chosen = input("policy_chosen_logps")?.sub(&input("reference_chosen_logps")?)?;
        let rejected = input("policy_rejected_logps")?.sub(&input("reference_rejected_logps")?)?;
        let margin = chosen.sub(&rejected)?.mul_scalar(beta);
        let loss = margin.log_sigmoid().neg().mean(&[], false)?;
        Ok(LossOutput { loss, metrics: vec![Metric { name: "rewards/margin".into(), value: margin.detach() }] })
    }
}

export_loss!(Plugin);
"#;

const JUDGE_TEMPLATE: &str = r#"//! A judge: asks the host's language model for a 1-10 grade and scores grade / 10.

use ftx_plugin_api::judge::{complete, export_judge, Judge, Judgement, Sample};

struct Plugin;

fn grade(s: &Sample) -> Result<Judgement, String> {
    let reference = s.reference.as_deref().unwrap_or("(none)");
    let prompt = format!("Grade this answer from 1 to 10. Reply \"Score: N\" and one sentence.\nQuestion: {}\nAnswer: {}\nReference: {reference}", s.prompt, s.response);
    let reply = complete(&prompt, 64)?;
    let digits: String = reply.chars().skip_while(|c| !c.is_ascii_digit()).take_while(|c| c.is_ascii_digit()).collect();
    match digits.parse::<u32>() {
        Ok(n @ 1..=10) => Ok(Judgement { score: n as f32 / 10.0, rationale: reply }),
        _ => Err(format!("no grade in the reply: {reply:?}")),
    }
}

impl Judge for Plugin {
    fn judge(samples: Vec<Sample>) -> Vec<Result<Judgement, String>> {
        samples.iter().map(grade).collect()
    }
}

export_judge!(Plugin);
"#;

const EXPORTER_TEMPLATE: &str = r#"//! An exporter: writes each tensor's raw little-endian bytes to `<name>.bin`, and `index.txt`.

use ftx_plugin_api::exporter::{create, export_exporter, finish, read, write, Exporter, ModelInfo};

struct Plugin;

const CHUNK: u64 = 1 << 20;

impl Exporter for Plugin {
    fn export(info: ModelInfo) -> Result<(), String> {
        let mut index = String::new();
        for t in &info.tensors {
            let h = create(&format!("{}.bin", t.name))?;
            let mut offset = 0;
            while offset < t.bytes() {
                let chunk = read(&t.name, offset, CHUNK)?;
                offset += chunk.len() as u64;
                write(h, &chunk)?;
            }
            finish(h)?;
            index.push_str(&format!("{} {} bytes, shape {:?}\n", t.name, t.bytes(), t.shape));
        }
        let h = create("index.txt")?;
        write(h, index.as_bytes())?;
        finish(h)
    }
}

export_exporter!(Plugin);
"#;
