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

mod ops;
mod paged;
mod preempt;
mod tools;

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
        engine: Default::default(),
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

/// Sends every `(model, user message, max_tokens)` chat request at once, each from its own
/// thread; each must be answered 200. The answers' texts, in the jobs' order.
fn chat_concurrently(server: &Server, jobs: &[(&str, String, usize)]) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(m, u, n)| {
                s.spawn(move || {
                    let (status, v) = post(server, "/v1/chat/completions", &chat_body(m, u, *n));
                    assert_eq!(status, 200, "{v}");
                    content(&v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
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
fn an_adapter_saved_with_a_chat_template_is_served_with_it() {
    // The fixture adapter, as a run with `data.chat_template` saves it: the template and the
    // stop tokens beside the weights.
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture(LORA).join(f), dir.path().join(f)).unwrap();
    }
    let template = "Transcript of a conversation with a helpful assistant.\n{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<<assistant>>{% endif %}";
    std::fs::write(dir.path().join("chat_template.jinja"), template).unwrap();
    std::fs::write(dir.path().join("generation_config.json"), json!({"eos_token_id": [7]}).to_string()).unwrap();
    let templated = dir.path().to_str().unwrap().to_owned();

    // What `ftx generate --adapter DIR --chat` gives: the base's tokenizer with the adapter's
    // template and stops.
    let mut model = CausalLm::load(&fixture(MODEL), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    {
        let _rng = torch_rng_lock();
        ftx::peft::load_adapter(&mut model, dir.path()).unwrap();
    }
    let mut tok = TextTokenizer::load(&fixture(MODEL), model.config.vocab).unwrap();
    ftx::data::chat_templates::adopt(&mut tok, dir.path()).unwrap();
    assert!(tok.stop_ids.contains(&7));
    let prompt = tok.encode_chat(&[Message::new("user", "Hello there")], true).unwrap();
    let g = generate(&model, &tok, &prompt, &GenerateOptions { stop_ids: tok.stop_ids.clone(), ..greedy(20) }, |_| {}).unwrap();
    let (_, plain_prompt, _) = reference(Some(LORA), "Hello there", greedy(20));
    assert_ne!(prompt.len(), plain_prompt, "the template changes the prompt");

    let server = {
        let _rng = torch_rng_lock();
        start_with(&[("lora", LORA)], |o| o.adapters.push(("templated".into(), templated.clone().into())))
    };
    let v = post(&server, "/v1/chat/completions", &chat_body("templated", "Hello there", 20)).1;
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len(), "{v}");
    assert_eq!(content(&v), g.text);
    // The same adapter without its template, and the base, keep the base's template.
    let v = post(&server, "/v1/chat/completions", &chat_body("lora", "Hello there", 20)).1;
    assert_eq!(v["usage"]["prompt_tokens"], plain_prompt, "{v}");
    // Loaded later, the same.
    let (status, v) = {
        let _rng = torch_rng_lock();
        post(&server, "/v1/adapters", &json!({"name": "later", "path": templated}))
    };
    assert_eq!(status, 200, "{v}");
    let v = post(&server, "/v1/chat/completions", &chat_body("later", "Hello there", 20)).1;
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len(), "{v}");
    assert_eq!(content(&v), g.text);
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
    let concurrent = chat_concurrently(&server, &jobs);
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

/// Runs the openai-client `script` against `server` (its base URL is the script's first
/// argument, `args` follow) and returns the JSON it prints.
fn run_openai_script(server: &Server, script: &str, args: &[&str]) -> Value {
    let python = python_with_openai();
    let url = format!("http://{}/v1", server.addr);
    let out = std::process::Command::new(&python)
        // httpx honours proxy variables; loopback must not go through one.
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .args(["-c", script, &url])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/env.sh, which installs openai into .venv, or set FTX_TEST_PYTHON)", python.display()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
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
    let v = run_openai_script(&server, OPENAI_SCRIPT, &[]);
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

/// The value of one Prometheus series in a text exposition (0 when absent).
fn series(metrics: &str, name_and_labels: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// DELETE, with the status and parsed body.
fn delete(server: &Server, path: &str) -> (u16, Value) {
    match ureq::delete(&format!("http://{}{path}", server.addr)).call() {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{path}: {e}"),
    }
}

#[test]
fn an_alias_rolls_versions_out_and_back_splits_a_canary_and_unloads() {
    let server = {
        let _rng = torch_rng_lock();
        start(&[("ad:v1", LORA), ("ad:v2", DORA)])
    };
    let v1 = reference(Some(LORA), "Hello there", greedy(12)).0;
    let v2 = reference(Some(DORA), "Hello there", greedy(12)).0;
    assert_ne!(v1, v2, "the two fixture adapters write different greedy text");
    let ask = |user: &str| {
        let mut b = chat_body("ad", "Hello there", 12);
        b["user"] = json!(user);
        let (status, v) = post(&server, "/v1/chat/completions", &b);
        assert_eq!(status, 200, "{v}");
        content(&v)
    };
    assert_eq!(post(&server, "/v1/aliases", &json!({"name": "ad", "target": "ad:v1"})).0, 200);
    assert_eq!(ask("a"), v1);
    assert_eq!(post(&server, "/v1/aliases", &json!({"name": "ad", "target": "ad:v2"})).0, 200);
    assert_eq!(ask("a"), v2, "rolled out");
    assert_eq!(post(&server, "/v1/aliases", &json!({"name": "ad", "target": "ad:v1"})).0, 200);
    assert_eq!(ask("a"), v1, "rolled back");

    // A 50/50 canary: each user sticks to one version, and both versions get users.
    assert_eq!(post(&server, "/v1/aliases", &json!({"name": "ad", "targets": {"ad:v1": 1, "ad:v2": 1}})).0, 200);
    let mut seen = std::collections::HashSet::new();
    for u in 0..10 {
        let user = format!("user-{u}");
        let first = ask(&user);
        assert!(first == v1 || first == v2, "{first}");
        assert_eq!(ask(&user), first, "{user} stays on one version");
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "ten users all landed on one side of a 50/50 split");
    let models: Value = ureq::get(&format!("http://{}/v1/models", server.addr)).call().unwrap().into_json().unwrap();
    let alias = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "ad").unwrap();
    assert_eq!(alias["targets"], json!({"ad:v1": 1.0, "ad:v2": 1.0}));

    // Bad aliases, and unloading.
    assert_eq!(post(&server, "/v1/aliases", &json!({"name": "ad", "target": "nope"})).1["error"]["param"], "targets");
    assert_eq!(post(&server, "/v1/aliases", &json!({"name": "tiny", "target": "ad:v1"})).0, 409);
    assert_eq!(delete(&server, "/v1/adapters/ad:v2").0, 409, "an alias still points at it");
    assert_eq!(post(&server, "/v1/aliases", &json!({"name": "ad", "target": "ad:v1"})).0, 200);
    assert_eq!(delete(&server, "/v1/adapters/ad:v2").0, 200);
    assert_eq!(post(&server, "/v1/chat/completions", &chat_body("ad:v2", "Hello there", 4)).0, 404);
    assert_eq!(delete(&server, "/v1/adapters/tiny").0, 400);
    assert_eq!(delete(&server, "/v1/aliases/ad").0, 200);
    assert_eq!(post(&server, "/v1/chat/completions", &chat_body("ad", "Hello there", 4)).0, 404);
    assert_eq!(content(&post(&server, "/v1/chat/completions", &chat_body("ad:v1", "Hello there", 12)).1), v1);
}
