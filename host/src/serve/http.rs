//! The HTTP side (axum on tokio): routes, OpenAI response and streaming-chunk shapes, and
//! errors as OpenAI's `{"error": {...}}` bodies. Handlers check and tokenise the request,
//! queue it for the model thread, and relay its events.

use super::api::{self, ApiError, ChatRequest, CompletionRequest, Settings};
use super::constrain::Constraints;
use super::scheduler::{Event, GenRequest, Job, ModelNames};
use crate::model::generate::{GenerateOptions, StopReason};
use crate::model::TextTokenizer;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// What every handler shares.
pub struct AppState {
    pub jobs: SyncSender<Job>,
    pub names: ModelNames,
    pub tok: Arc<TextTokenizer>,
    pub constraints: Arc<Constraints>,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// The most a request may ask for (the model's context).
    pub max_tokens_limit: usize,
    pub started: u64,
    pub next_id: AtomicU64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

/// The router with every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/adapters", post(load_adapter))
        .route("/health", get(|| async { "ok" }))
        .fallback(|| async { ApiError { status: 404, message: "no such endpoint; see /v1/models, /v1/chat/completions, /v1/completions, /v1/adapters".into(), kind: "not_found_error", param: None, code: None } })
        .with_state(state)
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let names = st.names.read().unwrap_or_else(|e| e.into_inner()).clone();
    let data: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| json!({"id": n, "object": "model", "created": st.started, "owned_by": "ftx", "root": names[0], "parent": if i == 0 { Value::Null } else { json!(names[0]) }}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn load_adapter(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: api::AdapterRequest = api::parse(&body)?;
    let valid = !req.name.is_empty() && req.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c));
    if !valid {
        return Err(ApiError::bad(Some("name"), "an adapter name uses letters, digits and - _ . : /"));
    }
    if st.names.read().unwrap_or_else(|e| e.into_inner()).contains(&req.name) {
        return Err(ApiError { status: 409, message: format!("'{}' is already served; pick another name", req.name), kind: "invalid_request_error", param: Some("name".into()), code: Some("model_exists") });
    }
    let (reply, wait) = oneshot::channel();
    enqueue(&st, Job::LoadAdapter { name: req.name.clone(), path: req.path.into(), reply })?;
    match wait.await {
        Ok(Ok(())) => Ok(Json(json!({"id": req.name, "object": "model", "created": now(), "owned_by": "ftx"}))),
        Ok(Err(e)) => Err(ApiError::bad(Some("path"), e)),
        Err(_) => Err(server_error("the model thread stopped")),
    }
}

fn server_error(message: &str) -> ApiError {
    ApiError { status: 500, message: message.into(), kind: "server_error", param: None, code: None }
}

fn enqueue(st: &AppState, job: Job) -> Result<(), ApiError> {
    st.jobs.try_send(job).map_err(|e| match e {
        TrySendError::Full(_) => ApiError { status: 429, message: "the request queue is full; retry shortly".into(), kind: "rate_limit_error", param: None, code: Some("queue_full") },
        TrySendError::Disconnected(_) => server_error("the model thread stopped"),
    })
}

/// Which endpoint a generation answers, for the response shapes.
#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completion,
}

/// A checked request ready to queue.
struct Prepared {
    model: String,
    adapter: Option<String>,
    prompt: Vec<u32>,
    settings: Settings,
    format: Option<super::constrain::OutputFormat>,
    stream: bool,
    include_usage: bool,
    echo: Option<String>,
}

impl Prepared {
    /// A request's model, prompt ids and the settings both endpoints share.
    fn new(st: &AppState, model: String, adapter: Option<String>, prompt: Vec<u32>, sampling: &api::Sampling, response_format: &Option<serde_json::Value>, echo: Option<String>) -> Result<Prepared, ApiError> {
        Ok(Prepared {
            model,
            adapter,
            prompt,
            settings: sampling.settings(st.default_max_tokens, st.max_tokens_limit)?,
            format: api::output_format(response_format)?,
            stream: sampling.stream,
            include_usage: sampling.stream_options.as_ref().is_some_and(|o| o.include_usage),
            echo,
        })
    }
}

fn check_model(st: &AppState, model: &str) -> Result<Option<String>, ApiError> {
    let names = st.names.read().unwrap_or_else(|e| e.into_inner());
    match names.iter().position(|n| n == model) {
        Some(0) => Ok(None),
        Some(_) => Ok(Some(model.to_owned())),
        None => Err(ApiError {
            status: 404,
            message: format!("the model '{model}' does not exist; served: {}", names.join(", ")),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }),
    }
}

async fn chat(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let prep = (|| -> Result<Prepared, ApiError> {
        let req: ChatRequest = api::parse(&body)?;
        let adapter = check_model(&st, &req.model)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad(Some("messages"), "messages must not be empty"));
        }
        let msgs = req.messages.iter().enumerate().map(|(i, m)| m.to_message(i)).collect::<Result<Vec<_>, _>>()?;
        let prompt = st.tok.encode_chat(&msgs, true).map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
        Prepared::new(&st, req.model, adapter, prompt, &req.sampling, &req.response_format, None)
    })();
    match prep {
        Ok(p) => respond(st, p, Endpoint::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let prep = (|| -> Result<Prepared, ApiError> {
        let req: CompletionRequest = api::parse(&body)?;
        let adapter = check_model(&st, &req.model)?;
        let text = api::prompt_text(&req.prompt)?;
        let prompt = st.tok.encode(&text, true).map_err(|e| ApiError::bad(Some("prompt"), e.to_string()))?;
        if prompt.is_empty() {
            return Err(ApiError::bad(Some("prompt"), "the prompt is empty"));
        }
        Prepared::new(&st, req.model, adapter, prompt, &req.sampling, &req.response_format, req.echo.then_some(text))
    })();
    match prep {
        Ok(p) => respond(st, p, Endpoint::Completion).await,
        Err(e) => e.into_response(),
    }
}

fn finish_reason(s: &StopReason) -> &'static str {
    match s {
        StopReason::Stop => "stop",
        StopReason::Length => "length",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Queues the request, then answers with one JSON body or a stream of chunks.
async fn respond(st: Arc<AppState>, p: Prepared, ep: Endpoint) -> Response {
    let limit = st.max_tokens_limit;
    if p.prompt.len() + p.settings.max_tokens > limit {
        return ApiError::bad(Some("max_tokens"), format!("the prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {limit} tokens", p.prompt.len(), p.settings.max_tokens)).into_response();
    }
    let matcher = match &p.format {
        None => None,
        Some(f) => match st.constraints.matcher(f) {
            Ok(m) => Some(m),
            Err(e) => return ApiError::bad(Some("response_format"), e.to_string()).into_response(),
        },
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let s = &p.settings;
    let req = GenRequest {
        adapter: p.adapter.clone(),
        prompt: p.prompt.clone(),
        opts: GenerateOptions {
            max_new_tokens: s.max_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            stop_ids: st.tok.stop_ids.clone(),
            stop_strings: s.stop.clone(),
        },
        matcher,
        events: tx,
    };
    if let Err(e) = enqueue(&st, Job::Generate(req)) {
        return e.into_response();
    }
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let (id, object) = match ep {
        Endpoint::Chat => (format!("chatcmpl-ftx{n}"), "chat.completion"),
        Endpoint::Completion => (format!("cmpl-ftx{n}"), "text_completion"),
    };
    let created = now();
    if !p.stream {
        let mut text = p.echo.clone().unwrap_or_default();
        loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Done { prompt_tokens, completion_tokens, stop }) => {
                    let choice = match ep {
                        Endpoint::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(&stop), "logprobs": null}),
                        Endpoint::Completion => json!({"index": 0, "text": text, "finish_reason": finish_reason(&stop), "logprobs": null}),
                    };
                    let body = json!({"id": id, "object": object, "created": created, "model": p.model, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)});
                    return Json(body).into_response();
                }
                Some(Event::Error(e)) => return server_error(&e).into_response(),
                None => return server_error("the model thread stopped").into_response(),
            }
        }
    }
    let object = format!("{object}.chunk");
    let object = if ep == Endpoint::Completion { "text_completion".to_owned() } else { object };
    let chunk = move |delta: Value, finish: Option<&str>| -> Value {
        let choice = match ep {
            Endpoint::Chat => json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}),
            Endpoint::Completion => json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "finish_reason": finish, "logprobs": null}),
        };
        json!({"id": id, "object": object, "created": created, "model": p.model, "choices": [choice]})
    };
    let first = match (ep, &p.echo) {
        (Endpoint::Chat, _) => Some(chunk(json!({"role": "assistant", "content": ""}), None)),
        (Endpoint::Completion, Some(e)) => Some(chunk(json!({"content": e}), None)),
        _ => None,
    };
    let include_usage = p.include_usage;
    let events = futures_util::stream::unfold((rx, first, false), move |(mut rx, first, done)| {
        let chunk = chunk.clone();
        async move {
            if done {
                return None;
            }
            let data = |v: &Value| SseEvent::default().data(v.to_string());
            if let Some(f) = first {
                return Some((vec![data(&f)], (rx, None, false)));
            }
            let out = match rx.recv().await {
                Some(Event::Text(t)) => return Some((vec![data(&chunk(json!({"content": t}), None))], (rx, None, false))),
                Some(Event::Done { prompt_tokens, completion_tokens, stop }) => {
                    let mut out = vec![data(&chunk(json!({}), Some(finish_reason(&stop))))];
                    if include_usage {
                        let mut u = chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(prompt_tokens, completion_tokens);
                        out.push(data(&u));
                    }
                    out
                }
                Some(Event::Error(e)) => vec![data(&server_error(&e).body())],
                None => vec![data(&server_error("the model thread stopped").body())],
            };
            let mut out = out;
            out.push(SseEvent::default().data("[DONE]"));
            Some((out, (rx, None, true)))
        }
    })
    .flat_map(|v| futures_util::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events).into_response()
}
