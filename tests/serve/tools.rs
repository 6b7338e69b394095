//! Tool calls through the model's chat template: rendered, read back, constrained, streamed,
//! and through the `openai` Python client.

use super::*;

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
    let v = run_openai_script(&server, OPENAI_TOOLS_SCRIPT, &[&weather_tools().to_string()]);
    let name = check_call(v["call"][0].as_str().unwrap(), v["call"][1].as_str().unwrap()).unwrap();
    assert_eq!(v["call"][2], "tool_calls");
    assert_eq!(v["streamed"], json!([name, v["call"][1]]));
    assert!(v["after_tool"].is_string(), "{v}");
}
