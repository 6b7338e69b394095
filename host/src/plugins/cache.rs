//! The disk cache of compiled components (`$FTX_HOME/cache/components/<key>.cwasm`).
//!
//! A compiled component is native code that wasmtime loads without checking it, so a file
//! planted under a plugin's cache name would run instead of the plugin. Every file ftx writes
//! there therefore carries an HMAC-SHA256 tag, under a secret key only this user can read
//! (`$FTX_HOME/cache-key`, mode 0600), over the cache name (the SHA-256 of the `.wasm` and the
//! engine's compatibility hash) and the compiled bytes. A file is loaded only when its tag is
//! right, so a file written by anyone without the key, or ftx's own file for another plugin
//! copied over this one's name, is refused. The key file and the folders on the way to the
//! cache must belong to this user and be writable by no one else; otherwise the cache is not
//! used at all. On any refusal ftx warns, compiles the plugin from its `.wasm`, and (when the
//! cache is usable) replaces the file atomically.
//!
//! The key guards against other users and against files copied or restored from elsewhere; a
//! process running as the same user can read the key, as it can rewrite ftx itself.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::Engine;

/// First bytes of a cache file: the format, then the 32-byte tag, then wasmtime's bytes.
const MAGIC: &[u8; 8] = b"ftxcwa1\0";
const TAG_LEN: usize = 32;
const KEY_LEN: usize = 32;
/// The key's file name in `$FTX_HOME`.
pub const KEY_FILE: &str = "cache-key";

/// Why the cache, or one file in it, cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum CacheRefusal {
    #[error("{0} belongs to another user (uid {1})")]
    Owner(PathBuf, u32),
    #[error("{0} is writable by other users (mode {1:o}; run `chmod go-w {0}`)")]
    Writable(PathBuf, u32),
    #[error("the cache key {0} is readable by other users (mode {1:o}; run `chmod 600 {0}`)")]
    KeyReadable(PathBuf, u32),
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("the cache key {0} is not {KEY_LEN} bytes")]
    KeyLength(PathBuf),
    #[error("{0} does not carry this user's tag for this plugin (planted, tampered with, or copied from another plugin's entry)")]
    BadTag(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// The cache under `home` (`$FTX_HOME`), checked for ownership and permissions.
pub struct ComponentCache {
    dir: PathBuf,
    key: [u8; KEY_LEN],
}

impl ComponentCache {
    /// Opens (creating with private permissions where missing) the cache and its key under
    /// `home`; refuses a home, cache folder or key that another user could write or read.
    pub fn open(home: &Path) -> Result<ComponentCache, CacheRefusal> {
        let dir = home.join("cache").join("components");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| CacheRefusal::Io(dir.clone(), e))?;
        for folder in [home, &home.join("cache"), &dir] {
            check_owned_not_writable(folder)?;
        }
        let key = read_or_create_key(&home.join(KEY_FILE))?;
        Ok(ComponentCache { dir, key })
    }

    /// Where the component cached as `name` lives.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.cwasm"))
    }

    fn tag(&self, name: &str, compiled: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(compiled);
        mac
    }

    /// The component cached as `name`, if a file is there; an error when one is there but
    /// cannot be trusted or loaded.
    pub fn load(&self, engine: &Engine, name: &str) -> Result<Option<Component>, CacheRefusal> {
        let path = self.path(name);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheRefusal::Io(path, e)),
        };
        if !meta.file_type().is_file() {
            return Err(CacheRefusal::NotAFile(path));
        }
        check_owned_not_writable(&path)?;
        let bytes = std::fs::read(&path).map_err(|e| CacheRefusal::Io(path.clone(), e))?;
        let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()).filter(|r| r.len() > TAG_LEN) else {
            return Err(CacheRefusal::BadTag(path));
        };
        let (tag, compiled) = rest.split_at(TAG_LEN);
        self.tag(name, compiled).verify_slice(tag).map_err(|_| CacheRefusal::BadTag(path.clone()))?;
        // SAFETY: `compiled` is the very buffer whose tag was checked: bytes this user's ftx
        // serialised from the `.wasm` and engine that `name` hashes (nothing can swap them
        // between the check and the load, as the file is read once).
        match unsafe { Component::deserialize(engine, compiled) } {
            Ok(c) => Ok(Some(c)),
            Err(e) => Err(CacheRefusal::Io(path, std::io::Error::other(format!("{e:#}")))),
        }
    }

    /// Caches `component` as `name`, tagged, replacing any file there atomically.
    pub fn store(&self, name: &str, component: &Component) -> Result<(), CacheRefusal> {
        let path = self.path(name);
        let compiled = component.serialize().map_err(|e| CacheRefusal::Io(path.clone(), std::io::Error::other(format!("{e:#}"))))?;
        let tag = self.tag(name, &compiled).finalize().into_bytes();
        let mut file = Vec::with_capacity(MAGIC.len() + TAG_LEN + compiled.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&tag);
        file.extend_from_slice(&compiled);
        crate::util::write_atomic_private(&path, &file).map_err(|e| CacheRefusal::Io(path, e))
    }
}

/// This process's effective user.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Refuses `path` unless it belongs to this user and neither its group nor others may write it.
fn check_owned_not_writable(path: &Path) -> Result<(), CacheRefusal> {
    let meta = std::fs::metadata(path).map_err(|e| CacheRefusal::Io(path.to_owned(), e))?;
    if meta.uid() != euid() {
        return Err(CacheRefusal::Owner(path.to_owned(), meta.uid()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(CacheRefusal::Writable(path.to_owned(), mode));
    }
    Ok(())
}

/// The user's cache key at `path`, created on first use: 32 random bytes in a file of mode 0600
/// that appears whole (written beside, then linked into place, so two processes starting at
/// once agree on one key).
fn read_or_create_key(path: &Path) -> Result<[u8; KEY_LEN], CacheRefusal> {
    let io = |e: std::io::Error| CacheRefusal::Io(path.to_owned(), e);
    if std::fs::symlink_metadata(path).is_err() {
        let mut key = [0u8; KEY_LEN];
        rand::Rng::fill(&mut rand::rng(), &mut key);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
        f.write_all(&key).and_then(|_| f.sync_all()).map_err(io)?;
        drop(f);
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => return Ok(key),
            // Another process made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
    }
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(CacheRefusal::NotAFile(path.to_owned()));
    }
    if meta.uid() != euid() {
        return Err(CacheRefusal::Owner(path.to_owned(), meta.uid()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CacheRefusal::KeyReadable(path.to_owned(), mode));
    }
    std::fs::read(path).map_err(io)?.try_into().map_err(|_| CacheRefusal::KeyLength(path.to_owned()))
}
