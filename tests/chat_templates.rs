//! Chat templates by name (rendered byte for byte as transformers' apply_chat_template renders
//! the same files: tests/fixtures/fx_chat_templates.py), `data.train_on_inputs` masks, and the
//! end-of-turn token override.

use crate::by_name::{ftx_at, ok};
use crate::common::{fixture, json};
use ftx::data::chat_templates::apply;
use ftx::data::tokenize::IGNORE;
use ftx::data::{Example, Tokenizing};
use ftx::model::tokenizer::Message;
use ftx::model::TextTokenizer;

fn messages(v: &serde_json::Value) -> Vec<Message> {
    v.as_array().unwrap().iter().map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())).collect()
}

#[test]
fn named_templates_render_as_transformers_renders_them() {
    let fx = json("chat_templates.json");
    let mut seen = std::collections::BTreeSet::new();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let mut tok = TextTokenizer::load(&fixture(fx["tokenizer"].as_str().unwrap()), 1 << 20).unwrap();
        apply(&mut tok, Some(name), None).unwrap();
        let got = tok.render_chat(&messages(&case["messages"]), case["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{name}: {}", case["messages"]);
        seen.insert(name.to_owned());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["chatml", "gemma", "llama3", "mistral", "qwen"]);
}

fn chat() -> Example {
    Example::Chat { messages: vec![Message::new("system", "Be brief."), Message::new("user", "What is 2+2?"), Message::new("assistant", "Four")] }
}

/// The text of the positions that take loss, in order.
fn targets(tok: &TextTokenizer, ids: &[i64], labels: &[i64]) -> String {
    let t: Vec<u32> = ids.iter().zip(labels).filter(|(_, l)| **l != IGNORE).map(|(i, _)| *i as u32).collect();
    tok.decode(&t, false)
}

#[test]
fn train_on_inputs_makes_every_token_a_target_and_the_default_only_the_answer() {
    let tok = TextTokenizer::load(&fixture("models/qwen2"), 1 << 20).unwrap();
    let only_answer = Tokenizing { tok: &tok, max_len: 4096, train_on_inputs: false }.example(&chat()).unwrap();
    let whole = Tokenizing { tok: &tok, max_len: 4096, train_on_inputs: true }.example(&chat()).unwrap();
    assert_eq!(whole.ids, only_answer.ids, "the same rendering either way");
    for (i, (&id, &label)) in whole.ids.iter().zip(&whole.labels).enumerate() {
        assert_eq!(label, id, "train_on_inputs: position {i} is a target");
    }
    // Default: the answer and the template's end token, nothing of the system or user turns.
    assert_eq!(targets(&tok, &only_answer.ids, &only_answer.labels).trim_start(), "Four<|im_end|>");
    let text = tok.render_chat(&messages(&serde_json::json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}])), true).unwrap();
    let prompt_len = tok.encode(&text, false).unwrap().len();
    for i in 0..prompt_len {
        assert_eq!(only_answer.labels[i], IGNORE, "position {i} of the prompt takes no loss");
    }
}

#[test]
fn the_end_of_turn_override_fixes_a_template_whose_end_token_is_not_eos() {
    // The qwen2 fixture with EOS <|endoftext|>: its template ends turns with <|im_end|>, which
    // is then neither EOS nor a stop token (as in base checkpoints with a ChatML template).
    let d = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("models/qwen2").join(f), d.path().join(f)).unwrap();
    }
    let cfg_path = d.path().join("tokenizer_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["eos_token"] = "<|endoftext|>".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut tok = TextTokenizer::load(d.path(), 1 << 20).unwrap();
    let e = Tokenizing { tok: &tok, max_len: 4096, train_on_inputs: false }.example(&chat()).unwrap_err();
    assert!(e.contains("does not end assistant turns") && e.contains("data.eot_token") && e.contains("data.chat_template") && e.contains("data.train_on_inputs"), "{e}");
    assert!(apply(&mut tok, None, Some("<|nope|>")).unwrap_err().contains("data.eot_token = \"<|nope|>\" is not a token"));
    apply(&mut tok, None, Some("<|im_end|>")).unwrap();
    let t = Tokenizing { tok: &tok, max_len: 4096, train_on_inputs: false }.example(&chat()).unwrap();
    assert_eq!(targets(&tok, &t.ids, &t.labels).trim_start(), "Four<|im_end|>");
    assert!(tok.stop_ids.contains(&tok.token_id("<|im_end|>").unwrap()), "and generation stops there");
}

#[test]
fn chat_templates_and_train_on_inputs_through_train() {
    let d = tempfile::tempdir().unwrap();
    let rec = serde_json::json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}).to_string();
    std::fs::write(d.path().join("chat.jsonl"), format!("{rec}\n").repeat(8)).unwrap();
    let cfg = |model: &str| {
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"chat.jsonl\"\nmax_seq_len = 64\n[method]\nkind = \"lora\"\nrank = 2\n[train]\nmax_steps = 1\nbatch_size = 4\noutput_dir = \"out\"\n",
            fixture(&format!("models/{model}")).display()
        )
    };
    std::fs::write(d.path().join("llama3.toml"), cfg("llama3")).unwrap();
    std::fs::write(d.path().join("qwen2.toml"), cfg("qwen2")).unwrap();
    let home = d.path().join("home");
    // llama3's vocabulary has no <|im_end|>: ChatML's turns end in no token it knows.
    let o = ftx_at(d.path(), &home, &["train", "--config", "llama3.toml", "--set", "data.chat_template=chatml"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("does not end assistant turns") && e.contains("data.eot_token"), "{e}");
    ok(ftx_at(d.path(), &home, &["train", "--config", "llama3.toml", "--set", "data.chat_template=chatml", "--set", "data.train_on_inputs=true"]));
    // The adapter keeps the template it trained with; generate and eval put it on the base's
    // tokenizer when they apply the adapter.
    let chatml = ftx::data::chat_templates::named("chatml").unwrap().source;
    assert_eq!(std::fs::read_to_string(d.path().join("out/final/chat_template.jinja")).unwrap(), chatml);
    let mut tok = TextTokenizer::load(&fixture("models/llama3"), 1 << 20).unwrap();
    ftx::data::chat_templates::adopt(&mut tok, &d.path().join("out/final")).unwrap();
    assert_eq!(tok.chat_template.as_deref(), Some(chatml));
    let llama3 = fixture("models/llama3");
    ok(ftx_at(d.path(), &home, &["generate", "--model", llama3.to_str().unwrap(), "--adapter", "out/final", "--chat", "Hi", "--max-new-tokens", "4", "--device", "cpu"]));
    ok(ftx_at(d.path(), &home, &["train", "--config", "qwen2.toml", "--set", "data.chat_template=qwen", "--set", "train.output_dir=\"out2\"", "--set", "method.kind=\"full\""]));
    // A full checkpoint carries it in its tokenizer_config.json, which its loader reads first.
    let saved = TextTokenizer::load(&d.path().join("out2/final"), 1 << 20).unwrap();
    assert_eq!(saved.chat_template.as_deref(), Some(ftx::data::chat_templates::named("qwen").unwrap().source));
    let o = ftx_at(d.path(), &home, &["train", "--config", "qwen2.toml", "--set", "data.chat_template=vicuna"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("data.chat_template = \"vicuna\" is neither a named template (chatml, gemma, llama3, mistral, qwen)"), "{e}");
}
