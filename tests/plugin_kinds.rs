//! Judge and exporter plugins: the rubric judge grades through the host's language model (a
//! fake callback, and the local fixture model), the npy exporter writes tensors that read back
//! equal, and a hostile exporter can neither leave its output folder nor pass its byte cap.

use crate::common::fixture;
use crate::plugins::wasm;
use ftx::model::decoder::LoadOptions;
use ftx::model::{CausalLm, TextTokenizer};
use ftx::plugins::exporter::ExporterPlugin;
use ftx::plugins::judge::{local_llm, JudgePlugin, JudgeSample, LlmFn};
use ftx::plugins::{inspect_file, Limits, PluginError, PluginKind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

fn sample(prompt: &str, response: &str, reference: Option<&str>) -> JudgeSample {
    JudgeSample { prompt: prompt.into(), response: response.into(), reference: reference.map(Into::into) }
}

/// A fake model that answers with `reply(prompt)` and records each (prompt, max-tokens).
fn fake_llm(reply: impl Fn(&str) -> Result<String, String> + Send + 'static) -> (LlmFn, Arc<Mutex<Vec<(String, u32)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let llm: LlmFn = Box::new(move |p: &str, n: u32| {
        log.lock().unwrap().push((p.to_owned(), n));
        reply(p)
    });
    (llm, seen)
}

fn rubric(llm: LlmFn, limits: Limits) -> JudgePlugin {
    JudgePlugin::load(&wasm("rubric-judge"), limits, llm).unwrap()
}

#[test]
fn the_rubric_judge_scores_the_hosts_reply_and_shows_it_the_sample() {
    let (llm, seen) = fake_llm(|_| Ok("Score: 7 because it names the right city but misspells it.".into()));
    let mut j = rubric(llm, Limits::default());
    let out = j.judge(&[sample("Capital of France?", "Parris", Some("Paris"))]).unwrap();
    let got = out[0].as_ref().unwrap();
    assert!((got.score - 0.7).abs() < 1e-6, "{got:?}");
    assert!(got.rationale.contains("because it names the right city"), "{got:?}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let (prompt, max_tokens) = &seen[0];
    assert!(prompt.contains("Capital of France?") && prompt.contains("Parris") && prompt.contains("REFERENCE") && prompt.contains("Paris"), "{prompt}");
    assert!(*max_tokens > 0 && *max_tokens <= ftx::plugins::judge::DEFAULT_MAX_TOKENS, "{max_tokens}");
}

#[test]
fn a_reply_without_a_grade_or_a_failing_model_is_an_error_for_that_sample_only() {
    let (llm, _) = fake_llm(|p| {
        if p.contains("good answer") {
            Ok("10/10, perfect.".into())
        } else if p.contains("down") {
            Err("endpoint unreachable".into())
        } else {
            Ok("I would rather not say.".into())
        }
    });
    let mut j = rubric(llm, Limits::default());
    let out = j.judge(&[sample("q", "good answer", None), sample("q", "rambling", None), sample("q", "server down", None)]).unwrap();
    assert_eq!(out.len(), 3);
    assert!((out[0].as_ref().unwrap().score - 1.0).abs() < 1e-6, "{:?}", out[0]);
    let e = out[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("plugin rubric_judge") && e.contains("judge(sample 1)") && e.contains("no grade") && e.contains("rather not say"), "{e}");
    let e = out[2].as_ref().unwrap_err().to_string();
    assert!(e.contains("judge(sample 2)") && e.contains("endpoint unreachable"), "{e}");
}

#[test]
fn the_host_caps_max_tokens_and_the_models_time_is_not_the_plugins() {
    // 3 × 150 ms in the model against a 100 ms limit: only the plugin's own compute counts.
    let (llm, seen) = fake_llm(|_| {
        std::thread::sleep(Duration::from_millis(150));
        Ok("Score: 3".into())
    });
    let mut j = rubric(llm, Limits { call_timeout: Duration::from_millis(100), ..Limits::default() });
    j.set_max_tokens(5);
    let out = j.judge(&[sample("a", "b", None), sample("c", "d", None), sample("e", "f", Some("g"))]).unwrap();
    assert!(out.iter().all(|r| matches!(r, Ok(j) if (j.score - 0.3).abs() < 1e-6)), "{out:?}");
    assert!(seen.lock().unwrap().iter().all(|(_, n)| *n == 5), "max-tokens is clamped to the host's cap");
}

/// The rubric judge on the local model in `dir` (8 new tokens a completion), and the replies it got.
fn local_rubric(dir: &Path) -> (JudgePlugin, Arc<Mutex<Vec<Result<String, String>>>>) {
    let model = CausalLm::load(dir, LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let tok = TextTokenizer::load(dir, model.config.vocab).unwrap();
    let mut local = local_llm(model, tok);
    let replies = Arc::new(Mutex::new(Vec::new()));
    let log = replies.clone();
    let llm: LlmFn = Box::new(move |p: &str, n: u32| {
        let r = local(p, n);
        log.lock().unwrap().push(r.clone());
        r
    });
    let mut j = rubric(llm, Limits::default());
    j.set_max_tokens(8);
    (j, replies)
}

#[test]
fn a_judge_routed_to_the_local_fixture_model_runs() {
    // The fixture has 256 positions, fewer than the rubric's prompt in its chat template: an
    // error for that sample, naming the plugin.
    let (mut j, _) = local_rubric(&fixture("models/llama3"));
    let e = j.judge(&[sample("2+2?", "4", Some("4"))]).unwrap().remove(0).unwrap_err().to_string();
    assert!(e.contains("plugin rubric_judge") && e.contains("judge(sample 0)") && e.contains("exceeds the model's 256 positions"), "{e}");

    // With room for the prompt, the model answers each sample.
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture("models/llama3")).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = 1024.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let (mut j, replies) = local_rubric(dir.path());
    let out = j.judge(&[sample("2+2?", "4", Some("4")), sample("Say hi.", "hello", None)]).unwrap();
    let replies = replies.lock().unwrap();
    assert_eq!(replies.len(), 2, "one completion per sample");
    for (i, (r, reply)) in out.iter().zip(replies.iter()).enumerate() {
        let reply = reply.as_ref().expect("the local model generates");
        match r {
            // A random model rarely grades, but when it does the score follows the rubric.
            Ok(j) => assert!((0.1..=1.0).contains(&j.score) && j.rationale == reply.trim(), "{j:?}"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("plugin rubric_judge") && e.contains(&format!("judge(sample {i})")), "{e}");
            }
        }
    }
}

#[test]
fn judges_and_exporters_are_recognised_and_not_confused_with_other_kinds() {
    let (kind, version) = inspect_file(&wasm("rubric-judge")).unwrap();
    assert_eq!((kind, kind.to_string(), version.as_str()), (PluginKind::Judge, "judge".into(), "0.1.0"));
    let (kind, _) = inspect_file(&wasm("npy-exporter")).unwrap();
    assert_eq!((kind, kind.to_string()), (PluginKind::Exporter, "exporter".into()));
    let (llm, _) = fake_llm(|_| Ok(String::new()));
    let e = JudgePlugin::load(&wasm("npy-exporter"), Limits::default(), llm).err().unwrap().to_string();
    assert!(e.contains("is a exporter plugin, not a judge"), "{e}");
    let e = ExporterPlugin::load(&wasm("rubric-judge"), Limits::default()).err().unwrap().to_string();
    assert!(e.contains("is a judge plugin, not an exporter"), "{e}");
}

/// A parsed .npy v1.0 file.
struct Npy {
    descr: String,
    shape: Vec<u64>,
    data: Vec<u8>,
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
    let from = s.find(start).unwrap_or_else(|| panic!("{start} in {s}")) + start.len();
    &s[from..from + s[from..].find(end).unwrap()]
}

fn read_npy(path: &Path) -> Npy {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + len) % 64, 0, "the header is padded to 64 bytes");
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.ends_with('\n') && header.contains("'fortran_order': False"), "{header}");
    let shape = between(header, "'shape': (", ")").split(',').map(str::trim).filter(|d| !d.is_empty()).map(|d| d.parse().unwrap()).collect();
    Npy { descr: between(header, "'descr': '", "'").to_owned(), shape, data: bytes[10 + len..].to_vec() }
}

fn le_bytes_f32(t: &Tensor) -> Vec<u8> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Files under `dir`, relative, sorted (links listed, not followed).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_npy_exporter_writes_the_fixture_models_tensors_exactly() {
    let model = CausalLm::load(&fixture("models/llama3"), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut x = ExporterPlugin::load(&wasm("npy-exporter"), Limits::default()).unwrap();
    let files = x.export(&model, out.path()).unwrap();
    let tensors = model.named_tensors();
    assert_eq!(files.len(), tensors.len() + 2, "{files:?}");
    for (name, t) in &tensors {
        let npy = read_npy(&out.path().join(format!("{name}.npy")));
        assert_eq!(npy.descr, "<f4", "{name}");
        assert_eq!(npy.shape, t.size().iter().map(|&d| d as u64).collect::<Vec<_>>(), "{name}");
        assert!(npy.data == le_bytes_f32(t), "{name}: the data differs");
    }
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["architecture"], "LlamaForCausalLM");
    assert_eq!(manifest["tensors"].as_array().unwrap().len(), tensors.len());
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config, model.config.raw);
    assert!(listing(out.path()).iter().all(|f| !f.contains(".part")), "no temporary file is left");
}

#[test]
fn the_npy_exporter_handles_every_dtype_shape_and_subfolders() {
    let vals = [1.0f32, -2.5, 0.15625, 3.0, -0.5, 1e-3];
    let bf16 = Tensor::from_slice(&vals).reshape([2, 3]).to_kind(Kind::BFloat16);
    let f16 = Tensor::from_slice(&vals[..2]).reshape([1, 2]).to_kind(Kind::Half);
    let ints = Tensor::from_slice(&[1i64, -2, 1 << 40, 0]);
    let flags = Tensor::from_slice(&[true, false, true]);
    let scalar = Tensor::from(4.25f32);
    let tensors = vec![
        ("w.bf16".to_owned(), bf16),
        ("sub/dir/h".to_owned(), f16),
        ("ids".to_owned(), ints),
        ("mask".to_owned(), flags),
        ("scale".to_owned(), scalar),
    ];
    let out = tempfile::tempdir().unwrap();
    let mut x = ExporterPlugin::load(&wasm("npy-exporter"), Limits::default()).unwrap();
    x.export_tensors("Test", "{\"a\": 1}", tensors, out.path()).unwrap();
    let npy = |n: &str| read_npy(&out.path().join(format!("{n}.npy")));
    let bits = |v: &[f32], f: fn(f32) -> u16| v.iter().flat_map(|&x| f(x).to_le_bytes()).collect::<Vec<u8>>();
    let b = npy("w.bf16");
    assert_eq!((b.descr.as_str(), b.shape.as_slice()), ("<u2", &[2u64, 3][..]));
    assert_eq!(b.data, bits(&vals, |x| half::bf16::from_f32(x).to_bits()));
    let h = npy("sub/dir/h");
    assert_eq!((h.descr.as_str(), h.shape.as_slice()), ("<f2", &[1u64, 2][..]));
    assert_eq!(h.data, bits(&vals[..2], |x| half::f16::from_f32(x).to_bits()));
    let i = npy("ids");
    assert_eq!((i.descr.as_str(), i.shape.as_slice()), ("<i8", &[4u64][..]));
    assert_eq!(i.data, [1i64, -2, 1 << 40, 0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
    let m = npy("mask");
    assert_eq!((m.descr.as_str(), m.data.as_slice()), ("|b1", &[1u8, 0, 1][..]));
    let s = npy("scale");
    assert_eq!((s.descr.as_str(), s.shape.len(), s.data.as_slice()), ("<f4", 0, &4.25f32.to_le_bytes()[..]));
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    let entry = manifest["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "w.bf16").unwrap().clone();
    assert!(entry["note"].as_str().unwrap().contains("bfloat16"), "{entry}");
    assert_eq!(std::fs::read_to_string(out.path().join("config.json")).unwrap(), "{\"a\": 1}");
}

fn small_tensors() -> Vec<(String, Tensor)> {
    vec![("t".to_owned(), Tensor::from_slice(&[1.0f32, 2.0, 3.0]))]
}

#[test]
fn a_hostile_exporter_stays_in_its_folder_and_under_its_byte_cap() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, outside) = (tmp.path().join("out"), tmp.path().join("outside"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, out.join("link")).unwrap();
    let mut x = ExporterPlugin::load(&wasm("hostile-exporter"), Limits::default()).unwrap();
    x.max_bytes = Some(9 << 19); // 4.5 MiB: four 1 MiB writes pass, the fifth does not.
    let files = x.export_tensors("Hostile", "{}", small_tensors(), &out).unwrap();
    let root = out.canonicalize().unwrap();
    assert_eq!(files, vec![root.join("done.txt"), root.join("report.txt")]);
    let report = std::fs::read_to_string(out.join("report.txt")).unwrap();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), 11, "{report}");
    for line in &lines[..6] {
        assert!(line.contains(": Err(") && (line.contains("only relative paths") || line.contains("symbolic link") || line.contains("not a file path")), "{line}");
    }
    assert!(lines[6].starts_with("cap: Some(\"write 4: ") && lines[6].contains("capped at 4718592 bytes"), "{}", lines[6]);
    assert!(lines[7].contains("Err(\"no open file with handle"), "{}", lines[7]);
    assert!(lines[8].contains("Err(\"no tensor called \\\"no.such.tensor\\\""), "{}", lines[8]);
    assert!(lines[9].contains("Err(\"read at most 16777216 bytes"), "{}", lines[9]);
    assert!(lines[10].contains("finish twice: Err("), "{}", lines[10]);
    // Nothing outside the folder, nothing left of the unfinished file.
    assert_eq!(listing(tmp.path()), ["out", "out/done.txt", "out/link", "out/report.txt", "outside"]);
}

#[test]
fn an_exporter_in_an_endless_loop_is_stopped_and_the_next_export_works() {
    let tmp = tempfile::tempdir().unwrap();
    let mut x = ExporterPlugin::load(&wasm("hostile-exporter"), Limits { call_timeout: Duration::from_millis(200), ..Limits::default() }).unwrap();
    x.max_bytes = Some(9 << 19);
    let t0 = Instant::now();
    let e = x.export_tensors("Hostile", "{\"attack\": \"loop\"}", small_tensors(), tmp.path()).unwrap_err();
    assert!(matches!(e, PluginError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3), "stopped in {:?}", t0.elapsed());
    assert!(e.to_string().contains("hostile_exporter") && e.to_string().contains("export(1 tensors)"), "{e}");
    let files: Vec<PathBuf> = x.export_tensors("Hostile", "{}", small_tensors(), tmp.path()).unwrap();
    assert_eq!(files.len(), 2, "the instance was rebuilt: {files:?}");
}

#[test]
fn plugin_new_scaffolds_a_judge_and_an_exporter_that_build_and_work() {
    use crate::plugins::{ftx_in, ok};
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = work.path().to_str().unwrap();
    for kind in ["judge", "exporter"] {
        let name = format!("my-{kind}");
        ok(ftx_in(home.path(), &["plugin", "new", kind, name.as_str(), "--dir", w]));
        let out = ok(ftx_in(home.path(), &["plugin", "build", work.path().join(&name).to_str().unwrap()]));
        assert!(out.contains(&format!("built {name} ({kind}, ftx:plugin@0.1.0)")), "{out}");
    }
    let (llm, _) = fake_llm(|_| Ok("Score: 8, fine.".into()));
    let mut j = JudgePlugin::load(&work.path().join("my-judge/dist/my-judge.wasm"), Limits::default(), llm).unwrap();
    let got = j.judge(&[sample("q", "a", None)]).unwrap().remove(0).unwrap();
    assert!((got.score - 0.8).abs() < 1e-6, "{got:?}");
    let mut x = ExporterPlugin::load(&work.path().join("my-exporter/dist/my-exporter.wasm"), Limits::default()).unwrap();
    let out = work.path().join("exported");
    x.export_tensors("Test", "{}", small_tensors(), &out).unwrap();
    assert_eq!(std::fs::read(out.join("t.bin")).unwrap(), le_bytes_f32(&small_tensors()[0].1));
    assert!(std::fs::read_to_string(out.join("index.txt")).unwrap().starts_with("t 12 bytes, shape [3]"));
}

#[test]
fn ftx_export_runs_an_exporter_plugin_on_the_merged_model() {
    // The CLI merges the adapter, then the plugin writes every tensor: the q_proj file must hold
    // W + ΔW exactly as the in-process merge computes it.
    let out = tempfile::tempdir().unwrap();
    let adapter = fixture("peft/adapters/lora_llama3");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_ftx"))
        .args(["export", "--format", "plugin", "--model"])
        .arg(fixture("models/llama3"))
        .arg("--adapter")
        .arg(&adapter)
        .arg("--plugin")
        .arg(wasm("npy-exporter"))
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let mut model = CausalLm::load(&fixture("models/llama3"), LoadOptions { device: Device::Cpu, kind: Kind::Float }).unwrap();
    ftx::peft::load_adapter(&mut model, &adapter).unwrap();
    assert!(ftx::export::merge_adapters(&mut model) > 0);
    let name = "model.layers.0.self_attn.q_proj.weight";
    let merged = model.named_tensors().into_iter().find(|(n, _)| n == name).unwrap().1;
    assert!(read_npy(&out.path().join(format!("{name}.npy"))).data == le_bytes_f32(&merged), "the plugin got the merged weight");
    // Without --plugin: a message, not a panic.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_ftx")).args(["export", "--format", "plugin", "--model"]).arg(fixture("models/llama3")).arg("--out").arg(out.path()).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--format plugin needs --plugin"), "{}", String::from_utf8_lossy(&bad.stderr));
}
