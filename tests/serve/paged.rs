//! The serving engine's throughput machinery seen from outside: a KV-cache pool too small for
//! every request at once (requests wait for blocks or are preempted instead of failing), prompts prefilled in
//! small chunks, base, LoRA and DoRA requests decoded in the same batches, and every answer
//! still `model::generate`'s.

use super::*;
use ftx::serve::paged::EngineOptions;

#[test]
fn a_small_pool_queues_requests_and_chunked_prefill_keeps_generates_answers() {
    let server = {
        let _rng = torch_rng_lock();
        // 40 blocks of 4 tokens: fewer than the nine requests below need together.
        start_with(&[("lora", LORA), ("dora", DORA)], |o| o.engine = EngineOptions { kv_block_size: 4, kv_cache_tokens: 160, prefill_chunk: 12, ..Default::default() })
    };
    let m = get(&server, "/metrics", None).1;
    assert_eq!(series(&m, "ftx_kv_cache_blocks_total"), 40.0, "{m}");
    let models = ["tiny", "lora", "dora"];
    let jobs: Vec<(&str, String, usize)> = (0..9).map(|i| (models[i % 3], format!("Tell me about item {i}, please{}", "!".repeat(i)), 6 + i)).collect();
    let answers = chat_concurrently(&server, &jobs);
    let mut needs = Vec::new();
    for ((m, u, n), got) in jobs.iter().zip(&answers) {
        let adapter = match *m {
            "lora" => Some(LORA),
            "dora" => Some(DORA),
            _ => None,
        };
        let (want, prompt_len, _) = reference(adapter, u, greedy(*n));
        assert_eq!(*got, want, "{m}: {u}");
        assert!(prompt_len > 5, "the prompt is prefilled in several chunks");
        // What a request may hold at its longest: the prompt's blocks, the new tokens' and one
        // to copy on write (the nine together do not fit: some wait or are preempted).
        needs.push(prompt_len.div_ceil(4) + n.div_ceil(4) + 1);
    }
    assert!(needs.iter().sum::<usize>() > 40 && needs.iter().all(|&n| n <= 40), "some requests had to wait for blocks: {needs:?}");
    // A request whose prompt and max_tokens can never fit is refused, naming the fix.
    let (status, v) = post(&server, "/v1/chat/completions", &chat_body("tiny", "hello", 200));
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("--kv-cache-tokens"), "{msg}");
    // Every block goes back to the pool (the gauge is set after the step that answered).
    let mut m = String::new();
    for _ in 0..200 {
        m = get(&server, "/metrics", None).1;
        if series(&m, "ftx_kv_cache_blocks_used") == 0.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert_eq!(series(&m, "ftx_kv_cache_blocks_used"), 0.0, "{m}");
}

/// The GPU serving benchmark's script end to end on the CPU with tiny numbers (ftx's side; the
/// transformers side needs transformers ≥ 5): `ftx bench random-model` writes a checkpoint
/// whose word-level tokenizer turns the generated prompts into exactly the planned token ids,
/// `ftx serve` answers every request with exactly NEW tokens (no end-of-sequence token), and the
/// table is printed. A smoke test of the plumbing, no timing claims.
#[test]
fn the_serving_benchmark_script_runs_on_a_tiny_random_model() {
    let out = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/serve_vs_hf.sh");
    let run = std::process::Command::new("bash")
        .arg(&script)
        .env("FTX", env!("CARGO_BIN_EXE_ftx"))
        .env("OUT", out.path())
        .env("SHAPES", "tiny")
        .env("CONC", "1 3")
        .env("PROMPT", "20")
        .env("NEW", "5")
        .env("REQUESTS", "4")
        .env("DEVICE", "cpu")
        .env("DTYPE", "fp32")
        .env("TIMEOUT", "120")
        .env("HF", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    let results = std::fs::read_to_string(out.path().join("results.jsonl")).unwrap();
    let lines: Vec<Value> = results.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{results}");
    for (line, conc) in lines.iter().zip([1, 3]) {
        assert_eq!(line["system"], "ftx");
        assert_eq!(line["concurrency"], conc);
        assert_eq!((line["ok"].as_u64(), line["errors"].as_u64()), (Some(4), Some(0)), "{line}");
        assert_eq!(line["output_tokens"], 4 * 5, "{line}");
        assert!(line["ttft_p50_ms"].as_f64().unwrap() > 0.0, "{line}");
    }
    assert!(stdout.contains("ftx tok/s") && stdout.contains("tiny"), "{stdout}");
    // The tokenizer maps token i to the word t<i>: text and ids agree.
    let dir = out.path().join("models/tiny");
    let tok = TextTokenizer::load(&dir, 32000).unwrap();
    assert_eq!(tok.encode("t5 t31999 t0", false).unwrap(), vec![5, 31999, 0]);
}
