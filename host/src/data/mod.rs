//! Training data: reading records ([`read`]), turning them into token ids with the loss
//! mask ([`tokenize`]), and collating them into padded or packed batches ([`batch`]).

pub mod batch;
pub mod chat_templates;
pub mod function_calls;
pub mod prep;
pub mod read;
pub mod tokenize;

pub use batch::Batch;
pub use read::{read_examples, DataFormat};
pub use tokenize::{TokenizedExample, Tokenizing};

use crate::model::tokenizer::Message;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One training record, in the shape its format gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Example {
    /// Raw text for continued pretraining: every token is a target.
    Text { text: String },
    /// Alpaca: the loss is on `output` only.
    Alpaca { instruction: String, input: String, output: String },
    /// A conversation: the loss is on assistant turns only.
    Chat { messages: Vec<Message> },
    /// A preference pair for DPO/ORPO: one prompt, a preferred and a dispreferred answer.
    Preference { prompt: String, chosen: String, rejected: String },
    /// A prompt alone, for RL (GRPO/PPO): the policy writes the answer; `reference` (if any)
    /// is handed to reward plugins (e.g. exact-match's expected answer, regex-match's pattern).
    Prompt { prompt: String, reference: Option<String> },
    /// KTO's unpaired format (as TRL's): one answer labelled desirable (`true`) or not.
    Unpaired { prompt: String, completion: String, label: bool },
}

/// Errors reading or preparing data; each names the file and, where there is one, the line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {problem}", path.display())]
    Record { path: PathBuf, line: usize, problem: String },
    #[error("{0}")]
    Other(String),
    /// A `hf://` data reference could not be resolved.
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}
