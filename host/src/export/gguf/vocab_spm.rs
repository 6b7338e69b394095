//! SentencePiece vocabularies as GGUF metadata: llama.cpp's `llama` tokenizer model (every
//! id's piece, score and type; llama.cpp segments by merging the adjacent pair whose merged
//! piece scores highest), as llama.cpp's converter writes it for Llama 2, Mistral and Gemma.
//!
//! Two sources: the SentencePiece `tokenizer.model` itself (pieces, scores and types as
//! trained), or a `tokenizer.json` whose model is SentencePiece-style (a BPE with byte
//! fallback / Metaspace, as Llama 2 and Mistral repositories ship it), where a piece's score is
//! derived from its merge's rank, so that llama.cpp merges in the order the merges list gives.
//! Either way, `tokenizer_config.json`'s `added_tokens_decoder` marks special tokens control
//! (others user-defined), and ids past the vocabulary up to the model's `vocab_size` are
//! unused padding, as llama.cpp's converter does.

use super::format::Value;
use crate::model::sentencepiece::{PieceType, SpmAlgorithm, SpmModel};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// Score of padding and added tokens (llama.cpp's converter's value).
const ADDED_SCORE: f32 = -1000.0;

/// Token texts, scores and types, one per id.
struct Vocab {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
}

impl Vocab {
    /// Applies `added_tokens_decoder`, pads to `n` ids, and returns the metadata.
    fn finish(mut self, config: &Json, n: usize, source: &Path) -> Result<Vec<(String, Value)>, String> {
        if self.tokens.len() > n {
            return Err(format!(
                "{}: has {} tokens but config.json's vocab_size is {n}: the tokenizer does not belong to this model",
                source.display(),
                self.tokens.len()
            ));
        }
        let pad = n - self.tokens.len();
        let first_pad = self.tokens.len();
        self.tokens.extend((0..pad).map(|i| format!("[PAD{}]", first_pad + i)));
        self.scores.extend(std::iter::repeat_n(ADDED_SCORE, pad));
        self.types.extend(std::iter::repeat_n(PieceType::Unused as i32, pad));
        for (id, t) in config.get("added_tokens_decoder").and_then(Json::as_object).into_iter().flatten() {
            let (Ok(id), Some(content)) = (id.parse::<usize>(), t.get("content").and_then(Json::as_str)) else { continue };
            if id >= n {
                continue;
            }
            let special = t.get("special").and_then(Json::as_bool).unwrap_or(false);
            // llama.cpp's tokenizer reads user-defined tokens as raw text: ▁ back to a space.
            self.tokens[id] = if special { content.to_owned() } else { content.replace('▁', " ") };
            self.types[id] = if special { PieceType::Control } else { PieceType::UserDefined } as i32;
            self.scores[id] = ADDED_SCORE;
        }
        Ok(vec![
            ("tokenizer.ggml.model".to_owned(), Value::Str("llama".into())),
            ("tokenizer.ggml.pre".to_owned(), Value::Str("default".into())),
            ("tokenizer.ggml.tokens".to_owned(), Value::StrArray(self.tokens)),
            ("tokenizer.ggml.scores".to_owned(), Value::F32Array(self.scores)),
            ("tokenizer.ggml.token_type".to_owned(), Value::I32Array(self.types)),
        ])
    }
}

fn unigram_refused(source: &Path) -> String {
    format!(
        "{}: is a SentencePiece Unigram tokenizer; ftx writes GGUF vocabularies for SentencePiece BPE (Llama 2, \
         Mistral, Gemma) and byte-level BPE — llama.cpp's `llama` tokenizer would segment a Unigram vocabulary \
         differently; convert it with llama.cpp's convert_hf_to_gguf.py instead",
        source.display()
    )
}

/// The vocabulary of a SentencePiece `tokenizer.model`, padded to `n` ids.
pub fn from_model(model: &SpmModel, config: &Json, n: usize) -> Result<Vec<(String, Value)>, String> {
    if model.algorithm == SpmAlgorithm::Unigram {
        return Err(unigram_refused(&model.path));
    }
    let vocab = Vocab {
        tokens: model.pieces.iter().map(|p| p.piece.clone()).collect(),
        scores: model.pieces.iter().map(|p| p.score).collect(),
        types: model.pieces.iter().map(|p| p.kind as i32).collect(),
    };
    vocab.finish(config, n, &model.path)
}

/// Whether a `tokenizer.json` is SentencePiece-style: a Unigram, or a BPE with byte fallback or
/// Metaspace pre-tokenisation (rather than GPT-2's byte-level alphabet).
pub fn is_spm_style(json: &Json, text: &str) -> bool {
    let model = &json["model"];
    model["type"] == "Unigram"
        || (model["type"] == "BPE"
            && !text.contains("\"ByteLevel\"")
            && (model["byte_fallback"] == true || text.contains("\"Metaspace\"")))
}

/// `<0xAB>`: a byte-fallback piece.
fn is_byte_piece(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// The vocabulary of a SentencePiece-style `tokenizer.json` (see [`is_spm_style`]).
pub fn from_tokenizer_json(json: &Json, config: &Json, n: usize, source: &Path) -> Result<Vec<(String, Value)>, String> {
    let model = &json["model"];
    if model["type"] == "Unigram" {
        return Err(unigram_refused(source));
    }
    let map = model["vocab"].as_object().ok_or_else(|| format!("{}: model.vocab is not a map", source.display()))?;
    let size = map.values().filter_map(Json::as_u64).map(|i| i as usize + 1).max().unwrap_or(0);
    let mut tokens: Vec<Option<String>> = vec![None; size];
    for (tok, id) in map {
        if let Some(id) = id.as_u64() {
            tokens[id as usize] = Some(tok.clone());
        }
    }
    // A piece's score: minus the rank of the first merge that makes it, so llama.cpp, which
    // merges the pair whose result scores highest, follows the merges list; pieces no merge
    // makes (single characters, bytes) rank after every merge.
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (r, m) in model["merges"].as_array().into_iter().flatten().enumerate() {
        let pair = match m {
            Json::String(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}")),
            Json::Array(p) => Some(format!("{}{}", p.first().and_then(Json::as_str).unwrap_or(""), p.get(1).and_then(Json::as_str).unwrap_or(""))),
            _ => None,
        };
        if let Some(merged) = pair {
            rank.entry(merged).or_insert(r);
        }
    }
    let n_merges = rank.len().max(model["merges"].as_array().map_or(0, Vec::len));
    let config_unk = match &config["unk_token"] {
        Json::String(s) => Some(s.as_str()),
        Json::Object(o) => o.get("content").and_then(Json::as_str),
        _ => None,
    };
    let unk = model["unk_token"].as_str().or(config_unk);
    let mut vocab = Vocab { tokens: Vec::with_capacity(size), scores: Vec::with_capacity(size), types: Vec::with_capacity(size) };
    for (id, tok) in tokens.into_iter().enumerate() {
        let Some(tok) = tok else {
            vocab.tokens.push(format!("[PAD{id}]"));
            vocab.scores.push(ADDED_SCORE);
            vocab.types.push(PieceType::Unused as i32);
            continue;
        };
        let kind = if Some(tok.as_str()) == unk {
            PieceType::Unknown
        } else if model["byte_fallback"] == true && is_byte_piece(&tok) {
            PieceType::Byte
        } else {
            PieceType::Normal
        };
        let score = match kind {
            PieceType::Normal => -(rank.get(&tok).copied().unwrap_or(n_merges + id) as f32),
            _ => 0.0,
        };
        vocab.tokens.push(tok);
        vocab.scores.push(score);
        vocab.types.push(kind as i32);
    }
    // tokenizer.json's own added tokens (<s>, </s>, [INST]…), then the config's.
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else { continue };
        let id = id as usize;
        if id >= vocab.tokens.len() {
            let from = vocab.tokens.len();
            vocab.tokens.extend((from..=id).map(|i| format!("[PAD{i}]")));
            vocab.scores.resize(id + 1, ADDED_SCORE);
            vocab.types.resize(id + 1, PieceType::Unused as i32);
        }
        let special = t["special"].as_bool() == Some(true);
        vocab.tokens[id] = content.to_owned();
        vocab.scores[id] = if special { 0.0 } else { ADDED_SCORE };
        vocab.types[id] = if special {
            if Some(content) == unk { PieceType::Unknown } else { PieceType::Control }
        } else {
            PieceType::UserDefined
        } as i32;
    }
    vocab.finish(config, n, source)
}
