//! From records to token ids and the loss mask.
//!
//! - Text: every token is a target, and the text ends with EOS.
//! - Alpaca: the Alpaca prompt is context; the output and its EOS are targets.
//! - Chat: rendered with the checkpoint's own template (or the run's, see `chat_templates`);
//!   assistant turns, through the template's end-of-turn token, are targets; system and user
//!   turns are not.
//! - With `train_on_inputs`, every token of an Alpaca or chat example is a target.
//!
//! Labels are not shifted here: `labels[i]` is the id at `i` when position i is learned,
//! `IGNORE` otherwise. The collator shifts them.

use super::Example;
use crate::model::tokenizer::Message;
use crate::model::TextTokenizer;

/// Label of a position that takes no loss (PyTorch's `ignore_index` convention).
pub const IGNORE: i64 = -100;

/// Token ids and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    pub ids: Vec<i64>,
    pub labels: Vec<i64>,
}

impl TokenizedExample {
    /// How many positions take loss.
    pub fn n_targets(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// A prompt-string record as a chat: an optional system turn, the user's prompt, and the
/// assistant's answer when there is one.
pub fn prompt_messages(system: Option<&str>, prompt: &str, answer: Option<&str>) -> Vec<Message> {
    let mut m: Vec<Message> = system.map(|s| Message::new("system", s)).into_iter().collect();
    m.push(Message::new("user", prompt));
    m.extend(answer.map(|a| Message::new("assistant", a)));
    m
}

/// The classic Alpaca prompt (Taori et al., 2023), with and without an input.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// Turns examples into ids and labels for one tokenizer.
pub struct Tokenizing<'a> {
    pub tok: &'a TextTokenizer,
    /// Longer examples are cut to this many tokens.
    pub max_len: usize,
    /// Every token of an Alpaca or chat example is a target, not only the answer's.
    pub train_on_inputs: bool,
}

impl Tokenizing<'_> {
    fn eos(&self) -> Option<i64> {
        self.tok.eos_token.as_deref().and_then(|t| self.tok.token_id(t)).map(i64::from)
    }

    fn enc(&self, text: &str, special: bool) -> Result<Vec<i64>, String> {
        Ok(self.tok.encode(text, special).map_err(|e| e.to_string())?.into_iter().map(i64::from).collect())
    }

    /// Ids and labels of one example; an error says why it cannot be trained on.
    pub fn example(&self, ex: &Example) -> Result<TokenizedExample, String> {
        let mut t = match ex {
            Example::Text { text } => {
                let mut ids = self.enc(text, true)?;
                if let Some(eos) = self.eos() {
                    ids.push(eos);
                }
                TokenizedExample { labels: ids.clone(), ids }
            }
            Example::Alpaca { instruction, input, output } => {
                let prompt = self.enc(&alpaca_prompt(instruction, input), true)?;
                let mut answer = self.enc(output, false)?;
                answer.extend(self.eos());
                let labels = if self.train_on_inputs { prompt.clone() } else { vec![IGNORE; prompt.len()] }.into_iter().chain(answer.iter().copied()).collect();
                TokenizedExample { ids: [prompt, answer].concat(), labels }
            }
            Example::Chat { messages } => self.chat(messages)?,
            Example::Preference { .. } => return Err("a preference pair is for dpo/orpo, not supervised training".into()),
            Example::Unpaired { .. } => return Err("an unpaired (prompt, completion, label) record is for kto, not supervised training".into()),
            Example::Prompt { .. } => return Err("a prompt without an answer is for grpo/ppo ([rl]), not supervised training".into()),
        };
        t.ids.truncate(self.max_len);
        t.labels.truncate(self.max_len);
        if t.n_targets() == 0 {
            return Err(format!("no target tokens within the first {} tokens", self.max_len));
        }
        Ok(t)
    }

    /// Texts that end an assistant turn in templates: the EOS and the stop tokens.
    fn end_markers(&self) -> Vec<String> {
        let mut m: Vec<String> = self.tok.eos_token.iter().cloned().collect();
        for id in &self.tok.stop_ids {
            let t = self.tok.decode(&[*id], false);
            if !t.is_empty() && !m.contains(&t) {
                m.push(t);
            }
        }
        m
    }

    fn chat(&self, messages: &[Message]) -> Result<TokenizedExample, String> {
        let text = self.tok.render_chat(messages, false).map_err(|e| e.to_string())?;
        if self.train_on_inputs {
            let ids = self.enc(&text, false)?;
            return Ok(TokenizedExample { labels: ids.clone(), ids });
        }
        let markers = self.end_markers();
        // Byte spans of the rendered text that are assistant output, end token included.
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut cursor = 0;
        for m in messages {
            if m.role == "user" {
                // User turns are rendered in order: step past each, so an answer that
                // repeats words of its question is found after the question.
                if let Some(i) = text[cursor..].find(m.content.as_str()) {
                    cursor += i + m.content.len();
                }
                continue;
            }
            if m.role != "assistant" {
                continue;
            }
            // Templates that drop earlier reasoning render only the text after </think>.
            let candidates = [m.content.as_str(), m.content.rsplit("</think>").next().unwrap_or("").trim_start()];
            // The first occurrence that the template closes with an end token.
            let found = candidates.iter().filter(|c| !c.is_empty()).find_map(|c| {
                text[cursor..].match_indices(*c).find_map(|(i, _)| {
                    let end = cursor + i + c.len();
                    let rest = &text[end..];
                    let gap = rest.len() - rest.trim_start().len();
                    markers.iter().find(|mk| rest[gap..].starts_with(mk.as_str())).map(|mk| (cursor + i, end + gap + mk.len()))
                })
            });
            let (start, end) = match found {
                Some(span) => span,
                None if candidates.iter().any(|c| !c.is_empty() && text[cursor..].contains(*c)) => {
                    return Err(format!(
                        "the chat template does not end assistant turns with an end token ({}): the model would never learn to stop; name the token the template does end them with (data.eot_token = \"<|im_end|>\"), use a template that ends them (data.chat_template = chatml, llama3, mistral, qwen, gemma or a Jinja file), or train on the whole conversation (data.train_on_inputs = true)",
                        markers.join(", ")
                    ))
                }
                None => return Err("the chat template did not render an assistant message verbatim".to_string()),
            };
            spans.push((start, end));
            cursor = end;
        }
        let enc = self.tok.inner.encode(text.as_str(), false).map_err(|e| e.to_string())?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        let labels = enc
            .get_offsets()
            .iter()
            .zip(&ids)
            .map(|(&(s, e), &id)| {
                // Overlap, not containment: a token may carry the space before the answer.
                let inside = spans.iter().any(|&(a, b)| s < b && e > a);
                if inside { id } else { IGNORE }
            })
            .collect();
        Ok(TokenizedExample { ids, labels })
    }
}
