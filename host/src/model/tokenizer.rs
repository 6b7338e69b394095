//! The checkpoint's tokenizer (`tokenizer.json`, through the `tokenizers` crate, or a
//! SentencePiece `tokenizer.model` converted to the same pipeline: see [`super::sentencepiece`])
//! and chat template (the Jinja in `tokenizer_config.json`, rendered with minijinja the way
//! transformers' `apply_chat_template` renders it).

use super::ModelError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A turn from a role and its text.
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.to_owned(), content: content.to_owned() }
    }
}

/// Tokenizer, special tokens and chat template of one checkpoint.
#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Token ids that end generation (generation_config.json, else the EOS token).
    pub stop_ids: Vec<u32>,
    template_path: PathBuf,
}

/// The tokenizer files a checkpoint folder may carry, copied along when a model is saved or
/// exported.
pub const TOKENIZER_FILES: &[&str] =
    &["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// The `tokenizer.json` document of the checkpoint in `dir` and the file it came from: the
/// file itself, else the SentencePiece `tokenizer.model` converted (with the options
/// `tokenizer_config.json` gives).
pub fn tokenizer_json(dir: &Path) -> Result<(PathBuf, String), ModelError> {
    let json_path = dir.join("tokenizer.json");
    match std::fs::read_to_string(&json_path) {
        Ok(text) => return Ok((json_path, text)),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(ModelError::io(&json_path, e)),
        Err(_) => {}
    }
    let spm_path = dir.join("tokenizer.model");
    if !spm_path.exists() {
        return Err(ModelError::Missing {
            path: json_path,
            hint: "ftx reads Hugging Face fast tokenizers (tokenizer.json) and SentencePiece models (tokenizer.model)",
        });
    }
    let model = super::sentencepiece::SpmModel::read(&spm_path)?;
    let cfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let opts = super::sentencepiece::SpmOptions::from_config(&cfg);
    Ok((spm_path, model.tokenizer_json(&opts).to_string()))
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, ModelError> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| ModelError::file(path, format!("not valid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` from `dir`,
    /// and checks the vocabulary fits the model's `vocab_size`.
    pub fn load(dir: &Path, model_vocab: i64) -> Result<TextTokenizer, ModelError> {
        let dir = &crate::hub::resolve_model(dir)?;
        let (tok_path, json) = tokenizer_json(dir)?;
        let inner = json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| ModelError::file(&tok_path, format!("not a valid tokenizer: {e}")))?;
        let vocab = inner.get_vocab_size(true) as i64;
        if vocab > model_vocab {
            return Err(ModelError::file(
                &tok_path,
                format!(
                    "has {vocab} tokens but config.json's vocab_size is {model_vocab}: the tokenizer does not belong to this model"
                ),
            ));
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json(&cfg_path)?.unwrap_or(Value::Null);
        let mut chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str).map(str::to_owned)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?);
        }
        let special = |k: &str| token_text(cfg.get(k));
        let eos_token = special("eos_token");
        let mut stop_ids: Vec<u32> = Vec::new();
        if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
            match gen.get("eos_token_id") {
                Some(Value::Number(n)) => stop_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Value::Array(a)) => stop_ids.extend(a.iter().filter_map(Value::as_u64).map(|v| v as u32)),
                _ => {}
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        Ok(TextTokenizer {
            inner,
            chat_template,
            bos_token: special("bos_token"),
            eos_token,
            pad_token: special("pad_token"),
            unk_token: special("unk_token"),
            stop_ids,
            template_path: cfg_path,
        })
    }

    /// Token ids of `text`, with the tokenizer's own special tokens (BOS) when `special`.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, ModelError> {
        self.inner
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::file(&self.template_path, format!("tokenizing failed: {e}")))
    }

    /// Text of `ids`, special tokens dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.inner.decode(ids, skip_special).unwrap_or_default()
    }

    /// The part of `decode(ids, skip_special)` that further tokens cannot change, for
    /// streaming: a trailing U+FFFD (byte-level BPE stopped mid-character) is held back, and so
    /// is a trailing run of SentencePiece byte-fallback pieces (`<0xE4>`…), which decode as a
    /// whole — one U+FFFD per byte while the run is not valid UTF-8 — once the run ends.
    pub fn decode_stable(&self, ids: &[u32], skip_special: bool) -> String {
        let run = self.trailing_byte_pieces(ids);
        let mut text = self.decode(&ids[..ids.len() - run], skip_special);
        text.truncate(text.trim_end_matches('\u{FFFD}').len());
        text
    }

    /// How many of the last `ids` are SentencePiece byte-fallback pieces (`<0xE4>`…): while
    /// there are none, `decode_stable` is `decode` less a trailing U+FFFD.
    pub fn trailing_byte_pieces(&self, ids: &[u32]) -> usize {
        let is_byte_piece = |id: &&u32| {
            self.inner.id_to_token(**id).is_some_and(|t| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>'))
        };
        ids.iter().rev().take_while(is_byte_piece).count()
    }

    /// Id of a token's exact text, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders `messages` with the checkpoint's chat template, as transformers does.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ModelError> {
        self.render_chat_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// Like [`TextTokenizer::render_chat`], with extra template variables (e.g.
    /// `enable_thinking`), as transformers passes `**kwargs` to the template.
    pub fn render_chat_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String, ModelError> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            ModelError::file(&self.template_path, "has no chat_template: use --prompt, or a checkpoint with a chat template")
        })?;
        render(template, messages, add_generation_prompt, extra, self)
            .map_err(|e| ModelError::file(&self.template_path, format!("chat template failed: {e:#}")))
    }

    /// Renders and tokenises a chat (no extra special tokens: the template writes them).
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>, ModelError> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?, false)
    }
}

fn render(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    extra: &serde_json::Map<String, Value>,
    tok: &TextTokenizer,
) -> Result<String, minijinja::Error> {
    let mut env = minijinja::Environment::new();
    // Python string methods (.strip(), .startswith(), …) that HF templates call.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // transformers renders with trim_blocks and lstrip_blocks.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> String {
        // Templates ask for today's date; a fixed date keeps rendering reproducible.
        fmt.replace("%d", "01").replace("%B", "January").replace("%b", "Jan").replace("%Y", "2026").replace("%m", "01")
    });
    env.add_template("chat", template)?;
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => tok.bos_token.clone().unwrap_or_default(),
        eos_token => tok.eos_token.clone().unwrap_or_default(),
        pad_token => tok.pad_token.clone(),
        unk_token => tok.unk_token.clone(),
        ..minijinja::Value::from_serialize(extra)
    };
    env.get_template("chat")?.render(ctx)
}
