//! Exporter plugins: write a model in a format of their own. The host lends, for one `export`
//! call, a reader of the model's tensors (little-endian bytes, in chunks, so a model larger than
//! the plugin's memory streams through) and an output sink confined to one folder: relative
//! paths only, no `..`, no writing through symbolic links, each file written under a temporary
//! name and renamed into place when the plugin finishes it, and caps on the files, folders, path
//! depth and bytes of one export. A `create` is checked whole before anything is made, and an
//! export that fails leaves nothing it made behind. The time the host spends reading and
//! writing for the plugin counts against its deadline (with an allowance for the model's size).
//! A native exporter (a `cdylib` of the same source) gets the same reader and sink through the
//! `HostApi` callbacks (see `native_host`): it never learns the folder's path either.

use super::export_io::ExportCtx;
use super::native::{is_native, NativeCtx, NativePlugin};
use super::sandbox::{self, Sandboxed, State};
use super::{engine, grant, Limits, PluginError, PluginKind};
use crate::model::CausalLm;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

mod bindings {
    wasmtime::component::bindgen!({ world: "exporter-fn", path: "../wit" });
}
use bindings::exports::ftx::plugin::exporter::{Dtype, ModelInfo, TensorInfo};
use bindings::{ExporterFn, ExporterFnPre};

/// Host read and write throughput an export's deadline allows for: the deadline is the plugin's
/// call limit plus one second per this many bytes of the model.
pub const HOST_BYTES_PER_SECOND: u64 = 64 << 20;

/// The WIT dtype of a tensor kind and its element size, or `None` for kinds exporters do not see.
fn dtype(kind: Kind) -> Option<(Dtype, u64)> {
    Some(match kind {
        Kind::Double => (Dtype::F64, 8),
        Kind::Float => (Dtype::F32, 4),
        Kind::Half => (Dtype::F16, 2),
        Kind::BFloat16 => (Dtype::Bf16, 2),
        Kind::Int64 => (Dtype::I64, 8),
        Kind::Int => (Dtype::I32, 4),
        Kind::Int16 => (Dtype::I16, 2),
        Kind::Int8 => (Dtype::I8, 1),
        Kind::Uint8 => (Dtype::U8, 1),
        Kind::Bool => (Dtype::Bool, 1),
        _ => return None,
    })
}

// The host's reads and writes count against the plugin's deadline like its own compute.
impl bindings::ftx::plugin::tensor_reader::Host for State {
    fn read(&mut self, name: String, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        self.export.as_mut().ok_or("no export is in progress")?.read(&name, offset, len)
    }
}

impl bindings::ftx::plugin::output::Host for State {
    fn create(&mut self, path: String) -> Result<u32, String> {
        self.export.as_mut().ok_or("no export is in progress")?.sink.create(&path)
    }
    fn write(&mut self, handle: u32, bytes: Vec<u8>) -> Result<(), String> {
        self.export.as_mut().ok_or("no export is in progress")?.sink.write(handle, &bytes)
    }
    fn finish(&mut self, handle: u32) -> Result<(), String> {
        self.export.as_mut().ok_or("no export is in progress")?.sink.finish(handle)
    }
}

/// A loaded exporter plugin.
pub struct ExporterPlugin {
    pub name: String,
    /// The time limit of one export counts the plugin's compute and the host's reads and writes
    /// for it, plus an allowance of a second per [`HOST_BYTES_PER_SECOND`] bytes of the model.
    pub limits: Limits,
    /// Bytes one export may write; `None`: twice the model's size plus 64 MiB.
    pub max_bytes: Option<u64>,
    backend: Backend,
}

enum Backend {
    Wasm(Sandboxed<ExporterFn>),
    /// Trusted native code: no time or memory limit; the sink's checks and byte cap still apply.
    Native(NativePlugin, NativeCtx),
}

impl ExporterPlugin {
    /// Loads and instantiates the component at `path`, with no capabilities.
    pub fn load(path: &Path, limits: Limits) -> Result<ExporterPlugin, PluginError> {
        Self::load_granted(path, limits, &[])
    }

    /// [`ExporterPlugin::load`] with the user's `grants` (see `grant`).
    pub fn load_granted(path: &Path, limits: Limits, grants: &[String]) -> Result<ExporterPlugin, PluginError> {
        if is_native(path) {
            let native = NativePlugin::load_kind(path, PluginKind::Exporter, &limits)?;
            let ctx = NativeCtx::new(tch::Device::Cpu);
            return Ok(ExporterPlugin { name: native.name.clone(), limits, max_bytes: None, backend: Backend::Native(native, ctx) });
        }
        let (name, component) = engine::compile_kind(path, PluginKind::Exporter)?;
        let granted = grant::for_component(&name, path, grants)?;
        let mut linker = sandbox::linker();
        ExporterFn::add_to_linker::<State, wasmtime::component::HasSelf<State>>(&mut linker, |s| s)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let pre = ExporterFnPre::new(sandbox::pre(&linker, &component, &name)?)
            .map_err(|e| PluginError::Load { plugin: name.clone(), problem: format!("{e:#}") })?;
        let sandboxed = Sandboxed::new(name.clone(), limits, granted, tch::Device::Cpu, false, move |s| pre.instantiate(s))?;
        Ok(ExporterPlugin { name, limits, max_bytes: None, backend: Backend::Wasm(sandboxed) })
    }

    /// The plugin's calls and time so far in this run, against its run budget.
    pub fn time(&self) -> super::budget::PluginTime {
        match &self.backend {
            Backend::Wasm(w) => w.clock.usage(&self.name),
            Backend::Native(n, _) => n.clock.usage(&self.name),
        }
    }

    /// Exports `model`'s dense tensors and config.json into `out_dir`; returns the files written.
    pub fn export(&mut self, model: &CausalLm, out_dir: &Path) -> Result<Vec<PathBuf>, PluginError> {
        self.export_tensors(&model.config.architecture, &model.config.raw.to_string(), model.named_tensors(), out_dir)
    }

    /// Exports named tensors and a config.json text into `out_dir` (created if needed); returns
    /// the files the plugin finished, in order. On an error, the export leaves nothing it made:
    /// its files, finished or not, its folders, and `out_dir` if it made that.
    pub fn export_tensors(
        &mut self,
        architecture: &str,
        config_json: &str,
        tensors: Vec<(String, Tensor)>,
        out_dir: &Path,
    ) -> Result<Vec<PathBuf>, PluginError> {
        let call = format!("export({} tensors)", tensors.len());
        let invalid = |problem: String| PluginError::Invalid { plugin: self.name.clone(), call: call.clone(), problem };
        let mut infos = Vec::with_capacity(tensors.len());
        let mut model_bytes = 0u64;
        for (name, t) in &tensors {
            let (dtype, size) = dtype(t.kind()).ok_or_else(|| invalid(format!("tensor {name} has kind {:?}, which exporters cannot read", t.kind())))?;
            let shape: Vec<u64> = t.size().iter().map(|&d| d as u64).collect();
            model_bytes += shape.iter().product::<u64>() * size;
            infos.push(TensorInfo { name: name.clone(), shape, dtype });
        }
        // The folders `create_dir_all` is about to make, to remove if the export fails.
        let made_root: Vec<PathBuf> = out_dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).map(Path::to_path_buf).collect();
        let root = std::fs::create_dir_all(out_dir)
            .and_then(|_| out_dir.canonicalize())
            .map_err(|e| invalid(format!("output folder {}: {e}", out_dir.display())))?;
        let cap = self.max_bytes.unwrap_or(2 * model_bytes + (64 << 20));
        let ctx = ExportCtx::new(tensors, root, cap);
        let info = ModelInfo { architecture: architecture.to_owned(), config: config_json.to_owned(), tensors: infos };
        let allowance = std::time::Duration::from_secs_f64(model_bytes as f64 / HOST_BYTES_PER_SECOND as f64);
        // Dropping a context that was not committed deletes what the export made (a trap
        // dropped the store, and the context with it).
        let (result, mut ctx) = match &mut self.backend {
            Backend::Wasm(w) => {
                w.store.data_mut().export = Some(ctx);
                let result = w.call_with_allowance(&call, allowance, |i, s| i.ftx_plugin_exporter().call_export(s, &info));
                (result, w.store.data_mut().export.take())
            }
            Backend::Native(n, native_ctx) => {
                native_ctx.export = Some(ctx);
                let result = n.call_host::<_, ()>(native_ctx, &native_info(&info), &call).map(Ok).or_else(|e| match e {
                    // The plugin's own `Err(message)`, as the WebAssembly path reports it.
                    PluginError::Trap { detail, .. } if !detail.starts_with("panicked") => Ok(Err(detail)),
                    e => Err(e),
                });
                (result, native_ctx.export.take())
            }
        };
        let outcome = match result {
            Ok(Ok(())) => Ok(ctx.as_mut().map(|c| c.sink.commit()).unwrap_or_default()),
            Ok(Err(msg)) => Err(invalid(super::untrusted::plugin_text(&msg))),
            Err(e) => Err(e),
        };
        if outcome.is_err() {
            drop(ctx);
            made_root.iter().for_each(|d| drop(std::fs::remove_dir(d)));
        }
        outcome
    }
}

/// The request a native exporter reads: the same model description as the WIT record.
fn native_info(info: &ModelInfo) -> ftx_plugin_api::exporter::ModelInfo {
    use ftx_plugin_api::exporter::{Dtype as N, TensorInfo as T};
    let dtype = |d: Dtype| match d {
        Dtype::F64 => N::F64,
        Dtype::F32 => N::F32,
        Dtype::F16 => N::F16,
        Dtype::Bf16 => N::Bf16,
        Dtype::I64 => N::I64,
        Dtype::I32 => N::I32,
        Dtype::I16 => N::I16,
        Dtype::I8 => N::I8,
        Dtype::U8 => N::U8,
        Dtype::Bool => N::Bool,
    };
    ftx_plugin_api::exporter::ModelInfo {
        architecture: info.architecture.clone(),
        config: info.config.clone(),
        tensors: info.tensors.iter().map(|t| T { name: t.name.clone(), shape: t.shape.clone(), dtype: dtype(t.dtype) }).collect(),
    }
}
