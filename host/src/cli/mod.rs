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
mod torch_panic;
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
    /// `ftx --plugin P train …`: the same as `ftx train --plugin P …` (only `train` takes it).
    #[arg(long = "plugin", value_name = "NAME|PATH")]
    pub plugins: Vec<std::path::PathBuf>,
    /// `ftx --grant G train …`: the same as `ftx train --grant G …` (only `train` takes it).
    #[arg(long = "grant", value_name = "PERMISSION")]
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
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour_on_stderr()).init();
    if !(cli.plugins.is_empty() && cli.grants.is_empty()) && !matches!(cli.command, Command::Train(_)) {
        eprintln!("error: --plugin and --grant before the command apply to `ftx train` only; this command takes its plugins in its own options (see its --help)");
        return 2;
    }
    let result = torch_panic::run_catching_torch_errors(|| match cli.command {
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
        Command::Train(args) => train::run(args, cli.plugins, cli.grants),
        Command::Plugin(cmd) => plugin::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    });
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
            let msg = crate::plugins::untrusted::escape_keeping(&error_chain(&e), &['\n', '\t']);
            // In a rank of a distributed run, say which one (most errors there already do).
            match std::env::var("RANK") {
                Ok(rank) if std::env::var_os("WORLD_SIZE").is_some() && !msg.starts_with("rank ") => eprintln!("error: rank {rank}: {msg}"),
                _ => eprintln!("error: {msg}"),
            }
            1
        }
    }
}

/// An error and its causes on one line, `outer: cause: cause`, each cause left out when the
/// text before it already says it (a file error whose message quotes its OS error, which is
/// also its source, would otherwise print that OS message twice).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

/// Whether stderr gets ANSI colours: only on a terminal, and never with `NO_COLOR` set
/// (<https://no-color.org>).
pub fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[test]
    fn a_cause_the_message_already_quotes_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        #[derive(Debug, thiserror::Error)]
        #[error("x.jsonl: {source}")]
        struct FileError {
            source: std::io::Error,
        }
        let e = anyhow::Error::new(FileError { source: io }).context("data.train");
        assert_eq!(error_chain(&e), "data.train: x.jsonl: No such file or directory (os error 2)");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
