//! Adapter versions by alias: an alias names one served model (a version such as `sql:v2`)
//! or splits traffic between several by weight (a canary). Moving an alias rolls out or
//! rolls back without a restart; requests name the alias and never see the move.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::RwLock;

/// Alias → weighted targets (each a served model name).
#[derive(Default)]
pub struct Aliases {
    map: RwLock<BTreeMap<String, Vec<(String, f64)>>>,
}

impl Aliases {
    /// Points `name` at `targets` (weights positive), replacing what it pointed at.
    pub fn set(&self, name: &str, targets: Vec<(String, f64)>) {
        self.map.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned(), targets);
    }

    /// Removes an alias; false when there was none.
    pub fn remove(&self, name: &str) -> bool {
        self.map.write().unwrap_or_else(|e| e.into_inner()).remove(name).is_some()
    }

    /// Whether `name` is an alias.
    pub fn contains(&self, name: &str) -> bool {
        self.map.read().unwrap_or_else(|e| e.into_inner()).contains_key(name)
    }

    /// The aliases whose targets include `model`.
    pub fn targeting(&self, model: &str) -> Vec<String> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.iter().filter(|(_, t)| t.iter().any(|(m, _)| m == model)).map(|(a, _)| a.clone()).collect()
    }

    /// The served model an alias sends this request to (`None`: not an alias). With a `user`,
    /// the pick is a hash of it, so one user stays on one version through a canary; without,
    /// it is random by weight.
    pub fn resolve(&self, name: &str, user: Option<&str>) -> Option<String> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let targets = map.get(name)?;
        let total: f64 = targets.iter().map(|(_, w)| w).sum();
        let unit = match user {
            Some(u) => {
                let d = Sha256::digest(format!("{name}\0{u}").as_bytes());
                u64::from_be_bytes(d[..8].try_into().unwrap_or_default()) as f64 / (u64::MAX as f64 + 1.0)
            }
            None => rand::random::<f64>(),
        };
        let mut at = unit * total;
        for (model, w) in targets {
            if at < *w {
                return Some(model.clone());
            }
            at -= w;
        }
        targets.last().map(|(m, _)| m.clone())
    }

    /// `GET /v1/models` entries for the aliases.
    pub fn listing(&self, created: u64) -> Vec<Value> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|(a, t)| {
                let targets: serde_json::Map<String, Value> = t.iter().map(|(m, w)| (m.clone(), json!(w))).collect();
                json!({"id": a, "object": "model", "created": created, "owned_by": "ftx", "targets": targets})
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_follows_its_weights_and_a_user_stays_on_one_target() {
        let a = Aliases::default();
        a.set("sql", vec![("v1".into(), 3.0), ("v2".into(), 1.0)]);
        let mut v2 = 0;
        for i in 0..2000 {
            let user = format!("user-{i}");
            let pick = a.resolve("sql", Some(&user)).unwrap();
            assert_eq!(a.resolve("sql", Some(&user)).unwrap(), pick, "sticky");
            v2 += (pick == "v2") as usize;
        }
        assert!((400..600).contains(&v2), "about a quarter: {v2}");
        assert_eq!(a.resolve("other", None), None);
        a.set("sql", vec![("v2".into(), 1.0)]);
        assert_eq!(a.resolve("sql", Some("user-1")).as_deref(), Some("v2"));
        assert_eq!(a.targeting("v2"), ["sql"]);
    }
}

/// The HTTP side of versions: `POST /v1/aliases`, `DELETE /v1/aliases/{name}`,
/// `DELETE /v1/adapters/{name}`.
pub mod routes {
    use crate::serve::api::{self, ApiError};
    use crate::serve::http::{enqueue, valid_name, AppState};
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
            Ok(Ok(())) => Ok(Json(json!({"id": name, "object": "model", "deleted": true}))),
            Ok(Err(e)) => Err(conflict(e, "adapter_in_use")),
            Err(_) => Err(ApiError { status: 500, message: "the model thread stopped".into(), kind: "server_error", param: None, code: None }),
        }
    }
}
