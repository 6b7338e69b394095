//! The HTTP side of versions: `POST /v1/aliases`, `DELETE /v1/aliases/{name}`,
//! `DELETE /v1/adapters/{name}`.

use crate::serve::api::{self, ApiError};
use crate::serve::state::{enqueue, valid_name, AppState};
use crate::serve::scheduler::Job;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// `{"name": "sql", "target": "sql:v2"}` or `{"name": "sql", "targets": {"sql:v1": 9, "sql:v2": 1}}`.
#[derive(Deserialize)]
struct AliasRequest {
    name: String,
    target: Option<String>,
    targets: Option<serde_json::Map<String, Value>>,
}

fn conflict(message: String, code: &'static str) -> ApiError {
    ApiError { status: 409, message, kind: "invalid_request_error", param: Some("name".into()), code: Some(code) }
}

fn not_found(message: String) -> ApiError {
    ApiError { status: 404, message, kind: "invalid_request_error", param: Some("name".into()), code: Some("model_not_found") }
}

/// Creates or moves an alias.
pub async fn set_alias(State(st): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: AliasRequest = api::parse_request(&body, &["name", "target", "targets"])?;
    if !valid_name(&req.name) {
        return Err(ApiError::bad(Some("name"), "an alias name uses letters, digits and - _ . : /"));
    }
    let names = st.names.read().unwrap_or_else(|e| e.into_inner()).clone();
    if names.contains(&req.name) {
        return Err(conflict(format!("'{}' is a served model, not an alias; pick another name", req.name), "model_exists"));
    }
    let targets: Vec<(String, f64)> = match (req.target, req.targets) {
        (Some(t), None) => vec![(t, 1.0)],
        (None, Some(map)) if !map.is_empty() => map
            .into_iter()
            .map(|(m, w)| match w.as_f64() {
                Some(w) if w > 0.0 && w.is_finite() => Ok((m, w)),
                _ => Err(ApiError::bad(Some("targets"), format!("the weight of '{m}' must be a positive number, got {w}"))),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::bad(Some("target"), "give \"target\": MODEL, or \"targets\": {MODEL: WEIGHT, ...}")),
    };
    if let Some((m, _)) = targets.iter().find(|(m, _)| !names.contains(m)) {
        return Err(ApiError::bad(Some("targets"), format!("'{m}' is not served (aliases point at served models: {})", names.join(", "))));
    }
    st.aliases.set(&req.name, targets.clone());
    let targets: serde_json::Map<String, Value> = targets.into_iter().map(|(m, w)| (m, json!(w))).collect();
    Ok(Json(json!({"id": req.name, "object": "model", "owned_by": "ftx", "targets": targets})))
}

/// Removes an alias (404 when there is none).
pub async fn delete_alias(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    if !st.aliases.remove(&name) {
        return Err(not_found(format!("there is no alias '{name}'")));
    }
    Ok(Json(json!({"id": name, "object": "model", "deleted": true})))
}

/// Unloads an adapter: refused while an alias points at it or requests run on it.
pub async fn unload_adapter(State(st): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let position = st.names.read().unwrap_or_else(|e| e.into_inner()).iter().position(|n| *n == name);
    match position {
        None => return Err(not_found(format!("there is no adapter '{name}'"))),
        Some(0) => return Err(ApiError::bad(Some("name"), format!("'{name}' is the base model, which cannot be unloaded"))),
        Some(_) => {}
    }
    let aliases = st.aliases.targeting(&name);
    if !aliases.is_empty() {
        return Err(conflict(format!("alias(es) {} point at '{name}'; move them first", aliases.join(", ")), "adapter_in_use"));
    }
    let (reply, wait) = tokio::sync::oneshot::channel();
    enqueue(&st, Job::UnloadAdapter { name: name.clone(), reply })?;
    match wait.await {
        Ok(Ok(())) => {
            st.forget_adapter(&name);
            Ok(Json(json!({"id": name, "object": "model", "deleted": true})))
        }
        Ok(Err(e)) => Err(conflict(e, "adapter_in_use")),
        Err(_) => Err(ApiError { status: 500, message: "the model thread stopped".into(), kind: "server_error", param: None, code: None }),
    }
}
