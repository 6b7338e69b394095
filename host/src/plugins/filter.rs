//! Data-filter plugins: keep, drop or rewrite records, in batches. A record whose call
//! traps is isolated (the batch is retried one record at a time) and comes back as an error
//! naming the plugin and the record, for the rejects file; the other records are unharmed.
//! A call that runs out of time is not retried: a plugin that hangs would otherwise cost its
//! time limit once per record. Sandboxed WebAssembly components and trusted native libraries
//! behave the same.

use super::native::{is_native, NativePlugin};
use super::sandbox::{self, Sandboxed};
use super::{engine, permissions, Limits, PluginError, PluginKind};
use std::path::Path;

mod bindings {
    wasmtime::component::bindgen!({ world: "data-filter", path: "../wit" });
}
use bindings::exports::ftx::plugin::filter::{Item, Verdict as WitVerdict};
use bindings::{DataFilter, DataFilterPre};

/// What a filter decided about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Drop(String),
    Rewrite(String),
}

/// A loaded data-filter plugin.
pub struct FilterPlugin {
    pub name: String,
    pub limits: Limits,
    backend: Backend,
    /// Whether the user was told that a failed batch is retried record by record (said once).
    told_retry: bool,
}

enum Backend {
    Wasm(Sandboxed<DataFilter>),
    Native(NativePlugin),
}

impl FilterPlugin {
    /// Loads a WebAssembly component (`.wasm`) or a native library (`.so`), with no capabilities.
    pub fn load(path: &Path, limits: Limits) -> Result<FilterPlugin, PluginError> {
        Self::load_granted(path, limits, &[])
    }

    /// [`FilterPlugin::load`] with the user's `grants` (see `permissions`).
    pub fn load_granted(path: &Path, limits: Limits, grants: &[String]) -> Result<FilterPlugin, PluginError> {
        if is_native(path) {
            let native = NativePlugin::load_kind(path, PluginKind::DataFilter, &limits)?;
            return Ok(FilterPlugin { name: native.name.clone(), limits, backend: Backend::Native(native), told_retry: false });
        }
        let (name, component) = engine::compile_kind(path, PluginKind::DataFilter)?;
        let granted = permissions::for_component(&name, path, grants)?;
        let pre = DataFilterPre::new(sandbox::pre(&sandbox::linker(), &component, &name)?)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let sandboxed = Sandboxed::new(name.clone(), limits, granted, tch::Device::Cpu, false, move |s| pre.instantiate(s))?;
        Ok(FilterPlugin { name, limits, backend: Backend::Wasm(sandboxed), told_retry: false })
    }

    /// The plugin's calls and time so far in this run, against its run budget.
    pub fn time(&self) -> super::budget::PluginTime {
        match &self.backend {
            Backend::Wasm(w) => w.clock.usage(&self.name),
            Backend::Native(n) => n.clock.usage(&self.name),
        }
    }

    fn call(&mut self, items: &[Item], call: &str) -> Result<Vec<Verdict>, PluginError> {
        let result = match &mut self.backend {
            Backend::Native(n) => {
                let req: Vec<ftx_plugin_api::filter::Item> =
                    items.iter().map(|i| ftx_plugin_api::filter::Item { id: i.id, json: i.json.clone() }).collect();
                n.filter(&req, call).map(|vs| {
                    vs.into_iter()
                        .map(|v| match v {
                            ftx_plugin_api::filter::Verdict::Keep => Verdict::Keep,
                            ftx_plugin_api::filter::Verdict::Drop(r) => Verdict::Drop(r),
                            ftx_plugin_api::filter::Verdict::Rewrite(j) => Verdict::Rewrite(j),
                        })
                        .collect::<Vec<_>>()
                })?
            }
            Backend::Wasm(w) => w
                .call(call, |i, s| i.ftx_plugin_filter().call_filter(s, items))?
                .into_iter()
                .map(|v| match v {
                    WitVerdict::Keep => Verdict::Keep,
                    WitVerdict::Drop(r) => Verdict::Drop(r),
                    WitVerdict::Rewrite(j) => Verdict::Rewrite(j),
                })
                .collect(),
        };
        if result.len() != items.len() {
            return Err(PluginError::Invalid {
                plugin: self.name.clone(),
                call: call.into(),
                problem: format!("returned {} verdicts for {} records", result.len(), items.len()),
            });
        }
        Ok(result)
    }

    fn convert(&self, v: Verdict, id: u64) -> Result<Verdict, PluginError> {
        let too_big = |s: &String| s.len() > self.limits.max_output_bytes;
        match v {
            Verdict::Keep => Ok(Verdict::Keep),
            // A reason is shown to people (the rejects file, logs): escaped and cut to size.
            Verdict::Drop(r) => Ok(Verdict::Drop(super::untrusted::plugin_text(&r))),
            Verdict::Rewrite(j) if !too_big(&j) => match serde_json::from_str::<serde_json::Value>(&j) {
                Ok(_) => Ok(Verdict::Rewrite(j)),
                Err(e) => Err(PluginError::Invalid { plugin: self.name.clone(), call: format!("filter(record {id})"), problem: format!("rewrote the record into invalid JSON: {e}") }),
            },
            _ => Err(PluginError::Invalid {
                plugin: self.name.clone(),
                call: format!("filter(record {id})"),
                problem: format!("output larger than the {} byte limit", self.limits.max_output_bytes),
            }),
        }
    }

    /// A verdict (or the error that stands for one) per `(id, json)` record, in order.
    pub fn filter(&mut self, records: &[(u64, String)]) -> Vec<Result<Verdict, PluginError>> {
        let items: Vec<Item> = records.iter().map(|(id, json)| Item { id: *id, json: json.clone() }).collect();
        let batch_call = match records {
            [one] => format!("filter(record {})", one.0),
            _ => format!("filter(records {}..={})", records.first().map_or(0, |r| r.0), records.last().map_or(0, |r| r.0)),
        };
        match self.call(&items, &batch_call) {
            Ok(vs) => vs.into_iter().zip(records).map(|(v, r)| self.convert(v, r.0)).collect(),
            Err(PluginError::Load { plugin, problem }) => {
                records.iter().map(|_| Err(PluginError::Load { plugin: plugin.clone(), problem: problem.clone() })).collect()
            }
            // Out of time: every record of the batch gets the error, none is retried.
            Err(e) if out_of_time(&e) => records.iter().map(|_| Err(e.clone())).collect(),
            Err(e) if items.len() > 1 => {
                if !std::mem::replace(&mut self.told_retry, true) {
                    tracing::warn!("{e}; retrying that batch one record at a time, and any later batch of this plugin that fails (said once)");
                }
                self.retry_one_by_one(&items)
            }
            Err(e) => vec![Err(e)],
        }
    }

    /// Verdicts for `items` from one call per record, so a failure stays with its record.
    /// Stops at the first record that runs out of time: the rest get that error, untried.
    fn retry_one_by_one(&mut self, items: &[Item]) -> Vec<Result<Verdict, PluginError>> {
        let mut stopped: Option<PluginError> = None;
        items
            .iter()
            .map(|item| {
                if let Some(e) = &stopped {
                    return Err(e.clone());
                }
                let v = self.call(std::slice::from_ref(item), &format!("filter(record {})", item.id)).inspect_err(|e| {
                    if out_of_time(e) {
                        stopped = Some(e.clone());
                    }
                })?;
                self.convert(v.into_iter().next().expect("one verdict"), item.id)
            })
            .collect()
    }
}

/// A call stopped by its time limit or by the plugin's run budget.
fn out_of_time(e: &PluginError) -> bool {
    matches!(e, PluginError::Timeout { .. } | PluginError::Budget { .. })
}
