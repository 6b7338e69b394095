//! A filter that reads the file each record names (a JSON string) and drops the record with
//! what it found: the file's text, or the error. It works only where the user granted its
//! manifest's `read:` permission.

use ftx_plugin_api::filter::{export_filter, Filter, Item, Verdict};

struct ReadFile;

impl Filter for ReadFile {
    fn filter(items: Vec<Item>) -> Vec<Verdict> {
        items
            .iter()
            .map(|i| match std::fs::read_to_string(i.json.trim_matches('"')) {
                Ok(text) => Verdict::Drop(format!("read: {text}")),
                Err(e) => Verdict::Drop(format!("error: {e}")),
            })
            .collect()
    }
}

export_filter!(ReadFile);
