//! Helpers shared by the integration tests.

pub mod families;
pub mod lora;

use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

/// Parses a JSON fixture.
pub fn json(rel: &str) -> serde_json::Value {
    let p = fixture(rel);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Loads one tensor of a safetensors fixture as fp32.
pub fn tensor(rel: &str, name: &str) -> Tensor {
    let all = Tensor::read_safetensors(fixture(rel)).unwrap();
    all.into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{rel} has no {name}")).1.to_kind(Kind::Float)
}

/// Largest absolute difference of two tensors.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float).to_device(Device::Cpu) - b.to_kind(Kind::Float).to_device(Device::Cpu))
        .abs()
        .max()
        .double_value(&[])
}

/// A JSON array of integers as Vec<u32>.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Loads one tensor of a safetensors fixture as stored.
pub fn raw_tensor(rel: &str, name: &str) -> Tensor {
    let all = Tensor::read_safetensors(fixture(rel)).unwrap();
    all.into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{rel} has no {name}")).1
}

/// Every tensor of a safetensors fixture.
pub fn all_tensors(rel: &str) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(fixture(rel)).unwrap()
}

/// libtorch's random generator is process-wide; tests that seed it and draw from it (adapter
/// init, dropout, whole training runs) hold this lock so parallel tests cannot interleave draws.
pub fn torch_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Asks `ftx serve` (in process, fp32 on the CPU) for greedy chat answers of `max_tokens` to
/// `users` — all at once when `together` (batched decoding pads them), else one after another —
/// and checks each equals `model::generate` on the same prompt.
pub fn serve_matches_generate(model_dir: &std::path::Path, users: &[String], together: bool, max_tokens: usize) {
    use ftx::model::decoder::LoadOptions;
    use ftx::model::generate::{generate, GenerateOptions};
    use ftx::model::tokenizer::Message;
    use ftx::model::{CausalLm, TextTokenizer};
    use ftx::serve::{ServeOptions, Server};
    let load = LoadOptions { device: Device::Cpu, kind: Kind::Float };
    let opts = ServeOptions {
        model_dir: model_dir.to_path_buf(),
        served_name: Some("m".into()),
        adapters: Vec::new(),
        load,
        max_batch: 8,
        queue: 64,
        default_max_tokens: 16,
        api_key: None,
        request_log: None,
        engine: Default::default(),
    };
    let server = Server::start(opts, "127.0.0.1:0".parse().unwrap()).expect("server starts");
    let model = CausalLm::load(model_dir, load).unwrap();
    let tok = TextTokenizer::load(model_dir, model.config.vocab).unwrap();
    let ask = |u: &str| {
        let url = format!("http://{}/v1/chat/completions", server.addr);
        let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": u}], "max_tokens": max_tokens, "temperature": 0});
        let v: serde_json::Value = ureq::post(&url).set("Content-Type", "application/json").send_string(&body.to_string()).unwrap().into_json().unwrap();
        v["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
    };
    let answers: Vec<String> = if together {
        std::thread::scope(|s| {
            let handles: Vec<_> = users.iter().map(|u| s.spawn(|| ask(u))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    } else {
        users.iter().map(|u| ask(u)).collect()
    };
    for (u, got) in users.iter().zip(&answers) {
        let prompt = tok.encode_chat(&[Message::new("user", u)], true).unwrap();
        let opts = GenerateOptions { max_new_tokens: max_tokens, stop_ids: tok.stop_ids.clone(), ..Default::default() };
        let want = generate(&model, &tok, &prompt, &opts, |_| {}).unwrap().text;
        assert_eq!(got, &want, "{}: {u}", model_dir.display());
    }
}

/// The lines of `out/metrics.jsonl` (`out`: a run's output folder), none before the file exists.
pub fn metrics_lines(out: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", out.display())))
        .collect()
}

/// (step, `key`) of every line of `out/metrics.jsonl` that has both.
pub fn metric_series(out: &std::path::Path, key: &str) -> Vec<(u64, f64)> {
    metrics_lines(out).iter().filter_map(|v| Some((v["step"].as_u64()?, v.get(key)?.as_f64()?))).collect()
}

/// `key` in the line of `step` of `out/metrics.jsonl`.
pub fn metric_at(out: &std::path::Path, step: u64, key: &str) -> f64 {
    metric_series(out, key).into_iter().find(|(s, _)| *s == step).unwrap_or_else(|| panic!("{}: no {key} at step {step}", out.display())).1
}

/// Asserts that the merged checkpoint folder `merged` holds exactly the tensors (names and
/// shapes) of the checkpoint `base`, as transformers' own `save_pretrained` wrote them.
pub fn assert_same_layout(base: &std::path::Path, merged: &std::path::Path, what: &str) {
    let mut want = ftx::model::weights::WeightFiles::open(base).unwrap().shapes();
    let mut got = ftx::model::weights::WeightFiles::open(merged).unwrap().shapes();
    want.sort();
    got.sort();
    assert_eq!(got, want, "{what}: merged layout (transformers' own tensor names and shapes)");
}
