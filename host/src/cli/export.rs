//! `ftx export --model BASE [--adapter DIR] --format merged|gguf|plugin --out PATH`

use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `ftx export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The base checkpoint folder, or a Hub id: org/name[@revision].
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder (e.g. a run's `final/`), merged into the base in fp32.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// `merged`: a standalone Hugging Face checkpoint (sharded safetensors);
    /// `gguf`: one GGUF file for llama.cpp / Ollama, with a Modelfile;
    /// `plugin`: whatever the exporter plugin given with --plugin writes.
    /// Default: `gguf` when --out ends in `.gguf`, else `merged`.
    #[arg(long)]
    pub format: Option<String>,
    /// Output folder (gguf: a folder, or a path ending in .gguf).
    #[arg(long)]
    pub out: PathBuf,
    /// merged: weight dtype, fp32, bf16 or fp16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// merged: the largest shard (e.g. 5GB, 500MB); bigger checkpoints get an index.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// gguf: f16, q8_0, q4_k_m, q5_k_m or q6_k.
    #[arg(long, default_value = "f16")]
    pub quant: String,
    /// plugin: the exporter plugin (a .wasm component or a native library); it reads the
    /// merged model's tensors and writes only inside --out.
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// plugin: permissions granted to it (read:/folder, env:NAME, clock; repeatable).
    #[arg(long)]
    pub grant: Vec<String>,
    /// plugin: seconds the plugin's calls may take in all (its own compute and the host's reads
    /// and writes for it; see the README's Plugins section).
    #[arg(long, default_value_t = crate::plugins::budget::DEFAULT_RUN_BUDGET.as_secs_f64())]
    pub plugin_time_budget_s: f64,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let gguf_out = a.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let format = a.format.clone().unwrap_or_else(|| if gguf_out { "gguf".into() } else { "merged".into() });
    match format.as_str() {
        "merged" if gguf_out => {
            anyhow::bail!("--out {}: a merged checkpoint is a folder; name a folder, or add --format gguf for one GGUF file", a.out.display())
        }
        "merged" => {
            let kind = crate::model::parse_dtype(&a.dtype)?;
            let max = crate::export::parse_size(&a.max_shard_size).map_err(anyhow::Error::msg)?;
            let files = crate::export::safetensors_out::export_merged_sharded(&a.model, a.adapter.as_deref(), &a.out, kind, max)
                .with_context(|| format!("exporting {} as a merged checkpoint", a.model.display()))?;
            println!("wrote {} ({} weight file{})", a.out.display(), files.len(), if files.len() == 1 { "" } else { "s" });
        }
        "gguf" => {
            let quant: crate::export::gguf::Quant = a.quant.parse().map_err(anyhow::Error::msg)?;
            let r = crate::export::gguf::export_gguf(&a.model, a.adapter.as_deref(), &a.out, quant)
                .with_context(|| format!("exporting {} as GGUF", a.model.display()))?;
            for (t, why) in &r.fallbacks {
                println!("note: {t}: {why}");
            }
            println!("wrote {} ({} tensors, {:.1} MB)", r.path.display(), r.tensors, r.bytes as f64 / 1e6);
            println!("wrote {}  (ollama create <name> -f {})", r.modelfile.display(), r.modelfile.display());
        }
        "plugin" => {
            let path = a.plugin.as_ref().context("--format plugin needs --plugin <exporter.wasm or .so, or a plugin's name>")?;
            let path = &crate::plugins::manifest::locate(path)?;
            let run_budget = crate::plugins::budget::budget_from_secs(a.plugin_time_budget_s).map_err(|e| anyhow::anyhow!("--plugin-time-budget-s: {e}"))?;
            let t0 = std::time::Instant::now();
            let limits = crate::plugins::Limits { run_budget, ..Default::default() };
            let mut exporter = crate::plugins::exporter::ExporterPlugin::load_granted(path, limits, &a.grant)?;
            let opts = crate::model::decoder::LoadOptions { device: tch::Device::Cpu, kind: tch::Kind::Float };
            let mut model = crate::model::CausalLm::load(&a.model, opts)?;
            if let Some(adapter) = &a.adapter {
                crate::peft::load_adapter(&mut model, adapter).map_err(|e| anyhow::anyhow!("{}: {e}", adapter.display()))?;
                crate::export::merge_adapters(&mut model);
            }
            let files = exporter.export(&model, &a.out)?;
            println!("plugin {} wrote {} file{} into {}", exporter.name, files.len(), if files.len() == 1 { "" } else { "s" }, a.out.display());
            for line in crate::plugins::budget::summary_lines(&[exporter.time()], t0.elapsed().as_secs_f64()) {
                println!("{line}");
            }
        }
        other => anyhow::bail!("unknown export format '{other}': use merged, gguf or plugin"),
    }
    Ok(())
}
