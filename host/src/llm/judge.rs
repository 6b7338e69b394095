//! A judge plugin's language model behind an OpenAI-compatible endpoint: [`openai_llm`] turns
//! a [`Client`] into the callback judges call, and [`JudgeLlm`] reads the option that picks
//! the judge's model — `openai:<base_url>` with a model and an API-key variable, or
//! `local:<model folder>` (ftx runs the model itself); `ftx eval`'s judge options carry it.

use super::{ChatMessage, Client, EndpointConfig, LlmError};
use crate::plugins::judge::local_llm;
use crate::plugins::judge_model::LlmFn;
use std::path::PathBuf;

/// Where a judge's `llm` calls go.
#[derive(Debug, Clone, PartialEq)]
pub enum JudgeLlm {
    /// A model folder (Hugging Face layout) run by ftx, greedy.
    Local(PathBuf),
    /// An OpenAI-compatible endpoint.
    OpenAi(EndpointConfig),
}

impl JudgeLlm {
    /// Reads `spec` (`openai:<base_url>`, `local:<dir>` or a bare folder); `model` and
    /// `api_key_env` go with `openai:`. The endpoint's other settings take their defaults
    /// (temperature 0 is sent, so the judge's answers are as repeatable as the server makes them).
    pub fn parse(spec: &str, model: Option<&str>, api_key_env: Option<&str>) -> Result<JudgeLlm, LlmError> {
        if let Some(url) = spec.strip_prefix("openai:") {
            let model = model.filter(|m| !m.trim().is_empty()).ok_or_else(|| {
                LlmError::Config(format!("judge_llm = \"{spec}\" needs the endpoint's model name (`model` in the eval [judge] table, or --judge-llm-model)"))
            })?;
            let mut cfg = EndpointConfig::new(url, model);
            cfg.api_key_env = api_key_env.map(str::to_owned);
            cfg.validate().map_err(|e| LlmError::Config(format!("judge_llm = \"{spec}\": {e}")))?;
            return Ok(JudgeLlm::OpenAi(cfg));
        }
        let path = spec.strip_prefix("local:").unwrap_or(spec);
        if path.is_empty() || (spec.contains("://") && !spec.starts_with("local:")) {
            return Err(LlmError::Config(format!(
                "judge_llm = \"{spec}\": use openai:<base_url> (an OpenAI-compatible endpoint) or local:<model folder>"
            )));
        }
        Ok(JudgeLlm::Local(PathBuf::from(path)))
    }
}

/// A judge's model as the callback the judge host calls: an endpoint's client, or the local
/// model loaded with `opts`.
pub fn judge_llm(which: &JudgeLlm, opts: crate::model::decoder::LoadOptions) -> Result<LlmFn, LlmError> {
    match which {
        JudgeLlm::OpenAi(cfg) => Ok(openai_llm(Client::new(cfg.clone())?)),
        JudgeLlm::Local(dir) => {
            let fail = |e: String| LlmError::Config(format!("judge model {}: {e}", dir.display()));
            let model = crate::model::CausalLm::load(dir, opts).map_err(|e| fail(e.to_string()))?;
            let tok = crate::model::TextTokenizer::load(dir, model.config.vocab).map_err(|e| fail(e.to_string()))?;
            Ok(local_llm(model, tok))
        }
    }
}

/// An [`LlmFn`] that sends the judge's prompt as one user message to the endpoint, with the
/// judge's token budget as `max_tokens` and temperature 0, and answers with the reply's text.
/// Errors (after the client's retries) reach the judge as text naming the URL and status.
pub fn openai_llm(client: Client) -> LlmFn {
    Box::new(move |prompt: &str, max_tokens: u32| {
        let req = client.request(vec![ChatMessage::new("user", prompt)], Some(max_tokens), Some(0.0));
        client.complete(&req).map(|c| c.content).map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_llm_specs() {
        let j = JudgeLlm::parse("openai:http://127.0.0.1:8000/v1", Some("qwen"), Some("MY_KEY")).unwrap();
        let JudgeLlm::OpenAi(c) = j else { panic!("{j:?}") };
        assert_eq!((c.completions_url().as_str(), c.model.as_str(), c.api_key_env.as_deref()), ("http://127.0.0.1:8000/v1/chat/completions", "qwen", Some("MY_KEY")));
        assert_eq!(JudgeLlm::parse("local:models/judge", None, None).unwrap(), JudgeLlm::Local("models/judge".into()));
        assert_eq!(JudgeLlm::parse("models/judge", None, None).unwrap(), JudgeLlm::Local("models/judge".into()));
        let e = JudgeLlm::parse("openai:http://x/v1", None, None).unwrap_err().to_string();
        assert!(e.contains("needs the endpoint's model name"), "{e}");
        let e = JudgeLlm::parse("openai:ftp://x", Some("m"), None).unwrap_err().to_string();
        assert!(e.contains("http:// or https://"), "{e}");
        let e = JudgeLlm::parse("https://api.example.com/v1", Some("m"), None).unwrap_err().to_string();
        assert!(e.contains("use openai:<base_url>"), "{e}");
    }
}
