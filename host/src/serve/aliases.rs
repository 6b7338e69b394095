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

