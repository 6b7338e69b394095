//! A data filter speaking `ftx:plugin@9.0.0`: the host must refuse it by version.

wit_bindgen::generate!({ world: "data-filter", path: "wit" });

struct Future;

impl exports::ftx::plugin::filter::Guest for Future {
    fn filter(items: Vec<exports::ftx::plugin::filter::Item>) -> Vec<exports::ftx::plugin::filter::Verdict> {
        items.iter().map(|_| exports::ftx::plugin::filter::Verdict::Keep).collect()
    }
}

export!(Future);
