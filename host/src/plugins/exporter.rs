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

use super::native::{is_native, NativeCtx, NativePlugin};
use super::sandbox::{self, Sandboxed, State};
use super::{engine, permissions, Limits, PluginError, PluginKind};
use crate::model::CausalLm;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};
use tch::{Kind, Tensor};

mod bindings {
    wasmtime::component::bindgen!({ world: "exporter-fn", path: "../wit" });
}
use bindings::exports::ftx::plugin::exporter::{Dtype, ModelInfo, TensorInfo};
use bindings::{ExporterFn, ExporterFnPre};

// Tensor bytes are handed out as they lie in memory, which the interface defines as little-endian.
const _: () = assert!(cfg!(target_endian = "little"), "exporters read tensors as little-endian bytes");

/// Largest chunk one `read` returns.
pub const MAX_READ: u64 = 16 << 20;
/// Files a plugin may have open at once.
const MAX_OPEN: usize = 64;
/// Files one export may create.
const MAX_FILES: usize = 100_000;
/// Folders one export may create.
pub const MAX_FOLDERS: usize = 10_000;
/// Components of one path, the file's name included.
pub const MAX_DEPTH: usize = 16;
/// Bytes of one path component (the temporary name adds about 30 to the file's).
pub const MAX_NAME: usize = 200;
/// Bytes of one path.
pub const MAX_PATH: usize = 1024;
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

/// One export call's model and output folder.
pub struct ExportCtx {
    tensors: Vec<(String, Tensor)>,
    /// The tensor read last, as flat CPU bytes: reads stream through one tensor at a time.
    cached: Option<(usize, Tensor)>,
    pub(super) sink: Sink,
}

impl ExportCtx {
    /// `len` bytes of tensor `name` from byte `offset` (at most [`MAX_READ`]).
    pub(super) fn read(&mut self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        if len > MAX_READ {
            return Err(format!("read at most {MAX_READ} bytes at a time (asked for {len})"));
        }
        let i = self.tensors.iter().position(|(n, _)| n == name).ok_or_else(|| format!("no tensor called {name:?}"))?;
        if self.cached.as_ref().map(|c| c.0) != Some(i) {
            let t = self.tensors[i].1.detach().to_device(tch::Device::Cpu).contiguous().reshape([-1]);
            let bytes = t.f_view_dtype(Kind::Uint8).map_err(|e| format!("{name}: {e}"))?;
            self.cached = Some((i, bytes));
        }
        let bytes = &self.cached.as_ref().expect("cached above").1;
        let total = bytes.size()[0] as u64;
        if offset > total {
            return Err(format!("{name}: offset {offset} is past its end ({total} bytes)"));
        }
        let n = len.min(total - offset);
        Vec::<u8>::try_from(&bytes.narrow(0, offset as i64, n as i64)).map_err(|e| format!("{name}: {e}"))
    }
}

/// A file being written: its temporary path and where it goes on `finish`.
struct OpenFile {
    writer: BufWriter<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

/// The output folder of one export, as the plugin may use it.
pub(super) struct Sink {
    root: PathBuf,
    cap: u64,
    written: u64,
    created: usize,
    next: u32,
    open: HashMap<u32, OpenFile>,
    finished: Vec<PathBuf>,
    /// Folders this export made, in the order it made them.
    folders: Vec<PathBuf>,
    /// Set when the export succeeded; until then, dropping the sink removes what it made.
    committed: bool,
}

impl Sink {
    fn new(root: PathBuf, cap: u64) -> Sink {
        Sink { root, cap, written: 0, created: 0, next: 1, open: HashMap::new(), finished: Vec::new(), folders: Vec::new(), committed: false }
    }

    /// Where `rel` goes inside the root, and the folders on the way that do not exist yet;
    /// touches nothing. Only plain relative components, none of them a symbolic link, within
    /// the caps on depth, name and path length and on the folders of the export.
    fn plan(&self, rel: &str) -> Result<(PathBuf, Vec<PathBuf>), String> {
        let shown: String = rel.chars().take(120).collect::<String>() + if rel.chars().count() > 120 { "…" } else { "" };
        let refuse = |why: String| Err(format!("{shown:?}: {why}"));
        if rel.is_empty() || rel.contains(['\0', '\\']) || rel.ends_with('/') {
            return refuse("not a file path".into());
        }
        if rel.len() > MAX_PATH {
            return refuse(format!("a path is at most {MAX_PATH} bytes (this one has {})", rel.len()));
        }
        let mut parts = Vec::new();
        for part in Path::new(rel).components() {
            match part {
                Component::Normal(p) if p.len() > MAX_NAME => return refuse(format!("a file or folder name is at most {MAX_NAME} bytes (one here has {})", p.len())),
                Component::Normal(p) => parts.push(p),
                _ => return refuse("only relative paths inside the output folder are allowed (no absolute paths, '.' or '..')".into()),
            }
        }
        if parts.len() > MAX_DEPTH {
            return refuse(format!("a path is at most {MAX_DEPTH} levels deep (this one has {})", parts.len()));
        }
        let (mut dest, mut missing) = (self.root.clone(), Vec::new());
        for (i, part) in parts.iter().enumerate() {
            dest.push(part);
            let last = i + 1 == parts.len();
            if !missing.is_empty() {
                // Below a folder that does not exist, nothing does.
                if !last {
                    missing.push(dest.clone());
                }
                continue;
            }
            match std::fs::symlink_metadata(&dest) {
                Ok(m) if m.file_type().is_symlink() => return refuse("goes through a symbolic link".into()),
                Ok(m) if !last && !m.is_dir() => return refuse("a folder on the way is a file".into()),
                Ok(m) if last && m.is_dir() => return refuse("is a folder".into()),
                Ok(_) => {}
                Err(_) if !last => missing.push(dest.clone()),
                Err(_) => {}
            }
        }
        if self.folders.len() + missing.len() > MAX_FOLDERS {
            return refuse(format!("at most {MAX_FOLDERS} folders per export ({} made so far; this path needs {} more)", self.folders.len(), missing.len()));
        }
        Ok((dest, missing))
    }

    /// Opens `rel` (checked whole by `plan` first) under a temporary name; returns its handle.
    /// A create that fails leaves nothing behind.
    pub(super) fn create(&mut self, rel: &str) -> Result<u32, String> {
        if self.open.len() >= MAX_OPEN {
            return Err(format!("at most {MAX_OPEN} files may be open at once"));
        }
        if self.created >= MAX_FILES {
            return Err(format!("at most {MAX_FILES} files per export"));
        }
        let (dest, missing) = self.plan(rel)?;
        if self.open.values().any(|f| f.dest == dest) {
            return Err(format!("{rel:?} is already open"));
        }
        let handle = self.next;
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let tmp = dest.with_file_name(format!(".{name}.{}-{handle}.part", std::process::id()));
        let mut made = Vec::new();
        let opened = missing
            .iter()
            .try_for_each(|dir| std::fs::create_dir(dir).map(|()| made.push(dir.clone())))
            // create_new: never follows or reuses whatever is already at the temporary path.
            .and_then(|()| File::options().write(true).create_new(true).open(&tmp));
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                made.iter().rev().for_each(|d| drop(std::fs::remove_dir(d)));
                return Err(format!("{rel:?}: {e}"));
            }
        };
        self.folders.extend(made);
        self.next += 1;
        self.created += 1;
        self.open.insert(handle, OpenFile { writer: BufWriter::new(file), tmp, dest });
        Ok(handle)
    }

    /// Marks the export a success and returns the files it finished.
    fn commit(&mut self) -> Vec<PathBuf> {
        self.committed = true;
        std::mem::take(&mut self.finished)
    }

    /// Appends to an open file, within the export's byte cap.
    pub(super) fn write(&mut self, handle: u32, bytes: &[u8]) -> Result<(), String> {
        let f = self.open.get_mut(&handle).ok_or_else(|| format!("no open file with handle {handle}"))?;
        if self.written + bytes.len() as u64 > self.cap {
            return Err(format!("the export's output is capped at {} bytes ({} written)", self.cap, self.written));
        }
        f.writer.write_all(bytes).map_err(|e| format!("{}: {e}", f.dest.display()))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Closes a file and renames it into place.
    pub(super) fn finish(&mut self, handle: u32) -> Result<(), String> {
        let f = self.open.remove(&handle).ok_or_else(|| format!("no open file with handle {handle}"))?;
        let publish = || -> std::io::Result<()> {
            f.writer.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            // The destination must still be no link or folder when it is replaced.
            if std::fs::symlink_metadata(&f.dest).is_ok_and(|m| m.file_type().is_symlink() || m.is_dir()) {
                return Err(std::io::Error::other("became a symbolic link or folder"));
            }
            std::fs::rename(&f.tmp, &f.dest)
        };
        match publish() {
            Ok(()) => {
                self.finished.push(f.dest);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&f.tmp);
                Err(format!("{}: {e}", f.dest.display()))
            }
        }
    }
}

impl Drop for Sink {
    /// Files the plugin never finished leave nothing behind; nor does an export that failed.
    fn drop(&mut self) {
        for (_, f) in self.open.drain() {
            drop(f.writer);
            let _ = std::fs::remove_file(&f.tmp);
        }
        if !self.committed {
            for f in self.finished.drain(..).rev() {
                let _ = std::fs::remove_file(f);
            }
            // Deepest first; a folder something else has put a file into stays.
            for d in self.folders.drain(..).rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
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

    /// [`ExporterPlugin::load`] with the user's `grants` (see `permissions`).
    pub fn load_granted(path: &Path, limits: Limits, grants: &[String]) -> Result<ExporterPlugin, PluginError> {
        if is_native(path) {
            let native = NativePlugin::load_kind(path, PluginKind::Exporter, &limits)?;
            let ctx = NativeCtx::new(tch::Device::Cpu);
            return Ok(ExporterPlugin { name: native.name.clone(), limits, max_bytes: None, backend: Backend::Native(native, ctx) });
        }
        let (name, component) = engine::compile_kind(path, PluginKind::Exporter)?;
        let granted = permissions::for_component(&name, path, grants)?;
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
        let ctx = ExportCtx { tensors, cached: None, sink: Sink::new(root, cap) };
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
