//! Drops junk records: ones matching a built-in list of patterns, each with a name that goes
//! into the drop reason.
//!
//! - `blank record`: the line is empty or only whitespace.
//! - `blank text`: a string value that is only whitespace ("  ", "\n\t"); the empty string
//!   is allowed, as in Alpaca's `"input": ""`.
//! - `lorem ipsum`: placeholder text, `(?i)\blorem\s+ipsum\b`.
//! - `template placeholder`: an unfilled `{{ name }}` (an identifier, dotted path allowed,
//!   between double braces) or a Jinja statement `{% if/for/set/… %}`.
//! - `chat-template token`: a chat template's special token leaked into the text:
//!   `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`, `<|start_header_id|>`,
//!   `<|user|>`, `<|assistant|>`, … and `[INST]`, `[/INST]`, `<<SYS>>`, `<</SYS>>`.
//!
//! The last three are looked for outside code: fenced blocks (``` or ~~~) and inline `code`
//! spans are cut out first, so a Jinja or Handlebars example in a code block is kept. The
//! checks run on the JSON's string values, decoded (the raw line when it is not JSON).

use ftx_plugin_api::filter::{export_filter, Filter, Item, Verdict};
use regex::Regex;
use serde_json::Value;
use std::sync::LazyLock;

/// Patterns looked for outside code, with their names.
static PATTERNS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    [
        ("lorem ipsum", r"(?i)\blorem\s+ipsum\b"),
        ("template placeholder", r"\{\{-?\s*[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\s*-?\}\}|\{%-?\s*(?:if|elif|else|endif|for|endfor|set|block|endblock|include|extends|macro|endmacro)\b[^%]*%\}"),
        (
            "chat-template token",
            r"<\|(?:im_start|im_end|im_sep|endoftext|end_of_text|begin_of_text|eot_id|eom_id|start_header_id|end_header_id|system|user|assistant|end)\|>|\[/?INST\]|<</?SYS>>",
        ),
    ]
    .into_iter()
    .map(|(name, re)| (name, Regex::new(re).expect("built-in pattern")))
    .collect()
});

/// Fenced code blocks (to the end when unclosed) and inline code spans.
static CODE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?s)```.*?(?:```|\z)|~~~.*?(?:~~~|\z)|`[^`\n]*`").expect("built-in pattern"));

fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// At most 40 characters of `s`, for a reason.
fn excerpt(s: &str) -> String {
    let cut: String = s.chars().take(40).collect();
    if cut.len() < s.len() { format!("{cut}…") } else { cut }
}

/// Why `text` is junk, if it is.
fn junk(text: &str) -> Option<String> {
    if !text.is_empty() && text.trim().is_empty() {
        return Some("blank text".into());
    }
    let prose = CODE.replace_all(text, " ");
    PATTERNS.iter().find_map(|(name, re)| re.find(&prose).map(|m| format!("{name}: {:?}", excerpt(m.as_str()))))
}

struct RegexFilter;

impl Filter for RegexFilter {
    fn filter(items: Vec<Item>) -> Vec<Verdict> {
        items
            .iter()
            .map(|i| {
                if i.json.trim().is_empty() {
                    return Verdict::Drop("blank record".into());
                }
                let found = match serde_json::from_str::<Value>(&i.json) {
                    Ok(v) => {
                        let mut texts = Vec::new();
                        strings(&v, &mut texts);
                        texts.into_iter().find_map(junk)
                    }
                    Err(_) => junk(&i.json),
                };
                found.map_or(Verdict::Keep, Verdict::Drop)
            })
            .collect()
    }
}

export_filter!(RegexFilter);
