//! The OpenAI-compatible client, `ftx prep`'s augmentation stage and judges routed to an
//! endpoint, against a chat-completions server this test starts on loopback: canned answers,
//! a count of the requests it received, and failures on demand.

use ftx::data::prep::{self, PrepConfig};
use ftx::llm::{ChatMessage, Client, EndpointConfig, LlmError, RateLimiter};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the fake server answers: status, extra headers, body.
pub struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    /// Wait this long before answering.
    delay: Duration,
}

impl Reply {
    fn ok(content: &str) -> Reply {
        let body = json!({
            "id": "chatcmpl-test", "object": "chat.completion", "model": "teacher",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]
        });
        Reply { status: 200, headers: vec![], body: body.to_string(), delay: Duration::ZERO }
    }
    fn status(status: u16, body: &str) -> Reply {
        Reply { status, headers: vec![], body: body.into(), delay: Duration::ZERO }
    }
}

type Handler = dyn Fn(usize, &Value) -> Reply + Send + Sync;

/// A chat-completions server on 127.0.0.1 (one thread per connection; `Connection: close`).
pub struct FakeOpenAi {
    pub base_url: String,
    /// Requests received.
    pub requests: Arc<AtomicUsize>,
    /// Each request's body and Authorization header, in arrival order.
    pub seen: Arc<Mutex<Vec<(Value, Option<String>)>>>,
    /// The most requests ever in flight at once.
    pub max_in_flight: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

impl FakeOpenAi {
    /// `handler(n, body)` answers request number `n` (from 0).
    pub fn start(handler: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static) -> FakeOpenAi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Arc<Handler> = Arc::new(handler);
        let (requests, seen, max_in_flight, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (r, s, m, st) = (requests.clone(), seen.clone(), max_in_flight.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (h, r, s, m, f) = (handler.clone(), r.clone(), s.clone(), m.clone(), in_flight.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &*h, &r, &s, (&f, &m));
                });
            }
        });
        FakeOpenAi { base_url: format!("http://{addr}/v1"), requests, seen, max_in_flight, stop, addr }
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Answers one request. `in_flight` counts the requests read but not yet answered (the
/// count drops before the answer is written, so a client's next request never overlaps its
/// previous one in the count) and keeps the most ever seen.
fn serve(stream: TcpStream, handler: &Handler, count: &AtomicUsize, seen: &Mutex<Vec<(Value, Option<String>)>>, in_flight: (&AtomicUsize, &AtomicUsize)) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    assert!(line.starts_with("POST /v1/chat/completions "), "unexpected request line {line:?}");
    let (mut length, mut auth) = (0usize, None);
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => length = v.trim().parse().unwrap(),
            "authorization" => auth = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let body: Value = serde_json::from_slice(&body).unwrap();
    let now = in_flight.0.fetch_add(1, Ordering::SeqCst) + 1;
    in_flight.1.fetch_max(now, Ordering::SeqCst);
    let n = count.fetch_add(1, Ordering::SeqCst);
    seen.lock().unwrap().push((body.clone(), auth));
    let reply = handler(n, &body);
    std::thread::sleep(reply.delay);
    in_flight.0.fetch_sub(1, Ordering::SeqCst);
    let mut head = format!("HTTP/1.1 {} Test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n", reply.status, reply.body.len());
    for (k, v) in &reply.headers {
        head += &format!("{k}: {v}\r\n");
    }
    let mut stream = stream;
    stream.write_all(format!("{head}\r\n{}", reply.body).as_bytes())?;
    stream.flush()
}

/// The last user message of a request.
fn user_text(body: &Value) -> String {
    body["messages"].as_array().unwrap().iter().rev().find(|m| m["role"] == "user").unwrap()["content"].as_str().unwrap().to_owned()
}

fn endpoint(server: &FakeOpenAi) -> EndpointConfig {
    let mut c = EndpointConfig::new(&server.base_url, "teacher");
    c.backoff_initial_ms = 1;
    c.backoff_max_ms = 5;
    c
}

#[test]
fn transient_failures_are_retried_until_they_pass() {
    // 429 (with Retry-After), 500, 503, then an answer.
    let server = FakeOpenAi::start(|n, _| match n {
        0 => Reply { headers: vec![("Retry-After", "0".into())], ..Reply::status(429, r#"{"error": "slow down"}"#) },
        1 => Reply::status(500, "boom"),
        2 => Reply::status(503, "overloaded"),
        _ => Reply::ok("fine"),
    });
    let client = Client::new(endpoint(&server)).unwrap();
    let req = client.request(vec![ChatMessage::new("user", "hi")], Some(5), None);
    assert_eq!(client.complete(&req).unwrap().content, "fine");
    assert_eq!(server.count(), 4);
    let s = client.stats();
    assert_eq!((s.http_requests, s.retries, s.failures), (4, 3, 0));

    // Out of retries: the error names the URL, the last status and the body.
    let server = FakeOpenAi::start(|_, _| Reply::status(502, "bad gateway upstream"));
    let mut cfg = endpoint(&server);
    cfg.max_retries = 2;
    let client = Client::new(cfg).unwrap();
    let e = client.complete(&req).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&server.base_url) && msg.contains("gave up after 3 attempts") && msg.contains("HTTP 502") && msg.contains("bad gateway upstream"), "{msg}");
    assert_eq!(server.count(), 3);

    // A bad key is not retried, and says so plainly.
    let server = FakeOpenAi::start(|_, _| Reply::status(401, r#"{"error": {"message": "Incorrect API key"}}"#));
    let client = Client::new(endpoint(&server)).unwrap();
    let e = client.complete(&req).unwrap_err();
    assert!(e.is_configuration() && e.to_string().contains("HTTP 401") && e.to_string().contains("Incorrect API key"), "{e}");
    assert_eq!(server.count(), 1);
}

#[test]
fn a_timeout_is_retried_and_a_200_that_is_no_completion_is_an_error() {
    let server = FakeOpenAi::start(|n, _| match n {
        0 => Reply { delay: Duration::from_secs(3), ..Reply::ok("late") },
        1 => Reply::ok("on time"),
        _ => Reply::status(200, "<html>a login page</html>"),
    });
    let mut cfg = endpoint(&server);
    cfg.timeout_secs = 0.3;
    let client = Client::new(cfg).unwrap();
    let req = client.request(vec![ChatMessage::new("user", "hi")], None, None);
    assert_eq!(client.complete(&req).unwrap().content, "on time");
    assert_eq!(client.stats().retries, 1);
    let e = client.complete(&req).unwrap_err();
    assert!(matches!(e, LlmError::BadResponse { .. }) && e.to_string().contains("not JSON") && e.to_string().contains("a login page"), "{e}");
}

#[test]
fn the_api_key_comes_from_its_variable_and_is_never_shown() {
    let server = FakeOpenAi::start(|_, _| Reply::ok("ok"));
    let mut cfg = endpoint(&server);
    cfg.api_key_env = Some("FTX_TEST_LLM_KEY_PRESENT".into());
    std::env::set_var("FTX_TEST_LLM_KEY_PRESENT", "sk-test-secret");
    let client = Client::new(cfg.clone()).unwrap();
    assert!(!format!("{client:?}").contains("sk-test-secret"));
    client.complete(&client.request(vec![ChatMessage::new("user", "hi")], None, None)).unwrap();
    assert_eq!(server.seen.lock().unwrap()[0].1.as_deref(), Some("Bearer sk-test-secret"));
    cfg.api_key_env = Some("FTX_TEST_LLM_KEY_NEVER_SET".into());
    let e = Client::new(cfg).unwrap_err().to_string();
    assert!(e.contains("FTX_TEST_LLM_KEY_NEVER_SET (api_key_env) is not set"), "{e}");
}

#[test]
fn answers_are_cached_on_disk_and_concurrency_is_bounded() {
    let server = FakeOpenAi::start(|_, body| Reply { delay: Duration::from_millis(30), ..Reply::ok(&format!("echo: {}", user_text(body))) });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = endpoint(&server);
    cfg.concurrency = 3;
    cfg.cache_dir = Some(dir.path().join("cache"));
    let client = Client::new(cfg.clone()).unwrap();
    let reqs: Vec<_> = (0..12).map(|i| client.request(vec![ChatMessage::new("user", format!("q{i}"))], None, None)).collect();
    let done = AtomicUsize::new(0);
    let out = client.complete_all(&reqs, &|_| {
        done.fetch_add(1, Ordering::SeqCst);
    });
    let texts: Vec<String> = out.into_iter().map(|r| r.unwrap().content).collect();
    assert_eq!(texts, (0..12).map(|i| format!("echo: q{i}")).collect::<Vec<_>>(), "answers come back in request order");
    assert_eq!(done.load(Ordering::SeqCst), 12);
    assert!(server.max_in_flight.load(Ordering::SeqCst) <= 3, "at most `concurrency` requests in flight");
    assert_eq!(server.count(), 12);
    // The cache file is named by the SHA-256 of the request's JSON.
    let key = reqs[0].cache_key();
    assert_eq!(key, ftx::util::sha256_hex(&serde_json::to_vec(&reqs[0]).unwrap()));
    assert!(dir.path().join("cache").join(&key[..2]).join(format!("{key}.json")).is_file());
    // A new client (a re-run) on the same cache sends nothing.
    let again = Client::new(cfg).unwrap();
    let out = again.complete_all(&reqs, &|_| {});
    assert!(out.iter().all(|r| r.as_ref().unwrap().cached));
    assert_eq!((server.count(), again.stats().cache_hits, again.stats().http_requests), (12, 12, 0));
}

#[test]
fn the_rate_limiter_never_books_more_than_the_limit_in_any_minute() {
    let limiter = RateLimiter::new(120);
    let t0 = Instant::now();
    // 300 requests asked for at once, then 10 more 3 minutes later.
    let mut slots: Vec<Instant> = (0..300).map(|_| limiter.reserve(t0)).collect();
    slots.extend((0..10).map(|_| limiter.reserve(t0 + Duration::from_secs(180))));
    for w in slots.windows(2) {
        assert!(w[1] - w[0] >= Duration::from_millis(500), "slots at least 60/120 s apart");
    }
    assert_eq!(slots[0], t0);
    assert_eq!(slots[299] - t0, Duration::from_millis(500 * 299));
    for (i, s) in slots.iter().enumerate() {
        let in_window = slots[i..].iter().filter(|x| **x - *s < Duration::from_secs(60)).count();
        assert!(in_window <= 120, "{in_window} requests in the minute from slot {i}");
    }
    // No limit: every request may go at once.
    let free = RateLimiter::new(0);
    assert!((0..5).all(|_| free.reserve(t0) == t0));
}

/// The fake teacher: two pairs per text; a refusal for texts with GARBAGE; one good and one
/// malformed element for texts with HALFBAD.
fn teacher(_: usize, body: &Value) -> Reply {
    let prompt = user_text(body);
    let text = prompt.rsplit("TEXT:\n").next().unwrap().to_owned();
    if text.contains("GARBAGE") {
        return Reply::ok("I am sorry, I cannot rewrite this text.");
    }
    if text.contains("HALFBAD") {
        let answer = json!([{"instruction": format!("What does '{text}' say?"), "response": "Half of it."}, {"instruction": "missing its response"}]);
        return Reply::ok(&format!("```json\n{answer}\n```"));
    }
    let answer = json!([
        {"instruction": format!("Summarise: {text}"), "response": format!("In short: {text}")},
        {"instruction": format!("Ask about: {text}"), "response": format!("It says {text}")},
    ]);
    Reply::ok(&answer.to_string())
}

fn augment_config(dir: &Path, server: &FakeOpenAi) -> PrepConfig {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/notes.txt"), "Cats purr when content.\nGARBAGE in, garbage out.\nRivers carve canyons.\nHALFBAD example here.\n").unwrap();
    std::fs::write(dir.join("data/pairs.jsonl"), "{\"instruction\": \"Say hi\", \"input\": \"\", \"output\": \"Hi!\"}\n").unwrap();
    let toml = format!(
        "[prep]\ninputs = [\"data\"]\nout = \"out\"\nstages = [\"augment\"]\n[prep.split]\ntrain = 1.0\nvalidation = 0.0\ntest = 0.0\n\
         [prep.augment]\npairs_per_item = 2\n[prep.augment.endpoint]\nbase_url = \"{}\"\nmodel = \"teacher\"\nconcurrency = 2\nbackoff_initial_ms = 1\ncache_dir = \"cache\"\n",
        server.base_url
    );
    std::fs::write(dir.join("prep.toml"), toml).unwrap();
    PrepConfig::load(&dir.join("prep.toml")).unwrap()
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn augmentation_makes_pairs_rejects_what_it_cannot_parse_and_a_rerun_is_free_and_identical() {
    // The first request of the run fails once (500): the retry makes it whole.
    let server = FakeOpenAi::start(|n, body| if n == 0 { Reply::status(500, "warming up") } else { teacher(n, body) });
    let dir = tempfile::tempdir().unwrap();
    let cfg = augment_config(dir.path(), &server);
    let done = prep::run(&cfg, false).unwrap();
    let out = dir.path().join("out");

    let train = read_jsonl(&out.join("train.jsonl"));
    let alpaca = |i: &str, o: &str| json!({"instruction": i, "input": "", "output": o});
    // Files are read in name order: notes.txt, then pairs.jsonl.
    assert_eq!(
        train,
        vec![
            alpaca("Summarise: Cats purr when content.", "In short: Cats purr when content."),
            alpaca("Ask about: Cats purr when content.", "It says Cats purr when content."),
            alpaca("Summarise: Rivers carve canyons.", "In short: Rivers carve canyons."),
            alpaca("Ask about: Rivers carve canyons.", "It says Rivers carve canyons."),
            alpaca("What does 'HALFBAD example here.' say?", "Half of it."),
            alpaca("Say hi", "Hi!"),
        ]
    );
    let rejects = read_jsonl(&out.join("rejects.jsonl"));
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    assert_eq!((rejects[0]["stage"].as_str(), rejects[0]["reason"].as_str(), rejects[0]["line"].as_u64()), (Some("augment"), Some("unparseable_teacher_output"), Some(2)));
    let detail = rejects[0]["detail"].as_str().unwrap();
    assert!(detail.contains("no JSON") && detail.contains("I cannot rewrite this text"), "{detail}");
    assert_eq!(rejects[0]["record"]["text"], "GARBAGE in, garbage out.", "the record is kept whole");
    assert_eq!((rejects[1]["reason"].as_str(), rejects[1]["line"].as_u64()), (Some("bad_pair"), Some(4)));
    assert_eq!(rejects[1]["record"], json!({"instruction": "missing its response"}));

    // The accounting: 5 records in, 3 more made (two texts became two pairs each; HALFBAD
    // became a pair and a rejected element) = 6 written + 2 rejected.
    let r = &done.report;
    assert!(r.balanced(), "{r:?}");
    assert_eq!((r.input_records, r.added_records, r.output_records, r.rejected_records), (5, 3, 6, 2));
    let a = r.augment.as_ref().unwrap();
    assert_eq!((a.records_sent, a.pairs, a.unparseable, a.bad_pairs, a.teacher_errors), (4, 5, 1, 1, 0));
    let stage = r.stages.iter().find(|s| s.stage == "augment").unwrap();
    assert_eq!((stage.input, stage.added, stage.rejected, stage.out), (5, 3, 2, 6));
    assert_eq!(server.count(), 5, "4 texts, one retried");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["inputs"].as_array().unwrap().iter().map(|i| i["records"].as_u64().unwrap()).sum::<u64>(), 5, "records per input count what was read");

    // A second run: no request, the same bytes.
    let before: Vec<Vec<u8>> = ["train.jsonl", "rejects.jsonl", "report.json", "manifest.json"].iter().map(|f| std::fs::read(out.join(f)).unwrap()).collect();
    let again = prep::run(&cfg, false).unwrap();
    assert_eq!(server.count(), 5, "every answer came from the cache");
    let client = again.timing.augment_client.unwrap();
    assert_eq!((client.http_requests, client.cache_hits), (0, 4));
    let after: Vec<Vec<u8>> = ["train.jsonl", "rejects.jsonl", "report.json", "manifest.json"].iter().map(|f| std::fs::read(out.join(f)).unwrap()).collect();
    assert!(before == after, "a re-run gives byte-identical outputs");
}

#[test]
fn a_bad_key_stops_the_run_with_the_endpoints_words() {
    let server = FakeOpenAi::start(|_, _| Reply::status(401, "invalid_api_key"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = augment_config(dir.path(), &server);
    let e = prep::run(&cfg, false).unwrap_err().to_string();
    assert!(e.contains("prep.augment") && e.contains("HTTP 401") && e.contains("invalid_api_key"), "{e}");
    assert!(server.count() <= 2, "the remaining requests are not sent ({} were)", server.count());
    assert!(!dir.path().join("out/train.jsonl").exists(), "no partial outputs");
}

#[test]
fn a_judge_scores_through_the_endpoint() {
    let server = FakeOpenAi::start(|_, body| {
        let p = user_text(body);
        Reply::ok(if p.contains("Parris") { "Score: 7 because the city is misspelt." } else { "Score: 10" })
    });
    let spec = ftx::llm::JudgeLlm::parse(&format!("openai:{}", server.base_url), Some("judge-model"), None).unwrap();
    let llm = ftx::llm::judge_llm(&spec, ftx::model::decoder::LoadOptions { device: tch::Device::Cpu, kind: tch::Kind::Float }).unwrap();
    let mut judge = ftx::plugins::judge::JudgePlugin::load(&crate::plugins::wasm("rubric-judge"), ftx::plugins::Limits::default(), llm).unwrap();
    let sample = |r: &str| ftx::plugins::judge::JudgeSample { prompt: "Capital of France?".into(), response: r.into(), reference: Some("Paris".into()) };
    let out = judge.judge(&[sample("Parris"), sample("Paris")]).unwrap();
    assert!((out[0].as_ref().unwrap().score - 0.7).abs() < 1e-6, "{out:?}");
    assert!(out[0].as_ref().unwrap().rationale.contains("misspelt"));
    assert!((out[1].as_ref().unwrap().score - 1.0).abs() < 1e-6, "{out:?}");
    let seen = server.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let body = &seen[0].0;
    assert_eq!((body["model"].as_str(), body["temperature"].as_f64()), (Some("judge-model"), Some(0.0)));
    assert!(body["max_tokens"].as_u64().unwrap() <= u64::from(ftx::plugins::judge::DEFAULT_MAX_TOKENS));
    assert!(user_text(body).contains("Capital of France?") && user_text(body).contains("Parris"));
}
