//! The OpenAI request bodies ftx accepts, and their checks. Fields ftx does not use are
//! ignored, as OpenAI-compatible servers do; values it cannot honour are refused with a
//! message naming the parameter.

use super::constrain::OutputFormat;
use crate::model::tokenizer::Message;
use serde::Deserialize;
use serde_json::Value;

/// A request the server refuses, with the HTTP status and OpenAI error fields.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 with a message and the offending parameter.
    pub fn bad(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError { status: 400, message: message.into(), kind: "invalid_request_error", param: param.map(str::to_owned), code: None }
    }
    /// The body OpenAI clients parse: `{"error": {message, type, param, code}}`.
    pub fn body(&self) -> Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

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
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// One message; `content` is a string or a list of `{type: "text", text}` parts.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
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

/// Parses a JSON body, turning serde's message into a 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(None, format!("the request body is not valid: {e}")))
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
}

impl Sampling {
    /// Checks ranges (as OpenAI documents them) and fills defaults.
    pub fn settings(&self, default_max: usize, limit: usize) -> Result<Settings, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad(Some("n"), "only n = 1 is supported"));
        }
        let max = self.max_completion_tokens.or(self.max_tokens).map_or(default_max as u64, |m| m);
        if max == 0 || max > limit as u64 {
            return Err(ApiError::bad(Some("max_tokens"), format!("max_tokens must be between 1 and {limit}, got {max}")));
        }
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
        Ok(Settings { max_tokens: max as usize, temperature, top_p, top_k: top_k as usize, seed: self.seed.unwrap_or(0) as u64, stop })
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
