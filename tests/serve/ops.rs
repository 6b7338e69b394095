//! Operating `ftx serve`: API-key auth, /metrics, the request log, graceful shutdown, a
//! soak of rude clients, and the real `ftx serve` process end to end.

use super::*;

#[test]
fn an_api_key_guards_every_endpoint_but_health() {
    let server = start_with(&[], |o| o.api_key = Some("sekrit-key".into()));
    for key in [None, Some("wrong"), Some("sekrit-ke"), Some("sekrit-key-")] {
        let (status, body) = get(&server, "/v1/models", key);
        assert_eq!(status, 401, "{key:?}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let status = match ureq::post(&url).send_json(chat_body("tiny", "hi", 4)) {
        Err(ureq::Error::Status(code, _)) => code,
        other => panic!("{other:?}"),
    };
    assert_eq!(status, 401);
    assert_eq!(get(&server, "/metrics", None).0, 401);
    assert_eq!(get(&server, "/health", None), (200, "ok".into()));
    let (status, body) = get(&server, "/v1/models", Some("sekrit-key"));
    assert_eq!(status, 200, "{body}");
    let r = ureq::post(&url).set("Authorization", "Bearer sekrit-key").send_json(chat_body("tiny", "hi", 4)).unwrap();
    let v: Value = r.into_json().unwrap();
    assert_eq!(content(&v), reference(None, "hi", greedy(4)).0);
}

#[test]
fn metrics_and_the_request_log_account_for_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.jsonl");
    let server = start_with(&[], |o| o.request_log = Some(ftx::serve::ops::LogOptions { path: log.clone(), content_sample: 1.0 }));
    let (_, a) = post(&server, "/v1/chat/completions", &chat_body("tiny", "Hello there", 9));
    let mut streamed = chat_body("tiny", "Tell me a story", 7);
    streamed["stream"] = json!(true);
    streamed["user"] = json!("u-42");
    let r = ureq::post(&format!("http://{}/v1/chat/completions", server.addr)).send_json(streamed).unwrap();
    let stream_text: String = sse_data(&r.into_string().unwrap()).iter().filter_map(|d| serde_json::from_str::<Value>(d).ok()).filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned)).collect();
    let (status, _) = post(&server, "/v1/chat/completions", &json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logit_bias": {}}));
    assert_eq!(status, 400);
    let (_, b) = post(&server, "/v1/completions", &json!({"model": "tiny", "prompt": "The sea", "max_tokens": 5, "temperature": 0}));

    let (status, m) = get(&server, "/metrics", None);
    assert_eq!(status, 200);
    assert_eq!(series(&m, r#"ftx_requests_total{endpoint="chat",status="200"}"#), 2.0, "{m}");
    assert_eq!(series(&m, r#"ftx_requests_total{endpoint="chat",status="400"}"#), 1.0);
    assert_eq!(series(&m, r#"ftx_requests_total{endpoint="completions",status="200"}"#), 1.0);
    let (_, _, stream_completion) = reference(None, "Tell me a story", greedy(7));
    let completion = a["usage"]["completion_tokens"].as_u64().unwrap() + stream_completion as u64 + b["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(series(&m, r#"ftx_completion_tokens_total{model="tiny"}"#), completion as f64);
    assert_eq!(series(&m, r#"ftx_request_duration_seconds_count{model="tiny"}"#), 3.0);
    assert_eq!(series(&m, r#"ftx_time_to_first_token_seconds_count{model="tiny"}"#), 3.0);
    assert_eq!(series(&m, "ftx_queue_depth"), 0.0);
    assert_eq!(series(&m, "ftx_requests_in_flight"), 0.0);

    let lines: Vec<Value> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0]["id"], a["id"]);
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["model"], "tiny");
    assert_eq!(lines[0]["completion_tokens"], a["usage"]["completion_tokens"]);
    assert_eq!(lines[0]["prompt_tokens"], a["usage"]["prompt_tokens"]);
    assert_eq!(lines[0]["output"], json!([content(&a)]));
    assert_eq!(lines[0]["input"], json!([{"role": "user", "content": "Hello there"}]));
    assert_eq!(lines[1]["stream"], true);
    assert_eq!(lines[1]["user"], "u-42");
    assert_eq!(lines[1]["output"], json!([stream_text]));
    assert_eq!(lines[1]["completion_tokens"], stream_completion);
    assert_eq!(lines[2]["status"], 400);
    assert_eq!(lines[3]["endpoint"], "completions");
    assert_eq!(lines[3]["output"], json!([b["choices"][0]["text"]]));
    assert!(lines.iter().all(|l| l["latency_ms"].is_number()));
}

#[test]
fn shutdown_finishes_running_streams_and_refuses_new_requests() {
    use std::io::BufRead;
    let server = start(&[]);
    let mut body = chat_body("tiny", "Tell me a story", 40);
    body["stream"] = json!(true);
    let r = ureq::post(&format!("http://{}/v1/chat/completions", server.addr)).send_json(body).unwrap();
    let mut lines = std::io::BufReader::new(r.into_reader()).lines();
    // The first chunk has arrived: the request is running.
    let first = lines.by_ref().map(Result::unwrap).find(|l| l.starts_with("data:")).unwrap();
    assert!(first.contains("assistant"), "{first}");
    server.drain();
    let (status, v) = post(&server, "/v1/chat/completions", &chat_body("tiny", "hi", 4));
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "shutting_down");
    assert_eq!(get(&server, "/health", None).0, 503);
    let rest: Vec<String> = lines.map(Result::unwrap).filter(|l| l.starts_with("data:")).collect();
    let text: String = rest.iter().filter_map(|d| serde_json::from_str::<Value>(d.trim_start_matches("data:").trim()).ok()).filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned)).collect();
    assert_eq!(text, reference(None, "Tell me a story", greedy(40)).0, "the running stream finished whole");
    assert_eq!(rest.last().map(|l| l.trim_start_matches("data:").trim()), Some("[DONE]"));
    assert_eq!(server.shutdown(std::time::Duration::from_secs(30)), 0);
}

const OPENAI_AUTH_SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI
url = sys.argv[1]
client = OpenAI(base_url=url, api_key="sekrit-key")
out = {}
r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0,
    n=2, logprobs=True, top_logprobs=2)
out["n"] = [c.message.content for c in r.choices]
out["logprobs"] = [[t.token, t.logprob, [a.token for a in t.top_logprobs]] for t in r.choices[0].logprobs.content]
def status(f):
    try:
        f()
        return None
    except openai.APIStatusError as e:
        b = e.body if isinstance(e.body, dict) else {}
        b = b.get("error", b)
        return [type(e).__name__, e.status_code, b.get("param") or b.get("code")]
out["no_key"] = status(lambda: OpenAI(base_url=url, api_key="wrong").models.list())
out["unsupported"] = status(lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], logit_bias={"1": 5}))
print(json.dumps(out))
"#;

#[test]
fn the_openai_python_client_gets_logprobs_n_and_auth_errors() {
    let server = start_with(&[], |o| o.api_key = Some("sekrit-key".into()));
    let v = run_openai_script(&server, OPENAI_AUTH_SCRIPT, &[]);
    let (model, tok, prompt) = tiny_model("Hello there");
    let g = generate(&model, &tok, &prompt, &GenerateOptions { max_new_tokens: 8, stop_ids: tok.stop_ids.clone(), ..Default::default() }, |_| {}).unwrap();
    assert_eq!(v["n"], json!([g.text, g.text]), "greedy: both choices are generate's text");
    let rows = log_softmax_rows(&model, &prompt, &g.ids);
    let lp = v["logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), g.ids.len());
    for (i, (e, &id)) in lp.iter().zip(&g.ids).enumerate() {
        assert_eq!(e[0], tok.decode(&[id], false));
        assert!((e[1].as_f64().unwrap() as f32 - rows[i][id as usize]).abs() < 1e-4);
        assert_eq!(e[2][0], e[0], "greedy took the most likely token");
    }
    assert_eq!(v["no_key"], json!(["AuthenticationError", 401, "invalid_api_key"]));
    assert_eq!(v["unsupported"], json!(["BadRequestError", 400, "logit_bias"]));
}

/// Polls `/metrics` until every gauge in `gauges` reads 0 (bounded: the server winds down
/// streams whose clients left at its next step).
fn wait_idle(server: &Server, gauges: &[&str]) -> String {
    let mut m = String::new();
    for _ in 0..300 {
        m = get(server, "/metrics", None).1;
        if gauges.iter().all(|g| series(&m, g) == 0.0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    m
}

#[test]
fn a_soak_of_rude_clients_leaves_every_request_answered_and_nothing_held() {
    use std::io::{BufRead, Read, Write};
    let server = start(&[]);
    let addr = server.addr;
    // Raw HTTP: sends `request`, half-closes, and reads the status of the answer (0: none).
    let raw = |request: &[u8]| -> u16 {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(request).unwrap();
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    };
    let statuses: Vec<Vec<u16>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (server, raw) = (&server, &raw);
                s.spawn(move || {
                    let mut got = Vec::new();
                    for i in 0..6 {
                        match (t + i) % 5 {
                            0 => got.push(post(server, "/v1/chat/completions", &chat_body("tiny", &format!("soak {t} {i}"), 8)).0),
                            1 => {
                                // Reads the first chunk of a long stream, then hangs up.
                                let mut body = chat_body("tiny", "Tell me a long story", 200);
                                body["stream"] = json!(true);
                                let r = ureq::post(&format!("http://{addr}/v1/chat/completions")).send_json(body).unwrap();
                                got.push(r.status());
                                let mut lines = std::io::BufReader::new(r.into_reader()).lines();
                                assert!(lines.next().unwrap().unwrap().starts_with("data:"));
                            }
                            2 => got.push(post_raw(server, "/v1/chat/completions", "{\"model\": \"tiny\", \"messages\": [").0),
                            // A 3 MiB body announced with `Expect: 100-continue`, as curl sends one.
                            3 => got.push(raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3145728\r\nExpect: 100-continue\r\n\r\n")),
                            // A body cut short: the header promises more than is sent.
                            _ => got.push(raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\": \"ti")),
                        }
                    }
                    got
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, got) in statuses.iter().enumerate() {
        for (i, &status) in got.iter().enumerate() {
            let want: &[u16] = match (t + i) % 5 {
                0 | 1 => &[200],
                2 => &[400],
                3 => &[413],
                _ => &[0, 400], // the server may answer 400 or just close a truncated body
            };
            assert!(want.contains(&status), "client {t} request {i}: {status}");
        }
    }
    let m = wait_idle(&server, &["ftx_requests_in_flight", "ftx_batch_sequences", "ftx_kv_cache_tokens", "ftx_queue_depth"]);
    for g in ["ftx_requests_in_flight", "ftx_batch_sequences", "ftx_kv_cache_tokens", "ftx_queue_depth"] {
        assert_eq!(series(&m, g), 0.0, "{g} after the soak:\n{m}");
    }
    let (status, v) = post(&server, "/v1/chat/completions", &chat_body("tiny", "still there?", 4));
    assert_eq!(status, 200, "{v}");
    assert_eq!(content(&v), reference(None, "still there?", greedy(4)).0);
}

#[test]
fn ftx_serve_checks_the_key_file_logs_requests_and_drains_on_sigterm() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "file-key\n").unwrap();
    let log = dir.path().join("log.jsonl");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ftx"))
        .args(["serve", "--model", fixture(MODEL).to_str().unwrap(), "--served-name", "tiny", "--device", "cpu", "--port", "0"])
        .args(["--api-key-file", key.to_str().unwrap(), "--request-log", log.to_str().unwrap()])
        .env_remove("FTX_API_KEY")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = stderr.next().unwrap().unwrap();
    let addr = first.split("http://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_else(|| panic!("{first}")).to_owned();
    let url = format!("http://{addr}/v1/chat/completions");
    let status = match ureq::post(&url).set("Authorization", "Bearer wrong").send_json(chat_body("tiny", "hi", 4)) {
        Err(ureq::Error::Status(code, _)) => code,
        other => panic!("{other:?}"),
    };
    assert_eq!(status, 401);
    let v: Value = ureq::post(&url).set("Authorization", "Bearer file-key").send_json(chat_body("tiny", "hi", 4)).unwrap().into_json().unwrap();
    assert_eq!(content(&v), reference(None, "hi", greedy(4)).0);
    // SAFETY: signals the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let rest: Vec<String> = stderr.map_while(Result::ok).collect();
    assert!(status.success(), "{status}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("SIGTERM: draining")), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("every request was answered")), "{rest:?}");
    let lines: Vec<Value> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "the 401 never reached a handler: {lines:?}");
    assert_eq!(lines[0]["id"], v["id"]);
    assert!(lines[0].get("input").is_none(), "content is kept only when sampled");
}
