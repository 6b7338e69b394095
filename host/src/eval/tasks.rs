//! Reading task files (JSONL, one sample a line): generation samples and multiple-choice
//! questions. A bad line is an error naming the file and the line.

use super::EvalError;
use crate::model::tokenizer::Message;
use serde_json::Value;
use std::path::Path;

/// What the model is asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw text to continue (or one user turn, when rendered through a chat template).
    Text(String),
    /// Chat turns, rendered with the model's template and a generation prompt.
    Chat(Vec<Message>),
}

impl Prompt {
    /// The prompt as plain text (for reports and judges): the turns' contents, one per line.
    pub fn as_text(&self) -> String {
        match self {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(m) => m.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n"),
        }
    }
}

/// One sample of a generation task.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSample {
    /// 1-based line in the task file.
    pub line: usize,
    pub prompt: Prompt,
    /// The expected answer: a string, or a JSON value (e.g. a function call).
    pub reference: Option<Value>,
    /// This sample's JSON Schema, if it has its own.
    pub schema: Option<Value>,
}

impl GenerationSample {
    /// The reference as text (a JSON value in its compact form).
    pub fn reference_text(&self) -> Option<String> {
        self.reference.as_ref().map(|r| match r {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        })
    }
}

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceSample {
    pub line: usize,
    pub context: String,
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub gold: usize,
}

/// Reads every non-empty line of a JSONL file through `parse`, naming file and line on error.
fn read_lines<T>(path: &Path, limit: Option<usize>, parse: impl Fn(&Value, usize) -> Result<T, String>) -> Result<Vec<T>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io { path: path.to_owned(), source: e })?;
    let bad = |line, problem| EvalError::Record { path: path.to_owned(), line, problem };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| bad(i + 1, format!("not valid JSON: {e}")))?;
        out.push(parse(&v, i + 1).map_err(|p| bad(i + 1, p))?);
    }
    if out.is_empty() {
        return Err(bad(1, "the task file has no samples".into()));
    }
    Ok(out)
}

fn string(v: &Value, key: &str) -> Result<Option<String>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("\"{key}\" must be a string")),
    }
}

/// Reads a generation task: `prompt` (text) or `messages` (chat; a final assistant turn is the
/// reference), or Alpaca `instruction`/`input`/`output`; the reference from `reference`
/// (string or JSON), `answer`, `expected` or `output`; an optional per-sample `schema`.
pub fn read_generation(path: &Path, limit: Option<usize>) -> Result<Vec<GenerationSample>, EvalError> {
    read_lines(path, limit, |v, line| {
        if !v.is_object() {
            return Err("a sample must be a JSON object".into());
        }
        let mut reference = ["reference", "answer", "expected"].iter().find_map(|k| v.get(*k).filter(|r| !r.is_null()).cloned());
        let prompt = if let Some(p) = string(v, "prompt")? {
            Prompt::Text(p)
        } else if let Some(list) = v.get("messages") {
            let mut messages = parse_turns(list)?;
            if messages.last().is_some_and(|m| m.role == "assistant") {
                let last = messages.pop().expect("checked");
                reference.get_or_insert(Value::String(last.content));
            }
            if messages.is_empty() {
                return Err("\"messages\" has no turn before the answer".into());
            }
            Prompt::Chat(messages)
        } else if let Some(instruction) = string(v, "instruction")? {
            let input = string(v, "input")?.unwrap_or_default();
            if reference.is_none() {
                reference = string(v, "output")?.map(Value::String);
            }
            Prompt::Text(crate::data::tokenize::alpaca_prompt(&instruction, &input))
        } else {
            return Err("no prompt: give \"prompt\", \"messages\" or \"instruction\"".into());
        };
        let schema = v.get("schema").filter(|s| !s.is_null()).cloned();
        Ok(GenerationSample { line, prompt, reference, schema })
    })
}

/// Chat turns without the need for an assistant turn (a prompt has none).
fn parse_turns(list: &Value) -> Result<Vec<Message>, String> {
    let with_answer = serde_json::json!({"messages": list.as_array().ok_or("\"messages\" must be an array")?.iter().cloned().chain([serde_json::json!({"role": "assistant", "content": ""})]).collect::<Vec<_>>()});
    match crate::data::read::parse_record(&with_answer, crate::data::DataFormat::Chat)? {
        crate::data::Example::Chat { mut messages } => {
            messages.pop();
            Ok(messages)
        }
        _ => unreachable!("parsed as chat"),
    }
}

/// Reads a multiple-choice task: `context` (or `question`, `query`, `ctx`), `choices` (a list of
/// strings, ARC's `{"text": [...], "label": [...]}`, or `endings`), and `gold` (or `label`,
/// `answer`): an index, or a choice label such as "B".
pub fn read_choice(path: &Path, limit: Option<usize>) -> Result<Vec<ChoiceSample>, EvalError> {
    read_lines(path, limit, |v, line| {
        let context = ["context", "question", "query", "ctx"]
            .iter()
            .find_map(|k| string(v, k).transpose())
            .transpose()?
            .ok_or("no context: give \"context\" (or \"question\")")?;
        let (choices, labels): (Vec<String>, Vec<String>) = match v.get("choices").or_else(|| v.get("endings")) {
            Some(Value::Array(a)) => {
                let c = a.iter().map(|c| c.as_str().map(str::to_owned).ok_or("each choice must be a string")).collect::<Result<Vec<_>, _>>()?;
                let labels = (0..c.len()).map(|i| ((b'A' + i as u8) as char).to_string()).collect();
                (c, labels)
            }
            Some(Value::Object(o)) => {
                let texts = o.get("text").and_then(Value::as_array).ok_or("\"choices\" as an object needs a \"text\" list")?;
                let c = texts.iter().map(|c| c.as_str().map(str::to_owned).ok_or("each choice must be a string")).collect::<Result<Vec<_>, _>>()?;
                let labels = match o.get("label").and_then(Value::as_array) {
                    Some(l) => l.iter().map(|x| x.as_str().map(str::to_owned).unwrap_or_else(|| x.to_string())).collect(),
                    None => (0..c.len()).map(|i| ((b'A' + i as u8) as char).to_string()).collect(),
                };
                (c, labels)
            }
            _ => return Err("no choices: give \"choices\" (a list of strings)".into()),
        };
        if choices.len() < 2 {
            return Err("a question needs at least two choices".into());
        }
        let gold = ["gold", "label", "answer"].iter().find_map(|k| v.get(*k)).ok_or("no answer: give \"gold\" (the right choice's index)")?;
        let gold = match gold {
            Value::Number(n) => n.as_u64().map(|n| n as usize).ok_or("\"gold\" must be a non-negative index")?,
            Value::String(s) => match labels.iter().position(|l| l == s) {
                Some(i) => i,
                None => s.parse().map_err(|_| format!("\"gold\" is \"{s}\", which is neither an index nor a choice label ({})", labels.join(", ")))?,
            },
            _ => return Err("\"gold\" must be an index or a choice label".into()),
        };
        if gold >= choices.len() {
            return Err(format!("\"gold\" is {gold} but there are {} choices", choices.len()));
        }
        Ok(ChoiceSample { line, context, choices, gold })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_samples_take_several_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("g.jsonl");
        std::fs::write(
            &f,
            concat!(
                "{\"prompt\": \"2+2=\", \"reference\": \"4\"}\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
                "{\"messages\": [{\"role\": \"user\", \"content\": \"call\"}], \"reference\": {\"name\": \"f\", \"arguments\": {}}}\n",
                "{\"instruction\": \"Say yes.\", \"output\": \"yes\"}\n"
            ),
        )
        .unwrap();
        let s = read_generation(&f, None).unwrap();
        assert_eq!(s[0].prompt, Prompt::Text("2+2=".into()));
        assert_eq!(s[1].prompt, Prompt::Chat(vec![Message::new("user", "hi")]));
        assert_eq!(s[1].reference_text().as_deref(), Some("hello"));
        assert_eq!(s[2].reference.as_ref().unwrap()["name"], "f");
        assert!(matches!(&s[3].prompt, Prompt::Text(t) if t.contains("Say yes.")));
        assert_eq!(read_generation(&f, Some(2)).unwrap().len(), 2);
    }

    #[test]
    fn choice_answers_may_be_indices_or_labels() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("mc.jsonl");
        std::fs::write(
            &f,
            "{\"question\": \"q\", \"choices\": {\"text\": [\"a\", \"b\"], \"label\": [\"A\", \"B\"]}, \"answer\": \"B\"}\n{\"context\": \"c\", \"endings\": [\"x\", \"y\", \"z\"], \"label\": 2}\n{\"context\": \"c\", \"choices\": [\"x\"], \"gold\": 0}\n",
        )
        .unwrap();
        let e = read_choice(&f, None).unwrap_err().to_string();
        assert!(e.ends_with("mc.jsonl:3: a question needs at least two choices"), "{e}");
        let s = read_choice(&f, Some(2)).unwrap();
        assert_eq!((s[0].gold, s[1].gold, s[1].choices.len()), (1, 2, 3));
    }
}
