//! SentencePiece `tokenizer.model` checkpoints (Llama 2, Mistral, Gemma): ids as the
//! `sentencepiece` package computes them (tests/fixtures/spm, fx_spm.py), chat ids as
//! transformers' SentencePiece tokenizer computes them, `ftx generate` and `ftx train` on a
//! checkpoint that ships only tokenizer.model, and GGUF export of SentencePiece vocabularies
//! read back by gguf-py.

use crate::by_name::{ftx_at, ok};
use crate::common::{fixture, ids, json};
use crate::gguf::run_check;
use ftx::export::gguf::{export_gguf, Quant};
use ftx::model::sentencepiece::{SpmModel, SpmOptions};
use ftx::model::tokenizer::Message;
use ftx::model::TextTokenizer;
use serde_json::Value;
use std::path::Path;

/// A text sentencepiece cannot tokenise as ftx does: it holds a control or unknown piece,
/// which transformers (and ftx) match as a special token where sentencepiece spells it out.
fn holds_special(text: &str, model: &Value) -> bool {
    let types = model["types"].as_array().unwrap();
    model["pieces"].as_array().unwrap().iter().zip(types).any(|(p, t)| {
        matches!(t.as_str(), Some("control" | "unknown")) && text.contains(p.as_str().unwrap())
    })
}

#[test]
fn sentencepiece_models_encode_and_decode_like_sentencepiece() {
    let expected = json("spm/expected.json");
    for name in ["llama", "gemma", "unigram"] {
        let exp = &expected[name];
        let model = SpmModel::read(&fixture(&format!("spm/{name}.model"))).unwrap();
        assert_eq!(model.pieces.len() as u64, exp["vocab_size"].as_u64().unwrap());
        let opts = SpmOptions { legacy: true, add_bos: true, ..SpmOptions::default() };
        let tok = model.to_tokenizer(&opts).unwrap();
        let mut compared = 0;
        for case in exp["encoded"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            if holds_special(text, exp) {
                continue;
            }
            let got = tok.encode(text, false).unwrap();
            assert_eq!(got.get_ids(), ids(&case["ids"]).as_slice(), "{name}: {text:?}: {:?} vs {}", got.get_tokens(), case["pieces"]);
            let decoded = tok.decode(got.get_ids(), false).unwrap();
            let pieces: Vec<&str> = case["pieces"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
            if pieces.iter().take(2).filter(|p| p.chars().all(|c| c == '▁')).count() == 2 {
                // Two whitespace pieces first: sentencepiece's decoder drops the ▁ of each while
                // nothing else is out yet; transformers' (and ftx's) strips the dummy prefix
                // alone, one space.
                let joined = pieces.concat().replace('▁', " ");
                assert_eq!(decoded, joined[1..], "{name}: decode of {text:?}");
            } else {
                assert_eq!(decoded, case["decoded"].as_str().unwrap(), "{name}: decode of {text:?}");
            }
            compared += 1;
            // BOS first when asked, as add_bos_token does.
            let with_bos = tok.encode(text, true).unwrap();
            assert_eq!(with_bos.get_ids().first().copied(), Some(exp["bos_id"].as_u64().unwrap() as u32), "{name}: {text:?}");
            assert_eq!(&with_bos.get_ids()[1..], got.get_ids());
        }
        // Every text but the one with <s> and </s> in it.
        assert_eq!(compared, exp["encoded"].as_array().unwrap().len() - 1, "{name}");
    }
}

#[test]
fn an_spm_only_checkpoint_loads_renders_and_tokenises_its_chat_like_transformers() {
    let dir = fixture("models/llama2_spm");
    assert!(!dir.join("tokenizer.json").exists() && dir.join("tokenizer.model").exists());
    let exp = json("models/llama2_spm/expected/expected.json");
    let tok = TextTokenizer::load(&dir, 512).unwrap();
    assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
    assert!(tok.stop_ids.contains(&2), "{:?}", tok.stop_ids);
    let messages: Vec<Message> = serde_json::from_value(exp["chat"]["messages"].clone()).unwrap();
    let rendered = tok.render_chat(&messages, true).unwrap();
    assert_eq!(rendered, exp["chat"]["rendered"].as_str().unwrap());
    // <s> and </s> in the rendered chat are special tokens; each chunk between them gets the
    // dummy prefix (transformers' legacy SentencePiece tokenizer).
    assert_eq!(tok.encode(&rendered, false).unwrap(), ids(&exp["chat"]["ids"]));
    assert_eq!(tok.encode(exp["greedy"]["prompt"].as_str().unwrap(), true).unwrap(), ids(&exp["greedy"]["prompt_ids"]));
}

#[test]
fn streamed_text_of_byte_fallback_pieces_never_changes_once_out() {
    // ftx generate streams decode_stable of the ids so far: each must extend the last, and the
    // full text ends it. Byte-fallback runs (emoji, CJK) decode as a whole, so before the fix
    // a half run's U+FFFDs were sent and then rewritten (and generate panicked slicing them).
    let tok = TextTokenizer::load(&fixture("models/llama2_spm"), 512).unwrap();
    let text = "emoji 🤗 and 中文 end 🚀";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.iter().any(|&i| (3..259).contains(&i)), "the text takes byte pieces: {ids:?}");
    let mut sent = String::new();
    for k in 1..=ids.len() {
        let ready = tok.decode_stable(&ids[..k], false);
        assert!(ready.starts_with(&sent), "{sent:?} then {ready:?}");
        sent = ready;
    }
    assert_eq!(tok.decode(&ids, false), text);
    assert!(text.starts_with(&sent) && sent.trim_end().ends_with("end"), "{sent:?}");
}

#[test]
fn tokenizer_model_errors_name_the_file() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("tokenizer.model");
    std::fs::write(&bad, b"\xff\xfe not a protocol buffer").unwrap();
    let err = SpmModel::read(&bad).unwrap_err().to_string();
    assert!(err.contains("tokenizer.model") && err.contains("not a SentencePiece model"), "{err}");
    let err = TextTokenizer::load(d.path(), 512).err().unwrap().to_string();
    assert!(err.contains("tokenizer.model"), "{err}");
    std::fs::remove_file(&bad).unwrap();
    let err = TextTokenizer::load(d.path(), 512).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("tokenizer.model"), "{err}");
}

#[test]
fn generate_and_train_run_on_an_spm_only_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let home = dir.join("home");
    let model = fixture("models/llama2_spm");
    let exp = json("models/llama2_spm/expected/expected.json");
    let g = &exp["greedy"];
    let prompt = g["prompt"].as_str().unwrap();
    let args = ["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", "8", "--device", "cpu", "--ids"];
    let got: Vec<u32> = ok(ftx_at(dir, &home, &args)).split_whitespace().map(|t| t.parse().unwrap()).collect();
    assert_eq!(got, ids(&g["output_ids"]), "greedy continuation of transformers");
    let text = ok(ftx_at(dir, &home, &args[..args.len() - 1]));
    assert_eq!(text.strip_suffix('\n').unwrap(), g["text"].as_str().unwrap());
    ok(ftx_at(dir, &home, &["generate", "--model", model.to_str().unwrap(), "--chat", "Hello", "--max-new-tokens", "4", "--device", "cpu"]));

    let records: String = (0..8)
        .map(|i| serde_json::json!({"messages": [{"role": "user", "content": format!("Weather in city {i}?")},
                                                 {"role": "assistant", "content": "Sunny, 20 °C 🌞"}]}).to_string() + "\n")
        .collect();
    std::fs::write(dir.join("chat.jsonl"), records).unwrap();
    let config = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"chat.jsonl\"\nmax_seq_len = 96\n[method]\nkind = \"lora\"\nrank = 4\nalpha = 8\n[train]\nlr = 1e-2\nmax_steps = 2\nbatch_size = 4\noutput_dir = \"out\"\n",
        model.display()
    );
    std::fs::write(dir.join("sft.toml"), config).unwrap();
    ok(ftx_at(dir, &home, &["train", "--config", "sft.toml"]));
    let metrics = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("loss")?.as_f64())
        .collect();
    assert_eq!(losses.len(), 2, "{metrics}");
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");

    // The merged export carries tokenizer.model along, and generates from it.
    let base = model.to_str().unwrap();
    ok(ftx_at(dir, &home, &["export", "--model", base, "--adapter", "out/final", "--format", "merged", "--dtype", "fp32", "--out", "merged"]));
    assert!(dir.join("merged/tokenizer.model").exists() && !dir.join("merged/tokenizer.json").exists());
    let merged = ok(ftx_at(dir, &home, &["generate", "--model", "merged", "--prompt", prompt, "--max-new-tokens", "4", "--device", "cpu", "--ids"]));
    assert_eq!(merged.split_whitespace().count(), 4, "{merged}");
}

/// The tokenizer.* metadata of a GGUF file, as gguf-py reads it.
fn gguf_vocab(path: &Path) -> Value {
    run_check(&["vocab", path.to_str().unwrap()])
}

fn type_number(kind: &str) -> i64 {
    match kind {
        "normal" => 1,
        "unknown" => 2,
        "control" => 3,
        "user_defined" => 4,
        "unused" => 5,
        "byte" => 6,
        k => panic!("{k}"),
    }
}

#[test]
fn gguf_export_writes_the_sentencepiece_vocabulary_as_llama_cpp_reads_it() {
    let expected = json("spm/expected.json");
    let llama = &expected["llama"];
    let pieces = llama["pieces"].as_array().unwrap();
    let score = |i: usize| llama["scores"][i].as_f64().unwrap();
    let kind = |i: usize| type_number(llama["types"][i].as_str().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("models/llama2_spm");

    // From tokenizer.model: every piece, score and type as sentencepiece has them; the tensors
    // as the checkpoint's (gguf_check.py's own comparison).
    let r = export_gguf(&base, None, &tmp.path().join("spm"), Quant::F16).unwrap();
    let expect = crate::gguf::expect_file(
        tmp.path(),
        serde_json::json!({"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                           "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
                           "tokenizer.ggml.add_bos_token": true, "len:tokenizer.ggml.tokens": 512}),
    );
    run_check(&["check", r.path.to_str().unwrap(), base.to_str().unwrap(), expect.to_str().unwrap()]);
    let v = gguf_vocab(&r.path);
    assert!(v["tokenizer.chat_template"].as_str().unwrap().contains("[INST]"));
    for (i, p) in pieces.iter().enumerate() {
        assert_eq!(&v["tokenizer.ggml.tokens"][i], p, "token {i}");
        assert_eq!(v["tokenizer.ggml.scores"][i].as_f64().unwrap(), score(i), "score {i}");
        assert_eq!(v["tokenizer.ggml.token_type"][i].as_i64().unwrap(), kind(i), "type {i}");
    }
    // Control, unknown, byte and normal pieces all occur (Llama 2's layout: <unk> <s> </s>, bytes).
    for k in 1..=3 {
        assert!((0..pieces.len()).any(|i| kind(i) == k), "no piece of type {k}");
    }
    assert_eq!(kind(3), 6);

    // From a SentencePiece-style tokenizer.json alone (what transformers converts the model
    // to): the same tokens and types, and scores that order the merged pieces as
    // sentencepiece's scores do.
    let json_only = tmp.path().join("json_only");
    std::fs::create_dir(&json_only).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), json_only.join(f)).unwrap();
    }
    std::fs::copy(fixture("spm/llama_tokenizer.json"), json_only.join("tokenizer.json")).unwrap();
    let r = export_gguf(&json_only, None, &tmp.path().join("json"), Quant::F16).unwrap();
    let v = gguf_vocab(&r.path);
    assert_eq!(v["tokenizer.ggml.model"], "llama");
    let scores: Vec<f64> = v["tokenizer.ggml.scores"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap()).collect();
    let mut normal = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        assert_eq!(&v["tokenizer.ggml.tokens"][i], p, "token {i}");
        assert_eq!(v["tokenizer.ggml.token_type"][i].as_i64().unwrap(), kind(i), "type {i}");
        if kind(i) == 1 {
            normal.push((score(i), i));
        }
    }
    // sentencepiece's order of the normal pieces (score, then id) is the order of ftx's scores.
    normal.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for w in normal.windows(2) {
        assert!(scores[w[0].1] > scores[w[1].1], "pieces {} and {}: {} !> {}", w[0].1, w[1].1, scores[w[0].1], scores[w[1].1]);
    }
}

#[test]
fn gguf_export_refuses_a_unigram_vocabulary_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("models/llama2_spm");
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), dir.join(f)).unwrap();
    }
    std::fs::copy(fixture("spm/unigram.model"), dir.join("tokenizer.model")).unwrap();
    let err = export_gguf(&dir, None, &tmp.path().join("out"), Quant::F16).err().unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("tokenizer.model") && msg.contains("Unigram") && msg.contains("convert_hf_to_gguf.py"), "{msg}");
}
