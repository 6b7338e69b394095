//! The tokenizer as GGUF metadata (`tokenizer.ggml.*`), following llama.cpp's converter:
//! SentencePiece vocabularies (model "llama", [`super::vocab_spm`]) from `tokenizer.model` or a
//! SentencePiece-style `tokenizer.json`, byte-level BPE vocabularies (model "gpt2") here —
//! every id's token text, its type, the merges — then for both the special ids, whether BOS is
//! prepended, and the chat template.

use super::format::Value;
use super::vocab_spm;
use crate::model::sentencepiece::SpmModel;
use crate::model::{Family, TextTokenizer};
use serde_json::Value as Json;
use std::path::Path;

/// llama.cpp token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The `tokenizer.*` key/values for the checkpoint in `dir`, padded to `vocab` ids.
pub fn metadata(dir: &Path, family: Family, vocab: i64) -> Result<Vec<(String, Value)>, String> {
    let read_json = |p: &Path| -> Result<Option<(String, Json)>, String> {
        match std::fs::read_to_string(p) {
            Ok(t) => serde_json::from_str(&t).map(|j| Some((t, j))).map_err(|e| format!("{}: not valid JSON: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    };
    let tok_config = read_json(&dir.join("tokenizer_config.json"))?.map(|(_, j)| j).unwrap_or(Json::Null);
    let path = dir.join("tokenizer.json");
    let spm_path = dir.join("tokenizer.model");
    // tokenizer.model first, as llama.cpp's converter: the pieces' own scores and types. (A
    // tokenizer.model that is not SentencePiece, as tiktoken's, defers to tokenizer.json.)
    let spm = if spm_path.exists() { Some(SpmModel::read(&spm_path).map_err(|e| e.to_string())) } else { None };
    let json = read_json(&path)?;
    let mut kv = match (spm, json) {
        (Some(Ok(model)), _) => vocab_spm::from_model(&model, &tok_config, vocab as usize)?,
        (Some(Err(e)), None) => return Err(e),
        (_, None) => return Err(format!("{}: not found (nor a tokenizer.model)", path.display())),
        (_, Some((text, json))) if vocab_spm::is_spm_style(&json, &text) => {
            vocab_spm::from_tokenizer_json(&json, &tok_config, vocab as usize, &path)?
        }
        (_, Some((text, json))) => byte_level(&path, &text, &json, family, vocab)?,
    };
    kv.extend(special_metadata(dir, vocab)?);
    Ok(kv)
}

/// A byte-level BPE vocabulary (GPT-2 style: Llama 3, Qwen).
fn byte_level(path: &Path, text: &str, json: &Json, family: Family, vocab: i64) -> Result<Vec<(String, Value)>, String> {
    let model = &json["model"];
    let byte_level = text.contains("\"ByteLevel\"");
    if model["type"] != "BPE" || !byte_level {
        return Err(format!(
            "{}: ftx writes GGUF vocabularies for byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 style) and \
             SentencePiece ones (Llama 2, Mistral, Gemma); this one is {} {}— convert it with llama.cpp's \
             convert_hf_to_gguf.py instead",
            path.display(),
            model["type"].as_str().unwrap_or("?"),
            if byte_level { "" } else { "without byte-level pre-tokenisation " }
        ));
    }
    let n = vocab as usize;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![UNUSED; n];
    let vocab_map = model["vocab"].as_object().ok_or_else(|| format!("{}: model.vocab is not a map", path.display()))?;
    for (tok, id) in vocab_map {
        let id = id.as_u64().unwrap_or(u64::MAX) as usize;
        if id < n {
            tokens[id] = Some(tok.clone());
            types[id] = NORMAL;
        }
    }
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else { continue };
        if (id as usize) < n {
            tokens[id as usize] = Some(content.to_owned());
            types[id as usize] = if t["special"].as_bool() == Some(true) { CONTROL } else { USER_DEFINED };
        }
    }
    let tokens: Vec<String> =
        tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();

    let pre = match family {
        Family::Llama => "llama-bpe",
        Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe => "qwen2",
        Family::Mistral | Family::Mixtral | Family::Gemma2 | Family::Gemma3 => "default",
        // Phi-4-mini's o200k byte-level BPE: the pre-tokenizer llama.cpp names gpt-4o.
        Family::Phi3 => "gpt-4o",
        // gpt-oss's o200k_harmony: llama.cpp's gpt-4o pre-tokenizer as well.
        Family::GptOss => "gpt-4o",
    };
    Ok(vec![
        ("tokenizer.ggml.model".to_owned(), Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_owned(), Value::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_owned(), Value::StrArray(tokens)),
        ("tokenizer.ggml.token_type".to_owned(), Value::I32Array(types)),
        ("tokenizer.ggml.merges".to_owned(), Value::StrArray(merges)),
    ])
}

/// Special token ids, BOS / EOS prepending and the chat template, as the tokenizer ftx loads
/// sees them.
fn special_metadata(dir: &Path, vocab: i64) -> Result<Vec<(String, Value)>, String> {
    let tok = TextTokenizer::load(dir, vocab).map_err(|e| e.to_string())?;
    let mut kv = Vec::new();
    let config: Json = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Json::Null);
    let id_of = |token: &Option<String>, config_key: &str| -> Option<u32> {
        token.as_deref().and_then(|t| tok.token_id(t)).or_else(|| match &config[config_key] {
            Json::Number(n) => n.as_u64().map(|v| v as u32),
            Json::Array(a) => a.first().and_then(Json::as_u64).map(|v| v as u32),
            _ => None,
        })
    };
    for (key, token, config_key) in [
        ("bos_token_id", &tok.bos_token, "bos_token_id"),
        ("eos_token_id", &tok.eos_token, "eos_token_id"),
        ("unknown_token_id", &tok.unk_token, "unk_token_id"),
        ("padding_token_id", &tok.pad_token, "pad_token_id"),
    ] {
        if let Some(id) = id_of(token, config_key) {
            kv.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    // Whether the tokenizer itself prepends BOS (its post-processor), as llama.cpp must too.
    let adds_bos = match (tok.encode("a", true), tok.encode("a", false)) {
        (Ok(with), Ok(without)) => with.len() > without.len(),
        _ => false,
    };
    kv.push(("tokenizer.ggml.add_bos_token".to_owned(), Value::Bool(adds_bos)));
    kv.push(("tokenizer.ggml.add_eos_token".to_owned(), Value::Bool(false)));
    if let Some(t) = &tok.chat_template {
        kv.push(("tokenizer.chat_template".to_owned(), Value::Str(t.clone())));
    }
    Ok(kv)
}
