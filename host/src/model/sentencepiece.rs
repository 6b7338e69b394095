//! SentencePiece `tokenizer.model` files (Llama 2, Mistral v0.1–v0.3, Gemma), read into the
//! same `tokenizers` pipeline a `tokenizer.json` loads.
//!
//! Why this way: the model file is a protocol buffer (`ModelProto`) whose few fields ftx needs
//! — pieces with scores and types, the trainer's model type, byte fallback and special ids,
//! the normaliser's settings — are declared below with `prost` (already used for TensorBoard),
//! and the equivalent `tokenizers` model is built as transformers' `convert_slow_tokenizer`
//! builds it from the same proto: SentencePiece BPE becomes a `tokenizers` BPE with byte
//! fallback whose merges are ranked by the merged piece's score; Unigram becomes `tokenizers`'
//! Unigram with the pieces' log-probabilities; the normaliser's precompiled charsmap, whitespace
//! folding and escaping, the dummy prefix (Metaspace), user-defined pieces (kept whole), and the
//! decoder (▁ → space, byte fallback, the dummy prefix stripped) follow the model's own
//! settings. So encoding reuses the library every other checkpoint's tokenizer runs through.
//! The alternative, a binding to the C++ sentencepiece library, would put a cmake + C++ build
//! of it on every build (CI has two cores) for what a few hundred lines do; no pure-Rust
//! SentencePiece crate is maintained well enough to rely on.
//!
//! The special tokens of the text (`<s>`, `</s>`, Mistral's `[INST]`…) are the model's control
//! and unknown pieces plus `tokenizer_config.json`'s `added_tokens_decoder`: they are matched in
//! text, as transformers does (sentencepiece itself would spell them out as text). `legacy`
//! (default true, as transformers' SentencePiece tokenizer) decides whether each chunk between
//! special tokens gets the dummy prefix (`legacy: true`, sentencepiece on each chunk) or only the
//! first one. BOS / EOS are added as `add_bos_token` (default true) / `add_eos_token` say.

use super::ModelError;
use base64::Engine;
use prost::Message;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The protocol-buffer messages of sentencepiece_model.proto, the fields ftx reads (tags as
/// there; proto2 defaults applied by the accessors of [`SpmModel`]).
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, repeated, tag = "1")]
        pub pieces: Vec<Piece>,
        #[prost(message, optional, tag = "2")]
        pub trainer_spec: Option<TrainerSpec>,
        #[prost(message, optional, tag = "3")]
        pub normalizer_spec: Option<NormalizerSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Piece {
        #[prost(string, optional, tag = "1")]
        pub piece: Option<String>,
        #[prost(float, optional, tag = "2")]
        pub score: Option<f32>,
        /// NORMAL = 1 (the default), UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6.
        #[prost(int32, optional, tag = "3")]
        pub r#type: Option<i32>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TrainerSpec {
        /// UNIGRAM = 1 (the default), BPE = 2, WORD = 3, CHAR = 4.
        #[prost(int32, optional, tag = "3")]
        pub model_type: Option<i32>,
        #[prost(bool, optional, tag = "24")]
        pub treat_whitespace_as_suffix: Option<bool>,
        #[prost(bool, optional, tag = "35")]
        pub byte_fallback: Option<bool>,
        #[prost(int32, optional, tag = "40")]
        pub unk_id: Option<i32>,
        #[prost(int32, optional, tag = "41")]
        pub bos_id: Option<i32>,
        #[prost(int32, optional, tag = "42")]
        pub eos_id: Option<i32>,
        #[prost(int32, optional, tag = "43")]
        pub pad_id: Option<i32>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NormalizerSpec {
        #[prost(bytes = "vec", optional, tag = "2")]
        pub precompiled_charsmap: Option<Vec<u8>>,
        #[prost(bool, optional, tag = "3")]
        pub add_dummy_prefix: Option<bool>,
        #[prost(bool, optional, tag = "4")]
        pub remove_extra_whitespaces: Option<bool>,
        #[prost(bool, optional, tag = "5")]
        pub escape_whitespaces: Option<bool>,
    }
}

/// A piece's type, numbered as SentencePiece numbers them (llama.cpp's GGUF token types are
/// the same numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// One vocabulary entry: its text, score (BPE: merge priority; Unigram: log-probability) and type.
#[derive(Debug, Clone, PartialEq)]
pub struct SpmPiece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
}

/// The segmentation algorithm the model was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpmAlgorithm {
    Bpe,
    Unigram,
}

/// A parsed SentencePiece model.
#[derive(Debug, Clone)]
pub struct SpmModel {
    pub path: PathBuf,
    pub pieces: Vec<SpmPiece>,
    pub algorithm: SpmAlgorithm,
    pub byte_fallback: bool,
    pub unk_id: Option<u32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    precompiled_charsmap: Vec<u8>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

/// What `tokenizer_config.json` adds to the model file.
#[derive(Debug, Clone, Default)]
pub struct SpmOptions {
    /// Every chunk between special tokens gets the dummy prefix (transformers' `legacy`).
    pub legacy: bool,
    pub add_bos: bool,
    pub add_eos: bool,
    /// `added_tokens_decoder`: (id, content, special).
    pub added: Vec<(u32, String, bool)>,
}

impl SpmOptions {
    /// The options `tokenizer_config.json` (`Value::Null` when absent) gives.
    pub fn from_config(cfg: &Value) -> SpmOptions {
        let flag = |k: &str, default: bool| cfg.get(k).and_then(Value::as_bool).unwrap_or(default);
        let mut added: Vec<(u32, String, bool)> = cfg
            .get("added_tokens_decoder")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(id, t)| {
                let content = t.get("content")?.as_str()?.to_owned();
                Some((id.parse().ok()?, content, t.get("special").and_then(Value::as_bool).unwrap_or(false)))
            })
            .collect();
        added.sort_by_key(|a| a.0);
        SpmOptions { legacy: flag("legacy", true), add_bos: flag("add_bos_token", true), add_eos: flag("add_eos_token", false), added }
    }
}

fn id(v: Option<i32>, default: i32) -> Option<u32> {
    u32::try_from(v.unwrap_or(default)).ok()
}

impl SpmModel {
    /// Parses the SentencePiece model file at `path`.
    pub fn read(path: &Path) -> Result<SpmModel, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let bad = |why: String| ModelError::file(path, why);
        let m = proto::ModelProto::decode(bytes.as_slice()).map_err(|e| {
            bad(format!("is not a SentencePiece model ({e}); ftx reads SentencePiece tokenizer.model files and tokenizer.json"))
        })?;
        if m.pieces.is_empty() {
            return Err(bad("is not a SentencePiece model (it has no pieces)".into()));
        }
        let trainer = m.trainer_spec.unwrap_or_default();
        let norm = m.normalizer_spec.unwrap_or_default();
        let algorithm = match trainer.model_type.unwrap_or(1) {
            1 => SpmAlgorithm::Unigram,
            2 => SpmAlgorithm::Bpe,
            3 => return Err(bad("is a SentencePiece WORD model; ftx reads BPE and Unigram models".into())),
            t => return Err(bad(format!("is a SentencePiece model of type {t} (CHAR or unknown); ftx reads BPE and Unigram models"))),
        };
        if trainer.treat_whitespace_as_suffix.unwrap_or(false) {
            return Err(bad("puts whitespace at the end of pieces (treat_whitespace_as_suffix), which ftx does not support".into()));
        }
        let mut pieces = Vec::with_capacity(m.pieces.len());
        for (i, p) in m.pieces.into_iter().enumerate() {
            let kind = match p.r#type.unwrap_or(1) {
                1 => PieceType::Normal,
                2 => PieceType::Unknown,
                3 => PieceType::Control,
                4 => PieceType::UserDefined,
                5 => PieceType::Unused,
                6 => PieceType::Byte,
                t => return Err(bad(format!("piece {i} has an unknown type {t}"))),
            };
            pieces.push(SpmPiece { piece: p.piece.unwrap_or_default(), score: p.score.unwrap_or(0.0), kind });
        }
        let n = pieces.len() as u32;
        let in_vocab = |v: Option<u32>| v.filter(|&i| i < n);
        Ok(SpmModel {
            path: path.to_owned(),
            algorithm,
            byte_fallback: trainer.byte_fallback.unwrap_or(false),
            unk_id: in_vocab(id(trainer.unk_id, 0)),
            bos_id: in_vocab(id(trainer.bos_id, 1)),
            eos_id: in_vocab(id(trainer.eos_id, 2)),
            pad_id: in_vocab(id(trainer.pad_id, -1)),
            precompiled_charsmap: norm.precompiled_charsmap.unwrap_or_default(),
            add_dummy_prefix: norm.add_dummy_prefix.unwrap_or(true),
            remove_extra_whitespaces: norm.remove_extra_whitespaces.unwrap_or(true),
            escape_whitespaces: norm.escape_whitespaces.unwrap_or(true),
            pieces,
        })
    }

    /// The text of piece `id`.
    pub fn piece(&self, id: Option<u32>) -> Option<&str> {
        self.pieces.get(id? as usize).map(|p| p.piece.as_str())
    }

    /// BPE merges as `convert_slow_tokenizer` derives them: every split of a normal piece into
    /// two normal pieces, the merge ranked by the merged piece's score (higher first), then id.
    fn merges(&self) -> Vec<(String, String)> {
        let normal: std::collections::HashMap<&str, (f32, usize)> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == PieceType::Normal)
            .map(|(i, p)| (p.piece.as_str(), (p.score, i)))
            .collect();
        let mut ranked: Vec<(f32, usize, &str, &str)> = Vec::new();
        for (&token, &(score, i)) in &normal {
            for (split, _) in token.char_indices().skip(1) {
                let (left, right) = token.split_at(split);
                if normal.contains_key(left) && normal.contains_key(right) {
                    ranked.push((score, i, left, right));
                }
            }
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(b.2)).then(a.3.cmp(b.3)));
        ranked.into_iter().map(|(_, _, l, r)| (l.to_owned(), r.to_owned())).collect()
    }

    /// The `tokenizer.json` document of the equivalent `tokenizers` pipeline.
    pub fn tokenizer_json(&self, opts: &SpmOptions) -> Value {
        let user_defined: Vec<&str> =
            self.pieces.iter().filter(|p| p.kind == PieceType::UserDefined).map(|p| p.piece.as_str()).collect();
        let model = match self.algorithm {
            SpmAlgorithm::Bpe => {
                let vocab: serde_json::Map<String, Value> =
                    self.pieces.iter().enumerate().map(|(i, p)| (p.piece.clone(), json!(i))).collect();
                let merges: Vec<Value> = self.merges().into_iter().map(|(l, r)| json!([l, r])).collect();
                json!({
                    "type": "BPE", "dropout": null, "unk_token": self.piece(self.unk_id),
                    "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                    "byte_fallback": self.byte_fallback,
                    // A user-defined piece arrives alone (the Split below) and is taken whole.
                    "ignore_merges": !user_defined.is_empty(),
                    "vocab": vocab, "merges": merges,
                })
            }
            SpmAlgorithm::Unigram => {
                let vocab: Vec<Value> = self.pieces.iter().map(|p| json!([p.piece, p.score])).collect();
                json!({"type": "Unigram", "unk_id": self.unk_id, "vocab": vocab, "byte_fallback": self.byte_fallback})
            }
        };

        // The normaliser, in SentencePiece's order.
        let mut normalizers = Vec::new();
        if !self.precompiled_charsmap.is_empty() {
            let charsmap = base64::engine::general_purpose::STANDARD.encode(&self.precompiled_charsmap);
            normalizers.push(json!({"type": "Precompiled", "precompiled_charsmap": charsmap}));
        }
        if self.remove_extra_whitespaces {
            // Spaces only: SentencePiece leaves newlines and tabs alone.
            normalizers.push(json!({"type": "Replace", "pattern": {"Regex": "\\A +| +\\z"}, "content": ""}));
            normalizers.push(json!({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}));
        }
        if self.escape_whitespaces {
            normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
        }
        if self.add_dummy_prefix && opts.legacy {
            // Metaspace adds no prefix to text that starts with ▁; SentencePiece always does.
            normalizers.push(json!({"type": "Replace", "pattern": {"Regex": "\\A▁"}, "content": "▁▁"}));
        }

        let mut pre = Vec::new();
        if self.add_dummy_prefix {
            let scheme = if opts.legacy { "always" } else { "first" };
            pre.push(json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false}));
        }
        if !user_defined.is_empty() {
            let mut sorted = user_defined.clone();
            sorted.sort_by_key(|p| std::cmp::Reverse(p.len()));
            let pattern = sorted.iter().map(|p| regex::escape(p)).collect::<Vec<_>>().join("|");
            pre.push(json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false}));
        }

        let mut decoders = vec![json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "})];
        if self.byte_fallback {
            decoders.push(json!({"type": "ByteFallback"}));
        }
        if self.add_dummy_prefix {
            decoders.push(json!({"type": "Fuse"}));
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        } else if self.byte_fallback {
            decoders.push(json!({"type": "Fuse"}));
        }

        // Special tokens matched in text: control and unknown pieces, then the config's own.
        let mut added: Vec<(u32, String, bool)> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p.kind, PieceType::Control | PieceType::Unknown))
            .map(|(i, p)| (i as u32, p.piece.clone(), true))
            .collect();
        for (id, content, special) in &opts.added {
            let in_model = self.pieces.get(*id as usize);
            if in_model.is_some_and(|p| p.piece != *content) {
                continue; // a rename of a piece: keep the model's text
            }
            if in_model.is_some_and(|p| p.kind == PieceType::UserDefined) && !special {
                continue; // SentencePiece's own handling (the Split above) keeps it whole
            }
            match added.iter_mut().find(|a| a.0 == *id) {
                Some(a) => a.2 = *special,
                None => added.push((*id, content.clone(), *special)),
            }
        }
        added.sort_by_key(|a| a.0);
        let added_tokens: Vec<Value> = added
            .iter()
            .map(|(id, content, special)| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": special})
            })
            .collect();

        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": if normalizers.is_empty() { Value::Null } else { json!({"type": "Sequence", "normalizers": normalizers}) },
            "pre_tokenizer": if pre.is_empty() { Value::Null } else { json!({"type": "Sequence", "pretokenizers": pre}) },
            "post_processor": self.post_processor(opts),
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": model,
        })
    }

    /// BOS / EOS around every sequence, as `add_bos_token` / `add_eos_token` ask.
    fn post_processor(&self, opts: &SpmOptions) -> Value {
        let bos = self.piece(self.bos_id).filter(|_| opts.add_bos);
        let eos = self.piece(self.eos_id).filter(|_| opts.add_eos);
        if bos.is_none() && eos.is_none() {
            return Value::Null;
        }
        let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
        let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
        let wrap = |s: &str, type_id: u32| -> Vec<Value> {
            bos.map(|t| special(t, type_id)).into_iter().chain([seq(s, type_id)]).chain(eos.map(|t| special(t, type_id))).collect()
        };
        let single = wrap("A", 0);
        let pair: Vec<Value> = wrap("A", 0).into_iter().chain(wrap("B", 1)).collect();
        let mut specials = serde_json::Map::new();
        for (t, id) in [(bos, self.bos_id), (eos, self.eos_id)] {
            if let (Some(t), Some(id)) = (t, id) {
                specials.insert(t.to_owned(), json!({"id": t, "ids": [id], "tokens": [t]}));
            }
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    }

    /// The `tokenizers` tokenizer of this model.
    pub fn to_tokenizer(&self, opts: &SpmOptions) -> Result<tokenizers::Tokenizer, ModelError> {
        let text = self.tokenizer_json(opts).to_string();
        text.parse::<tokenizers::Tokenizer>()
            .map_err(|e| ModelError::file(&self.path, format!("could not be converted to a tokenizer: {e}")))
    }
}
