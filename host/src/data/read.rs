//! Reading training records from JSONL (or a JSON array): Alpaca, ShareGPT, OpenAI
//! `messages`, preference pairs and raw text, detected per record or named.

use super::{DataError, Example};
use crate::model::tokenizer::Message;
use serde_json::Value;
use std::io::BufRead;
use std::path::Path;

/// The record shapes ftx reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Decide per record from its keys.
    Auto,
    /// `{"text": ...}`
    Text,
    /// `{"instruction", "input"?, "output"}`
    Alpaca,
    /// `{"messages": [{"role", "content"}]}` or ShareGPT `{"conversations": [{"from", "value"}]}`
    Chat,
    /// `{"prompt", "chosen", "rejected"}` (a preference pair).
    Preference,
    /// `{"prompt", "completion", "label"}` (KTO's unpaired format; `label` is a bool).
    Unpaired,
    /// `{"prompt", "reference"?}` (prompts for GRPO/PPO rollouts).
    Prompt,
}

/// Reads every record of a `.jsonl`, `.json` or `.parquet` file; `path` may be a Hub data
/// reference, `hf://datasets/org/name[@revision]/file`, fetched into the Hub cache first.
pub fn read_examples(path: &Path, format: DataFormat) -> Result<Vec<Example>, DataError> {
    let local = crate::hub::resolve_data_file(path)?;
    let io = |source| DataError::Io { path: path.to_owned(), source };
    let file = std::fs::File::open(&local).map_err(io)?;
    let bad = |line: usize, problem: String| DataError::Record { path: path.to_owned(), line, problem };
    let mut out = Vec::new();
    if local.extension().is_some_and(|e| e == "parquet") {
        // Columns named as the record's keys (the Hub's own dataset format), one record a row.
        let reader = parquet::file::reader::SerializedFileReader::new(file)
            .map_err(|e| DataError::Other(format!("{}: not a readable Parquet file: {e}", path.display())))?;
        for (i, row) in reader.into_iter().enumerate() {
            let row = row.map_err(|e| bad(i + 1, format!("unreadable Parquet row: {e}")))?;
            out.push(parse_record(&row.to_json_value(), format).map_err(|p| bad(i + 1, p))?);
        }
        return Ok(out);
    }
    if path.extension().is_some_and(|e| e == "json") {
        let v: Value = serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| bad(e.line(), e.to_string()))?;
        let Value::Array(items) = v else { return Err(bad(1, "a .json data file must hold an array of records".into())) };
        for (i, item) in items.iter().enumerate() {
            out.push(parse_record(item, format).map_err(|p| bad(1, format!("record {i}: {p}")))?);
        }
        return Ok(out);
    }
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| bad(i + 1, format!("unreadable line ({e}); is the file UTF-8?")))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| bad(i + 1, format!("not valid JSON: {e}")))?;
        out.push(parse_record(&v, format).map_err(|p| bad(i + 1, p))?);
    }
    Ok(out)
}

fn text_field(v: &Value, key: &str) -> Result<String, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(format!("missing \"{key}\"")),
        Some(_) => Err(format!("\"{key}\" must be a string")),
    }
}

/// Parses one record in `format` (or the format its keys show).
pub fn parse_record(v: &Value, format: DataFormat) -> Result<Example, String> {
    let format = match format {
        DataFormat::Auto if v.get("chosen").is_some() && v.get("rejected").is_some() => DataFormat::Preference,
        DataFormat::Auto if v.get("completion").is_some() && v.get("label").is_some() => DataFormat::Unpaired,
        DataFormat::Auto if v.get("messages").is_some() || v.get("conversations").is_some() => DataFormat::Chat,
        DataFormat::Auto if v.get("instruction").is_some() => DataFormat::Alpaca,
        DataFormat::Auto if v.get("text").is_some() => DataFormat::Text,
        DataFormat::Auto if v.get("prompt").is_some() && v.get("completion").is_none() => DataFormat::Prompt,
        DataFormat::Auto => {
            return Err("unknown record shape: expected \"text\", \"instruction\"/\"output\", \"messages\", \"conversations\", \"prompt\"/\"chosen\"/\"rejected\", \"prompt\"/\"completion\"/\"label\" or \"prompt\"".into())
        }
        f => f,
    };
    match format {
        DataFormat::Text => Ok(Example::Text { text: text_field(v, "text")? }),
        DataFormat::Preference => Ok(Example::Preference {
            prompt: text_field(v, "prompt")?,
            chosen: text_field(v, "chosen")?,
            rejected: text_field(v, "rejected")?,
        }),
        DataFormat::Unpaired => Ok(Example::Unpaired {
            prompt: text_field(v, "prompt")?,
            completion: text_field(v, "completion")?,
            label: v.get("label").and_then(Value::as_bool).ok_or("\"label\" must be true (desirable) or false (undesirable)")?,
        }),
        DataFormat::Prompt => Ok(Example::Prompt {
            prompt: text_field(v, "prompt")?,
            reference: match v.get("reference") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err("\"reference\" must be a string".into()),
            },
        }),
        DataFormat::Alpaca => Ok(Example::Alpaca {
            instruction: text_field(v, "instruction")?,
            input: v.get("input").and_then(Value::as_str).unwrap_or("").to_owned(),
            output: text_field(v, "output")?,
        }),
        DataFormat::Chat => {
            let (list, role_key, content_key) = match (v.get("messages"), v.get("conversations")) {
                (Some(m), _) => (m, "role", "content"),
                (None, Some(c)) => (c, "from", "value"),
                _ => return Err("missing \"messages\"".into()),
            };
            let list = list.as_array().ok_or("\"messages\" must be an array")?;
            let mut messages = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let role = text_field(m, role_key).map_err(|e| format!("message {i}: {e}"))?;
                let content = text_field(m, content_key).map_err(|e| format!("message {i}: {e}"))?;
                // ShareGPT speaks of human/gpt; chat templates of user/assistant.
                let role = match role.as_str() {
                    "human" | "user" => "user",
                    "gpt" | "assistant" | "model" => "assistant",
                    "system" => "system",
                    "tool" | "function" => "tool",
                    other => return Err(format!("message {i}: unknown role \"{other}\"")),
                };
                messages.push(Message::new(role, &content));
            }
            if !messages.iter().any(|m| m.role == "assistant") {
                return Err("conversation has no assistant turn to learn from".into());
            }
            Ok(Example::Chat { messages })
        }
        DataFormat::Auto => unreachable!("resolved above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_detected_from_keys() {
        let p = |s: &str| parse_record(&serde_json::from_str(s).unwrap(), DataFormat::Auto);
        assert!(matches!(p(r#"{"text":"hi"}"#), Ok(Example::Text { .. })));
        assert!(matches!(p(r#"{"instruction":"a","output":"b"}"#), Ok(Example::Alpaca { .. })));
        let sharegpt = p(r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#).unwrap();
        assert_eq!(
            sharegpt,
            Example::Chat { messages: vec![Message::new("user", "q"), Message::new("assistant", "a")] }
        );
        assert_eq!(
            p(r#"{"prompt":"p","chosen":"c","rejected":"r"}"#).unwrap(),
            Example::Preference { prompt: "p".into(), chosen: "c".into(), rejected: "r".into() }
        );
        assert_eq!(p(r#"{"prompt":"x"}"#).unwrap(), Example::Prompt { prompt: "x".into(), reference: None });
        assert_eq!(
            p(r#"{"prompt":"p","completion":"c","label":false}"#).unwrap(),
            Example::Unpaired { prompt: "p".into(), completion: "c".into(), label: false }
        );
        assert!(p(r#"{"prompt":"p","completion":"c","label":"yes"}"#).unwrap_err().contains("label"));
        assert!(p(r#"{"question":"x"}"#).unwrap_err().contains("unknown record shape"));
        assert!(p(r#"{"messages":[{"role":"user","content":"q"}]}"#).unwrap_err().contains("no assistant"));
    }

    #[test]
    fn a_bad_line_is_reported_with_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.jsonl");
        std::fs::write(&f, "{\"text\":\"a\"}\n\n{\"text\": 3}\n").unwrap();
        let e = read_examples(&f, DataFormat::Auto).unwrap_err().to_string();
        assert!(e.ends_with("d.jsonl:3: \"text\" must be a string"), "{e}");
        std::fs::write(&f, "{\"text\":\"a\"}\n{oops\n").unwrap();
        let e = read_examples(&f, DataFormat::Auto).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2: not valid JSON"), "{e}");
    }
}
