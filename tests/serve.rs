//! `ftx serve`: an in-process server on 127.0.0.1:0 over the tiny Llama 3 fixture, checked
//! against `model::generate` (the code behind `ftx generate`), PEFT fixture adapters, the
//! JSON schema it was asked to follow, and the real `openai` Python client.

use crate::common::{fixture, torch_rng_lock};
use ftx::model::decoder::LoadOptions;
use ftx::model::generate::{generate, GenerateOptions};
use ftx::model::tokenizer::Message;
use ftx::model::{CausalLm, TextTokenizer};
use ftx::serve::{ServeOptions, Server};
use serde_json::{json, Value};
use tch::{Device, Kind};

const MODEL: &str = "models/llama3";
const LORA: &str = "peft/adapters/lora_llama3";
const DORA: &str = "peft/adapters/dora_llama3";

fn start(adapters: &[(&str, &str)]) -> Server {
    start_with(adapters, |_| {})
}

/// A server whose options `edit` changes first (API key, request log).
fn start_with(adapters: &[(&str, &str)], edit: impl FnOnce(&mut ServeOptions)) -> Server {
    let mut opts = ServeOptions {
        model_dir: fixture(MODEL),
        served_name: Some("tiny".into()),
        adapters: adapters.iter().map(|(n, p)| (n.to_string(), fixture(p))).collect(),
        load: LoadOptions { device: Device::Cpu, kind: Kind::Float },
        max_batch: 8,
        queue: 64,
        default_max_tokens: 16,
        api_key: None,
        request_log: None,
    };
    edit(&mut opts);
    Server::start(opts, "127.0.0.1:0".parse().unwrap()).expect("server starts")
}

/// POSTs JSON (or raw bytes) and returns the status and the parsed body.
fn post_raw(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let url = format!("http://{}{path}", server.addr);
    match ureq::post(&url).set("Content-Type", "application/json").send_string(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{url}: {e}"),
    }
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    post_raw(server, path, &body.to_string())
}

/// What `ftx generate --chat` (greedy unless `opts` says otherwise) writes for `user`.
fn reference(adapter: Option<&str>, user: &str, opts: GenerateOptions) -> (String, usize, usize) {
    let mut model = CausalLm::load(&fixture(MODEL), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    if let Some(a) = adapter {
        let _rng = torch_rng_lock();
        ftx::peft::load_adapter(&mut model, &fixture(a)).unwrap();
    }
    let tok = TextTokenizer::load(&fixture(MODEL), model.config.vocab).unwrap();
    let prompt = tok.encode_chat(&[Message::new("user", user)], true).unwrap();
    let opts = GenerateOptions { stop_ids: tok.stop_ids.clone(), ..opts };
    let g = generate(&model, &tok, &prompt, &opts, |_| {}).unwrap();
    (g.text, prompt.len(), g.ids.len())
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, ..Default::default() }
}

fn chat_body(model: &str, user: &str, max_tokens: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": user}], "max_tokens": max_tokens, "temperature": 0})
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("no content in {v}")).to_owned()
}

#[test]
fn chat_and_completion_match_generate() {
    let server = start(&[]);
    let (status, v) = post(&server, "/v1/chat/completions", &chat_body("tiny", "Hello there", 24));
    assert_eq!(status, 200, "{v}");
    let (text, prompt_tokens, completion_tokens) = reference(None, "Hello there", greedy(24));
    assert!(!text.is_empty());
    assert_eq!(content(&v), text);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny");
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], completion_tokens);
    assert_eq!(v["usage"]["total_tokens"], prompt_tokens + completion_tokens);
    let finish = if completion_tokens == 24 { "length" } else { "stop" };
    assert_eq!(v["choices"][0]["finish_reason"], finish);

    // Sampling settings reach the sampler: same seed, same draws as generate.
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20,
                      "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 7});
    let (_, v) = post(&server, "/v1/chat/completions", &body);
    let sampled = GenerateOptions { max_new_tokens: 20, temperature: 0.9, top_p: 0.95, top_k: 40, seed: 7, ..Default::default() };
    assert_eq!(content(&v), reference(None, "Hi", sampled).0);

    // A stop string cuts the text before it, as generate does.
    let cut: String = text.chars().skip(3).take(2).collect();
    let mut body = chat_body("tiny", "Hello there", 24);
    body["stop"] = json!(cut);
    let (_, v) = post(&server, "/v1/chat/completions", &body);
    let stop_opts = GenerateOptions { max_new_tokens: 24, stop_strings: vec![cut.clone()], ..Default::default() };
    assert_eq!(content(&v), reference(None, "Hello there", stop_opts).0);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // /v1/completions continues raw text, as `ftx generate --prompt`.
    let (status, v) = post(&server, "/v1/completions", &json!({"model": "tiny", "prompt": "The sea", "max_tokens": 12, "temperature": 0}));
    assert_eq!(status, 200, "{v}");
    let model = CausalLm::load(&fixture(MODEL), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let tok = TextTokenizer::load(&fixture(MODEL), model.config.vocab).unwrap();
    let ids = tok.encode("The sea", true).unwrap();
    let g = generate(&model, &tok, &ids, &GenerateOptions { max_new_tokens: 12, stop_ids: tok.stop_ids.clone(), ..Default::default() }, |_| {}).unwrap();
    assert_eq!(v["choices"][0]["text"], g.text);
    assert_eq!(v["object"], "text_completion");

    let models: Value = ureq::get(&format!("http://{}/v1/models", server.addr)).call().unwrap().into_json().unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))).map(str::to_owned).collect()
}

#[test]
fn streamed_chunks_concatenate_to_the_same_text() {
    let server = start(&[]);
    let mut body = chat_body("tiny", "Tell me a story", 30);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = ureq::post(&format!("http://{}/v1/chat/completions", server.addr)).send_json(body).unwrap();
    assert!(r.content_type().starts_with("text/event-stream"), "{}", r.content_type());
    let data = sse_data(&r.into_string().unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let (expected, prompt_tokens, completion_tokens) = reference(None, "Tell me a story", greedy(30));
    assert_eq!(text, expected);
    assert!(chunks.len() > 3, "text came in pieces: {}", chunks.len());
    let finish: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish.len(), 1);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], prompt_tokens);
    assert_eq!(usage["completion_tokens"], completion_tokens);

    // Completions stream too.
    let body = json!({"model": "tiny", "prompt": "Once", "max_tokens": 10, "temperature": 0, "stream": true});
    let r = ureq::post(&format!("http://{}/v1/completions", server.addr)).send_json(body).unwrap();
    let data = sse_data(&r.into_string().unwrap());
    let text: String = data[..data.len() - 1].iter().map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap().to_owned()).collect();
    let (_, v) = post(&server, "/v1/completions", &json!({"model": "tiny", "prompt": "Once", "max_tokens": 10, "temperature": 0}));
    assert_eq!(text, v["choices"][0]["text"].as_str().unwrap());
}

/// Checks `v` against the test schema by hand (the schema is small enough to read).
fn check_person(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort();
    if keys != ["age", "name", "ok"] {
        return Err(format!("keys {keys:?}"));
    }
    let name = o["name"].as_str().ok_or("name is not a string")?;
    if name.chars().count() > 8 {
        return Err(format!("name {name:?} is longer than 8"));
    }
    match o["age"].as_i64() {
        Some(a) if (0..=120).contains(&a) => {}
        _ => return Err(format!("age {} is not an integer in 0..=120", o["age"])),
    }
    o["ok"].as_bool().ok_or("ok is not a boolean")?;
    Ok(())
}

#[test]
fn response_format_forces_schema_valid_json_from_a_random_model() {
    let server = start(&[]);
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"], "additionalProperties": false});
    let unconstrained = content(&post(&server, "/v1/chat/completions", &chat_body("tiny", "Describe a person", 60)).1);
    assert!(serde_json::from_str::<Value>(&unconstrained).is_err(), "the tiny model writes JSON by itself: {unconstrained}");
    for (i, temperature) in [0.0, 1.0, 1.5].into_iter().enumerate() {
        let mut body = chat_body("tiny", "Describe a person", 120);
        body["temperature"] = json!(temperature);
        body["seed"] = json!(i);
        body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "person", "schema": schema}});
        let (status, v) = post(&server, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        let text = content(&v);
        let parsed: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        check_person(&parsed).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
    let mut body = chat_body("tiny", "Anything", 80);
    body["temperature"] = json!(1.0);
    body["response_format"] = json!({"type": "json_object"});
    let (_, v) = post(&server, "/v1/chat/completions", &body);
    let text = content(&v);
    let parsed: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert!(parsed.is_object(), "{text}");
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_answering() {
    let server = start(&[]);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, None),
        ("/v1/chat/completions", json!({"model": "tiny"}).to_string(), 400, None),
        ("/v1/chat/completions", chat_body("nope", "hi", 4).to_string(), 404, Some("model")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}).to_string(), 400, Some("temperature")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).to_string(), 400, None),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).to_string(), 400, Some("max_tokens")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000}).to_string(), 400, Some("max_tokens")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 17}).to_string(), 400, Some("n")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}}).to_string(), 400, Some("logit_bias")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}).to_string(), 400, Some("top_logprobs")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}).to_string(), 400, Some("top_logprobs")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}).to_string(), 400, Some("presence_penalty")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}).to_string(), 400, Some("max_completion_tokens")),
        ("/v1/completions", json!({"model": "tiny", "prompt": "hi", "suffix": "x"}).to_string(), 400, Some("suffix")),
        ("/v1/completions", json!({"model": "tiny", "prompt": "hi", "logprobs": true}).to_string(), 400, Some("logprobs")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": []}).to_string(), 400, Some("messages")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}).to_string(), 400, Some("messages[0].role")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}).to_string(), 400, Some("response_format")),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}).to_string(), 400, Some("response_format")),
        ("/v1/completions", json!({"model": "tiny", "prompt": 42}).to_string(), 400, Some("prompt")),
        ("/v1/adapters", json!({"name": "x", "path": "/no/such/adapter"}).to_string(), 400, Some("path")),
        ("/v1/adapters", json!({"name": "tiny", "path": "/no/such/adapter"}).to_string(), 409, Some("name")),
        ("/v1/nothing", "{}".into(), 404, None),
    ];
    for (path, body, status, param) in cases {
        let (got, v) = post_raw(&server, path, &body);
        assert_eq!(got, status, "{path} {body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{path} {body}: no error message in {v}"));
        assert!(!msg.is_empty());
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body}: {v}");
        }
    }
    let (status, v) = post(&server, "/v1/chat/completions", &chat_body("tiny", "still there?", 4));
    assert_eq!(status, 200, "{v}");
    assert_eq!(content(&v), reference(None, "still there?", greedy(4)).0);
    // A parameter sent as null counts as not sent.
    let mut body = chat_body("tiny", "still there?", 4);
    body["logit_bias"] = Value::Null;
    let (status, v) = post(&server, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
}

#[test]
fn adapters_are_picked_per_request_and_load_without_restart() {
    let server = {
        let _rng = torch_rng_lock();
        start(&[("lora", LORA)])
    };
    let base = reference(None, "Hello there", greedy(20)).0;
    let lora = reference(Some(LORA), "Hello there", greedy(20)).0;
    assert_ne!(base, lora, "the fixture adapter changes the greedy text");
    assert_eq!(content(&post(&server, "/v1/chat/completions", &chat_body("lora", "Hello there", 20)).1), lora);
    assert_eq!(content(&post(&server, "/v1/chat/completions", &chat_body("tiny", "Hello there", 20)).1), base);

    let (status, v) = {
        let _rng = torch_rng_lock();
        post(&server, "/v1/adapters", &json!({"name": "dora", "path": fixture(DORA)}))
    };
    assert_eq!(status, 200, "{v}");
    let models: Value = ureq::get(&format!("http://{}/v1/models", server.addr)).call().unwrap().into_json().unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny", "lora", "dora"]);
    let dora = reference(Some(DORA), "Hello there", greedy(20)).0;
    assert_eq!(content(&post(&server, "/v1/chat/completions", &chat_body("dora", "Hello there", 20)).1), dora);
    assert_eq!(content(&post(&server, "/v1/chat/completions", &chat_body("lora", "Hello there", 20)).1), lora);
    let (status, _) = post(&server, "/v1/adapters", &json!({"name": "dora", "path": fixture(DORA)}));
    assert_eq!(status, 409);
}

#[test]
fn concurrent_requests_get_the_sequential_answers() {
    let server = {
        let _rng = torch_rng_lock();
        start(&[("lora", LORA)])
    };
    let jobs: Vec<(&str, String, usize)> = (0..8)
        .map(|i| (if i % 3 == 0 { "lora" } else { "tiny" }, format!("Question number {i}{}", "?".repeat(i)), 10 + 3 * i))
        .collect();
    let sequential: Vec<String> = jobs.iter().map(|(m, u, n)| content(&post(&server, "/v1/chat/completions", &chat_body(m, u, *n)).1)).collect();
    let concurrent: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(m, u, n)| {
                let server = &server;
                s.spawn(move || {
                    let (status, v) = post(server, "/v1/chat/completions", &chat_body(m, u, *n));
                    assert_eq!(status, 200, "{v}");
                    content(&v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(concurrent, sequential);
    // And the sequential ones are generate's.
    assert_eq!(sequential[1], reference(None, &jobs[1].1, greedy(jobs[1].2)).0);
    assert_eq!(sequential[3], reference(Some(LORA), &jobs[3].1, greedy(jobs[3].2)).0);
}

/// The Python of the CI venv (tests/env.sh installs `openai` there), or `FTX_TEST_PYTHON`.
fn python_with_openai() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("FTX_TEST_PYTHON") {
        return p.into();
    }
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

const OPENAI_SCRIPT: &str = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="unused")
out = {"models": [m.id for m in client.models.list().data]}
r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=24, temperature=0)
out["chat"] = r.choices[0].message.content
out["usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens]
stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=24, temperature=0, stream=True)
out["stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=60, temperature=1,
    response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["a"], "additionalProperties": False}}})
out["json"] = json.loads(r.choices[0].message.content)
try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
except Exception as e:
    out["error"] = [type(e).__name__, getattr(e, "status_code", None)]
print(json.dumps(out))
"#;

#[test]
fn the_openai_python_client_talks_to_it() {
    let server = start(&[]);
    let python = python_with_openai();
    let out = std::process::Command::new(&python)
        // httpx honours proxy variables; loopback must not go through one.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .args(["-c", OPENAI_SCRIPT, &format!("http://{}/v1", server.addr)])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/env.sh, which installs openai into .venv, or set FTX_TEST_PYTHON)", python.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (text, prompt_tokens, completion_tokens) = reference(None, "Hello there", greedy(24));
    assert_eq!(v["models"], json!(["tiny"]));
    assert_eq!(v["chat"], text);
    assert_eq!(v["usage"], json!([prompt_tokens, completion_tokens]));
    assert_eq!(v["stream"], text);
    assert!(v["json"]["a"].is_i64(), "{}", v["json"]);
    assert_eq!(v["json"].as_object().unwrap().len(), 1);
    assert_eq!(v["error"], json!(["NotFoundError", 404]));
}

/// The tiny model, its tokenizer, and the chat prompt ids for `user`.
fn tiny_model(user: &str) -> (CausalLm, TextTokenizer, Vec<u32>) {
    let model = CausalLm::load(&fixture(MODEL), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let tok = TextTokenizer::load(&fixture(MODEL), model.config.vocab).unwrap();
    let prompt = tok.encode_chat(&[Message::new("user", user)], true).unwrap();
    (model, tok, prompt)
}

/// The model's own log-softmax over the next token after each prefix `prompt + new[..i]`,
/// from one forward pass over the whole sequence without a cache: `[new.len()][vocab]`.
fn log_softmax_rows(model: &CausalLm, prompt: &[u32], new: &[u32]) -> Vec<Vec<f32>> {
    let _g = tch::no_grad_guard();
    let all: Vec<i64> = prompt.iter().chain(new).map(|&t| t as i64).collect();
    let logits = model.forward(&tch::Tensor::from_slice(&all).unsqueeze(0), None).squeeze_dim(0).log_softmax(-1, Kind::Float);
    (0..new.len()).map(|i| Vec::<f32>::try_from(&logits.get((prompt.len() + i - 1) as i64)).unwrap()).collect()
}

#[test]
fn logprobs_are_the_models_log_softmax_and_n_choices_follow_their_seeds() {
    let server = start(&[]);
    let (model, tok, prompt) = tiny_model("Hello there");
    let g = generate(&model, &tok, &prompt, &GenerateOptions { max_new_tokens: 10, stop_ids: tok.stop_ids.clone(), ..Default::default() }, |_| {}).unwrap();
    let rows = log_softmax_rows(&model, &prompt, &g.ids);

    let mut body = chat_body("tiny", "Hello there", 10);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (status, v) = post(&server, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(content(&v), g.text);
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap_or_else(|| panic!("no logprobs in {v}"));
    assert_eq!(lp.len(), g.ids.len());
    for (i, (entry, &id)) in lp.iter().zip(&g.ids).enumerate() {
        assert_eq!(entry["token"], tok.decode(&[id], false));
        let want = rows[i][id as usize];
        let got = entry["logprob"].as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-4, "token {i}: {got} vs the model's {want}");
        assert_eq!(entry["bytes"], json!(tok.decode(&[id], false).as_bytes()));
        // The three most likely tokens, most likely first: greedy picked the first.
        let mut order: Vec<usize> = (0..rows[i].len()).collect();
        order.sort_by(|&a, &b| rows[i][b].total_cmp(&rows[i][a]));
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        for (t, &want_id) in top.iter().zip(&order) {
            assert_eq!(t["token"], tok.decode(&[want_id as u32], false));
            assert!((t["logprob"].as_f64().unwrap() as f32 - rows[i][want_id]).abs() < 1e-4);
        }
        assert_eq!(order[0] as u32, id);
    }

    // Completions: logprobs = k, the legacy shape.
    let ids = tok.encode("The sea", true).unwrap();
    let gc = generate(&model, &tok, &ids, &GenerateOptions { max_new_tokens: 6, stop_ids: tok.stop_ids.clone(), ..Default::default() }, |_| {}).unwrap();
    let rows = log_softmax_rows(&model, &ids, &gc.ids);
    let (_, v) = post(&server, "/v1/completions", &json!({"model": "tiny", "prompt": "The sea", "max_tokens": 6, "temperature": 0, "logprobs": 2}));
    let lp = &v["choices"][0]["logprobs"];
    let got: Vec<f32> = lp["token_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(got.len(), gc.ids.len(), "{v}");
    for (i, &id) in gc.ids.iter().enumerate() {
        assert!((got[i] - rows[i][id as usize]).abs() < 1e-4, "{i}: {} vs {}", got[i], rows[i][id as usize]);
    }
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);

    // n = 3 sampled: choice i is generate's text with seed + i; usage adds the choices up.
    let mut body = chat_body("tiny", "Hello there", 12);
    body["temperature"] = json!(1.0);
    body["seed"] = json!(5);
    body["n"] = json!(3);
    let (status, v) = post(&server, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut total = 0;
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let opts = GenerateOptions { max_new_tokens: 12, temperature: 1.0, seed: 5 + i as u64, stop_ids: tok.stop_ids.clone(), ..Default::default() };
        let want = generate(&model, &tok, &prompt, &opts, |_| {}).unwrap();
        assert_eq!(c["message"]["content"], want.text, "choice {i}");
        total += want.ids.len();
    }
    assert_ne!(choices[0]["message"]["content"], choices[1]["message"]["content"], "different seeds, different samples");
    assert_eq!(v["usage"]["completion_tokens"], total);
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());

    // Streamed n = 2: chunks carry their choice's index and rebuild each text.
    body["n"] = json!(2);
    body["stream"] = json!(true);
    let r = ureq::post(&format!("http://{}/v1/chat/completions", server.addr)).send_json(body).unwrap();
    let data = sse_data(&r.into_string().unwrap());
    let mut texts = [String::new(), String::new()];
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        let i = c["choices"][0]["index"].as_u64().unwrap() as usize;
        texts[i].push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(texts[0], choices[0]["message"]["content"].as_str().unwrap());
    assert_eq!(texts[1], choices[1]["message"]["content"].as_str().unwrap());
}

/// Greedy decoding with OpenAI's penalties, written out by hand: a full forward pass per
/// step, `logit -= count × frequency + presence` for every token generated so far.
fn penalised_greedy(model: &CausalLm, tok: &TextTokenizer, prompt: &[u32], steps: usize, presence: f32, frequency: f32) -> String {
    let _g = tch::no_grad_guard();
    let mut ids: Vec<u32> = Vec::new();
    let mut counts = std::collections::HashMap::<u32, f32>::new();
    for _ in 0..steps {
        let all: Vec<i64> = prompt.iter().chain(&ids).map(|&t| t as i64).collect();
        let logits = model.forward(&tch::Tensor::from_slice(&all).unsqueeze(0), None).select(1, -1).squeeze_dim(0);
        let mut row = Vec::<f32>::try_from(&logits.to_kind(Kind::Float)).unwrap();
        for (&t, &c) in &counts {
            row[t as usize] -= c * frequency + presence;
        }
        let next = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
        if tok.stop_ids.contains(&next) {
            break;
        }
        ids.push(next);
        *counts.entry(next).or_default() += 1.0;
    }
    tok.decode(&ids, true)
}

#[test]
fn presence_and_frequency_penalties_change_greedy_decoding_as_openai_defines() {
    let server = start(&[]);
    let (model, tok, prompt) = tiny_model("Tell me a story");
    let plain = penalised_greedy(&model, &tok, &prompt, 30, 0.0, 0.0);
    assert_eq!(plain, reference(None, "Tell me a story", greedy(30)).0, "the hand-written loop is greedy decoding");
    for (presence, frequency) in [(0.0, 2.0), (1.5, 0.0), (-1.0, 0.5)] {
        let mut body = chat_body("tiny", "Tell me a story", 30);
        body["presence_penalty"] = json!(presence);
        body["frequency_penalty"] = json!(frequency);
        let (status, v) = post(&server, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{v}");
        let want = penalised_greedy(&model, &tok, &prompt, 30, presence, frequency);
        assert_eq!(content(&v), want, "presence {presence} frequency {frequency}");
        if frequency == 2.0 {
            assert_ne!(want, plain, "a strong frequency penalty changes the tiny model's greedy text");
        }
    }
}

/// GET with an optional Bearer key: status and body text.
fn get(server: &Server, path: &str, key: Option<&str>) -> (u16, String) {
    let mut req = ureq::get(&format!("http://{}{path}", server.addr));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{path}: {e}"),
    }
}

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

/// The value of one Prometheus series in a text exposition (0 when absent).
fn series(metrics: &str, name_and_labels: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
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
    let python = python_with_openai();
    let out = std::process::Command::new(&python)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .args(["-c", OPENAI_AUTH_SCRIPT, &format!("http://{}/v1", server.addr)])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/env.sh, which installs openai into .venv, or set FTX_TEST_PYTHON)", python.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
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

/// A Hermes-style chat template (the shape of Qwen 2.5's) for the tiny Llama 3 fixture: the
/// tools in a system turn, calls as `<tool_call>` blocks.
const TOOL_TEMPLATE: &str = r#"{%- if tools %}<|start_header_id|>system<|end_header_id|>

# Tools
<tools>{% for t in tools %}
{{ t | tojson }}{% endfor %}
</tools>
Call a function as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|eot_id|>{% endif %}
{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>

{{ m['content'] }}<|eot_id|>{% endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"#;

/// The tiny Llama 3 fixture with [`TOOL_TEMPLATE`] as its chat template.
fn tool_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture(MODEL).join(f), dir.path().join(f)).unwrap();
    }
    // A longer context: with this 450-token vocabulary the tools' JSON alone is ~300 tokens.
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(fixture(MODEL).join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = json!(1024);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(fixture(MODEL).join("tokenizer_config.json")).unwrap()).unwrap();
    cfg["chat_template"] = json!(TOOL_TEMPLATE);
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                           "required": ["city", "days"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

/// Checks a call against [`weather_tools`] by hand: `Ok(name)` when its arguments are valid.
fn check_call(name: &str, arguments: &str) -> Result<String, String> {
    let args: Value = serde_json::from_str(arguments).map_err(|e| format!("arguments are not JSON ({e}): {arguments}"))?;
    let o = args.as_object().ok_or("arguments are not an object")?;
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort();
    match name {
        "get_weather" => {
            if keys != ["city", "days"] {
                return Err(format!("keys {keys:?}"));
            }
            let city = o["city"].as_str().ok_or("city is not a string")?;
            if city.chars().count() > 12 {
                return Err(format!("city {city:?} is longer than 12"));
            }
            match o["days"].as_i64() {
                Some(d) if (1..=7).contains(&d) => {}
                _ => return Err(format!("days {} is not an integer in 1..=7", o["days"])),
            }
        }
        "add" => {
            let small = |v: &Value| v.as_i64().is_some_and(|x| (0..=99).contains(&x));
            if keys != ["a", "b"] || !small(&o["a"]) || !small(&o["b"]) {
                return Err(format!("add arguments {arguments}"));
            }
        }
        other => return Err(format!("unknown tool {other}")),
    }
    Ok(name.to_owned())
}

/// The prompt ids the tool template gives `messages` with [`weather_tools`], plus `suffix`.
fn tool_prompt(dir: &std::path::Path, messages: &[Message], suffix: &str) -> Vec<u32> {
    let model_vocab = ftx::model::ModelConfig::load(dir).unwrap().vocab;
    let tok = TextTokenizer::load(dir, model_vocab).unwrap();
    let mut extra = serde_json::Map::new();
    extra.insert("tools".into(), weather_tools());
    let text = tok.render_chat_with(messages, true, &extra).unwrap() + suffix;
    assert!(text.contains("\"name\":\"get_weather\"") || text.contains("\"name\": \"get_weather\""), "the tools are in the prompt: {text}");
    tok.encode(&text, false).unwrap()
}

#[test]
fn tools_render_through_the_template_and_required_calls_follow_their_schemas() {
    let dir = tool_model_dir();
    let server = start_with(&[], |o| o.model_dir = dir.path().to_path_buf());
    let user = [Message::new("user", "Weather in Paris?")];
    let body = |choice: Value, temperature: f64, seed: u64| {
        json!({"model": "tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 120,
               "temperature": temperature, "seed": seed, "tools": weather_tools(), "tool_choice": choice})
    };
    // Required: one valid call of some tool, whatever the sampling.
    for (i, temperature) in [0.0, 1.0, 1.5].into_iter().enumerate() {
        let (status, v) = post(&server, "/v1/chat/completions", &body(json!("required"), temperature, i as u64));
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert!(c["message"]["content"].is_null(), "{v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["type"], "function");
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
        check_call(calls[0]["function"]["name"].as_str().unwrap(), calls[0]["function"]["arguments"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {v}"));
        assert_eq!(v["usage"]["prompt_tokens"], tool_prompt(dir.path(), &user, "<tool_call>\n").len());
    }
    // A named tool.
    let (_, v) = post(&server, "/v1/chat/completions", &body(json!({"type": "function", "function": {"name": "add"}}), 1.0, 3));
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(check_call(call["name"].as_str().unwrap(), call["arguments"].as_str().unwrap()), Ok("add".into()), "{v}");

    // Streamed: the same call as the non-streamed greedy answer, as tool_calls deltas.
    let (_, greedy_call) = post(&server, "/v1/chat/completions", &body(json!("required"), 0.0, 0));
    let mut b = body(json!("required"), 0.0, 0);
    b["stream"] = json!(true);
    let r = ureq::post(&format!("http://{}/v1/chat/completions", server.addr)).send_json(b).unwrap();
    let data = sse_data(&r.into_string().unwrap());
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let deltas: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
    assert_eq!(deltas.len(), 1, "{chunks:?}");
    assert_eq!(deltas[0]["index"], 0);
    assert_eq!(deltas[0]["function"], greedy_call["choices"][0]["message"]["tool_calls"][0]["function"]);
    assert_eq!(chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect::<Vec<_>>(), ["tool_calls"]);

    // Auto: the tiny model writes no call, so the answer is generate's text for the tools prompt.
    let (_, v) = post(&server, "/v1/chat/completions", &body(json!("auto"), 0.0, 0));
    let prompt = tool_prompt(dir.path(), &user, "");
    let model = CausalLm::load(dir.path(), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let tok = TextTokenizer::load(dir.path(), model.config.vocab).unwrap();
    let g = generate(&model, &tok, &prompt, &GenerateOptions { max_new_tokens: 120, stop_ids: tok.stop_ids.clone(), ..Default::default() }, |_| {}).unwrap();
    assert!(!g.text.contains("<tool_call>"));
    assert_eq!(v["choices"][0]["message"]["content"], g.text.trim(), "{v}");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());

    // An earlier call and its result go back in: the assistant turn in the model's syntax, the
    // tool turn as a `tool` message.
    let history = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}
    ]);
    let mut b = body(json!("auto"), 0.0, 0);
    b["messages"] = history;
    let (status, v) = post(&server, "/v1/chat/completions", &b);
    assert_eq!(status, 200, "{v}");
    let written = [
        Message::new("user", "Weather in Paris?"),
        Message::new("assistant", "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\",\"days\":2}}\n</tool_call>"),
        Message::new("tool", "sunny, 24 C"),
    ];
    assert_eq!(v["usage"]["prompt_tokens"], tool_prompt(dir.path(), &written, "").len());

    // A template without tools refuses them rather than dropping them.
    let plain = start(&[]);
    let (status, v) = post(&plain, "/v1/chat/completions", &body(json!("auto"), 0.0, 0));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "tools");
}

const OPENAI_TOOLS_SCRIPT: &str = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="unused")
tools = json.loads(sys.argv[2])
msgs = [{"role": "user", "content": "Weather in Paris?"}]
out = {}
r = client.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice="required", max_tokens=120, temperature=0)
c = r.choices[0]
out["call"] = [c.message.tool_calls[0].function.name, c.message.tool_calls[0].function.arguments, c.finish_reason]
calls = {}
for chunk in client.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice="required", max_tokens=120, temperature=0, stream=True):
    for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        e = calls.setdefault(d.index, {"name": "", "arguments": ""})
        e["name"] += d.function.name or ""
        e["arguments"] += d.function.arguments or ""
out["streamed"] = [calls[0]["name"], calls[0]["arguments"]]
r = client.chat.completions.create(model="tiny", messages=msgs + [c.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": c.message.tool_calls[0].id, "content": "sunny"}],
    tools=tools, max_tokens=8, temperature=0)
out["after_tool"] = r.choices[0].finish_reason
print(json.dumps(out))
"#;

#[test]
fn the_openai_python_client_calls_tools_streamed_and_not() {
    let dir = tool_model_dir();
    let server = start_with(&[], |o| o.model_dir = dir.path().to_path_buf());
    let python = python_with_openai();
    let out = std::process::Command::new(&python)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .args(["-c", OPENAI_TOOLS_SCRIPT, &format!("http://{}/v1", server.addr), &weather_tools().to_string()])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let name = check_call(v["call"][0].as_str().unwrap(), v["call"][1].as_str().unwrap()).unwrap();
    assert_eq!(v["call"][2], "tool_calls");
    assert_eq!(v["streamed"], json!([name, v["call"][1]]));
    assert!(v["after_tool"].is_string(), "{v}");
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
    let oversized = format!("{{\"model\": \"tiny\", \"prompt\": \"{}\"}}", "a".repeat(3 << 20));
    let statuses: Vec<Vec<u16>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (server, oversized) = (&server, &oversized);
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
                            3 => got.push(post_raw(server, "/v1/completions", oversized).0),
                            _ => {
                                // A body cut short: the header promises more than is sent.
                                let mut c = std::net::TcpStream::connect(addr).unwrap();
                                c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\": \"ti").unwrap();
                                c.shutdown(std::net::Shutdown::Write).unwrap();
                                let mut answer = String::new();
                                let _ = c.read_to_string(&mut answer);
                                got.push(answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0));
                            }
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
