//! The model card (`README.md`) `ftx push` uploads: YAML front-matter the Hub indexes
//! (`base_model`, `library_name`, `tags`, `datasets`, and the training data's hashes) and a
//! body that says what was trained on what — the base, each data file with its SHA-256 (from
//! the run's `manifest.json`), the training summary and configuration (`config.toml`), and the
//! evaluation table when an `ftx eval` report is found.

use super::HubRef;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What is pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushKind {
    /// A PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
    Adapter,
    /// A full checkpoint folder (`config.json`, safetensors, tokenizer).
    Merged,
    /// One GGUF file.
    Gguf,
}

impl PushKind {
    /// The name `--kind` takes.
    pub fn name(self) -> &'static str {
        match self {
            PushKind::Adapter => "adapter",
            PushKind::Merged => "merged",
            PushKind::Gguf => "gguf",
        }
    }
}

/// What the run folder around a pushed path records.
#[derive(Debug, Default, Clone)]
pub struct RunInfo {
    /// The run folder (holding `manifest.json`), if one was found.
    pub run_dir: Option<PathBuf>,
    /// The base model as the run named it (a Hub id or a local path).
    pub base_model: Option<String>,
    /// Training data: (path or hf:// reference, SHA-256).
    pub data: Vec<(String, Option<String>)>,
    /// `manifest.json`'s `report` (steps, losses, tokens).
    pub report: Option<Value>,
    /// The run's `config.toml`, verbatim.
    pub config_toml: Option<String>,
    /// `method.kind` and `method.objective` of the config, when set.
    pub method: Option<String>,
    pub objective: Option<String>,
    /// An `ftx eval` report.json.
    pub eval: Option<Value>,
    /// Where the eval report came from.
    pub eval_path: Option<PathBuf>,
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

impl RunInfo {
    /// Looks for the run folder around `path` (itself or up to three folders up: `run/final`,
    /// `run/checkpoints/step-N/adapter`, an export folder beside its manifest) and reads what
    /// it records. `eval` names an eval report (its report.json or folder); else the run's
    /// `eval/report.json` is used when present.
    pub fn discover(path: &Path, eval: Option<&Path>) -> RunInfo {
        let mut info = RunInfo::default();
        let start = if path.is_dir() { path.to_owned() } else { path.parent().unwrap_or(Path::new(".")).to_owned() };
        // An export (merged folder, GGUF file) records its base and adapter: the adapter's run
        // folder holds the data hashes and config.
        let export_manifest = match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => path.with_extension("manifest.json"),
            _ => start.join("ftx-manifest.json"),
        };
        if let Some(m) = read_json(&export_manifest) {
            let base = m["base_model"].as_str().map(str::to_owned);
            if let Some(adapter) = m["adapter"].as_str().map(Path::new).filter(|a| a.is_dir() && *a != path) {
                let mut inner = Self::discover(adapter, eval);
                inner.base_model = base.or(inner.base_model);
                return inner;
            }
            info.base_model = base;
        }
        if let Some(a) = read_json(&start.join("adapter_config.json")) {
            info.base_model = info.base_model.or(a["base_model_name_or_path"].as_str().map(str::to_owned));
            if a["use_dora"].as_bool() == Some(true) {
                info.method = Some("dora".into());
            }
        }
        let run = start.ancestors().take(4).find(|d| d.join("manifest.json").is_file() && d.join("config.toml").is_file()).map(Path::to_owned);
        let manifest_dir = run.clone().or_else(|| start.ancestors().take(2).find(|d| d.join("manifest.json").is_file()).map(Path::to_owned));
        if let Some(m) = manifest_dir.as_ref().and_then(|d| read_json(&d.join("manifest.json"))) {
            let base = m["model"].as_str().or(m["base"].as_str()).map(str::to_owned);
            info.base_model = info.base_model.or(base);
            for i in m["inputs"].as_array().into_iter().flatten() {
                if let Some(p) = i["path"].as_str() {
                    info.data.push((p.to_owned(), i["sha256"].as_str().map(str::to_owned)));
                }
            }
            info.report = m.get("report").filter(|r| !r.is_null()).cloned();
        }
        if let Some(dir) = &run {
            info.config_toml = std::fs::read_to_string(dir.join("config.toml")).ok();
            if let Some(t) = info.config_toml.as_deref().and_then(|t| t.parse::<toml::Table>().ok()) {
                let method = t.get("method").and_then(|m| m.as_table());
                let kind = method.and_then(|m| m.get("kind")).and_then(|k| k.as_str()).map(str::to_owned);
                info.method = info.method.clone().or(kind);
                info.objective = method.and_then(|m| m.get("objective")).and_then(|k| k.as_str()).map(str::to_owned);
            }
        }
        let eval_path = match eval {
            Some(e) if e.is_dir() => Some(e.join("report.json")),
            Some(e) => Some(e.to_owned()),
            None => run.as_ref().map(|d| d.join("eval/report.json")).filter(|p| p.is_file()),
        };
        info.eval = eval_path.as_deref().and_then(read_json);
        info.eval_path = eval_path.filter(|_| info.eval.is_some());
        info.run_dir = run;
        info
    }
}

/// A YAML scalar: JSON strings are valid YAML, and escape whatever a value holds.
fn yaml_str(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// `org/name` of a dataset reference (`hf://datasets/org/name/...`).
fn dataset_id(path: &str) -> Option<String> {
    HubRef::parse_file(path).filter(|r| r.kind == super::RepoKind::Dataset).map(|r| r.repo)
}

fn metric(v: &Value) -> String {
    v.as_f64().map_or_else(|| "–".into(), |x| format!("{x:.4}"))
}

/// The card's Markdown, front-matter first.
pub fn render(repo: &str, kind: PushKind, files: &[String], info: &RunInfo) -> String {
    let base_id = info.base_model.as_deref().filter(|b| HubRef::parse_model(b).is_some() && !Path::new(b).exists());
    let mut out = String::from("---\n");
    if let Some(b) = base_id {
        // The Hub's base_model takes a bare id; a revision goes in the body.
        let _ = writeln!(out, "base_model: {}", yaml_str(b.split('@').next().unwrap_or(b)));
    }
    match kind {
        PushKind::Adapter => out.push_str("library_name: peft\n"),
        PushKind::Merged => out.push_str("library_name: transformers\n"),
        PushKind::Gguf => {}
    }
    let mut tags = vec!["ftx".to_owned()];
    tags.extend(info.method.clone());
    tags.extend(info.objective.clone());
    if kind == PushKind::Gguf {
        tags.push("gguf".into());
    }
    if let Some(b) = base_id {
        tags.push(format!("base_model:{}", b.split('@').next().unwrap_or(b)));
    }
    out.push_str("tags:\n");
    for t in &tags {
        let _ = writeln!(out, "- {}", yaml_str(t));
    }
    let datasets: Vec<String> = info.data.iter().filter_map(|(p, _)| dataset_id(p)).collect();
    if !datasets.is_empty() {
        out.push_str("datasets:\n");
        for d in &datasets {
            let _ = writeln!(out, "- {}", yaml_str(d));
        }
    }
    if !info.data.is_empty() {
        out.push_str("ftx_training_data:\n");
        for (p, sha) in &info.data {
            let _ = writeln!(out, "- path: {}\n  sha256: {}", yaml_str(p), sha.as_deref().map_or("null".into(), yaml_str));
        }
    }
    out.push_str("---\n\n");

    let name = repo.rsplit('/').next().unwrap_or(repo);
    let _ = writeln!(out, "# {name}\n");
    let what = match kind {
        PushKind::Adapter => "A PEFT adapter",
        PushKind::Merged => "A full checkpoint (adapter merged into the base)",
        PushKind::Gguf => "A GGUF file for llama.cpp, Ollama and LM Studio",
    };
    let base_line = match (&info.base_model, base_id) {
        (Some(b), Some(_)) => format!(" for [{b}](https://huggingface.co/{})", b.split('@').next().unwrap_or(b)),
        (Some(b), None) => format!(" for the base model `{b}`"),
        (None, _) => String::new(),
    };
    let _ = writeln!(out, "{what}{base_line}, trained with ftx {}.\n", env!("CARGO_PKG_VERSION"));
    out.push_str("Files: ");
    out.push_str(&files.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", "));
    out.push_str(".\n\n");

    out.push_str("## Training data\n\n");
    if info.data.is_empty() {
        out.push_str("No run manifest was found beside the pushed files, so the data is not recorded here.\n\n");
    } else {
        out.push_str("| file | SHA-256 |\n|---|---|\n");
        for (p, sha) in &info.data {
            let _ = writeln!(out, "| `{p}` | `{}` |", sha.as_deref().unwrap_or("–"));
        }
        out.push('\n');
    }
    if let Some(r) = &info.report {
        out.push_str("## Training\n\n");
        let _ = writeln!(
            out,
            "{} steps on {} tokens; train loss {} → {}.\n",
            r["steps"].as_u64().map_or("–".into(), |s| s.to_string()),
            r["tokens"].as_i64().map_or("–".into(), |s| s.to_string()),
            metric(&r["first_loss"]),
            metric(&r["last_loss"]),
        );
    }
    if let Some(cfg) = &info.config_toml {
        out.push_str("### Configuration\n\n```toml\n");
        out.push_str(cfg.trim_end());
        out.push_str("\n```\n\n");
    }
    if let Some(eval) = &info.eval {
        out.push_str(&eval_table(eval));
    }
    out.push_str("## Use\n\n```sh\n");
    match (kind, &info.base_model) {
        (PushKind::Adapter, Some(b)) => {
            let _ = writeln!(out, "huggingface-cli download {repo} --local-dir {name}");
            let _ = writeln!(out, "ftx serve --model {b} --adapter {name}={name}");
            let _ = writeln!(out, "ftx export --model {b} --adapter {name} --format merged --out {name}-merged/");
        }
        (PushKind::Adapter, None) => out.push_str("ftx export --model <base> --adapter <this adapter> --format merged --out merged/\n"),
        (PushKind::Merged, _) => {
            let _ = writeln!(out, "ftx generate --model {repo} --chat \"Hello\"");
        }
        (PushKind::Gguf, _) => {
            let _ = writeln!(out, "ollama run hf.co/{repo}");
        }
    }
    out.push_str("```\n");
    out
}

/// The `ftx eval` report as a Markdown table: one row a model, one column a task's metric
/// (and perplexity when measured).
fn eval_table(eval: &Value) -> String {
    let models = eval["models"].as_array().cloned().unwrap_or_default();
    let mut cols: Vec<(String, String)> = Vec::new();
    for m in &models {
        for t in m["tasks"].as_array().into_iter().flatten() {
            for k in t["metrics"].as_object().into_iter().flat_map(|o| o.keys()) {
                let c = (t["task"].as_str().unwrap_or("").to_owned(), k.clone());
                if !cols.contains(&c) {
                    cols.push(c);
                }
            }
        }
    }
    let ppl = models.iter().any(|m| m["perplexity"].is_object());
    let mut out = String::from("## Evaluation\n\n| model |");
    if ppl {
        out.push_str(" perplexity |");
    }
    for (t, k) in &cols {
        let _ = write!(out, " {t} {k} |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(cols.len() + usize::from(ppl)));
    out.push('\n');
    for m in &models {
        let _ = write!(out, "| {} |", m["name"].as_str().unwrap_or("?"));
        if ppl {
            let _ = write!(out, " {} |", metric(&m["perplexity"]["perplexity"]));
        }
        for (t, k) in &cols {
            let v = m["tasks"].as_array().into_iter().flatten().find(|x| x["task"] == t.as_str()).map(|x| &x["metrics"][k]);
            let _ = write!(out, " {} |", v.map_or("–".into(), metric));
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_card_carries_base_data_hashes_and_eval_table() {
        let info = RunInfo {
            base_model: Some("org/base@v2".into()),
            data: vec![("hf://datasets/org/chat/train.jsonl".into(), Some("ab".repeat(32))), ("local.jsonl".into(), None)],
            method: Some("lora".into()),
            eval: Some(serde_json::json!({"models": [
                {"name": "base", "tasks": [{"task": "qa", "metrics": {"exact_match": 0.25}}]},
                {"name": "tuned", "perplexity": {"perplexity": 3.5}, "tasks": [{"task": "qa", "metrics": {"exact_match": 0.5}}]},
            ]})),
            ..Default::default()
        };
        let card = render("me/tuned", PushKind::Adapter, &["adapter_model.safetensors".into()], &info);
        let front = card.split("---\n").nth(1).unwrap();
        assert!(front.contains("base_model: \"org/base\"\n"), "{front}");
        assert!(front.contains("library_name: peft\n"));
        assert!(front.contains("- \"lora\"\n"));
        assert!(front.contains("datasets:\n- \"org/chat\"\n"), "{front}");
        assert!(front.contains(&format!("  sha256: \"{}\"", "ab".repeat(32))));
        assert!(card.contains("| model | perplexity | qa exact_match |\n|---|---|---|\n| base | – | 0.2500 |\n| tuned | 3.5000 | 0.5000 |\n"), "{card}");
    }
}
