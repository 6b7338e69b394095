//! The OpenAI request bodies ftx accepts, and their checks. A parameter ftx does not
//! implement is refused with a 400 naming it (never silently ignored: a client that asks
//! for `logit_bias` must not get an answer that ignored it); values it cannot honour are
//! refused the same way. A parameter sent as `null` counts as not sent.

use super::constrain::OutputFormat;
use crate::model::tokenizer::Message;
use serde::Deserialize;
use serde_json::Value;

pub use super::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Sampling and length settings both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; vLLM and llama.cpp accept it too.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub n: Option<u64>,
    /// Chat: a boolean; completions: how many top alternatives per token (0..=20).
    pub logprobs: Option<Value>,
    /// Chat only: alternatives per token when `logprobs` is true.
    pub top_logprobs: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// An end-user id; only written to the request log.
    pub user: Option<String>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<super::tools::Tool>>,
    pub tool_choice: Option<Value>,
    /// `false`: read only the first call (a required call is always a single call).
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// One message; `content` is a string or a list of `{type: "text", text}` parts.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
    /// An assistant turn's calls (written back into the prompt in the model's tool syntax).
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` turn's answer to this call (accepted; templates key tool answers by order).
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Value,
    #[serde(default)]
    pub echo: bool,
    pub response_format: Option<Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `POST /v1/adapters`: load a PEFT adapter folder under a name.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterRequest {
    pub name: String,
    pub path: String,
}

/// Parameters `/v1/chat/completions` implements.
pub const CHAT_PARAMS: &[&str] = &[
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
    "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "response_format", "user",
    "tools", "tool_choice", "parallel_tool_calls",
];

/// Parameters `/v1/completions` implements.
pub const COMPLETION_PARAMS: &[&str] = &[
    "model", "prompt", "echo", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
    "stream_options", "logprobs", "presence_penalty", "frequency_penalty", "response_format", "user",
];

/// Parses a JSON body, turning serde's message into a 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(None, format!("the request body is not valid: {e}")))
}

/// Parses a request body whose top-level keys must all be in `supported` (or be `null`).
pub fn parse_request<T: serde::de::DeserializeOwned>(body: &[u8], supported: &[&str]) -> Result<T, ApiError> {
    let v: Value = parse(body)?;
    let Some(obj) = v.as_object() else {
        return Err(ApiError::bad(None, "the request body must be a JSON object"));
    };
    if let Some((k, _)) = obj.iter().find(|(k, v)| !v.is_null() && !supported.contains(&k.as_str())) {
        return Err(ApiError::bad(Some(k), format!("the parameter '{k}' is not supported by ftx serve (supported: {})", supported.join(", "))));
    }
    serde_json::from_value(v).map_err(|e| ApiError::bad(None, format!("the request body is not valid: {e}")))
}

/// Checked decoding settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Choices per request.
    pub n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `Some(k)`: return each sampled token's log-probability and its `k` top alternatives.
    pub logprobs: Option<usize>,
}

/// The most choices one request may ask for.
pub const MAX_N: u64 = 16;
/// The most alternatives per token `top_logprobs` (or completions' `logprobs`) may ask for.
pub const MAX_TOP_LOGPROBS: u64 = 20;

impl Sampling {
    /// Checks ranges (as OpenAI documents them) and fills defaults; `chat` picks the
    /// endpoint's meaning of `logprobs`.
    pub fn settings(&self, default_max: usize, limit: usize, chat: bool) -> Result<Settings, ApiError> {
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::bad(Some("n"), format!("n must be between 1 and {MAX_N}, got {n}")));
        }
        let (max_param, max) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", m),
            (None, Some(m)) => ("max_tokens", m),
            (None, None) => ("max_tokens", default_max as u64),
        };
        if max == 0 || max > limit as u64 {
            return Err(ApiError::bad(Some(max_param), format!("{max_param} must be between 1 and {limit}, got {max}")));
        }
        let penalty = |name: &str, v: Option<f64>| match v.unwrap_or(0.0) {
            p if (-2.0..=2.0).contains(&p) => Ok(p as f32),
            p => Err(ApiError::bad(Some(name), format!("{name} must be between -2 and 2, got {p}"))),
        };
        let presence_penalty = penalty("presence_penalty", self.presence_penalty)?;
        let frequency_penalty = penalty("frequency_penalty", self.frequency_penalty)?;
        let logprobs = self.logprobs_setting(chat)?;
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(Some("temperature"), format!("temperature must be between 0 and 2, got {temperature}")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(Some("top_p"), format!("top_p must be in (0, 1], got {top_p}")));
        }
        let top_k = self.top_k.unwrap_or(0);
        if top_k < 0 {
            return Err(ApiError::bad(Some("top_k"), format!("top_k must be 0 (off) or positive, got {top_k}")));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(String::is_empty) {
            return Err(ApiError::bad(Some("stop"), "stop takes up to 4 non-empty strings"));
        }
        Ok(Settings {
            max_tokens: max as usize,
            temperature,
            top_p,
            top_k: top_k as usize,
            seed: self.seed.unwrap_or(0) as u64,
            stop,
            n: n as usize,
            presence_penalty,
            frequency_penalty,
            logprobs,
        })
    }

    /// Chat: `logprobs: true` plus `top_logprobs: k`; completions: `logprobs: k`.
    fn logprobs_setting(&self, chat: bool) -> Result<Option<usize>, ApiError> {
        let range = |name: &str, k: u64| {
            if k <= MAX_TOP_LOGPROBS {
                Ok(k as usize)
            } else {
                Err(ApiError::bad(Some(name), format!("{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {k}")))
            }
        };
        if !chat {
            return match &self.logprobs {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(k) => range("logprobs", k).map(Some),
                    None => Err(ApiError::bad(Some("logprobs"), format!("logprobs is a number of alternatives per token (0..={MAX_TOP_LOGPROBS}), got {v}"))),
                },
            };
        }
        let on = match &self.logprobs {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(ApiError::bad(Some("logprobs"), format!("logprobs is true or false, got {v}"))),
        };
        match (on, self.top_logprobs) {
            (true, k) => range("top_logprobs", k.unwrap_or(0)).map(Some),
            (false, None) => Ok(None),
            (false, Some(_)) => Err(ApiError::bad(Some("top_logprobs"), "top_logprobs needs logprobs: true")),
        }
    }
}

impl ChatMessage {
    /// The message as the chat template sees it.
    pub fn to_message(&self, i: usize) -> Result<Message, ApiError> {
        let param = format!("messages[{i}].content");
        let content = match &self.content {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => return Err(ApiError::bad(Some(&param), "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")),
                    }
                }
                text
            }
            Some(_) => return Err(ApiError::bad(Some(&param), "content must be a string or a list of text parts")),
        };
        if !["system", "developer", "user", "assistant", "tool"].contains(&self.role.as_str()) {
            return Err(ApiError::bad(Some(&format!("messages[{i}].role")), format!("unknown role '{}'", self.role)));
        }
        // Chat templates know "system"; OpenAI's newer "developer" means the same.
        let role = if self.role == "developer" { "system" } else { &self.role };
        let content = match self.tool_calls.as_deref() {
            None | Some([]) => content,
            Some(calls) if role == "assistant" => super::tools::render_calls(&content, calls, i)?,
            Some(_) => return Err(ApiError::bad(Some(&format!("messages[{i}].tool_calls")), "only assistant messages carry tool_calls")),
        };
        Ok(Message::new(role, &content))
    }
}

/// Reads `response_format`: `text`, `json_object`, or `json_schema` with `json_schema.schema`.
pub fn output_format(v: &Option<Value>) -> Result<Option<OutputFormat>, ApiError> {
    let Some(v) = v else { return Ok(None) };
    let p = Some("response_format");
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
        Some("json_schema") => {
            let schema = v
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| ApiError::bad(p, "json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}"))?;
            Ok(Some(OutputFormat::JsonSchema(schema.clone())))
        }
        Some(other) => Err(ApiError::bad(p, format!("unknown response_format type '{other}': use text, json_object or json_schema"))),
        None => Err(ApiError::bad(p, "response_format needs a \"type\"")),
    }
}

/// The completion prompt: a string, or a list holding one string.
pub fn prompt_text(v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => Ok(a[0].as_str().unwrap_or_default().to_owned()),
        _ => Err(ApiError::bad(Some("prompt"), "prompt must be a string (or a list of exactly one string)")),
    }
}
