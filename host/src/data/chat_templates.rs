//! Chat templates chosen by the run rather than the checkpoint (`data.chat_template`): a named
//! one shipped with ftx (the Jinja files beside this module: chatml, llama3, mistral, qwen,
//! gemma), or a Jinja file; and the end-of-turn token override (`data.eot_token`). Both are
//! rendered by the tokenizer's own engine ([`crate::model::tokenizer`]), as transformers'
//! `apply_chat_template` renders them.

use crate::model::TextTokenizer;

/// A named template: its name, its Jinja source, and the token that ends a turn in it (`None`:
/// the tokenizer's EOS).
pub struct NamedTemplate {
    pub name: &'static str,
    pub source: &'static str,
    pub end_of_turn: Option<&'static str>,
}

/// The templates ftx ships, by name.
pub const NAMED: &[NamedTemplate] = &[
    NamedTemplate { name: "chatml", source: include_str!("chat_templates/chatml.jinja"), end_of_turn: Some("<|im_end|>") },
    NamedTemplate { name: "gemma", source: include_str!("chat_templates/gemma.jinja"), end_of_turn: Some("<end_of_turn>") },
    NamedTemplate { name: "llama3", source: include_str!("chat_templates/llama3.jinja"), end_of_turn: Some("<|eot_id|>") },
    NamedTemplate { name: "mistral", source: include_str!("chat_templates/mistral.jinja"), end_of_turn: None },
    NamedTemplate { name: "qwen", source: include_str!("chat_templates/qwen.jinja"), end_of_turn: Some("<|im_end|>") },
];

/// The named template `name`, if ftx ships one.
pub fn named(name: &str) -> Option<&'static NamedTemplate> {
    NAMED.iter().find(|t| t.name == name)
}

/// Whether `spec` names a shipped template (rather than a file).
pub fn is_named(spec: &str) -> bool {
    named(spec).is_some()
}

fn names() -> String {
    NAMED.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
}

/// Checks a `data.chat_template` value: a shipped name, or something that reads as a file path
/// (it has a `/` or an extension). The message names the key and the choices.
pub fn check_spec(spec: &str) -> Result<(), String> {
    if is_named(spec) || spec.contains('/') || spec.contains('.') {
        return Ok(());
    }
    Err(format!("data.chat_template = \"{spec}\" is neither a named template ({}) nor a file path (a Jinja file, e.g. \"./template.jinja\")", names()))
}

/// The Jinja source of `spec` and the end-of-turn token it implies.
pub fn source(spec: &str) -> Result<(String, Option<&'static str>), String> {
    if let Some(t) = named(spec) {
        return Ok((t.source.to_owned(), t.end_of_turn));
    }
    let text = std::fs::read_to_string(spec).map_err(|e| {
        format!("data.chat_template = \"{spec}\": cannot read the file ({}); named templates are {}", e.kind(), names())
    })?;
    Ok((text, None))
}

/// Puts the run's template and end-of-turn token on `tok`: the template replaces the
/// checkpoint's; the end-of-turn token (the override, else the named template's own when the
/// vocabulary has it) joins the stop tokens, which both end assistant turns in training's loss
/// mask and stop generation.
pub fn apply(tok: &mut TextTokenizer, template: Option<&str>, eot: Option<&str>) -> Result<(), String> {
    if let Some(spec) = template {
        let (source, end_of_turn) = source(spec)?;
        tok.chat_template = Some(source);
        if let Some(id) = end_of_turn.and_then(|t| tok.token_id(t)) {
            add_stop(tok, id);
        }
    }
    if let Some(t) = eot {
        let id = tok.token_id(t).ok_or_else(|| {
            format!("data.eot_token = \"{t}\" is not a token of this tokenizer: name the single token the chat template ends assistant turns with (for a template whose end token the vocabulary lacks, add it to the tokenizer first)")
        })?;
        add_stop(tok, id);
    }
    Ok(())
}

fn add_stop(tok: &mut TextTokenizer, id: u32) {
    if !tok.stop_ids.contains(&id) {
        tok.stop_ids.push(id);
    }
}

/// The file beside a run's weights that holds the chat template it trained with.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";

/// Records the chat template and stop tokens `tok` trained with in the run's weights folder
/// `dir`, for a run that chose its own (`data.chat_template`, `data.eot_token`), so what it
/// trained on is what later renders and stops: `chat_template.jinja` and
/// generation_config.json's `eos_token_id` — and for a full checkpoint (a tokenizer_config.json
/// in `dir`) its `chat_template` too, which the checkpoint's loader reads first.
pub fn save(tok: &TextTokenizer, dir: &std::path::Path) -> std::io::Result<()> {
    let Some(template) = &tok.chat_template else { return Ok(()) };
    crate::util::write_atomic(&dir.join(TEMPLATE_FILE), template.as_bytes())?;
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| -> std::io::Result<()> {
        let path = dir.join(name);
        let mut v: serde_json::Value = match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
            Err(e) => return Err(e),
        };
        if let Some(o) = v.as_object_mut() {
            f(o);
        }
        crate::util::write_atomic(&path, serde_json::to_string_pretty(&v)?.as_bytes())
    };
    if dir.join("tokenizer_config.json").exists() {
        edit("tokenizer_config.json", &|o| {
            o.insert("chat_template".into(), template.clone().into());
        })?;
    }
    edit("generation_config.json", &|o| {
        o.insert("eos_token_id".into(), tok.stop_ids.clone().into());
    })
}

/// Puts what [`save`] recorded beside an adapter (its folder `dir`) on the base's tokenizer:
/// the template it trained with, and its stop tokens. Nothing when the adapter has none.
pub fn adopt(tok: &mut TextTokenizer, dir: &std::path::Path) -> Result<(), String> {
    let dir = &crate::peft::adapter_dir(dir)?;
    let path = dir.join(TEMPLATE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => tok.chat_template = Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let gen = dir.join("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&gen) {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", gen.display()))?;
        for id in v["eos_token_id"].as_array().into_iter().flatten().filter_map(serde_json::Value::as_u64) {
            add_stop(tok, id as u32);
        }
    }
    Ok(())
}
