//! A record as it moves through `ftx prep`: where it came from, and either the example it
//! holds or why it was rejected. Also the text views the stages read and rewrite.

use crate::data::Example;
use serde_json::Value;

/// Where a record came from: an input file (an index into the run's source list) and the
/// line of a JSONL, CSV or text file, the element number of a JSON array, the row number
/// of a Parquet file, or the record number of a WARC archive (all counted from 1; an HTML
/// file is one record, line 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub source: u32,
    pub line: u64,
}

/// The pipeline stages, in the names the report and the rejects use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Ingest,
    Filter,
    Pii,
    Dedup,
    /// Data-filter plugins (WebAssembly or native).
    Plugin,
    /// Synthetic augmentation through a teacher model.
    Augment,
    Format,
}

impl Stage {
    /// The stage's name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Ingest => "ingest",
            Stage::Filter => "filter",
            Stage::Pii => "pii",
            Stage::Dedup => "dedup",
            Stage::Plugin => "plugin",
            Stage::Augment => "augment",
            Stage::Format => "format",
        }
    }

    /// The stage of a name [`Stage::name`] gives.
    pub fn from_name(name: &str) -> Option<Stage> {
        [Stage::Ingest, Stage::Filter, Stage::Pii, Stage::Dedup, Stage::Plugin, Stage::Augment, Stage::Format].into_iter().find(|s| s.name() == name)
    }
}

/// Why a record left the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub stage: Stage,
    /// A short category, counted in the report (`refusal`, `near_duplicate`, …).
    pub reason: &'static str,
    /// The particulars (which phrase, which language, how similar, …).
    pub detail: String,
    /// For duplicates: the record kept in its place.
    pub duplicate_of: Option<Origin>,
}

impl Reject {
    /// A rejection without a duplicate.
    pub fn new(stage: Stage, reason: &'static str, detail: impl Into<String>) -> Reject {
        Reject { stage, reason, detail: detail.into(), duplicate_of: None }
    }
}

/// What a record holds before ingest parses it.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A JSONL line, not parsed yet (parsing runs on the worker threads).
    JsonLine(Vec<u8>),
    /// A JSON value (an array element, a CSV or Parquet row made into an object).
    Json(Value),
    /// Raw text (a line or a whole plain-text file).
    Text(String),
    /// A web page, not decoded yet (decoding and main-text extraction run on the worker
    /// threads): its bytes, the URL it was fetched from and the charset its HTTP header named.
    Html { bytes: Vec<u8>, url: Option<String>, charset: Option<String> },
    /// An input record that holds no training text by design (a WARC request or metadata
    /// record, a response that is an image): rejected at ingest with this reason.
    Skipped { reason: &'static str, detail: String },
    /// The reader could not make a record of it.
    Broken(String),
}

/// The state of one record.
#[derive(Debug, Clone)]
pub enum State {
    Raw(Payload),
    Alive(Example),
    Rejected { reject: Reject, record: Option<Value> },
}

/// One record in flight.
#[derive(Debug, Clone)]
pub struct Item {
    pub origin: Origin,
    pub state: State,
    /// Made by a stage from another record of the same origin (augmentation's second and
    /// later pairs): not a record read from the input.
    pub derived: bool,
    /// For a record extracted from a web page: its URL and title (written beside the text).
    pub meta: Option<Box<super::extract::PageMeta>>,
}

impl Item {
    /// The example, if the record is still in the pipeline.
    pub fn alive(&mut self) -> Option<&mut Example> {
        match &mut self.state {
            State::Alive(e) => Some(e),
            _ => None,
        }
    }

    /// Moves the record to the rejects, keeping what it held.
    pub fn reject(&mut self, reject: Reject) {
        let record = match std::mem::replace(&mut self.state, State::Raw(Payload::Broken(String::new()))) {
            State::Alive(e) => serde_json::to_value(&e).ok(),
            State::Raw(Payload::Json(v)) => Some(v),
            State::Raw(Payload::Text(t)) => Some(Value::String(t)),
            State::Raw(Payload::JsonLine(b)) => Some(Value::String(String::from_utf8_lossy(&b).into_owned())),
            State::Raw(Payload::Html { url, .. }) => Some(serde_json::json!({ "url": url })),
            State::Raw(Payload::Broken(_) | Payload::Skipped { .. }) => None,
            State::Rejected { record, .. } => record,
        };
        self.state = State::Rejected { reject, record };
    }
}

/// Every text field of an example, in a fixed order.
pub fn texts(e: &Example) -> Vec<&str> {
    match e {
        Example::Text { text } => vec![text],
        Example::Alpaca { instruction, input, output } => vec![instruction, input, output],
        Example::Chat { messages } => messages.iter().map(|m| m.content.as_str()).collect(),
        Example::Preference { prompt, chosen, rejected } => vec![prompt, chosen, rejected],
        Example::Unpaired { prompt, completion, .. } => vec![prompt, completion],
        Example::Prompt { prompt, reference } => std::iter::once(prompt).chain(reference.as_ref()).map(String::as_str).collect(),
    }
}

/// Every text field of an example, to rewrite in place.
pub fn texts_mut(e: &mut Example) -> Vec<&mut String> {
    match e {
        Example::Text { text } => vec![text],
        Example::Alpaca { instruction, input, output } => vec![instruction, input, output],
        Example::Chat { messages } => messages.iter_mut().map(|m| &mut m.content).collect(),
        Example::Preference { prompt, chosen, rejected } => vec![prompt, chosen, rejected],
        Example::Unpaired { prompt, completion, .. } => vec![prompt, completion],
        // The reference may be a pattern for a reward plugin: it is not prose to rewrite.
        Example::Prompt { prompt, .. } => vec![prompt],
    }
}

/// The answers a model would learn to give: Alpaca `output`, assistant turns, the chosen
/// answer of a pair. Raw text has none.
pub fn answers(e: &Example) -> Vec<&str> {
    match e {
        Example::Text { .. } => vec![],
        Example::Alpaca { output, .. } => vec![output],
        Example::Chat { messages } => messages.iter().filter(|m| m.role == "assistant").map(|m| m.content.as_str()).collect(),
        Example::Preference { chosen, .. } => vec![chosen],
        Example::Unpaired { completion, label: true, .. } => vec![completion],
        Example::Unpaired { .. } | Example::Prompt { .. } => vec![],
    }
}

/// All text of an example joined by newlines (roles included for conversations, so that the
/// same words said by different speakers are different records).
pub fn joined(e: &Example) -> String {
    match e {
        Example::Chat { messages } => {
            messages.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n")
        }
        _ => texts(e).join("\n"),
    }
}
