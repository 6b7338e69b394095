//! `ftx push REPO --path DIR|FILE`: uploads an adapter folder, a merged checkpoint or a GGUF
//! file to a Hugging Face Hub repository, with a generated model card (`README.md`).

use crate::hub::card::{self, PushKind, RunInfo};
use crate::hub::push::{self, Content, PushOptions, UploadFile};
use crate::hub::HubEnv;
// Tokenizer and template files an adapter folder may carry (uploaded when present).
use crate::model::tokenizer::TOKENIZER_FILES;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// Arguments of `ftx push`.
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The repository, `org/name` (created when absent).
    pub repo: String,
    /// What to upload: an adapter folder (a run's `final/`, or the run folder itself), a merged
    /// checkpoint folder (`ftx export --format merged`), or a `.gguf` file.
    #[arg(long)]
    pub path: PathBuf,
    /// The branch to commit to (created when absent).
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Create the repository private.
    #[arg(long)]
    pub private: bool,
    /// adapter, merged or gguf (default: what --path holds).
    #[arg(long)]
    pub kind: Option<String>,
    /// An `ftx eval` report (its report.json or folder) for the card's evaluation table
    /// (default: the run folder's eval/report.json, when there is one).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// The commit message.
    #[arg(long)]
    pub message: Option<String>,
}


fn has(dir: &Path, f: &str) -> bool {
    dir.join(f).is_file()
}

/// What `path` holds, or why it is nothing ftx pushes.
fn detect(path: &Path) -> anyhow::Result<PushKind> {
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "gguf") {
            return Ok(PushKind::Gguf);
        }
        bail!("{}: a file to push must be a .gguf (push folders for adapters and checkpoints)", path.display());
    }
    if !path.is_dir() {
        bail!("{}: no such file or folder", path.display());
    }
    if has(path, "adapter_config.json") && has(path, "adapter_model.safetensors") {
        return Ok(PushKind::Adapter);
    }
    if has(path, "config.json") && (has(path, "model.safetensors") || has(path, "model.safetensors.index.json")) {
        return Ok(PushKind::Merged);
    }
    bail!(
        "{}: neither an adapter folder (adapter_config.json + adapter_model.safetensors), a checkpoint folder \
         (config.json + safetensors) nor a run folder with final/ in it",
        path.display()
    )
}

/// The files to upload, as (path in the repository, local file).
fn collect(path: &Path, kind: PushKind) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    match kind {
        PushKind::Gguf => {
            let name = path.file_name().and_then(|n| n.to_str()).context("the .gguf file's name is not UTF-8")?;
            out.push((name.to_owned(), path.to_owned()));
            // The Ollama Modelfile `ftx export` writes beside the file.
            let modelfile = path.with_file_name("Modelfile");
            if modelfile.is_file() {
                out.push(("Modelfile".into(), modelfile));
            }
        }
        PushKind::Adapter => {
            for f in ["adapter_config.json", "adapter_model.safetensors"].iter().chain(TOKENIZER_FILES) {
                if has(path, f) {
                    out.push((f.to_string(), path.join(f)));
                }
            }
        }
        PushKind::Merged => {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            for p in entries {
                let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
                // README.md is replaced by the generated card; ftx-manifest.json holds local paths.
                if name.starts_with('.') || name == "README.md" || name == "ftx-manifest.json" {
                    continue;
                }
                out.push((name, p));
            }
        }
    }
    Ok(out)
}

pub fn run(a: PushArgs) -> anyhow::Result<()> {
    let mut path = a.path.clone();
    if path.is_dir() && !has(&path, "adapter_config.json") && !has(&path, "config.json") && path.join("final").is_dir() {
        // A run folder: its final weights.
        path = path.join("final");
    }
    let found = detect(&path)?;
    let kind = match a.kind.as_deref() {
        None => found,
        Some(k) => {
            let want = [PushKind::Adapter, PushKind::Merged, PushKind::Gguf]
                .into_iter()
                .find(|p| p.name() == k)
                .with_context(|| format!("--kind {k}: use adapter, merged or gguf"))?;
            if want != found {
                bail!("--kind {k}, but {} holds {} (leave --kind out to push what is there)", path.display(), found.name());
            }
            want
        }
    };
    let files = collect(&path, kind)?;
    let info = RunInfo::discover(&path, a.eval.as_deref());
    if let Some(e) = &a.eval {
        anyhow::ensure!(info.eval.is_some(), "--eval {}: not a readable ftx eval report.json", e.display());
    }
    let mut names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    names.push("README.md".into());
    let readme = card::render(&a.repo, kind, &names, &info);
    let mut uploads: Vec<UploadFile> =
        files.into_iter().map(|(path_in_repo, p)| UploadFile { path_in_repo, content: Content::File(p) }).collect();
    uploads.push(UploadFile { path_in_repo: "README.md".into(), content: Content::Bytes(readme.into_bytes()) });
    let env = HubEnv::from_env();
    let message = a.message.clone().unwrap_or_else(|| format!("Upload {} with ftx {}", kind.name(), env!("CARGO_PKG_VERSION")));
    let opts = PushOptions { repo: a.repo.clone(), revision: a.revision.clone(), private: a.private, message };
    let report = push::push(&env, &opts, uploads)?;
    println!(
        "pushed {} files to {} ({}, revision {}): {} inline, {} through LFS; commit {}",
        report.regular.len() + report.lfs.len(),
        a.repo,
        env.endpoint,
        a.revision,
        report.regular.len(),
        report.lfs.len(),
        if report.commit_url.is_empty() { report.commit.clone() } else { report.commit_url.clone() }
    );
    if let Some(run) = &info.run_dir {
        println!("model card: base {}, data and config from {}", info.base_model.as_deref().unwrap_or("(unknown)"), run.display());
    }
    Ok(())
}
