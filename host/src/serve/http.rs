//! The HTTP side (axum on tokio): routes, OpenAI response and streaming-chunk shapes, and
//! errors as OpenAI's `{"error": {...}}` bodies. Handlers check and tokenise the request,
//! queue it for the model thread, and relay its events (one per choice when `n > 1`).

use super::api::{self, ApiError, ChatRequest, CompletionRequest, Settings};
use super::ops::{endpoint_label, InFlight, Outcome, Record, MAX_BODY_BYTES};
use super::scheduler::{Event, GenRequest, Job, Penalties, TokenLogprob};
use super::state::{enqueue, server_error, valid_name, AppState};
use super::tools::{self, ToolSet};
use crate::model::generate::{GenerateOptions, StopReason};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// The router with every endpoint, behind [`guard`] (drain, auth, request counts).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{*name}", axum::routing::delete(super::alias_routes::unload_adapter))
        .route("/v1/aliases", post(super::alias_routes::set_alias))
        .route("/v1/aliases/{*name}", axum::routing::delete(super::alias_routes::delete_alias))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(|State(st): State<Arc<AppState>>| async move { ([("content-type", "text/plain; version=0.0.4")], st.metrics.render()) }))
        .fallback(|| async { ApiError { status: 404, message: "no such endpoint; see /v1/models, /v1/chat/completions, /v1/completions, /v1/adapters, /metrics, /health".into(), kind: "not_found_error", param: None, code: None } })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let names = st.names.read().unwrap_or_else(|e| e.into_inner()).clone();
    let mut data: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| json!({"id": n, "object": "model", "created": st.started, "owned_by": "ftx", "root": names[0], "parent": if i == 0 { Value::Null } else { json!(names[0]) }}))
        .collect();
    data.extend(st.aliases.listing(st.started));
    Json(json!({"object": "list", "data": data}))
}

async fn load_adapter(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: api::AdapterRequest = api::parse_request(&body, &["name", "path"])?;
    if !valid_name(&req.name) {
        return Err(ApiError::bad(Some("name"), "an adapter name uses letters, digits and - _ . : /"));
    }
    if st.names.read().unwrap_or_else(|e| e.into_inner()).contains(&req.name) || st.aliases.contains(&req.name) {
        return Err(ApiError { status: 409, message: format!("'{}' is already served; pick another name", req.name), kind: "invalid_request_error", param: Some("name".into()), code: Some("model_exists") });
    }
    let (reply, wait) = oneshot::channel();
    let path = std::path::PathBuf::from(req.path);
    enqueue(&st, Job::LoadAdapter { name: req.name.clone(), path: path.clone(), reply })?;
    match wait.await {
        Ok(Ok(())) => {
            if let Err(e) = st.adopt_adapter(&req.name, &path) {
                tracing::warn!("{e}; its requests use the base model's chat template");
            }
            Ok(Json(json!({"id": req.name, "object": "model", "created": now(), "owned_by": "ftx"})))
        }
        Ok(Err(e)) => Err(ApiError::bad(Some("path"), e)),
        Err(_) => Err(server_error("the model thread stopped")),
    }
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
    /// Chat with `tools`: how the answer's calls are read back.
    tools: Option<ToolSet>,
}

impl Prepared {
    /// A request's model, prompt ids and the settings both endpoints share.
    fn new(st: &AppState, ep: Endpoint, model: String, adapter: Option<String>, prompt: Vec<u32>, sampling: &api::Sampling, response_format: &Option<Value>, echo: Option<String>) -> Result<Prepared, ApiError> {
        Ok(Prepared {
            model,
            adapter,
            prompt,
            settings: sampling.settings(st.default_max_tokens, st.max_tokens_limit, ep == Endpoint::Chat)?,
            format: api::output_format(response_format)?,
            stream: sampling.stream,
            include_usage: sampling.stream_options.as_ref().is_some_and(|o| o.include_usage),
            echo,
            tools: None,
        })
    }
}

/// The adapter a request's `model` runs on (`None`: the base), through an alias if it is one;
/// `rec` learns the served name.
fn check_model(st: &AppState, model: &str, rec: &mut Record) -> Result<Option<String>, ApiError> {
    let resolved = st.aliases.resolve(model, rec.user.as_deref());
    let model = resolved.as_deref().unwrap_or(model);
    rec.served = Some(model.to_owned());
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

fn new_record(st: &AppState, ep: Endpoint) -> Record {
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    match ep {
        Endpoint::Chat => Record::start(st.log.as_ref(), "chat", format!("chatcmpl-ftx{n}")),
        Endpoint::Completion => Record::start(st.log.as_ref(), "completions", format!("cmpl-ftx{n}")),
    }
}

async fn chat(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let mut rec = new_record(&st, Endpoint::Chat);
    let prep = (|| -> Result<Prepared, ApiError> {
        let req: ChatRequest = api::parse_request(&body, api::CHAT_PARAMS)?;
        rec.model = Some(req.model.clone());
        rec.user = req.sampling.user.clone();
        if rec.keeps_content() {
            rec.input = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("messages").cloned());
        }
        let adapter = check_model(&st, &req.model, &mut rec)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad(Some("messages"), "messages must not be empty"));
        }
        let msgs = req.messages.iter().enumerate().map(|(i, m)| m.to_message(i)).collect::<Result<Vec<_>, _>>()?;
        // The template (and stops) saved with the adapter, when it saved one.
        let tok = st.tok_for(adapter.as_deref());
        let toolset = ToolSet::new(req.tools.clone(), req.tool_choice.as_ref(), tok.chat_template.as_deref())?;
        let template_error = |e: crate::model::ModelError| ApiError::bad(Some("messages"), e.to_string());
        let (prompt, forced) = match &toolset {
            None => (tok.encode_chat(&msgs, true).map_err(template_error)?, None),
            Some(t) => {
                let mut extra = serde_json::Map::new();
                extra.insert("tools".into(), t.template_value());
                let mut text = tok.render_chat_with(&msgs, true, &extra).map_err(template_error)?;
                let forced = t.forced();
                if let Some((open, _)) = &forced {
                    text.push_str(open);
                }
                (tok.encode(&text, false).map_err(template_error)?, forced)
            }
        };
        let mut p = Prepared::new(&st, Endpoint::Chat, req.model, adapter, prompt, &req.sampling, &req.response_format, None)?;
        if let Some((_, schema)) = forced {
            if p.format.is_some() {
                return Err(ApiError::bad(Some("response_format"), "a required tool call already fixes the output's format; drop response_format or tool_choice"));
            }
            p.format = Some(super::constrain::OutputFormat::JsonSchema(schema));
        }
        p.tools = toolset.map(|t| ToolSet { single: req.parallel_tool_calls == Some(false), ..t });
        Ok(p)
    })();
    match prep {
        Ok(p) => respond(st, p, Endpoint::Chat, rec).await,
        Err(e) => {
            rec.finish(&st.metrics, st.log.as_ref(), e.status, None);
            e.into_response()
        }
    }
}

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let mut rec = new_record(&st, Endpoint::Completion);
    let prep = (|| -> Result<Prepared, ApiError> {
        let req: CompletionRequest = api::parse_request(&body, api::COMPLETION_PARAMS)?;
        rec.model = Some(req.model.clone());
        rec.user = req.sampling.user.clone();
        if rec.keeps_content() {
            rec.input = Some(req.prompt.clone());
        }
        let adapter = check_model(&st, &req.model, &mut rec)?;
        let text = api::prompt_text(&req.prompt)?;
        let prompt = st.tok.encode(&text, true).map_err(|e| ApiError::bad(Some("prompt"), e.to_string()))?;
        if prompt.is_empty() {
            return Err(ApiError::bad(Some("prompt"), "the prompt is empty"));
        }
        Prepared::new(&st, Endpoint::Completion, req.model, adapter, prompt, &req.sampling, &req.response_format, req.echo.then_some(text))
    })();
    match prep {
        Ok(p) => respond(st, p, Endpoint::Completion, rec).await,
        Err(e) => {
            rec.finish(&st.metrics, st.log.as_ref(), e.status, None);
            e.into_response()
        }
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

/// `logprobs` of a choice (or of one chunk of it) in the endpoint's shape; `offset` is the
/// character offset of the first token's text (completions' `text_offset`).
fn logprobs_json(ep: Endpoint, entries: &[TokenLogprob], offset: usize) -> Value {
    match ep {
        Endpoint::Chat => {
            let one = |t: &str, lp: f32| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
            let content: Vec<Value> = entries
                .iter()
                .map(|e| {
                    let mut v = one(&e.token, e.logprob);
                    v["top_logprobs"] = e.top.iter().map(|(t, lp)| one(t, *lp)).collect();
                    v
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Endpoint::Completion => {
            let mut at = offset;
            let mut offsets = Vec::with_capacity(entries.len());
            for e in entries {
                offsets.push(at);
                at += e.token.chars().count();
            }
            let top: Vec<Value> = entries.iter().map(|e| Value::Object(e.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect())).collect();
            json!({
                "tokens": entries.iter().map(|e| e.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

/// Queues the request, then answers with one JSON body or a stream of chunks.
async fn respond(st: Arc<AppState>, p: Prepared, ep: Endpoint, mut rec: Record) -> Response {
    let refuse = |rec: Record, e: ApiError| {
        rec.finish(&st.metrics, st.log.as_ref(), e.status, None);
        e.into_response()
    };
    let limit = st.max_tokens_limit;
    if p.prompt.len() + p.settings.max_tokens > limit {
        let e = ApiError::bad(Some("max_tokens"), format!("the prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {limit} tokens", p.prompt.len(), p.settings.max_tokens));
        return refuse(rec, e);
    }
    let matcher = match &p.format {
        None => None,
        Some(f) => match st.constraints.matcher(f) {
            Ok(m) => Some(m),
            Err(e) => {
                let param = if p.tools.as_ref().is_some_and(|t| t.forced().is_some()) { "tools" } else { "response_format" };
                return refuse(rec, ApiError::bad(Some(param), e.to_string()));
            }
        },
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let s = &p.settings;
    let n = s.n;
    rec.n = n;
    rec.stream = p.stream;
    let req = GenRequest {
        adapter: p.adapter.clone(),
        prompt: p.prompt.clone(),
        opts: GenerateOptions {
            max_new_tokens: s.max_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            stop_ids: st.tok_for(p.adapter.as_deref()).stop_ids.clone(),
            stop_strings: s.stop.clone(),
        },
        matcher,
        events: tx,
        n,
        logprobs: s.logprobs,
        penalties: Penalties { presence: s.presence_penalty, frequency: s.frequency_penalty },
    };
    let in_flight = InFlight::new(&st.metrics);
    if let Err(e) = enqueue(&st, Job::Generate(req)) {
        return refuse(rec, e);
    }
    let object = match ep {
        Endpoint::Chat => "chat.completion",
        Endpoint::Completion => "text_completion",
    };
    let mut relay = Relay {
        rx,
        ep,
        id: rec.id.clone(),
        object: if ep == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
        created: now(),
        model: p.model.clone(),
        logprobs: p.settings.logprobs.is_some(),
        include_usage: p.include_usage,
        echo_chars: p.echo.as_ref().map_or(0, |e| e.chars().count()),
        pending: vec![Vec::new(); n],
        all_logprobs: vec![Vec::new(); n],
        sent_chars: vec![0; n],
        out: VecDeque::new(),
        outcome: Outcome::new(n),
        record: Some(rec),
        tools: p.tools.clone(),
        st: st.clone(),
        _in_flight: in_flight,
    };
    relay.outcome.prompt_tokens = p.prompt.len();
    if !p.stream {
        loop {
            let ev = relay.rx.recv().await;
            if let Some(e) = relay.collect(ev) {
                relay.end(e.status);
                return e.into_response();
            }
            if relay.outcome.complete() {
                break;
            }
        }
        let o = &relay.outcome;
        let choices: Vec<Value> = (0..n)
            .map(|i| {
                let text = format!("{}{}", p.echo.as_deref().unwrap_or_default(), o.texts[i]);
                let logprobs = if relay.logprobs { logprobs_json(ep, &relay.all_logprobs[i], relay.echo_chars) } else { Value::Null };
                let mut reason = o.finish[i].as_ref().map(finish_reason);
                match ep {
                    Endpoint::Chat if relay.tools.is_some() => {
                        let (content, calls) = relay.tools.as_ref().map_or((Some(text), Vec::new()), |t| t.read(&o.texts[i]));
                        let mut message = json!({"role": "assistant", "content": content});
                        if !calls.is_empty() {
                            message["tool_calls"] = json!(tools::calls_json(&calls));
                            reason = Some("tool_calls");
                        }
                        json!({"index": i, "message": message, "finish_reason": reason, "logprobs": logprobs})
                    }
                    Endpoint::Chat => json!({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": logprobs}),
                    Endpoint::Completion => json!({"index": i, "text": text, "finish_reason": reason, "logprobs": logprobs}),
                }
            })
            .collect();
        let body = json!({"id": relay.id, "object": object, "created": relay.created, "model": p.model, "choices": choices, "usage": usage(o.prompt_tokens, o.completion_tokens)});
        relay.end(200);
        return Json(body).into_response();
    }
    for i in 0..n {
        match (ep, &p.echo) {
            (Endpoint::Chat, _) => relay.push_chunk(i, json!({"role": "assistant", "content": ""}), None, Value::Null),
            (Endpoint::Completion, Some(e)) => relay.push_chunk(i, json!(e), None, Value::Null),
            _ => {}
        }
    }
    let events = futures_util::stream::unfold(relay, |mut r| async move {
        loop {
            if let Some(e) = r.out.pop_front() {
                return Some((e, r));
            }
            if r.record.is_none() {
                return None; // ended and everything sent
            }
            let ev = r.rx.recv().await;
            r.relay(ev);
        }
    })
    .map(Ok::<_, Infallible>);
    Sse::new(events).into_response()
}

/// Turns the model thread's events into a response: collects choices, and for a stream,
/// queues chunks. Ending it (or dropping it when a client goes away) writes the request's
/// record once.
struct Relay {
    rx: mpsc::UnboundedReceiver<Event>,
    ep: Endpoint,
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    logprobs: bool,
    include_usage: bool,
    echo_chars: usize,
    /// Log-probabilities not yet attached to a chunk, per choice.
    pending: Vec<Vec<TokenLogprob>>,
    /// Every log-probability, per choice (the non-streamed answer).
    all_logprobs: Vec<Vec<TokenLogprob>>,
    /// Characters of each choice already streamed (completions' `text_offset`).
    sent_chars: Vec<usize>,
    out: VecDeque<SseEvent>,
    outcome: Outcome,
    /// `None` once the record is written.
    record: Option<Record>,
    /// With tools, a choice's text is held until it ends and then sent as content and calls.
    tools: Option<ToolSet>,
    st: Arc<AppState>,
    _in_flight: InFlight,
}

impl Relay {
    /// Folds one event into the outcome; an error ends the request.
    fn collect(&mut self, ev: Option<Event>) -> Option<ApiError> {
        match ev {
            Some(Event::Text { index, text }) => {
                self.outcome.first_token.get_or_insert_with(Instant::now);
                self.outcome.texts[index].push_str(&text);
                None
            }
            Some(Event::Logprob { index, entry }) => {
                self.all_logprobs[index].push(entry.clone());
                self.pending[index].push(entry);
                None
            }
            Some(Event::Done { index, completion_tokens, stop, .. }) => {
                self.outcome.first_token.get_or_insert_with(Instant::now);
                self.outcome.completion_tokens += completion_tokens;
                self.outcome.finish[index] = Some(stop);
                None
            }
            Some(Event::Error(e)) => Some(server_error(&e)),
            Some(Event::Refused(e)) => Some(ApiError::bad(Some("max_tokens"), e)),
            None => Some(server_error("the model thread stopped")),
        }
    }

    fn push_chunk(&mut self, index: usize, delta: Value, finish: Option<&str>, logprobs: Value) {
        let choice = match self.ep {
            Endpoint::Chat => json!({"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}),
            Endpoint::Completion => json!({"index": index, "text": delta, "finish_reason": finish, "logprobs": logprobs}),
        };
        let chunk = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [choice]});
        self.out.push_back(SseEvent::default().data(chunk.to_string()));
    }

    /// The log-probabilities waiting for choice `index`, in the endpoint's shape.
    fn take_logprobs(&mut self, index: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let entries = std::mem::take(&mut self.pending[index]);
        let v = logprobs_json(self.ep, &entries, self.echo_chars + self.sent_chars[index]);
        self.sent_chars[index] += entries.iter().map(|e| e.token.chars().count()).sum::<usize>();
        v
    }

    /// Streams one event as chunks.
    fn relay(&mut self, ev: Option<Event>) {
        let (index, kind) = match &ev {
            Some(Event::Text { index, text }) => (*index, Some(text.clone())),
            Some(Event::Done { index, .. }) => (*index, None),
            _ => (0, None),
        };
        let done = matches!(ev, Some(Event::Done { .. }));
        if let Some(e) = self.collect(ev) {
            self.out.push_back(SseEvent::default().data(e.body().to_string()));
            self.out.push_back(SseEvent::default().data("[DONE]"));
            self.end(e.status);
            return;
        }
        if kind.is_some() && self.tools.is_some() {
            // Held: with tools, calls are read once the choice is complete.
        } else if let Some(text) = kind {
            let lp = self.take_logprobs(index);
            let delta = if self.ep == Endpoint::Chat { json!({"content": text}) } else { json!(text) };
            self.push_chunk(index, delta, None, lp);
        } else if done {
            let mut reason = self.outcome.finish[index].as_ref().map(finish_reason);
            if let Some(t) = self.tools.clone() {
                let (content, calls) = t.read(&self.outcome.texts[index]);
                if let Some(c) = content {
                    let lp = self.take_logprobs(index);
                    self.push_chunk(index, json!({"content": c}), None, lp);
                }
                if !calls.is_empty() {
                    let deltas: Vec<Value> = tools::calls_json(&calls)
                        .into_iter()
                        .enumerate()
                        .map(|(k, mut c)| {
                            c["index"] = json!(k);
                            c
                        })
                        .collect();
                    let lp = self.take_logprobs(index);
                    self.push_chunk(index, json!({"tool_calls": deltas}), None, lp);
                    reason = Some("tool_calls");
                }
            }
            let lp = self.take_logprobs(index);
            let delta = if self.ep == Endpoint::Chat { json!({}) } else { json!("") };
            self.push_chunk(index, delta, reason, lp);
            if self.outcome.complete() {
                if self.include_usage {
                    let u = json!({"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": [],
                                   "usage": usage(self.outcome.prompt_tokens, self.outcome.completion_tokens)});
                    self.out.push_back(SseEvent::default().data(u.to_string()));
                }
                self.out.push_back(SseEvent::default().data("[DONE]"));
                self.end(200);
            }
        }
    }

    /// Writes the request's record (once).
    fn end(&mut self, status: u16) {
        if let Some(rec) = self.record.take() {
            rec.finish(&self.st.metrics, self.st.log.as_ref(), status, Some(&self.outcome));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // 499: the client closed the connection before the answer was complete.
        self.end(499);
    }
}

/// Runs before every handler: 503 while draining, 401 without the key (except `/health`),
/// 413 for a declared body over [`MAX_BODY_BYTES`] (before reading it, so a client that sent
/// `Expect: 100-continue`, as curl does for large bodies, reads the refusal instead of a
/// reset), and counts the answer by endpoint and status.
pub async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = endpoint_label(req.uri().path());
    let refusal = if st.draining.load(Ordering::SeqCst) {
        Some(ApiError { status: 503, message: "the server is shutting down; retry on another replica".into(), kind: "server_error", param: None, code: Some("shutting_down") })
    } else if endpoint == "health" {
        None
    } else if let Some(len) = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()).filter(|&l| l > MAX_BODY_BYTES) {
        Some(ApiError { status: 413, message: format!("the request body is {len} bytes; the limit is {MAX_BODY_BYTES}"), kind: "invalid_request_error", param: None, code: Some("request_too_large") })
    } else {
        st.api_key.as_ref().and_then(|key| {
            let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
            match presented {
                Some(p) if key.matches(p) => None,
                Some(_) => Some(unauthorized("Incorrect API key provided.")),
                None => Some(unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")),
            }
        })
    };
    let response = match refusal {
        Some(e) => {
            let status = e.status;
            let mut r = e.into_response();
            if status == 401 {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            r
        }
        None => next.run(req).await,
    };
    st.metrics.requests.with_label_values(&[endpoint, response.status().as_str()]).inc();
    response
}

fn unauthorized(message: &str) -> ApiError {
    ApiError { status: StatusCode::UNAUTHORIZED.as_u16(), message: message.into(), kind: "invalid_request_error", param: None, code: Some("invalid_api_key") }
}
