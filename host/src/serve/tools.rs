//! Tool calls (OpenAI's `tools` / `tool_choice`) in the model's own syntax.
//!
//! The tool list goes to the checkpoint's chat template as its `tools` variable, as
//! transformers' `apply_chat_template(tools=...)` does, so the model sees the tools the way it
//! was trained to. ftx reads calls written in the Hermes syntax that Qwen 2.5/3, Hermes and
//! most tool-tuned chat templates use:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! When `tool_choice` requires a call, the prompt ends with the opening `<tool_call>\n` and the
//! call object is decoded under a JSON schema (llguidance): `name` one of the allowed tools,
//! `arguments` valid under that tool's `parameters` schema.

use super::api::ApiError;
use serde::Deserialize;
use serde_json::{json, Value};

/// Where a call starts and ends in the model's text.
const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One entry of `tools`.
#[derive(Debug, Clone, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Function,
}

/// A function the model may call.
#[derive(Debug, Clone, Deserialize)]
pub struct Function {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// A JSON schema for the arguments (an object schema; absent means no arguments).
    #[serde(default)]
    pub parameters: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The model answers in text; calls are not read back.
    None,
    /// The model may call tools; calls in its text are read back.
    Auto,
    /// The model must call one of these tools (its call is constrained to their schemas).
    Required(Vec<String>),
}

/// A request's checked tools.
#[derive(Debug, Clone)]
pub struct ToolSet {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    /// `parallel_tool_calls: false`: only the first call is read; later blocks stay text.
    pub single: bool,
}

/// One call read back from the model's text.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments as a JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

impl ToolSet {
    /// Checks `tools` and `tool_choice` (OpenAI's defaults: `auto` with tools, `none` without)
    /// against what the chat template can render.
    pub fn new(tools: Option<Vec<Tool>>, choice: Option<&Value>, template: Option<&str>) -> Result<Option<ToolSet>, ApiError> {
        let tools = tools.unwrap_or_default();
        if tools.is_empty() {
            return match choice {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s == "none" => Ok(None),
                Some(_) => Err(ApiError::bad(Some("tool_choice"), "tool_choice needs tools")),
            };
        }
        for (i, t) in tools.iter().enumerate() {
            if t.kind != "function" {
                return Err(ApiError::bad(Some(&format!("tools[{i}].type")), format!("only function tools are supported, got '{}'", t.kind)));
            }
            let name = &t.function.name;
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(ApiError::bad(Some(&format!("tools[{i}].function.name")), format!("a function name is 1 to 64 letters, digits, _ or -, got '{name}'")));
            }
            if t.function.parameters.as_ref().is_some_and(|p| !p.is_object()) {
                return Err(ApiError::bad(Some(&format!("tools[{i}].function.parameters")), "parameters must be a JSON schema object"));
            }
        }
        let template = template.unwrap_or_default();
        if !(template.contains("tools") && template.contains(OPEN)) {
            return Err(ApiError::bad(
                Some("tools"),
                "this model's chat template does not render tools in the <tool_call> syntax ftx reads (Qwen 2.5/3, Hermes); \
                 serve a checkpoint whose tokenizer_config.json chat_template takes `tools`",
            ));
        }
        let names: Vec<String> = tools.iter().map(|t| t.function.name.clone()).collect();
        let choice = match choice {
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required(names),
                other => return Err(ApiError::bad(Some("tool_choice"), format!("tool_choice is none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got '{other}'"))),
            },
            Some(v) => {
                let name = v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
                match (v.get("type").and_then(Value::as_str), name) {
                    (Some("function"), Some(n)) if names.iter().any(|m| m == n) => Choice::Required(vec![n.to_owned()]),
                    (Some("function"), Some(n)) => return Err(ApiError::bad(Some("tool_choice"), format!("tool_choice names '{n}', which is not in tools"))),
                    _ => return Err(ApiError::bad(Some("tool_choice"), "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}")),
                }
            }
        };
        Ok(Some(ToolSet { tools, choice, single: false }))
    }

    /// The template's `tools` variable: the request's tool list as OpenAI wrote it.
    pub fn template_value(&self) -> Value {
        let tools: Vec<Value> = self
            .tools
            .iter()
            .map(|t| {
                let f = &t.function;
                let mut function = json!({"name": f.name, "parameters": f.parameters.clone().unwrap_or_else(|| json!({"type": "object", "properties": {}}))});
                if let Some(d) = &f.description {
                    function["description"] = json!(d);
                }
                json!({"type": "function", "function": function})
            })
            .collect();
        json!(tools)
    }

    /// When a call is required: the text that opens it (appended to the prompt) and the JSON
    /// schema its call object must follow.
    pub fn forced(&self) -> Option<(&'static str, Value)> {
        let Choice::Required(names) = &self.choice else { return None };
        let one = |name: &str| {
            let params = self
                .tools
                .iter()
                .find(|t| t.function.name == name)
                .and_then(|t| t.function.parameters.clone())
                .unwrap_or_else(|| json!({"type": "object", "properties": {}, "additionalProperties": false}));
            json!({"type": "object", "properties": {"name": {"const": name}, "arguments": params}, "required": ["name", "arguments"], "additionalProperties": false})
        };
        let schema = match names.as_slice() {
            [n] => one(n),
            many => json!({"anyOf": many.iter().map(|n| one(n)).collect::<Vec<_>>()}),
        };
        Some((concat!("<tool_call>", "\n"), schema))
    }

    /// Splits a finished choice's text into its content and calls. A required call's text is
    /// the call object itself; otherwise calls are the `<tool_call>` blocks holding a JSON
    /// object with a string `name` (anything else stays in the content).
    pub fn read(&self, text: &str) -> (Option<String>, Vec<Call>) {
        if self.choice == Choice::None {
            return (Some(text.to_owned()), Vec::new());
        }
        if self.forced().is_some() {
            if let Some(c) = parse_call(text) {
                return (None, vec![c]);
            }
            return (Some(text.to_owned()), Vec::new());
        }
        let mut content = String::new();
        let mut calls = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find(OPEN).filter(|_| !(self.single && !calls.is_empty())) {
            let after = &rest[start + OPEN.len()..];
            let Some(end) = after.find(CLOSE) else { break };
            match parse_call(&after[..end]) {
                Some(c) => {
                    content.push_str(&rest[..start]);
                    calls.push(c);
                }
                None => content.push_str(&rest[..start + OPEN.len() + end + CLOSE.len()]),
            }
            rest = &after[end + CLOSE.len()..];
        }
        content.push_str(rest);
        let content = content.trim();
        (if content.is_empty() { None } else { Some(content.to_owned()) }, calls)
    }
}

fn parse_call(text: &str) -> Option<Call> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_owned();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(Call { name, arguments })
}

/// An assistant turn's earlier calls written back in the model's syntax, after its content,
/// as Hermes-style templates render `tool_calls` (`i` names the message in errors).
pub fn render_calls(content: &str, calls: &[Value], i: usize) -> Result<String, ApiError> {
    let mut out = content.to_owned();
    for (j, c) in calls.iter().enumerate() {
        let param = format!("messages[{i}].tool_calls[{j}]");
        let f = c.get("function").ok_or_else(|| ApiError::bad(Some(&param), "a tool call needs {\"function\": {\"name\", \"arguments\"}}"))?;
        let name = f.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::bad(Some(&param), "a tool call needs function.name"))?;
        let arguments: Value = match f.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| ApiError::bad(Some(&format!("{param}.function.arguments")), format!("not a JSON text: {e}")))?,
            Some(v) => v.clone(),
            None => json!({}),
        };
        if !out.is_empty() {
            out.push('\n');
        }
        // `name` first, as the templates write it (serde_json objects sort their keys).
        out.push_str(&format!("{OPEN}\n{{\"name\": {}, \"arguments\": {arguments}}}\n{CLOSE}", json!(name)));
    }
    Ok(out)
}

/// The calls as OpenAI's `tool_calls` (ids `call_` + 24 hex digits).
pub fn calls_json(calls: &[Call]) -> Vec<Value> {
    calls
        .iter()
        .map(|c| json!({"id": format!("call_{:024x}", rand::random::<u128>() >> 32), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(choice: Option<Value>) -> ToolSet {
        let tools: Vec<Tool> = serde_json::from_value(json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])).unwrap();
        ToolSet::new(Some(tools), choice.as_ref(), Some("{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>")).unwrap().unwrap()
    }

    #[test]
    fn calls_are_read_out_of_the_text_and_the_rest_is_content() {
        let t = set(None);
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\nnot json\n</tool_call>";
        let (content, calls) = t.read(text);
        assert_eq!(calls, vec![Call { name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() }]);
        assert_eq!(content.as_deref(), Some("Let me check.\n\n<tool_call>\nnot json\n</tool_call>"));
        assert_eq!(t.read("no calls here"), (Some("no calls here".into()), vec![]));
        let two = "<tool_call>\n{\"name\": \"a\"}\n</tool_call><tool_call>\n{\"name\": \"b\"}\n</tool_call>";
        assert_eq!(t.read(two).1.len(), 2);
        let single = ToolSet { single: true, ..t.clone() };
        let (content, calls) = single.read(two);
        assert_eq!(calls, vec![Call { name: "a".into(), arguments: "{}".into() }]);
        assert_eq!(content.as_deref(), Some("<tool_call>\n{\"name\": \"b\"}\n</tool_call>"));
        // An unterminated block (cut by max_tokens) stays text.
        assert_eq!(t.read("<tool_call>\n{\"name\": \"x\"").1, vec![]);
    }

    #[test]
    fn tool_choice_is_checked() {
        assert_eq!(set(Some(json!("required"))).choice, Choice::Required(vec!["get_weather".into()]));
        assert_eq!(set(Some(json!({"type": "function", "function": {"name": "get_weather"}}))).choice, Choice::Required(vec!["get_weather".into()]));
        let tools: Vec<Tool> = serde_json::from_value(json!([{"type": "function", "function": {"name": "f"}}])).unwrap();
        let e = ToolSet::new(Some(tools.clone()), Some(&json!({"type": "function", "function": {"name": "g"}})), Some("tools <tool_call>")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = ToolSet::new(Some(tools), None, Some("{{ messages }}")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools"));
    }

    #[test]
    fn earlier_calls_are_written_back_in_the_models_syntax() {
        let calls = [json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}})];
        assert_eq!(render_calls("", &calls, 0).unwrap(), "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\":1}}\n</tool_call>");
        let bad = [json!({"function": {"name": "f", "arguments": "{oops"}})];
        assert_eq!(render_calls("", &bad, 2).unwrap_err().param.as_deref(), Some("messages[2].tool_calls[0].function.arguments"));
    }
}
