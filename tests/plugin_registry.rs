//! Registry, single-file installs, permission grants and native builds of every kind
//! (filters, rewards, losses, judges and exporters).

use crate::plugins::{fails, ftx_in, native, ok, wasm};
use ftx::plugins::filter::{FilterPlugin, Verdict};
use ftx::plugins::judge::{JudgePlugin, JudgeSample, LlmFn};
use ftx::plugins::loss::LossPlugin;
use ftx::plugins::Limits;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tch::{Device, Tensor};

/// A static file server for `root` on a loopback port; returns its base URL. Serves GET of
/// files (200) and answers 404 for anything else; one request per connection.
fn serve(root: PathBuf) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // Skip the headers.
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_owned();
            let file = root.join(&path);
            let mut conn = conn;
            let _ = match std::fs::read(&file) {
                Ok(body) if !path.contains("..") => {
                    write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).and_then(|_| conn.write_all(&body))
                }
                _ => write!(conn, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
            };
        }
    });
    url
}

/// A plugin folder for the component `component` (copied in) with a manifest asking for `permissions`.
fn plugin_folder(dir: &Path, component: &Path, version: &str, permissions: Vec<String>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let dest = dir.join(component.file_name().unwrap());
    std::fs::copy(component, &dest).unwrap();
    let m = ftx::plugins::manifest::describe(&dest, version, permissions).unwrap();
    std::fs::write(dir.join("plugin.toml"), m.to_toml()).unwrap();
    dir.to_owned()
}

/// A key pair under `dir`; returns the secret key file and the public key file.
fn keypair(home: &Path, dir: &Path, name: &str) -> (String, PathBuf) {
    let key = dir.join(name);
    ok(ftx_in(home, &["plugin", "keygen", key.to_str().unwrap()]));
    (key.with_extension("secret").to_str().unwrap().to_owned(), key.with_extension("pub"))
}

fn trust(home: &Path, public: &Path) {
    std::fs::create_dir_all(home.join("trusted-keys")).unwrap();
    std::fs::copy(public, home.join("trusted-keys").join(public.file_name().unwrap())).unwrap();
}

#[test]
fn registry_installs_check_the_hash_and_a_trusted_signature_over_http() {
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (h, w) = (home.path(), work.path());
    let registry = w.join("registry");
    let (secret, public) = keypair(h, w, "publisher");

    // Two signed versions and one unsigned plugin, published with `ftx plugin publish`.
    for version in ["0.1.0", "0.2.0"] {
        let dir = plugin_folder(&w.join(format!("length-{version}")), &wasm("length"), version, vec![]);
        ok(ftx_in(h, &["plugin", "sign", dir.to_str().unwrap(), "--key", secret.as_str()]));
        ok(ftx_in(h, &["plugin", "publish", dir.to_str().unwrap(), "--registry", registry.to_str().unwrap()]));
    }
    let unsigned = plugin_folder(&w.join("json-valid"), &wasm("json-valid"), "1.0.0", vec![]);
    ok(ftx_in(h, &["plugin", "publish", unsigned.to_str().unwrap(), "--registry", registry.to_str().unwrap()]));
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(registry.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["format"], 1);
    assert_eq!(index["plugins"]["length"]["0.2.0"]["component"], "length/0.2.0/length.wasm");
    assert_eq!(index["plugins"]["length"]["0.2.0"]["signature"], "length/0.2.0/plugin.sig");
    assert!(index["plugins"]["json_valid"]["1.0.0"].get("signature").is_none());

    let url = format!("{}/index.json", serve(registry.clone()));
    let install = |args: &[&str]| ftx_in(h, &[&["plugin", "install"][..], args, &["--registry", url.as_str()]].concat());

    // The publisher's key is not trusted yet: refused.
    let e = fails(install(&["length"]));
    assert!(e.contains("plugin length") && e.contains("does not match any trusted key"), "{e}");
    // Trusted: the newest version installs, and a named one on request.
    trust(h, &public);
    let out = ok(install(&["length"]));
    assert!(out.contains("installed length 0.2.0") && out.contains("signed by a trusted key"), "{out}");
    assert!(ok(install(&["length@0.1.0"])).contains("installed length 0.1.0"));
    assert!(ok(ftx_in(h, &["plugin", "list"])).contains("length"));
    // The installed plugin runs.
    let installed = h.join("plugins/length/length.wasm");
    let mut f = FilterPlugin::load(&installed, Limits::default()).unwrap();
    assert_eq!(f.filter(&[(0, "\"short\"".into())]).len(), 1);

    // Unsigned: refused unless explicitly allowed.
    let e = fails(install(&["json_valid"]));
    assert!(e.contains("plugin json_valid") && e.contains("not signed"), "{e}");
    assert!(ok(install(&["json_valid", "--allow-unsigned"])).contains("UNSIGNED"));

    // Tampered bytes on the server: refused, even though signed.
    let served = registry.join("length/0.2.0/length.wasm");
    let mut bytes = std::fs::read(&served).unwrap();
    bytes[200] ^= 0xff;
    std::fs::write(&served, bytes).unwrap();
    let e = fails(install(&["length@0.2.0"]));
    assert!(e.contains("plugin length") && e.contains("was modified"), "{e}");

    // Unknown names and versions, and a missing index (404), are clear errors.
    let e = fails(install(&["nope"]));
    assert!(e.contains("plugin nope") && e.contains("not in the registry"), "{e}");
    let e = fails(install(&["length@9.9.9"]));
    assert!(e.contains("no version 9.9.9") && e.contains("0.1.0, 0.2.0"), "{e}");
    std::fs::remove_file(registry.join("length/0.1.0/plugin.toml")).unwrap();
    let e = fails(install(&["length@0.1.0"]));
    assert!(e.contains("length/0.1.0/plugin.toml") && e.contains("404"), "{e}");
    let e = fails(ftx_in(h, &["plugin", "install", "length", "--registry", url.replace("index.json", "missing.json").as_str()]));
    assert!(e.contains("missing.json") && e.contains("404"), "{e}");
}

#[test]
fn a_bare_component_file_installs_only_with_a_trusted_signature() {
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (h, w) = (home.path(), work.path());
    let file = w.join("length.wasm");
    std::fs::copy(wasm("length"), &file).unwrap();
    let f = file.to_str().unwrap();
    let e = fails(ftx_in(h, &["plugin", "install", f]));
    assert!(e.contains("plugin length") && e.contains("not signed"), "{e}");
    let (secret, public) = keypair(h, w, "publisher");
    assert!(ok(ftx_in(h, &["plugin", "sign", f, "--key", secret.as_str()])).contains("length.wasm.sig"));
    let e = fails(ftx_in(h, &["plugin", "install", f]));
    assert!(e.contains("does not match any trusted key"), "{e}");
    trust(h, &public);
    // The signature covers the bytes: a signature of other bytes is refused.
    let other = w.join("other.sig");
    let json = w.join("json_valid.wasm");
    std::fs::copy(wasm("json-valid"), &json).unwrap();
    ok(ftx_in(h, &["plugin", "sign", json.to_str().unwrap(), "--key", secret.as_str()]));
    std::fs::copy(w.join("json_valid.wasm.sig"), &other).unwrap();
    assert!(fails(ftx_in(h, &["plugin", "install", f, "--signature", other.to_str().unwrap()])).contains("does not match"));
    let out = ok(ftx_in(h, &["plugin", "install", f]));
    assert!(out.contains("installed length") && out.contains("data-filter") && out.contains("signed by a trusted key"), "{out}");
    let listed = ok(ftx_in(h, &["plugin", "list"]));
    assert!(listed.contains("length") && listed.contains("data-filter"), "{listed}");
}

#[test]
fn a_permission_works_only_when_the_user_grants_it() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("sub/secret.txt"), "granted text").unwrap();
    std::fs::write(work.path().join("outside.txt"), "not granted").unwrap();
    let asks = format!("read:{}", data.display());
    let dir = plugin_folder(&work.path().join("plugin"), &wasm("read-file"), "0.1.0", vec![asks.clone()]);
    let component = dir.join("read_file.wasm");

    // Asked for, not granted: refused at load, naming the plugin, the permission and the fix.
    let e = FilterPlugin::load(&component, Limits::default()).err().unwrap().to_string();
    assert!(e.contains("plugin read_file") && e.contains(&asks) && e.contains(&format!("--grant {asks}")) && e.contains("grant = ["), "{e}");
    let e = FilterPlugin::load_granted(&component, Limits::default(), &[format!("read:{}", data.join("sub").display())]).err().unwrap().to_string();
    assert!(e.contains("not granted"), "a grant of a subfolder does not cover the folder: {e}");

    // Granted (here through a parent folder): the folder is readable, read-only, and nothing else.
    let grant = format!("read:{}", work.path().display());
    let mut f = FilterPlugin::load_granted(&component, Limits::default(), &[grant]).unwrap();
    let read = |f: &mut FilterPlugin, p: &Path| match f.filter(&[(0, format!("{:?}", p.to_str().unwrap()))]).remove(0).unwrap() {
        Verdict::Drop(s) => s,
        v => panic!("{v:?}"),
    };
    assert_eq!(read(&mut f, &data.join("sub/secret.txt")), "read: granted text");
    assert!(read(&mut f, &work.path().join("outside.txt")).starts_with("error:"), "only the folder asked for is opened");
    assert!(read(&mut f, Path::new("/etc/passwd")).starts_with("error:"));

    // The same plugin without a manifest beside it asks for nothing and gets nothing.
    let bare = work.path().join("bare/read_file.wasm");
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    std::fs::copy(&component, &bare).unwrap();
    let mut f = FilterPlugin::load(&bare, Limits::default()).unwrap();
    assert!(read(&mut f, &data.join("sub/secret.txt")).starts_with("error:"));
}

fn dpo_run(plugin: &mut LossPlugin) -> (f64, Vec<(String, f64)>, Vec<f32>, Vec<f32>) {
    let t = |v: &[f32]| Tensor::from_slice(v).set_requires_grad(true);
    let (pc, pr) = (t(&[-1.0, -2.0, -0.5, -3.0]), t(&[-1.5, -1.0, -3.0, -2.9]));
    let (rc, rr) = (Tensor::from_slice(&[-1.2f32, -1.8, -0.7, -3.1]), Tensor::from_slice(&[-1.4f32, -1.1, -2.5, -3.0]));
    let out = plugin
        .compute(
            &[("policy_chosen_logps", &pc), ("policy_rejected_logps", &pr), ("reference_chosen_logps", &rc), ("reference_rejected_logps", &rr)],
            &[("beta".into(), 0.3), ("label_smoothing".into(), 0.1)],
        )
        .unwrap();
    out.loss.backward();
    (out.loss.double_value(&[]), out.metrics, Vec::<f32>::try_from(pc.grad()).unwrap(), Vec::<f32>::try_from(pr.grad()).unwrap())
}

#[test]
fn native_builds_of_a_loss_and_a_judge_match_their_wasm_builds() {
    // Loss: the same value, metrics and gradients through the host's tensor ops either way.
    let mut w = LossPlugin::load(&wasm("dpo"), Limits::default(), Device::Cpu).unwrap();
    let mut n = LossPlugin::load(&native("dpo"), Limits::default(), Device::Cpu).unwrap();
    assert_eq!((n.name.as_str(), &n.inputs), ("dpo", &w.inputs));
    assert_eq!(ftx::plugins::manifest::describe(&native("dpo"), "1.0.0", vec![]).unwrap().name, "dpo");
    assert_eq!(n.params, w.params);
    let (a, b) = (dpo_run(&mut w), dpo_run(&mut n));
    assert_eq!(a, b);
    // Called repeatedly, native handles are all given back (the next call starts clean).
    for _ in 0..3 {
        assert_eq!(dpo_run(&mut n), b);
    }
    // A native loss is told what it lacks, like a WASM one.
    let x = Tensor::from_slice(&[1.0f32]);
    let e = n.compute(&[("policy_chosen_logps", &x)], &[]).err().unwrap().to_string();
    assert!(e.contains("plugin dpo") && e.contains("needs input"), "{e}");

    // Judge: the same prompts reach the model and the same judgements come back.
    let run = |path: PathBuf| {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let llm: LlmFn = Box::new(move |p: &str, max: u32| {
            log.lock().unwrap().push((p.to_owned(), max));
            if p.contains("Parris") { Ok("Score: 7, close.".into()) } else { Ok("no grade".into()) }
        });
        let mut j = JudgePlugin::load(&path, Limits::default(), llm).unwrap();
        let s = |r: &str| JudgeSample { prompt: "Capital of France?".into(), response: r.into(), reference: Some("Paris".into()) };
        let out: Vec<Result<(f32, String), String>> = j.judge(&[s("Parris"), s("Lyon")]).unwrap().into_iter().map(|r| r.map(|j| (j.score, j.rationale)).map_err(|e| e.to_string())).collect();
        let seen = seen.lock().unwrap().clone();
        (out, seen)
    };
    let (a, b) = (run(wasm("rubric-judge")), run(native("rubric-judge")));
    assert_eq!(a.1, b.1, "the same prompts and token budgets");
    assert!((a.0[0].as_ref().unwrap().0 - 0.7).abs() < 1e-6);
    assert_eq!(a.0[0], b.0[0]);
    let (ea, eb) = (a.0[1].as_ref().unwrap_err(), b.0[1].as_ref().unwrap_err());
    assert!(ea.contains("rubric_judge") && eb.contains("rubric_judge") && ea.contains("no grade") && eb.contains("no grade"), "{ea} / {eb}");
}

/// Every file under `dir`, by relative path, with its bytes.
fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn a_native_npy_exporter_writes_the_same_files_as_its_wasm_build_through_a_confined_sink() {
    use ftx::model::{decoder::LoadOptions, CausalLm};
    use ftx::plugins::exporter::ExporterPlugin;
    use tch::Kind;
    let model = CausalLm::load(&crate::common::fixture("models/llama3"), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let mut w = ExporterPlugin::load(&wasm("npy-exporter"), Limits::default()).unwrap();
    let mut n = ExporterPlugin::load(&native("npy-exporter"), Limits::default()).unwrap();
    assert_eq!(n.name, "npy_exporter");
    assert_eq!(ftx::plugins::kind_of(&native("npy-exporter")).unwrap().0, ftx::plugins::PluginKind::Exporter);

    // The fixture model: the same files, byte for byte, and the same list of finished files.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (fa, fb) = (w.export(&model, a.path()).unwrap(), n.export(&model, b.path()).unwrap());
    let rel = |fs: Vec<PathBuf>, root: &Path| fs.iter().map(|f| f.strip_prefix(root.canonicalize().unwrap()).unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(rel(fa, a.path()), rel(fb, b.path()));
    let (ta, tb) = (tree(a.path()), tree(b.path()));
    assert_eq!(ta.len(), model.named_tensors().len() + 2, "{:?}", ta.keys());
    assert!(ta == tb, "the native build wrote other files or bytes: {:?} vs {:?}", ta.keys(), tb.keys());

    // Every dtype, a 0-d tensor and a subfolder: the same bytes too.
    let tensors = || {
        let v = Tensor::from_slice(&[1.0f32, -2.5, 0.15625, 3.0, -0.5, 1e-3]).reshape([2, 3]);
        vec![
            ("w.bf16".to_owned(), v.to_kind(Kind::BFloat16)),
            ("sub/dir/h".to_owned(), v.to_kind(Kind::Half)),
            ("ids".to_owned(), Tensor::from_slice(&[1i64, -2, 1 << 40, 0])),
            ("mask".to_owned(), Tensor::from_slice(&[true, false, true])),
            ("scale".to_owned(), Tensor::from(4.25f32)),
        ]
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    w.export_tensors("Test", "{\"a\": 1}", tensors(), a.path()).unwrap();
    n.export_tensors("Test", "{\"a\": 1}", tensors(), b.path()).unwrap();
    let (ta, tb) = (tree(a.path()), tree(b.path()));
    assert_eq!(ta.len(), 7, "{:?}", ta.keys());
    assert!(ta == tb, "{:?} vs {:?}", ta.keys(), tb.keys());

    // A tensor whose name climbs out of (or replaces) the folder: the host's sink refuses the
    // file the native plugin names, with the same error as for the component, and nothing is
    // written anywhere.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let absolute = tmp.path().join("abs").to_str().unwrap().to_owned();
    for bad in ["../escape", absolute.as_str()] {
        let one = || vec![(bad.to_owned(), Tensor::from_slice(&[1.0f32, 2.0]))];
        let e = n.export_tensors("Test", "{}", one(), &out).unwrap_err().to_string();
        assert!(
            e.contains("plugin npy_exporter: export(1 tensors)") && e.contains(&format!("{:?}", format!("{bad}.npy"))) && e.contains("only relative paths inside the output folder"),
            "{e}"
        );
        let ew = w.export_tensors("Test", "{}", one(), &out).unwrap_err().to_string();
        assert_eq!(ew.replace("npy_exporter", "X"), e.replace("npy_exporter", "X"));
    }
    assert_eq!(tree(tmp.path()).len(), 0, "nothing written: {:?}", tree(tmp.path()).keys());
    assert!(!tmp.path().join("escape.npy").exists() && !tmp.path().join("abs.npy").exists());

    // The byte cap holds for native code as well: a .npy header alone (64 bytes or more) is past it.
    n.max_bytes = Some(50);
    let e = n.export_tensors("Test", "{}", vec![("t".to_owned(), Tensor::from_slice(&[1.0f32]))], &out).unwrap_err().to_string();
    assert!(e.contains("plugin npy_exporter") && e.contains("capped at 50 bytes"), "{e}");
    assert!(!out.exists(), "the unfinished file is gone, and so is the folder the failed export made");
}
