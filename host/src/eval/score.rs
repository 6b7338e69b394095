//! Scoring one generated answer: exact match, JSON validity, JSON-schema conformance and
//! function-call accuracy. Each returns plain numbers (1.0 right, 0.0 wrong; partial credit
//! where noted) that the task averages.

use serde_json::Value;

/// The answer trimmed equals the reference trimmed.
pub fn exact_match(output: &str, reference: &str) -> bool {
    output.trim() == reference.trim()
}

/// The JSON in an answer: the whole answer, or the inside of a Markdown code fence.
pub fn parse_json(output: &str) -> Option<Value> {
    let t = output.trim();
    if let Ok(v) = serde_json::from_str(t) {
        return Some(v);
    }
    let inner = t.strip_prefix("```")?;
    let inner = inner.strip_prefix("json").unwrap_or(inner);
    let inner = inner.trim_end().strip_suffix("```")?;
    serde_json::from_str(inner.trim()).ok()
}

/// A compiled JSON Schema.
pub struct Schema(jsonschema::Validator);

impl Schema {
    /// Compiles `schema`, or says why it is not a valid JSON Schema.
    pub fn new(schema: &Value) -> Result<Schema, String> {
        jsonschema::validator_for(schema).map(Schema).map_err(|e| format!("not a valid JSON Schema: {e}"))
    }

    /// `None` when the answer conforms, else why not (not JSON, or the first violation).
    pub fn violation(&self, output: &str) -> Option<String> {
        let Some(v) = parse_json(output) else { return Some("the answer is not JSON".into()) };
        self.0.validate(&v).err().map(|e| format!("{e} (at {})", e.instance_path()))
    }
}

/// A function call as the model wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: Value,
}

/// Reads a call from `{"name", "arguments"|"parameters"}`, with arguments as an object or as
/// a JSON-encoded string (OpenAI's form), also inside `{"function": ...}`, `{"tool_calls": [...]}`
/// or a one-element list.
pub fn read_call(v: &Value) -> Option<Call> {
    if let Some(first) = v.as_array().filter(|a| a.len() == 1).and_then(|a| a.first()) {
        return read_call(first);
    }
    if let Some(calls) = v.get("tool_calls") {
        return read_call(calls);
    }
    if let Some(f) = v.get("function").filter(|f| f.is_object()) {
        return read_call(f);
    }
    let name = v.get("name")?.as_str()?.to_owned();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        Some(Value::String(s)) => serde_json::from_str(s).ok().filter(Value::is_object)?,
        Some(a @ Value::Object(_)) => a.clone(),
        None => Value::Object(Default::default()),
        Some(_) => return None,
    };
    Some(Call { name, arguments })
}

/// Function-call scores of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CallScore {
    /// The answer is a well-formed call.
    pub valid: bool,
    /// Its function name is the expected one.
    pub name: bool,
    /// Name and arguments both right (arguments compared as JSON values).
    pub exact: bool,
    /// Share of the expected arguments present with the expected value (0 with the wrong name).
    pub arguments: f64,
}

/// Scores `output` against the expected call `expected` (a call value, or a string holding one).
pub fn score_function_call(output: &str, expected: &Value) -> Result<CallScore, String> {
    let expected = match expected {
        Value::String(s) => serde_json::from_str(s).map_err(|_| "the reference is not a JSON function call".to_string())?,
        v => v.clone(),
    };
    let want = read_call(&expected).ok_or("the reference is not a function call ({\"name\", \"arguments\"})")?;
    let Some(got) = parse_json(output).as_ref().and_then(read_call) else { return Ok(CallScore::default()) };
    let name = got.name == want.name;
    let wanted = want.arguments.as_object().expect("read_call gives objects");
    let arguments = if !name {
        0.0
    } else if wanted.is_empty() {
        f64::from(u8::from(got.arguments.as_object().is_some_and(|a| a.is_empty())))
    } else {
        wanted.iter().filter(|(k, v)| got.arguments.get(k.as_str()) == Some(v)).count() as f64 / wanted.len() as f64
    };
    Ok(CallScore { valid: true, name, exact: name && got.arguments == want.arguments, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_are_read_in_common_shapes_and_compared_by_value() {
        let want = json!({"name": "set_timer", "arguments": {"minutes": 5, "label": "tea"}});
        let s = |o: &str| score_function_call(o, &want).unwrap();
        assert!(s(r#"{"arguments": {"label": "tea", "minutes": 5}, "name": "set_timer"}"#).exact);
        assert!(s(r#"{"function": {"name": "set_timer", "arguments": "{\"minutes\": 5, \"label\": \"tea\"}"}}"#).exact);
        assert!(s("```json\n{\"name\": \"set_timer\", \"parameters\": {\"minutes\": 5, \"label\": \"tea\"}}\n```").exact);
        let half = s(r#"{"name": "set_timer", "arguments": {"minutes": 5, "label": "coffee"}}"#);
        assert_eq!((half.valid, half.name, half.exact, half.arguments), (true, true, false, 0.5));
        let wrong = s(r#"{"name": "play", "arguments": {"minutes": 5}}"#);
        assert_eq!((wrong.valid, wrong.name, wrong.arguments), (true, false, 0.0));
        assert_eq!(s(r#"{"name": "set_timer""#), CallScore::default());
        assert!(score_function_call("{}", &json!("not json")).is_err());
    }

    #[test]
    fn schemas_accept_and_reject() {
        let schema = Schema::new(&json!({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}})).unwrap();
        assert_eq!(schema.violation(r#"{"name": "x"}"#), None);
        assert!(schema.violation(r#"{"name": 3}"#).unwrap().contains("/name"));
        assert!(schema.violation("{}").unwrap().contains("required"));
        assert_eq!(schema.violation("nope").unwrap(), "the answer is not JSON");
        assert!(Schema::new(&json!({"type": 12})).is_err());
    }
}
