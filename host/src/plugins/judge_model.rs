//! The language model the host lends a judge: the callback its `complete` calls go to
//! ([`LlmFn`]) and what one call may still ask of it. Below the plugin kinds, so the sandbox's
//! store and the native context can hold it without reaching up into `judge`.

/// The host's language model as a judge sees it: a prompt (one user turn) and a budget of new
/// tokens in, the reply (or why there is none) out.
pub type LlmFn = Box<dyn FnMut(&str, u32) -> Result<String, String> + Send>;

/// Completions a judge may ask for per sample of a call.
pub const MAX_CALLS_PER_SAMPLE: usize = 4;

/// A judge's model and what it may still ask of it during the current call.
pub struct Llm {
    pub(super) complete: LlmFn,
    pub(super) max_tokens: u32,
    pub(super) max_prompt_bytes: usize,
    pub(super) calls_left: usize,
}

impl Llm {
    /// One completion within the call's budget: max-tokens clamped to the host's maximum, the
    /// prompt's size and the completions per sample bounded.
    pub(super) fn complete(&mut self, prompt: &str, max_tokens: u32) -> Result<String, String> {
        if self.calls_left == 0 {
            return Err(format!("no completions left in this call (at most {MAX_CALLS_PER_SAMPLE} per sample)"));
        }
        if prompt.len() > self.max_prompt_bytes {
            return Err(format!("the prompt is {} bytes; at most {} are accepted", prompt.len(), self.max_prompt_bytes));
        }
        self.calls_left -= 1;
        (self.complete)(prompt, max_tokens.min(self.max_tokens))
    }
}
