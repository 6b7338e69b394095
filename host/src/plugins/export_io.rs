//! What an exporter is lent for one `export` call (see `exporter`): a reader of the model's
//! tensors, in chunks of little-endian bytes, and an output sink confined to one folder, with
//! its checks and caps. Below the plugin kinds, so the sandbox's store and the native context
//! can hold an export in progress without reaching up into `exporter`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};
use tch::{Kind, Tensor};

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

/// One export call's model and output folder.
pub struct ExportCtx {
    tensors: Vec<(String, Tensor)>,
    /// The tensor read last, as flat CPU bytes: reads stream through one tensor at a time.
    cached: Option<(usize, Tensor)>,
    pub(super) sink: Sink,
}

impl ExportCtx {
    /// The context of an export of `tensors` into the folder `root` (which exists), writing at
    /// most `cap` bytes.
    pub(super) fn new(tensors: Vec<(String, Tensor)>, root: PathBuf, cap: u64) -> ExportCtx {
        ExportCtx { tensors, cached: None, sink: Sink::new(root, cap) }
    }

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
    pub(super) fn commit(&mut self) -> Vec<PathBuf> {
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
