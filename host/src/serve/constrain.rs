//! Structured outputs: a JSON schema (or "any JSON object") compiled by llguidance into a
//! token-level matcher whose mask of allowed tokens is applied to the logits on the device at
//! every step (serve/scheduler/sample.rs), so whatever is sampled keeps the
//! output a valid prefix of a document the schema accepts, and EOS is allowed only when the
//! document is complete.

use llguidance::api::TopLevelGrammar;
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;
use std::path::Path;
use toktrie_hf_tokenizers::ByteTokenizer;

/// What a request's `response_format` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Any JSON object (`{"type": "json_object"}`).
    JsonObject,
    /// A document valid under this JSON schema (`{"type": "json_schema", ...}`).
    JsonSchema(Value),
}

/// Builds a fresh matcher per request from the checkpoint's tokenizer.
pub struct Constraints {
    factory: ParserFactory,
}

/// A constraint could not be set up or followed.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The tokenizer could not be turned into llguidance's byte-level token trie.
    #[error("{path}: llguidance cannot read this tokenizer: {message}")]
    Tokenizer { path: String, message: String },
    /// The schema is not one llguidance can compile.
    #[error("response_format: the JSON schema cannot be used: {0}")]
    Schema(String),
}

impl Constraints {
    /// Reads the tokenizer of `dir` (`tokenizer.json`, or `tokenizer.model` converted); `stop_ids`
    /// become the tokens that end a finished document;
    /// `model_vocab` is the width of the logits (padded past the tokenizer's vocabulary).
    pub fn load(dir: &Path, stop_ids: &[u32], model_vocab: usize) -> Result<Constraints, ConstraintError> {
        let resolved = crate::hub::resolve_model(dir)
            .map_err(|e| ConstraintError::Tokenizer { path: dir.display().to_string(), message: e.to_string() })?;
        let (path, json) = crate::model::tokenizer::tokenizer_json(&resolved)
            .map_err(|e| ConstraintError::Tokenizer { path: dir.display().to_string(), message: e.to_string() })?;
        let err = |e: anyhow::Error| ConstraintError::Tokenizer { path: path.display().to_string(), message: format!("{e:#}") };
        let mut bt = ByteTokenizer::from_json_bytes(json.as_bytes()).map_err(err)?;
        let vocab = bt.tokrx_info().vocab_size;
        let stops: Vec<u32> = stop_ids.iter().copied().filter(|&t| t < vocab).collect();
        if !stops.is_empty() {
            bt.set_eos_tokens(&stops);
        }
        let env = bt.into_tok_env(Some(model_vocab.max(vocab as usize))).map_err(err)?;
        let mut factory = ParserFactory::new_simple(&env).map_err(err)?;
        // Diagnostics go through our own errors, not llguidance's stderr logger.
        factory.quiet();
        Ok(Constraints { factory })
    }

    /// A matcher for one request, or why the schema cannot be used.
    pub fn matcher(&self, format: &OutputFormat) -> Result<Matcher, ConstraintError> {
        let mut schema = match format {
            OutputFormat::JsonObject => serde_json::json!({"type": "object"}),
            OutputFormat::JsonSchema(s) => s.clone(),
        };
        let Some(obj) = schema.as_object() else {
            return Err(ConstraintError::Schema("the schema must be a JSON object".into()));
        };
        if !obj.contains_key("x-guidance") {
            // One space after ',' and ':' and nowhere else, as OpenAI's compact output:
            // a small model cannot then wander off into whitespace until max_tokens.
            let opts = JsonCompileOptions {
                item_separator: ", ".into(),
                key_separator: ": ".into(),
                whitespace_flexible: false,
                ..Default::default()
            };
            opts.apply_to(&mut schema);
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| ConstraintError::Schema(format!("{e:#}")))?;
        let m = Matcher::new(Ok(parser));
        match m.get_error() {
            Some(e) => Err(ConstraintError::Schema(e)),
            None => Ok(m),
        }
    }
}
