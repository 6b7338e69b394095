//! What every TOML reader shares (training's `ftx.toml`, prep's `[prep]`, its stages'
//! sections): suggestions for misspelt keys, and sections built from their serde defaults.
//! Below every module that reads a config, so none of them borrows from another.

use serde::de::DeserializeOwned;

/// Adds "did you mean `x`?" to serde's unknown-field errors.
pub(crate) fn did_you_mean(msg: &str) -> String {
    let Some(rest) = msg.split("unknown field `").nth(1) else { return msg.to_owned() };
    let unknown = rest.split('`').next().unwrap_or("");
    let expected: Vec<&str> = rest.split("expected one of ").nth(1).map_or(Vec::new(), |e| {
        e.split(',').map(|s| s.trim().trim_matches(|c: char| c == '`' || c.is_whitespace() || c == '\n')).collect()
    });
    let best = expected
        .iter()
        .map(|k| (strsim::damerau_levenshtein(unknown, k), *k))
        .min()
        .filter(|(d, k)| *d <= 3.max(k.len() / 3));
    match best {
        Some((_, k)) => format!("{}\ndid you mean `{k}`?", msg.trim_end()),
        None => msg.to_owned(),
    }
}

/// A config section with every key at its serde default (an empty table read as `T`): the
/// `Default` of sections whose defaults live in `#[serde(default = …)]` attributes, so each
/// default is written once.
pub(crate) fn serde_defaults<T: DeserializeOwned>() -> T {
    toml::Value::Table(Default::default()).try_into().expect("every key has a default")
}
