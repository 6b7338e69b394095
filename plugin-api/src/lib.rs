//! The ftx plugin SDK: a plugin depends on this crate, implements one trait, and exports it
//! with one macro. Built for `wasm32-wasip2`, the crate is a WebAssembly component that
//! `ftx` runs sandboxed.
//!
//! ```ignore
//! use ftx_plugin_api::filter::{export_filter, Filter, Item, Verdict};
//! struct Short;
//! impl Filter for Short {
//!     fn filter(items: Vec<Item>) -> Vec<Verdict> {
//!         items.iter().map(|i| if i.json.len() < 4096 { Verdict::Keep } else { Verdict::Drop("too long".into()) }).collect()
//!     }
//! }
//! export_filter!(Short);
//! ```

/// Version of the `ftx:plugin` WIT package these bindings were generated from.
pub const API_VERSION: &str = "0.1.0";

#[cfg(not(target_arch = "wasm32"))]
pub mod native;

/// Data filters, natively: the same names as the WebAssembly bindings, so one source
/// builds either way (`cargo build` for a native library, `--target wasm32-wasip2` for a
/// component).
#[cfg(not(target_arch = "wasm32"))]
pub mod filter {
    /// One record as the JSON line the data pipeline read; `id` is its position.
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    pub struct Item {
        pub id: u64,
        pub json: String,
    }
    /// What happens to a record.
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    pub enum Verdict {
        Keep,
        Drop(String),
        Rewrite(String),
    }
    /// A data filter.
    pub trait Filter {
        fn filter(items: Vec<Item>) -> Vec<Verdict>;
    }
    pub use crate::export_native_filter as export_filter;
}

/// Reward functions, natively (see [`filter`]).
#[cfg(not(target_arch = "wasm32"))]
pub mod reward {
    /// One sample to score.
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    pub struct Sample {
        pub prompt: String,
        pub completion: String,
        pub reference: Option<String>,
    }
    /// A reward function.
    pub trait Reward {
        fn score(samples: Vec<Sample>) -> Vec<f32>;
    }
    pub use crate::export_native_reward as export_reward;
}

/// Losses, natively (see [`filter`]): tensor handles and ops through the host.
#[cfg(not(target_arch = "wasm32"))]
#[path = "native_loss.rs"]
pub mod loss;

/// Judges, natively (see [`filter`]).
#[cfg(not(target_arch = "wasm32"))]
#[path = "native_judge.rs"]
pub mod judge;

/// Exporters, natively (see [`filter`]): tensor reads and output files through the host.
#[cfg(not(target_arch = "wasm32"))]
#[path = "native_exporter.rs"]
pub mod exporter;

/// Data filters: `filter(items) -> verdicts`.
#[cfg(target_arch = "wasm32")]
pub mod filter {
    wit_bindgen::generate!({
        world: "data-filter",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_filter",
        default_bindings_module: "ftx_plugin_api::filter",
    });
    pub use exports::ftx::plugin::filter::{Guest as Filter, Item, Verdict};
}

/// Reward functions: `score(samples) -> scores`.
#[cfg(target_arch = "wasm32")]
pub mod reward {
    wit_bindgen::generate!({
        world: "reward-fn",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_reward",
        default_bindings_module: "ftx_plugin_api::reward",
    });
    pub use exports::ftx::plugin::reward::{Guest as Reward, Sample};
}

/// Losses built from host tensor ops.
#[cfg(target_arch = "wasm32")]
pub mod loss {
    wit_bindgen::generate!({
        world: "loss-fn",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_loss",
        default_bindings_module: "ftx_plugin_api::loss",
    });
    pub use exports::ftx::plugin::loss::{Guest as Loss, LossOutput, LossSpec, Metric};
    pub use ftx::plugin::tensor_ops::Tensor;
    pub use ftx::plugin::types::ParamSpec;

    /// The input called `name` (one the plugin declared), or an error naming it.
    pub fn input(name: &str) -> Result<Tensor, String> {
        ftx::plugin::tensor_ops::input(name).ok_or_else(|| format!("missing input {name}"))
    }

    /// The parameter called `name` (the host always passes every declared parameter).
    pub fn param(params: &[(String, f64)], name: &str) -> Result<f64, String> {
        params.iter().find(|p| p.0 == name).map(|p| p.1).ok_or_else(|| format!("missing parameter {name}"))
    }

    /// A parameter declaration.
    pub fn param_spec(name: &str, default: f64, doc: &str) -> ParamSpec {
        ParamSpec { name: name.into(), default, doc: doc.into() }
    }
}

/// Judges: `judge(samples) -> judgements`, asking the host's language model through [`judge::complete`].
#[cfg(target_arch = "wasm32")]
pub mod judge {
    wit_bindgen::generate!({
        world: "judge-fn",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_judge",
        default_bindings_module: "ftx_plugin_api::judge",
    });
    pub use exports::ftx::plugin::judge::{Guest as Judge, Judgement, Sample};
    pub use ftx::plugin::llm::complete;
}

/// Exporters: `export(model-info)`, reading tensors with [`exporter::read`] and writing files
/// in the output folder with [`exporter::create`], [`exporter::write`] and [`exporter::finish`].
#[cfg(target_arch = "wasm32")]
pub mod exporter {
    wit_bindgen::generate!({
        world: "exporter-fn",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "export_exporter",
        default_bindings_module: "ftx_plugin_api::exporter",
    });
    pub use exports::ftx::plugin::exporter::{Dtype, Guest as Exporter, ModelInfo, TensorInfo};
    pub use ftx::plugin::output::{create, finish, write};
    pub use ftx::plugin::tensor_reader::read;

    impl Dtype {
        /// Bytes per element.
        pub fn size(self) -> u64 {
            match self {
                Dtype::F64 | Dtype::I64 => 8,
                Dtype::F32 | Dtype::I32 => 4,
                Dtype::F16 | Dtype::Bf16 | Dtype::I16 => 2,
                Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
            }
        }
    }

    impl TensorInfo {
        /// Size of the tensor's data in bytes.
        pub fn bytes(&self) -> u64 {
            self.shape.iter().product::<u64>() * self.dtype.size()
        }
    }
}
