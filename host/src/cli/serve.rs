//! `ftx serve`: the OpenAI-compatible server; `ftx bench serve`: its load test.

use crate::gpu::DeviceArg;
use crate::model::decoder::LoadOptions;
use crate::serve::bench::{self, LoadSpec};
use crate::serve::{ServeOptions, Server};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;

/// How the model is loaded and served (shared by `serve` and `bench serve`).
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint folder (config.json, *.safetensors, tokenizer.json), or a Hub id: org/name[@revision].
    #[arg(long)]
    pub model: PathBuf,
    /// The base model's name in requests (default: the folder's name).
    #[arg(long)]
    pub served_name: Option<String>,
    /// A PEFT adapter served under a name: `--adapter name=path` (repeatable).
    #[arg(long = "adapter", value_name = "NAME=PATH")]
    pub adapters: Vec<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceArg,
    /// Compute dtype: fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on GPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Most requests decoded together in one batch.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Requests that may wait for a batch slot; beyond that the server answers 429.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// max_tokens for requests that give none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Tokens per block of the paged KV cache.
    #[arg(long, default_value_t = 16)]
    pub kv_block_size: usize,
    /// Tokens the KV-cache pool holds over all running sequences, allocated at start
    /// (default: max-batch × min(context length, 4096)). A request starts when the pool can hold
    /// its prompt; when running ones outgrow the pool, the most recently admitted is preempted
    /// and later recomputed (ftx_preemptions_total counts it).
    #[arg(long)]
    pub kv_cache_tokens: Option<usize>,
    /// Prompt tokens prefilled per step (pieces of several prompts batched), between decode
    /// steps of running requests.
    #[arg(long, default_value_t = 2048)]
    pub prefill_chunk: usize,
    /// Decode every step eagerly, kernel by kernel, instead of replaying CUDA graphs captured
    /// per batch and context bucket (GPU only; graphs are for the base model's rows).
    #[arg(long)]
    pub no_cuda_graphs: bool,
}

impl ModelArgs {
    fn options(&self) -> anyhow::Result<ServeOptions> {
        let device = self.device.resolve().map_err(anyhow::Error::msg)?;
        let kind = match &self.dtype {
            Some(d) => crate::model::parse_dtype(d)?,
            None if device.is_cuda() => tch::Kind::BFloat16,
            None => tch::Kind::Float,
        };
        let adapters = self
            .adapters
            .iter()
            .map(|a| match a.split_once('=') {
                Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_owned(), PathBuf::from(p))),
                _ => anyhow::bail!("--adapter '{a}': write it as NAME=PATH, e.g. --adapter sql=runs/sql/adapter"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(ServeOptions {
            model_dir: self.model.clone(),
            served_name: self.served_name.clone(),
            adapters,
            load: LoadOptions { device, kind },
            max_batch: self.max_batch,
            queue: self.queue,
            default_max_tokens: self.default_max_tokens,
            api_key: None,
            request_log: None,
            engine: crate::serve::paged::EngineOptions {
                kv_block_size: self.kv_block_size,
                kv_cache_tokens: self.kv_cache_tokens.unwrap_or(0),
                prefill_chunk: self.prefill_chunk,
                cuda_graphs: !self.no_cuda_graphs,
            },
        })
    }
}

/// Arguments of `ftx serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health. Prefer
    /// --api-key-file or the FTX_API_KEY environment variable: a key on the command line
    /// shows in `ps`.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (its first line).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Append one JSON line per request here: time, id, model, status, latency, time to first
    /// token, tokens, finish reasons.
    #[arg(long)]
    pub request_log: Option<PathBuf>,
    /// The fraction of requests (0 to 1) whose prompt and output the request log keeps too.
    #[arg(long, default_value_t = 0.0, requires = "request_log")]
    pub log_content_sample: f64,
    /// On SIGTERM or Ctrl-C: seconds running requests get to finish (new ones get 503).
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
}

/// The API key from --api-key, --api-key-file or FTX_API_KEY, in that order.
fn api_key(a: &ServeArgs) -> anyhow::Result<Option<String>> {
    if let Some(k) = &a.api_key {
        return Ok(Some(k.clone()));
    }
    if let Some(path) = &a.api_key_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("--api-key-file {}", path.display()))?;
        let key = text.lines().next().unwrap_or("").trim().to_owned();
        if key.is_empty() {
            anyhow::bail!("--api-key-file {}: the first line is empty; write the key there", path.display());
        }
        return Ok(Some(key));
    }
    Ok(std::env::var("FTX_API_KEY").ok().filter(|k| !k.trim().is_empty()))
}

/// Blocks until SIGTERM or Ctrl-C.
fn wait_for_stop_signal() -> anyhow::Result<&'static str> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the signal listener")?;
    rt.block_on(async {
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("listening for SIGTERM")?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.map(|_| "Ctrl-C").context("listening for Ctrl-C"),
                _ = term.recv() => Ok("SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c().await.map(|_| "Ctrl-C").context("listening for Ctrl-C")
        }
    })
}

fn parse_addr(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    (host, port).to_socket_addrs().with_context(|| format!("--host {host}"))?.next().with_context(|| format!("--host {host} resolves to nothing"))
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    let addr = parse_addr(&a.host, a.port)?;
    let mut opts = a.model.options()?;
    opts.api_key = api_key(&a)?;
    opts.request_log = a.request_log.clone().map(|path| crate::serve::ops::LogOptions { path, content_sample: a.log_content_sample });
    let auth = opts.api_key.is_some();
    let server = Server::start(opts, addr).with_context(|| format!("starting the server for {}", a.model.model.display()))?;
    eprintln!("ftx serve: listening on http://{} — models: {}", server.addr, server.names.join(", "));
    eprintln!("  POST /v1/chat/completions, /v1/completions, /v1/adapters; GET /v1/models, /metrics, /health");
    if auth {
        eprintln!("  API key required (Authorization: Bearer ...) on all but /health");
    }
    let signal = wait_for_stop_signal()?;
    eprintln!("ftx serve: {signal}: draining (new requests get 503), waiting up to {} s for {} running", a.shutdown_grace, server.in_flight());
    let left = server.shutdown(std::time::Duration::from_secs(a.shutdown_grace));
    if left > 0 {
        eprintln!("ftx serve: stopped with {left} request(s) unfinished after {} s", a.shutdown_grace);
    } else {
        eprintln!("ftx serve: stopped; every request was answered");
    }
    Ok(())
}

/// Arguments of `ftx bench serve`.
#[derive(clap::Args, Debug)]
pub struct BenchServeArgs {
    /// A running server to load (e.g. http://127.0.0.1:8000); without it, one is started on
    /// loopback from --model.
    #[arg(long, conflicts_with = "model")]
    pub url: Option<String>,
    #[command(flatten)]
    pub serve: Option<ModelArgs>,
    /// The `model` of each request (default: the server's first model).
    #[arg(long)]
    pub request_model: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    #[arg(long, default_value = "Write a short poem about the sea.")]
    pub prompt: String,
}

pub fn bench(a: BenchServeArgs) -> anyhow::Result<()> {
    if a.requests == 0 || a.concurrency == 0 {
        anyhow::bail!("--requests and --concurrency must be positive");
    }
    let (url, server) = match (&a.url, &a.serve) {
        (Some(u), _) => (u.clone(), None),
        (None, Some(m)) => {
            let s = Server::start(m.options()?, "127.0.0.1:0".parse()?).context("starting the server")?;
            (format!("http://{}", s.addr), Some(s))
        }
        (None, None) => anyhow::bail!("give --url of a running server, or --model to start one"),
    };
    let model = match &a.request_model {
        Some(m) => m.clone(),
        None => {
            let v: serde_json::Value = ureq::get(&format!("{}/v1/models", url.trim_end_matches('/')))
                .call()
                .with_context(|| format!("GET {url}/v1/models"))?
                .into_json()?;
            v["data"][0]["id"].as_str().context("the server lists no models")?.to_owned()
        }
    };
    let spec = LoadSpec { url, model, requests: a.requests, concurrency: a.concurrency, max_tokens: a.max_tokens, prompt: a.prompt };
    let bar = indicatif::ProgressBar::new(a.requests as u64);
    let r = bench::run(&spec, || bar.inc(1));
    bar.finish_and_clear();
    drop(server);
    println!("requests            {} ({} ok, {} failed), {} concurrent", r.requests, r.ok, r.errors, r.concurrency);
    println!("wall time           {:.2} s", r.wall_s);
    println!("requests/s          {:.2}", r.requests_per_s);
    println!("completion tok/s    {:.1}", r.completion_tokens_per_s);
    println!("latency p50/p90/p99 {:.0} / {:.0} / {:.0} ms", r.latency_p50_ms, r.latency_p90_ms, r.latency_p99_ms);
    println!("{}", serde_json::to_string(&r)?);
    if let Some(e) = &r.first_error {
        anyhow::bail!("{} of {} requests failed; first: {e}", r.errors, r.requests);
    }
    Ok(())
}
