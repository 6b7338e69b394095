//! An Ollama `Modelfile` for an exported GGUF: `FROM` the file, the chat format as an Ollama
//! (Go text/template) `TEMPLATE` when the Hugging Face template is one of the common
//! families (ChatML, Llama 3 headers, Mistral/Llama 2 `[INST]`), and a `PARAMETER stop` for
//! every token that ends a turn.

use crate::model::TextTokenizer;
use std::path::Path;

/// The chat formats ftx recognises in a Jinja chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\n…<|im_end|>` (Qwen, many others).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>` (Llama 3).
    Llama3,
    /// `[INST] … [/INST]` (Mistral, Llama 2).
    Inst,
}

/// Which chat format a Jinja template implements, if ftx knows it.
pub fn detect(template: &str) -> Option<ChatFormat> {
    if template.contains("<|im_start|>") {
        Some(ChatFormat::ChatMl)
    } else if template.contains("<|start_header_id|>") {
        Some(ChatFormat::Llama3)
    } else if template.contains("[INST]") {
        Some(ChatFormat::Inst)
    } else {
        None
    }
}

/// The Ollama TEMPLATE for a format (one system message, one user turn, the reply).
pub fn ollama_template(f: ChatFormat) -> &'static str {
    match f {
        ChatFormat::ChatMl => {
            "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
        }
        ChatFormat::Llama3 => {
            "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
        }
        ChatFormat::Inst => "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]{{ .Response }}",
    }
}

fn stop_markers(f: ChatFormat) -> &'static [&'static str] {
    match f {
        ChatFormat::ChatMl => &["<|im_start|>", "<|im_end|>"],
        ChatFormat::Llama3 => &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        ChatFormat::Inst => &["[INST]", "[/INST]"],
    }
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// The Modelfile text for `gguf_file` (a name relative to the Modelfile's folder), reading
/// the chat template and stop tokens of the checkpoint in `base`.
pub fn modelfile(gguf_file: &str, base: &Path, vocab: i64) -> Result<String, String> {
    let tok = TextTokenizer::load(base, vocab).map_err(|e| e.to_string())?;
    let mut out = format!("# Written by ftx export: `ollama create <name> -f Modelfile`\nFROM ./{gguf_file}\n");
    let mut stops: Vec<String> = Vec::new();
    match tok.chat_template.as_deref().map(|t| (t, detect(t))) {
        Some((_, Some(f))) => {
            out.push_str(&format!("TEMPLATE \"\"\"{}\"\"\"\n", ollama_template(f)));
            stops.extend(stop_markers(f).iter().map(|s| s.to_string()));
        }
        Some((_, None)) => out.push_str(
            "# The chat template is not one ftx converts (ChatML, Llama 3, [INST]); Ollama falls back to the\n# template stored in the GGUF (tokenizer.chat_template). Add a TEMPLATE here if it does not.\n",
        ),
        None => out.push_str("# The checkpoint has no chat template: a plain completion model.\n"),
    }
    for id in &tok.stop_ids {
        let text = tok.decode(&[*id], false);
        if !text.is_empty() && !stops.contains(&text) {
            stops.push(text);
        }
    }
    for s in stops {
        out.push_str(&format!("PARAMETER stop {}\n", quoted(&s)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_common_formats() {
        assert_eq!(detect("{{ '<|im_start|>' + m.role }}"), Some(ChatFormat::ChatMl));
        assert_eq!(detect("<|start_header_id|>"), Some(ChatFormat::Llama3));
        assert_eq!(detect("[INST] x [/INST]"), Some(ChatFormat::Inst));
        assert_eq!(detect("### Human:"), None);
    }
}
