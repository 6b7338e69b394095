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
