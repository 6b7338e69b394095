//! Issue 13, item 1: the compiled-component cache runs only what this user's ftx compiled from
//! the plugin it is asked to run.

use super::{both, copy_plugin, logged_loss, train_with};
use crate::plugins::{ftx_in, ok};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The cache file compiled from the component `wasm` (named by the SHA-256 of its bytes).
fn cached(home: &Path, wasm: &Path) -> PathBuf {
    let sha = ftx::util::sha256_hex(&std::fs::read(wasm).unwrap());
    let dir = home.join("cache/components");
    let found: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&sha)).collect();
    assert_eq!(found.len(), 1, "one cache file for {} in {}: {found:?}", wasm.display(), dir.display());
    found[0].clone()
}

#[test]
fn another_plugins_compiled_code_planted_under_a_signed_plugins_cache_name_is_refused_and_the_real_plugin_runs() {
    let _rng = crate::common::torch_rng_lock();
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (h, w) = (home.path(), work.path());
    // A signed dpo, installed from a trusted publisher.
    let dpo = copy_plugin("dpo", w);
    let key = w.join("publisher");
    ok(ftx_in(h, &["plugin", "keygen", key.to_str().unwrap()]));
    ok(ftx_in(h, &["plugin", "sign", dpo.to_str().unwrap(), "--key", key.with_extension("secret").to_str().unwrap()]));
    std::fs::create_dir_all(h.join("trusted-keys")).unwrap();
    std::fs::copy(key.with_extension("pub"), h.join("trusted-keys/publisher.pub")).unwrap();
    assert!(ok(ftx_in(h, &["plugin", "install", dpo.to_str().unwrap()])).contains("signed by a trusted key"));
    // Both plugins compiled into the cache, as earlier runs leave them.
    let orpo = copy_plugin("orpo", w);
    let installed = h.join("plugins/dpo/dpo.wasm");
    let inspect_dpo = || ftx_in(h, &["plugin", "inspect", installed.to_str().unwrap()]);
    ok(inspect_dpo());
    ok(ftx_in(h, &["plugin", "inspect", orpo.to_str().unwrap()]));
    let dpo_cache = cached(h, &dpo);

    // The attack: ORPO's compiled code copied over dpo's cache name.
    std::fs::copy(cached(h, &orpo), &dpo_cache).unwrap();
    let run = train_with(h, &w.join("run"), "dpo", "", 1);
    let out = both(&run);
    assert!(run.status.success(), "{out}");
    // DPO ran: with LoRA the policy is the reference at step 1, so its loss is ln 2 exactly
    // (ORPO's code gives its NLL-based loss instead).
    let first = logged_loss(&w.join("run"), 1);
    assert!((first - std::f64::consts::LN_2).abs() < 1e-5, "first loss {first}, not DPO's ln 2: the planted code ran");
    assert!(out.contains("plugin dpo: refusing its cached compiled code") && out.contains("does not carry this user's tag"), "{out}");
    // The refused file was replaced by dpo's own: the next run loads it without a word.
    let again = inspect_dpo();
    assert!(!both(&again).contains("refusing"), "{}", both(&again));

    // A file ftx did not write at all (random bytes under the name) is refused the same way.
    std::fs::write(&dpo_cache, b"not a compiled component").unwrap();
    let out = both(&inspect_dpo());
    assert!(out.contains("does not carry this user's tag") && out.contains("kind = \"loss\""), "{out}");
}

#[test]
fn a_cache_others_can_write_or_a_cache_file_of_another_user_is_never_loaded() {
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (h, w) = (home.path(), work.path());
    let length = copy_plugin("length", w);
    let inspect = || ftx_in(h, &["plugin", "inspect", length.to_str().unwrap()]);
    ok(inspect());
    let file = cached(h, &length);
    let folder = h.join("cache/components");

    // A folder anyone may write to: the cache is not used at all (the plugin still loads).
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = inspect();
    let out = both(&o);
    assert!(o.status.success() && out.contains("not using the compiled-plugin cache") && out.contains("writable by other users"), "{out}");
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o700)).unwrap();

    // A group-writable cache file: refused, compiled again, and replaced by a private one.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
    let out = both(&ok_output(inspect()));
    assert!(out.contains("refusing its cached compiled code") && out.contains("writable by other users"), "{out}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o022, 0);

    // A cache file that belongs to another user (these tests may run as root, who can make one).
    let me = std::fs::metadata(h).unwrap().uid();
    if std::os::unix::fs::chown(&file, Some(me + 4242), None).is_ok() {
        let out = both(&ok_output(inspect()));
        assert!(out.contains("refusing its cached compiled code") && out.contains("belongs to another user"), "{out}");
        assert_eq!(std::fs::metadata(&file).unwrap().uid(), me, "replaced by this user's own file");
    }

    // A cache key others can read is no secret: the cache is not used.
    let key = h.join("cache-key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "the cache key is private");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = both(&ok_output(inspect()));
    assert!(out.contains("not using the compiled-plugin cache") && out.contains("readable by other users"), "{out}");
}

/// The output of a command that must succeed.
fn ok_output(o: std::process::Output) -> std::process::Output {
    assert!(o.status.success(), "{}", both(&o));
    o
}
