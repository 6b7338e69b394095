//! Plugins run sandboxed: first-party losses give their papers' values and gradients, filters
//! and rewards behave, and hostile plugins are stopped within limits while the host goes on.

use ftx::plugins::filter::{FilterPlugin, Verdict};
use ftx::plugins::loss::LossPlugin;
use ftx::plugins::reward::{RewardPlugin, RewardSample};
use ftx::plugins::{Limits, PluginError};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// A plugin built by tests/run.sh (`cargo build --target wasm32-wasip2` in plugins/).
pub fn wasm(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    assert!(p.exists(), "{} is missing: build the plugins first (tests/run.sh does)", p.display());
    p
}

fn t(v: &[f32]) -> Tensor {
    Tensor::from_slice(v).set_requires_grad(true)
}

fn log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

#[test]
fn dpo_plugin_matches_the_paper_formula_value_and_gradient() {
    let mut dpo = LossPlugin::load(&wasm("dpo"), Limits::default(), Device::Cpu).unwrap();
    assert_eq!(dpo.inputs.len(), 4);
    let (pc, pr, rc, rr) = ([-1.0f32, -2.0, -0.5], [-1.5f32, -1.0, -3.0], [-1.2f32, -1.8, -0.7], [-1.4f32, -1.1, -2.5]);
    let (tpc, tpr) = (t(&pc), t(&pr));
    let (trc, trr) = (Tensor::from_slice(&rc), Tensor::from_slice(&rr));
    let beta = 0.2;
    let out = dpo
        .compute(
            &[("policy_chosen_logps", &tpc), ("policy_rejected_logps", &tpr), ("reference_chosen_logps", &trc), ("reference_rejected_logps", &trr)],
            &[("beta".into(), beta)],
        )
        .unwrap();
    // Hand computation: z_i = β((pc−rc) − (pr−rr)); loss = mean(−log σ(z_i));
    // ∂loss/∂pc_i = −β σ(−z_i) / n.
    let n = 3.0;
    let z: Vec<f64> = (0..3).map(|i| beta * ((pc[i] - rc[i]) as f64 - (pr[i] - rr[i]) as f64)).collect();
    let want: f64 = z.iter().map(|&z| -log_sigmoid(z)).sum::<f64>() / n;
    assert!((out.loss.double_value(&[]) - want).abs() < 1e-6, "{} vs {want}", out.loss.double_value(&[]));
    out.loss.backward();
    let g = Vec::<f32>::try_from(tpc.grad()).unwrap();
    for i in 0..3 {
        let want = -beta * (1.0 / (1.0 + z[i].exp())) / n;
        assert!((g[i] as f64 - want).abs() < 1e-6, "grad {i}: {} vs {want}", g[i]);
    }
    let acc = out.metrics.iter().find(|m| m.0 == "rewards/accuracy").unwrap().1;
    assert!((acc - z.iter().filter(|&&z| z > 0.0).count() as f64 / n).abs() < 1e-9);
}

#[test]
fn orpo_plugin_matches_the_paper_formula() {
    let mut orpo = LossPlugin::load(&wasm("orpo"), Limits::default(), Device::Cpu).unwrap();
    let (c, r, nll) = ([-0.4f32, -1.1], [-0.9f32, -0.7], [1.3f32, 0.8]);
    let (tc, tr, tn) = (t(&c), t(&r), t(&nll));
    let out = orpo.compute(&[("policy_chosen_mean_logps", &tc), ("policy_rejected_mean_logps", &tr), ("chosen_nll", &tn)], &[]).unwrap();
    let beta = 0.1; // the plugin's default
    let log_odds = |x: f64| x - (1.0 - x.exp()).ln();
    let ratio: Vec<f64> = (0..2).map(|i| log_sigmoid(log_odds(c[i] as f64) - log_odds(r[i] as f64))).collect();
    let want = (nll[0] + nll[1]) as f64 / 2.0 - beta * (ratio[0] + ratio[1]) / 2.0;
    assert!((out.loss.double_value(&[]) - want).abs() < 1e-6, "{} vs {want}", out.loss.double_value(&[]));
}

#[test]
fn a_loss_plugin_is_told_what_it_lacks() {
    let mut dpo = LossPlugin::load(&wasm("dpo"), Limits::default(), Device::Cpu).unwrap();
    let x = t(&[0.0]);
    let e = dpo.compute(&[("policy_chosen_logps", &x)], &[]).err().unwrap().to_string();
    assert!(e.contains("dpo") && e.contains("policy_rejected_logps"), "{e}");
    let e = dpo
        .compute(&[("policy_chosen_logps", &x), ("policy_rejected_logps", &x), ("reference_chosen_logps", &x), ("reference_rejected_logps", &x)], &[("gamma".into(), 1.0)])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no parameter \"gamma\"") && e.contains("beta"), "{e}");
}

#[test]
fn loss_plugin_calls_are_cheap_and_leak_no_handles() {
    let mut dpo = LossPlugin::load(&wasm("dpo"), Limits::default(), Device::Cpu).unwrap();
    let x = Tensor::zeros([8], (Kind::Float, Device::Cpu));
    let inputs = [("policy_chosen_logps", &x), ("policy_rejected_logps", &x), ("reference_chosen_logps", &x), ("reference_rejected_logps", &x)];
    for _ in 0..3000 {
        dpo.compute(&inputs, &[]).unwrap();
    }
    // 4096 live handles at most: 3000 calls × ~15 intermediates each would have hit it.
}

#[test]
fn filters_keep_drop_and_rewards_score() {
    let mut f = FilterPlugin::load(&wasm("length"), Limits::default()).unwrap();
    let out = f.filter(&[(0, "\"short\"".into()), (1, format!("\"{}\"", "long enough text".repeat(2)))]);
    assert!(matches!(&out[0], Ok(Verdict::Drop(r)) if r.contains("shorter than 16")), "{out:?}");
    assert_eq!(out[1].as_ref().unwrap(), &Verdict::Keep);
    let mut r = RewardPlugin::load(&wasm("json-valid"), Limits::default()).unwrap();
    let s = |c: &str| RewardSample { prompt: "p".into(), completion: c.into(), reference: None };
    assert_eq!(r.score(&[s("{\"a\": 1}"), s("[1]"), s("nope")]).unwrap(), vec![1.0, 0.5, 0.0]);
}

fn hostile(limits: Limits) -> FilterPlugin {
    FilterPlugin::load(&wasm("hostile-filter"), limits).unwrap()
}

fn one(f: &mut FilterPlugin, attack: &str) -> Result<Verdict, PluginError> {
    f.filter(&[(7, format!("\"{attack}\""))]).remove(0)
}

#[test]
fn an_infinite_loop_is_stopped_at_its_time_limit() {
    let limits = Limits { call_timeout: Duration::from_millis(100), ..Limits::default() };
    let mut f = hostile(limits);
    let t0 = Instant::now();
    let e = one(&mut f, "loop").unwrap_err();
    assert!(matches!(e, PluginError::Timeout { .. }), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3), "stopped in {:?}", t0.elapsed());
    assert!(e.to_string().contains("hostile_filter") && e.to_string().contains("record 7"), "{e}");
    assert_eq!(one(&mut f, "fine").unwrap(), Verdict::Keep, "the plugin works again after the trap");
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let mut f = hostile(Limits { memory_bytes: 32 << 20, ..Limits::default() });
    let e = one(&mut f, "alloc").unwrap_err();
    assert!(matches!(e, PluginError::Memory { .. } | PluginError::Trap { .. }), "{e}");
    assert!(e.to_string().contains("record 7"), "{e}");
    assert_eq!(one(&mut f, "fine").unwrap(), Verdict::Keep);
}

#[test]
fn deep_recursion_and_panics_trap_cleanly() {
    let mut f = hostile(Limits::default());
    let e = one(&mut f, "recurse").unwrap_err().to_string();
    assert!(e.contains("stack overflow") || e.contains("trapped"), "{e}");
    let e = one(&mut f, "panic").unwrap_err().to_string();
    assert!(e.contains("hostile_filter") && e.contains("trapped"), "{e}");
}

#[test]
fn no_files_no_environment_no_network_no_clock() {
    let mut f = hostile(Limits::default());
    let mut text = |a: &str| match one(&mut f, a).unwrap() {
        Verdict::Drop(s) => s,
        v => panic!("{a}: {v:?}"),
    };
    let file = text("read-file");
    assert!(file.starts_with("file: Err"), "{file}");
    let env = text("env");
    assert_eq!(env, "env: 0 vars, HOME=None");
    let socket = text("socket");
    assert!(socket.starts_with("socket: Err"), "{socket}");
    assert_eq!(text("clock"), "clock: Ok(0)", "the clock is frozen");
}

#[test]
fn a_bad_record_in_a_batch_is_isolated_and_the_rest_survive() {
    let mut f = hostile(Limits { call_timeout: Duration::from_millis(200), ..Limits::default() });
    let records: Vec<(u64, String)> = ["ok", "panic", "ok", "huge", "ok"].iter().enumerate().map(|(i, a)| (i as u64, format!("\"{a}\""))).collect();
    let out = f.filter(&records);
    assert_eq!(out.len(), 5);
    assert_eq!(out[0].as_ref().unwrap(), &Verdict::Keep);
    assert!(out[1].as_ref().unwrap_err().to_string().contains("record 1"));
    assert_eq!(out[2].as_ref().unwrap(), &Verdict::Keep);
    let huge = out[3].as_ref().unwrap_err().to_string();
    assert!(huge.contains("record 3") && huge.contains("byte limit"), "{huge}");
    assert_eq!(out[4].as_ref().unwrap(), &Verdict::Keep);
}

#[test]
fn tampered_wrong_kind_and_missing_plugins_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(wasm("length")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 64].iter_mut().for_each(|b| *b ^= 0xA5);
    let bad = dir.path().join("length.wasm");
    std::fs::write(&bad, &bytes).unwrap();
    let e = FilterPlugin::load(&bad, Limits::default()).err().unwrap().to_string();
    assert!(e.contains("plugin length") && e.contains("not a valid WebAssembly component"), "{e}");
    let e = FilterPlugin::load(&wasm("dpo"), Limits::default()).err().unwrap().to_string();
    assert!(e.contains("is a loss plugin, not a data-filter"), "{e}");
    let e = FilterPlugin::load(&dir.path().join("nope.wasm"), Limits::default()).err().unwrap().to_string();
    assert!(e.contains("plugin nope: cannot load"), "{e}");
}

#[test]
fn a_plugin_for_another_api_version_is_refused_by_name() {
    let e = FilterPlugin::load(&wasm("future-api"), Limits::default()).err().unwrap().to_string();
    assert!(e.contains("ftx:plugin@9.0.0") && e.contains("this ftx speaks ftx:plugin@0.1.0"), "{e}");
}

/// `ftx` with its own plugin store and trusted keys.
pub fn ftx_in(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ftx"))
        .args(args)
        .env("FTX_HOME", home)
        .env("CARGO_TARGET_DIR", PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/target"))
        .output()
        .unwrap()
}

/// The stdout of a command that must succeed.
pub fn ok(o: std::process::Output) -> String {
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn fails(o: std::process::Output) -> String {
    assert!(!o.status.success(), "should have failed: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn new_build_sign_install_and_use_a_loss_plugin_as_a_user_would() {
    let _rng = crate::common::torch_rng_lock();
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let h = home.path();
    let w = work.path().to_str().unwrap();
    ok(ftx_in(h, &["plugin", "new", "loss", "my-dpo", "--dir", w]));
    let krate = work.path().join("my-dpo");
    let out = ok(ftx_in(h, &["plugin", "build", krate.to_str().unwrap()]));
    assert!(out.contains("built my-dpo (loss, ftx:plugin@0.1.0)"), "{out}");
    let dist = krate.join("dist");
    let d = dist.to_str().unwrap();
    let manifest = std::fs::read_to_string(dist.join("plugin.toml")).unwrap();
    assert!(manifest.contains("kind = \"loss\"") && manifest.contains("name = \"beta\""), "{manifest}");

    // Unsigned: refused unless allowed.
    assert!(fails(ftx_in(h, &["plugin", "install", d])).contains("not signed"));
    // Signed by a key the user does not trust: refused.
    let key = work.path().join("publisher");
    ok(ftx_in(h, &["plugin", "keygen", key.to_str().unwrap()]));
    ok(ftx_in(h, &["plugin", "sign", d, "--key", key.with_extension("secret").to_str().unwrap()]));
    assert!(fails(ftx_in(h, &["plugin", "verify", d])).contains("does not match any trusted key"));
    // Trusted: installs.
    std::fs::create_dir_all(h.join("trusted-keys")).unwrap();
    std::fs::copy(key.with_extension("pub"), h.join("trusted-keys/publisher.pub")).unwrap();
    assert!(ok(ftx_in(h, &["plugin", "verify", d])).contains("signature ok"));
    ok(ftx_in(h, &["plugin", "install", d]));
    assert!(ok(ftx_in(h, &["plugin", "list"])).contains("my-dpo"));

    // Used by name in a preference run.
    let data = work.path().join("pairs.jsonl");
    let rec = serde_json::json!({"prompt": "Say yes.", "chosen": "yes", "rejected": "no"}).to_string();
    std::fs::write(&data, format!("{rec}\n{rec}\n{rec}\n{rec}\n")).unwrap();
    let cfg = work.path().join("ftx.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n[method]\nkind = \"lora\"\nrank = 4\n[train]\nmax_steps = 2\nbatch_size = 2\noutput_dir = \"{}\"\n",
            crate::common::fixture("models/llama3").display(),
            data.display(),
            work.path().join("out").display()
        ),
    )
    .unwrap();
    let out = ok(ftx_in(h, &["--plugin", "my-dpo", "train", "--config", cfg.to_str().unwrap()]));
    assert!(out.contains("trained 2 steps"), "{out}");

    // Tampering with the installed component is caught before use.
    let installed = h.join("plugins/my-dpo/my-dpo.wasm");
    let mut bytes = std::fs::read(&installed).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&installed, bytes).unwrap();
    let e = fails(ftx_in(h, &["--plugin", "my-dpo", "train", "--config", cfg.to_str().unwrap(), "--set", "train.max_steps=3"]));
    assert!(e.contains("was modified"), "{e}");
    ok(ftx_in(h, &["plugin", "remove", "my-dpo"]));
    assert!(ok(ftx_in(h, &["plugin", "list"])).contains("no plugins installed"));
}

/// A plugin built natively from the same source (tests/run.sh builds these too).
pub fn native(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/release").join(format!("lib{}.so", name.replace('-', "_")));
    assert!(p.exists(), "{} is missing: build the native plugins first (tests/run.sh does)", p.display());
    p
}

#[test]
fn the_same_source_built_natively_behaves_the_same() {
    let records: Vec<(u64, String)> = vec![(0, "\"short\"".into()), (1, format!("\"{}\"", "long enough text".repeat(2))), (2, format!("\"{}\"", "x".repeat(20_000)))];
    let mut wasm_f = FilterPlugin::load(&wasm("length"), Limits::default()).unwrap();
    let mut native_f = FilterPlugin::load(&native("length"), Limits::default()).unwrap();
    assert_eq!(native_f.name, "length");
    let a: Vec<Verdict> = wasm_f.filter(&records).into_iter().map(Result::unwrap).collect();
    let b: Vec<Verdict> = native_f.filter(&records).into_iter().map(Result::unwrap).collect();
    assert_eq!(a, b);
    let s = |c: &str| RewardSample { prompt: "p".into(), completion: c.into(), reference: None };
    let samples = [s("{\"a\": 1}"), s("[1]"), s("nope")];
    let mut wr = RewardPlugin::load(&wasm("json-valid"), Limits::default()).unwrap();
    let mut nr = RewardPlugin::load(&native("json-valid"), Limits::default()).unwrap();
    assert_eq!(wr.score(&samples).unwrap(), nr.score(&samples).unwrap());
}

#[test]
fn a_native_panic_is_an_error_for_its_record_only() {
    let mut f = FilterPlugin::load(&native("hostile-filter"), Limits::default()).unwrap();
    let out = f.filter(&[(0, "\"ok\"".into()), (1, "\"panic\"".into()), (2, "\"ok\"".into())]);
    assert_eq!(out[0].as_ref().unwrap(), &Verdict::Keep);
    let e = out[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("hostile_filter") && e.contains("record 1") && e.contains("panics on purpose"), "{e}");
    assert_eq!(out[2].as_ref().unwrap(), &Verdict::Keep);
}

#[test]
fn a_library_that_is_not_an_ftx_plugin_is_refused() {
    // The C math library: a real shared library without an ftx plugin table.
    let libm = ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("libm is on every Linux machine");
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libnotaplugin.so");
    std::os::unix::fs::symlink(&libm, &fake).unwrap();
    let e = FilterPlugin::load(&fake, Limits::default()).err().unwrap().to_string();
    assert!(e.contains("plugin notaplugin") && e.contains("not an ftx native plugin"), "{e}");
    let e = FilterPlugin::load(&native("json-valid"), Limits::default()).err().unwrap().to_string();
    assert!(e.contains("is a reward plugin, not a data-filter"), "{e}");
}
