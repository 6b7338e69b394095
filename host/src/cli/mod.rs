//! The `ftx` command line: parses arguments, sets up logging, runs one command, and turns
//! every error into a message with context (never a panic trace).

mod bench;
mod demo;
mod demo_orpo;
mod dist_check;
mod doctor;
mod eval;
mod export;
mod generate;
mod merge;
mod plan;
mod plugin;
mod prep;
mod push;
mod serve;
mod train;

use crate::gpu::CudaStatus;
use clap::{Parser, Subcommand};

/// ftx — fine-tune large language models: prep, plan, train, eval, export, serve.
#[derive(Parser, Debug)]
#[command(name = "ftx", version, about, long_about = None)]
pub struct Cli {
    /// Log level filter (error, warn, info, debug, trace), or RUST_LOG syntax.
    #[arg(long, global = true, default_value = "warn")]
    pub log: String,
    /// A plugin for this run, e.g. a loss for preference training: a first-party or installed
    /// plugin's name (dpo, orpo, …), or a path to a .wasm/.so file or a plugin folder
    /// (repeatable; adds to the config's [[plugins]]).
    #[arg(long = "plugin", global = true, value_name = "NAME|PATH")]
    pub plugins: Vec<std::path::PathBuf>,
    /// Grant the run's plugins a permission their manifests ask for: `read:/folder`,
    /// `env:NAME` or `clock` (repeatable).
    #[arg(long = "grant", global = true, value_name = "PERMISSION")]
    pub grants: Vec<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the demo: a function-calling LoRA on a tiny model, scored before and after.
    Demo(demo::DemoArgs),
    /// Check a distributed set-up: rendezvous, then every collective on known values, per rank.
    DistCheck(dist_check::DistCheckArgs),
    /// Report libtorch, CUDA and GPUs, and where ftx keeps its files.
    Doctor,
    /// Evaluate models side by side: perplexity, task metrics, multiple choice, judge; HTML report.
    Eval(eval::EvalArgs),
    /// Write a fine-tuned model for deployment (merged Hugging Face checkpoint, or GGUF).
    Export(export::ExportArgs),
    /// Generate text from a checkpoint folder (KV cache; greedy or sampled; streamed).
    Generate(generate::GenerateArgs),
    /// Combine LoRA adapters into one (cat, linear, svd, ties, dare), as PEFT's add_weighted_adapter.
    Merge(merge::MergeArgs),
    /// Memory needed to fine-tune a model, and which hardware tier fits it.
    Plan(plan::PlanArgs),
    /// Plugins: new, build, inspect, keygen, sign, verify, install, list, remove.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Prepare training data: ingest, filter, scrub PII, deduplicate, format and split.
    Prep(prep::PrepArgs),
    /// Upload an adapter, a merged checkpoint or a GGUF file to a Hugging Face Hub repository, with a model card.
    Push(push::PushArgs),
    /// Serve a model and its adapters over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Fine-tune a model (full, LoRA, QLoRA, DoRA, HFT) as an ftx.toml describes.
    Train(train::TrainArgs),
    /// Benchmarks (training throughput and memory).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs the CLI; returns the process exit code.
pub fn main(cuda: CudaStatus) -> i32 {
    let cli = Cli::parse();
    // In a distributed run only rank 0 logs below warnings (its progress and metrics stand for all).
    let nonzero_rank = std::env::var("RANK").is_ok_and(|r| r.trim() != "0") && std::env::var_os("WORLD_SIZE").is_some();
    let level = if nonzero_rank { "warn" } else { cli.log.as_str() };
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::DistCheck(args) => dist_check::run(args),
        Command::Doctor => doctor::run(&cuda),
        Command::Demo(args) => demo::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Export(args) => export::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Prep(args) => prep::run(args),
        Command::Push(args) => push::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Train(args) => train::run(args, &cli.plugins, &cli.grants),
        Command::Plugin(cmd) => plugin::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => 0,
        // Stopped by Ctrl-C or SIGTERM after a checkpoint: where it is and how to resume (rank 0 says it).
        Err(e) if e.downcast_ref::<crate::train::interrupt::Interrupted>().is_some() => {
            let i = e.downcast_ref::<crate::train::interrupt::Interrupted>().expect("checked");
            if !nonzero_rank {
                eprintln!("ftx: {i}");
            }
            i.exit_code()
        }
        Err(e) if e.downcast_ref::<crate::train::interrupt::RanksStopped>().is_some() => {
            e.downcast_ref::<crate::train::interrupt::RanksStopped>().expect("checked").exit_code()
        }
        // Nothing left to do: say so, and how to train more.
        Err(e) if e.downcast_ref::<crate::recipes::RunFinished>().is_some() => {
            if !nonzero_rank {
                eprintln!("ftx: {e}");
            }
            0
        }
        Err(e) => {
            // Errors can quote plugins and files: no control character reaches the terminal
            // raw (plugin text is escaped and cut where it enters; this is the last guard).
            let msg = crate::plugins::untrusted::escape_keeping(&format!("{e:#}"), &['\n', '\t']);
            // In a rank of a distributed run, say which one (most errors there already do).
            match std::env::var("RANK") {
                Ok(rank) if std::env::var_os("WORLD_SIZE").is_some() && !msg.starts_with("rank ") => eprintln!("error: rank {rank}: {msg}"),
                _ => eprintln!("error: {msg}"),
            }
            1
        }
    }
}
