//! Preemption in the paged KV cache: a pool that holds one request's whole answer but not two
//! running together. Requests are admitted on their prompt's blocks, grow until the pool runs
//! out mid-decode, and the most recently admitted one is preempted (its blocks freed) and later
//! resumed by recomputing its prompt and the tokens it had generated. Every answer is still
//! `model::generate`'s, streams neither repeat nor lose text, and a sampled request draws what it
//! would have drawn unpreempted (a draw depends on the seed and the token's position). Which request is preempted depends on arrival order, so each test sends
//! requests of one kind only: whichever was preempted is of that kind.

use super::*;
use ftx::serve::paged::EngineOptions;
use std::time::Duration;

/// Tokens per block in these tests.
const BLOCK: usize = 4;
/// Tokens asked of every request: many more than the prompts', so that several requests are
/// admitted together (on their prompts' blocks) and outgrow the pool before they end.
const MAX_TOKENS: usize = 64;

/// Prompt tokens of a chat request with one user message.
fn prompt_len(user: &str) -> usize {
    let vocab = ftx::model::ModelConfig::load(&fixture(MODEL)).unwrap().vocab;
    let tok = TextTokenizer::load(&fixture(MODEL), vocab).unwrap();
    tok.encode_chat(&[Message::new("user", user)], true).unwrap().len()
}

/// A server whose pool holds the longest of `users`' whole answers (prompt and MAX_TOKENS − 1
/// fed-back tokens: the last sampled one is never fed) plus one block: two requests running
/// together must run out of blocks. Returns it with the pool's size in tokens.
fn start_tight(users: &[String]) -> (Server, usize) {
    let longest = users.iter().map(|u| prompt_len(u)).max().unwrap();
    let pool_tokens = ((longest + MAX_TOKENS - 1).div_ceil(BLOCK) + 1) * BLOCK;
    let server = start_with(&[], |o| o.engine = EngineOptions { kv_block_size: BLOCK, kv_cache_tokens: pool_tokens, prefill_chunk: 8, ..Default::default() });
    (server, pool_tokens)
}

/// An HTTP client whose calls give up after two minutes, so a scheduler that stalls fails the
/// test instead of hanging it.
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build()
}

/// POSTs `body` with [`agent`]; the status and the body as text.
fn post_bounded(server: &Server, path: &str, body: &Value) -> (u16, String) {
    let url = format!("http://{}{path}", server.addr);
    match agent().post(&url).set("Content-Type", "application/json").send_string(&body.to_string()) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{url}: {e} (a stalled scheduler times out here)"),
    }
}

/// The metrics once every block is back in the pool (the gauge is set after the step that
/// answered the last request).
fn metrics_when_idle(server: &Server) -> String {
    let mut m = String::new();
    for _ in 0..200 {
        m = get(server, "/metrics", None).1;
        if series(&m, "ftx_kv_cache_blocks_used") == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    m
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("Hi {i}")).collect()
}

/// The count of preempted decoding sequences (not prompts preempted while prefilling).
fn decode_preemptions(metrics: &str) -> f64 {
    series(metrics, "ftx_preemptions_total{stage=\"decode\"}")
}

/// Four greedy requests at once into a pool that fits one answer: all answered 200 with
/// `generate`'s text, with at least one decoding sequence preempted; so are the two choices of
/// one request; a request exactly as large as the pool runs, one token larger is refused up
/// front with a 400.
#[test]
fn a_full_kv_cache_preempts_and_every_answer_stays_generates() {
    let users = users(4);
    let (server, pool_tokens) = start_tight(&users);
    let answers: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = users
            .iter()
            .map(|u| {
                let (server, b) = (&server, chat_body("tiny", u, MAX_TOKENS));
                s.spawn(move || post_bounded(server, "/v1/chat/completions", &b))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).map(|(status, v)| {
            assert_eq!(status, 200, "{v}");
            serde_json::from_str(&v).unwrap()
        }).collect()
    });
    let mut longest_answer = 0;
    for (i, (u, v)) in users.iter().zip(&answers).enumerate() {
        let (want, prompt_tokens, completion_tokens) = reference(None, u, greedy(MAX_TOKENS));
        assert_eq!(content(v), want, "request {i}: {u}");
        assert_eq!(v["usage"]["completion_tokens"], completion_tokens, "request {i}");
        longest_answer = longest_answer.max(prompt_tokens + completion_tokens);
    }
    // The pool really is too small for two answers at once, and it did preempt.
    assert!(2 * (longest_answer - 1) > pool_tokens, "answers of {longest_answer} tokens fit the pool of {pool_tokens} together");
    let m = metrics_when_idle(&server);
    assert!(decode_preemptions(&m) > 0.0, "no sequence was preempted:\n{m}");
    assert_eq!(series(&m, "ftx_kv_cache_blocks_used"), 0.0, "every block is returned:\n{m}");

    // Two choices of one request share their prompt's blocks and cannot both finish in the
    // pool: one is preempted (releasing only its hold on the shared blocks) and recomputed.
    let mut body = chat_body("tiny", &users[0], MAX_TOKENS);
    body["n"] = json!(2);
    let (status, v) = post_bounded(&server, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let v: Value = serde_json::from_str(&v).unwrap();
    for c in 0..2 {
        assert_eq!(v["choices"][c]["message"]["content"].as_str(), Some(content(&answers[0]).as_str()), "choice {c}");
    }
    let m2 = metrics_when_idle(&server);
    assert!(decode_preemptions(&m2) > decode_preemptions(&m), "the choices ran without a preemption:\n{m2}");
    assert_eq!(series(&m2, "ftx_kv_cache_blocks_used"), 0.0, "every block is returned:\n{m2}");

    // The whole pool for one request: a prompt and max_tokens that need exactly every position
    // run; one token more can never fit and is refused, naming the limit and the flag.
    let user = "Hi";
    let fits = pool_tokens + 1 - prompt_len(user);
    let (status, v) = post_bounded(&server, "/v1/chat/completions", &chat_body("tiny", user, fits));
    assert_eq!(status, 200, "{v}");
    let v: Value = serde_json::from_str(&v).unwrap();
    assert_eq!(content(&v), reference(None, user, greedy(fits)).0);
    let (status, v) = post_bounded(&server, "/v1/chat/completions", &chat_body("tiny", user, fits + 1));
    assert_eq!(status, 400, "{v}");
    let v: Value = serde_json::from_str(&v).unwrap();
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("--kv-cache-tokens") && msg.contains(&format!("{pool_tokens} tokens")), "{msg}");
}

/// Sampling options of request `i` in the streaming test.
fn sampled(i: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: MAX_TOKENS, temperature: 0.9, top_p: 0.95, top_k: 40, seed: 7 + i as u64, ..Default::default() }
}

/// Request `i`'s body: `user`, sampled with [`sampled`]`(i)`'s settings and seed.
fn sampled_body(i: usize, user: &str) -> Value {
    let o = sampled(i);
    let mut b = chat_body("tiny", user, MAX_TOKENS);
    b["temperature"] = json!(o.temperature);
    b["top_p"] = json!(o.top_p);
    b["top_k"] = json!(o.top_k);
    b["seed"] = json!(o.seed);
    b
}

/// Three streamed, seeded sampled requests at once into the same tight pool: whichever is
/// preempted, each stream's deltas concatenate to the non-streamed answer and to `generate`'s
/// with the same seed — nothing sent twice or lost, and the draws after the preemption those of
/// the same positions unpreempted — with one finish reason each.
#[test]
fn a_preempted_stream_sends_each_piece_of_text_once() {
    let users = users(3);
    let (server, _) = start_tight(&users);
    let streams: Vec<Vec<Value>> = std::thread::scope(|s| {
        let handles: Vec<_> = users
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let server = &server;
                s.spawn(move || {
                    let mut b = sampled_body(i, u);
                    b["stream"] = json!(true);
                    let (status, body) = post_bounded(server, "/v1/chat/completions", &b);
                    assert_eq!(status, 200, "{body}");
                    let data = sse_data(&body);
                    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
                    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let m = metrics_when_idle(&server);
    assert!(decode_preemptions(&m) > 0.0, "no sequence was preempted:\n{m}");
    for (i, (u, chunks)) in users.iter().zip(&streams).enumerate() {
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        // Alone now: no preemption.
        let (status, v) = post_bounded(&server, "/v1/chat/completions", &sampled_body(i, u));
        assert_eq!(status, 200, "{v}");
        assert_eq!(text, content(&serde_json::from_str(&v).unwrap()), "{u}");
        assert_eq!(text, reference(None, u, sampled(i)).0, "{u}");
        let finishes = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).count();
        assert_eq!(finishes, 1, "{u}");
    }
}
