//! `ftx merge`: combined adapters against PEFT's add_weighted_adapter (fixtures made by
//! tests/fixtures/fx_merge.py) and against ΔW computed directly here.

use crate::common::{all_tensors, fixture, json, max_diff};
use ftx::peft::merge::{merge, read_adapter, save, LoadedAdapter, Method};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

fn inputs() -> (Vec<LoadedAdapter>, Vec<f64>) {
    let meta = json("peft/merge/merge.json");
    let adapters = meta["adapters"].as_array().unwrap().iter().map(|p| read_adapter(&fixture(p.as_str().unwrap())).unwrap()).collect();
    let weights = meta["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
    (adapters, weights)
}

/// Σ wᵢ·sᵢ·Bᵢ·Aᵢ of one module, straight from the inputs.
fn weighted_delta(adapters: &[LoadedAdapter], weights: &[f64], module: &str) -> Tensor {
    adapters
        .iter()
        .zip(weights)
        .map(|(a, w)| {
            let (fa, fb) = &a.modules[module];
            fb.matmul(fa) * (w * a.settings.scaling())
        })
        .reduce(|x, y| x + y)
        .unwrap()
}

/// A PEFT fixture's factors by module.
fn peft_result(kind: &str) -> BTreeMap<String, (Tensor, Tensor)> {
    let mut out: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, t) in all_tensors(&format!("peft/merge/{kind}.safetensors")) {
        let stem = name.strip_prefix("base_model.model.").unwrap();
        if let Some(m) = stem.strip_suffix(".lora_A.weight") {
            out.entry(m.to_owned()).or_default().0 = Some(t);
        } else if let Some(m) = stem.strip_suffix(".lora_B.weight") {
            out.entry(m.to_owned()).or_default().1 = Some(t);
        }
    }
    out.into_iter().map(|(k, (a, b))| (k, (a.unwrap(), b.unwrap()))).collect()
}

#[test]
fn cat_and_linear_equal_peft_factor_for_factor() {
    let (adapters, weights) = inputs();
    let meta = json("peft/merge/merge.json");
    for (kind, method) in [("cat", Method::Cat), ("linear", Method::Linear)] {
        let ours = merge(&adapters, &weights, &method, None).unwrap();
        assert_eq!(ours.rank, meta["results"][kind]["r"].as_i64().unwrap(), "{kind}");
        let peft = peft_result(kind);
        assert_eq!(ours.modules.len(), peft.len());
        for (m, (a, b)) in &peft {
            let (oa, ob) = &ours.modules[m];
            assert!(max_diff(oa, a) < 1e-6 && max_diff(ob, b) < 1e-6, "{kind} {m}");
        }
    }
}

#[test]
fn cat_is_exactly_the_weighted_sum_of_deltas() {
    let (adapters, weights) = inputs();
    let ours = merge(&adapters, &weights, &Method::Cat, None).unwrap();
    for (m, (a, b)) in &ours.modules {
        let want = weighted_delta(&adapters, &weights, m);
        assert!(max_diff(&b.matmul(a), &want) < 1e-6, "{m}");
    }
}

#[test]
fn svd_matches_peft_and_is_the_best_rank_r_approximation() {
    let (adapters, weights) = inputs();
    let r = json("peft/merge/merge.json")["svd_rank"].as_i64().unwrap();
    let ours = merge(&adapters, &weights, &Method::Svd, Some(r)).unwrap();
    let peft = peft_result("svd");
    for (m, (a, b)) in &ours.modules {
        let (pa, pb) = &peft[m];
        // Singular vectors are defined up to sign: compare the products.
        assert!(max_diff(&b.matmul(a), &pb.matmul(pa)) < 1e-5, "{m}");
        // Eckart–Young: the residual's energy is that of the dropped singular values.
        let want = weighted_delta(&adapters, &weights, m);
        let s = want.svd(true, true).1;
        let dropped = s.narrow(0, r, s.size()[0] - r).pow_tensor_scalar(2).sum(Kind::Float).double_value(&[]);
        let residual = (&want - b.matmul(a)).pow_tensor_scalar(2).sum(Kind::Float).double_value(&[]);
        assert!((dropped - residual).abs() < 1e-6 * (1.0 + dropped), "{m}: {dropped} vs {residual}");
    }
    // Full rank (8 = 4 + 4) reproduces the weighted sum exactly.
    let full = merge(&adapters, &weights, &Method::Svd, Some(8)).unwrap();
    for (m, (a, b)) in &full.modules {
        assert!(max_diff(&b.matmul(a), &weighted_delta(&adapters, &weights, m)) < 1e-5, "{m}");
    }
}

/// TIES by hand on flat values: keep the top-k magnitudes of each delta, elect the sign of
/// the sum, average the agreeing weighted values.
fn ties_by_hand(deltas: &[Vec<f32>], weights: &[f64], density: f64) -> Vec<f32> {
    let n = deltas[0].len();
    let k = (density * n as f64) as usize;
    let pruned: Vec<Vec<f32>> = deltas
        .iter()
        .map(|d| {
            let mut mags: Vec<f32> = d.iter().map(|v| v.abs()).collect();
            mags.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let cut = mags[k - 1];
            d.iter().map(|&v| if v.abs() >= cut { v } else { 0.0 }).collect()
        })
        .collect();
    (0..n)
        .map(|i| {
            let total: f32 = pruned.iter().map(|p| p[i]).sum();
            let sign = if total >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0.0f64, 0.0f64);
            for (p, w) in pruned.iter().zip(weights) {
                if p[i] != 0.0 && p[i].signum() == sign {
                    sum += p[i] as f64 * w;
                    count += 1.0;
                }
            }
            (sum / count.max(1.0)) as f32
        })
        .collect()
}

#[test]
fn ties_equals_trim_elect_sign_disjoint_mean_then_svd() {
    let (adapters, weights) = inputs();
    // Rank 64 ≥ every module's smaller side: the SVD step is exact.
    let ours = merge(&adapters, &weights, &Method::Ties { density: 0.3 }, Some(64)).unwrap();
    assert_eq!(ours.rank, 64);
    for (m, (a, b)) in &ours.modules {
        assert_eq!(a.size()[0], 64, "{m}: padded to the common rank");
        let deltas: Vec<Vec<f32>> = adapters
            .iter()
            .map(|ad| {
                let (fa, fb) = &ad.modules[m];
                Vec::<f32>::try_from(&(fb.matmul(fa) * ad.settings.scaling()).reshape([-1])).unwrap()
            })
            .collect();
        let want = Tensor::from_slice(&ties_by_hand(&deltas, &weights, 0.3)).view(b.matmul(a).size().as_slice());
        assert!(max_diff(&b.matmul(a), &want) < 1e-5, "{m}");
    }
}

#[test]
fn dare_drops_at_rate_p_rescales_and_repeats_with_its_seed() {
    let (adapters, weights) = inputs();
    let p = 0.3;
    let method = Method::Dare { drop: p, seed: 7, ties: false };
    let ours = merge(&adapters[..1], &weights[..1], &method, Some(64)).unwrap();
    let m = "model.layers.0.mlp.up_proj";
    let (a, b) = &ours.modules[m];
    let got = b.matmul(a);
    let full = weighted_delta(&adapters[..1], &weights[..1], m) / (1.0 - p);
    // Every entry is either dropped (0) or the full weighted delta rescaled by 1/(1−p).
    let kept = (&got - &full).abs().le(1e-5);
    let dropped = got.abs().le(1e-6);
    assert!(kept.logical_or(&dropped).all().int64_value(&[]) == 1);
    let frac = dropped.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert!((frac - p).abs() < 0.05, "dropped fraction {frac}");
    let again = merge(&adapters[..1], &weights[..1], &method, Some(64)).unwrap();
    assert_eq!(max_diff(&again.modules[m].1.matmul(&again.modules[m].0), &got), 0.0);
    let other = merge(&adapters[..1], &weights[..1], &Method::Dare { drop: p, seed: 8, ties: false }, Some(64)).unwrap();
    assert!(max_diff(&other.modules[m].1.matmul(&other.modules[m].0), &got) > 1e-3);
}

#[test]
fn merged_adapters_load_into_the_model_and_from_the_cli() {
    let (adapters, weights) = inputs();
    let tmp = tempfile::tempdir().unwrap();
    let ours = merge(&adapters, &weights, &Method::Cat, None).unwrap();
    save(&ours, tmp.path(), &Method::Cat).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_i64(), cfg["lora_alpha"].as_i64()), (Some(8), Some(8)));
    let mut model = ftx::model::CausalLm::load(&fixture("models/llama3"), ftx::model::decoder::LoadOptions { device: tch::Device::Cpu, kind: Kind::Float }).unwrap();
    ftx::peft::load_adapter(&mut model, tmp.path()).unwrap();

    let out = tmp.path().join("cli");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ftx"))
        .args(["merge", "--adapter", fixture("peft/adapters/lora_llama3").to_str().unwrap(), "--adapter", fixture("peft/adapters/rslora_llama3").to_str().unwrap()])
        .args(["--weight", "0.7", "--weight", "-0.4", "--method", "svd", "--rank", "6", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli = all_tensors_of(&out.join("adapter_model.safetensors"));
    let peft = peft_result("svd");
    let m = "model.layers.1.self_attn.v_proj";
    let (a, b) = (&cli[&format!("base_model.model.{m}.lora_A.weight")], &cli[&format!("base_model.model.{m}.lora_B.weight")]);
    assert!(max_diff(&b.matmul(a), &peft[m].1.matmul(&peft[m].0)) < 1e-5);
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_ftx"))
        .args(["merge", "--adapter", fixture("peft/adapters/dora_llama3").to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("DoRA"));
}

fn all_tensors_of(path: &std::path::Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}
