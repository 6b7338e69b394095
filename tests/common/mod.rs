//! Helpers shared by the integration tests.

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
