//! Keeps records whose JSON text is between 16 and 16384 characters; drops the others with
//! the reason stated.

use ftx_plugin_api::filter::{export_filter, Filter, Item, Verdict};

const MIN: usize = 16;
const MAX: usize = 16_384;

struct Length;

impl Filter for Length {
    fn filter(items: Vec<Item>) -> Vec<Verdict> {
        items
            .iter()
            .map(|i| match i.json.chars().count() {
                n if n < MIN => Verdict::Drop(format!("shorter than {MIN} characters ({n})")),
                n if n > MAX => Verdict::Drop(format!("longer than {MAX} characters ({n})")),
                _ => Verdict::Keep,
            })
            .collect()
    }
}

export_filter!(Length);
