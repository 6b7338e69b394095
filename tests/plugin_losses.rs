//! The second set of first-party plugins: the SimPO, KTO, PPO and GRPO losses give their
//! papers' values and gradients (computed here by hand, in f64), and the refusal and
//! regex-filter filters and exact-match and regex-match rewards decide tricky cases right.

use crate::plugins::wasm;
use ftx::plugins::filter::{FilterPlugin, Verdict};
use ftx::plugins::loss::{LossPlugin, LossValue};
use ftx::plugins::reward::{RewardPlugin, RewardSample};
use ftx::plugins::Limits;
use tch::{Device, Tensor};

fn load(name: &str) -> LossPlugin {
    LossPlugin::load(&wasm(name), Limits::default(), Device::Cpu).unwrap()
}

/// A leaf tensor of `shape` that collects gradients.
fn leaf(v: &[f32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).reshape(shape).detach().set_requires_grad(true)
}

fn grad(t: &Tensor) -> Vec<f64> {
    Vec::<f32>::try_from(t.grad().flatten(0, -1)).unwrap().into_iter().map(f64::from).collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

#[track_caller]
fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{what}: {got} vs {want}");
}

#[track_caller]
fn close_all(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(*g, *w, &format!("{what}[{i}]"));
    }
}

fn metric(out: &LossValue, name: &str) -> f64 {
    out.metrics.iter().find(|m| m.0 == name).unwrap_or_else(|| panic!("no metric {name}: {:?}", out.metrics)).1
}

fn params_of(p: &LossPlugin) -> Vec<(&str, f64)> {
    p.params.iter().map(|s| (s.name.as_str(), s.default)).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn simpo_plugin_matches_the_paper_formula_value_and_gradient() {
    let mut simpo = load("simpo");
    assert_eq!(simpo.inputs, ["policy_chosen_mean_logps", "policy_rejected_mean_logps"]);
    assert_eq!(params_of(&simpo), [("beta", 2.0), ("gamma_beta_ratio", 0.5)]);
    let (c, r) = ([-0.8f32, -1.5, -0.3, -1.0], [-1.2f32, -0.9, -2.0, -1.05]);
    // The defaults, then other settings: the margin is γ/β, subtracted before scaling by β.
    for (beta, ratio, overrides) in [(2.0, 0.5, vec![]), (2.5, 0.3, vec![("beta".to_string(), 2.5), ("gamma_beta_ratio".to_string(), 0.3)])] {
        let (tc, tr) = (leaf(&c, &[4]), leaf(&r, &[4]));
        let out = simpo.compute(&[("policy_chosen_mean_logps", &tc), ("policy_rejected_mean_logps", &tr)], &overrides).unwrap();
        // Paper: −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ) with γ = ratio·β;
        // ∂/∂m_w = −β σ(−z)/n, ∂/∂m_l = +β σ(−z)/n.
        let n = 4.0;
        let z: Vec<f64> = (0..4).map(|i| beta * c[i] as f64 - beta * r[i] as f64 - ratio * beta).collect();
        close(out.loss.double_value(&[]), z.iter().map(|&z| -log_sigmoid(z)).sum::<f64>() / n, "simpo loss");
        out.loss.backward();
        close_all(&grad(&tc), &z.iter().map(|&z| -beta * sigmoid(-z) / n).collect::<Vec<_>>(), "∂/∂chosen");
        close_all(&grad(&tr), &z.iter().map(|&z| beta * sigmoid(-z) / n).collect::<Vec<_>>(), "∂/∂rejected");
        let margin = (0..4).map(|i| beta * (c[i] - r[i]) as f64).sum::<f64>() / n;
        close(metric(&out, "rewards/margin"), margin, "margin");
        close(metric(&out, "rewards/accuracy"), 0.75, "accuracy");
    }
}

#[test]
fn kto_plugin_matches_the_paper_formula_with_a_detached_clamped_reference_point() {
    let mut kto = load("kto");
    assert_eq!(kto.inputs, ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"]);
    assert_eq!(params_of(&kto), [("beta", 0.1), ("desirable_weight", 1.0), ("undesirable_weight", 1.0)]);
    let (pc, rc) = ([-10.0f32, -12.5, -8.0], [-10.8f32, -12.0, -9.1]);
    let pr = [-11.0f32, -13.0, -9.5];
    // Rejected log-ratios averaging +1/3 (z₀ = 1/3), then −5/6 (z₀ clamped to 0).
    let cases = [
        ([-12.2f32, -13.3, -9.0], 0.5, 1.33, 0.7, vec![("beta".to_string(), 0.5), ("desirable_weight".to_string(), 1.33), ("undesirable_weight".to_string(), 0.7)]),
        ([-10.0f32, -12.0, -9.0], 0.1, 1.0, 1.0, vec![]),
    ];
    for (rr, beta, wd, wu, overrides) in cases {
        let (tpc, tpr) = (leaf(&pc, &[3]), leaf(&pr, &[3]));
        let (trc, trr) = (Tensor::from_slice(&rc), Tensor::from_slice(&rr));
        let out = kto
            .compute(&[("policy_chosen_logps", &tpc), ("policy_rejected_logps", &tpr), ("reference_chosen_logps", &trc), ("reference_rejected_logps", &trr)], &overrides)
            .unwrap();
        let cw: Vec<f64> = (0..3).map(|i| (pc[i] - rc[i]) as f64).collect();
        let rl: Vec<f64> = (0..3).map(|i| (pr[i] - rr[i]) as f64).collect();
        let z0 = (rl.iter().sum::<f64>() / 3.0).max(0.0);
        close(metric(&out, "kl"), z0, "kl");
        // Eq. 7, λ_y − v(x, y), averaged over the 2n examples.
        let n2 = 6.0;
        let want = (cw.iter().map(|&c| wd * (1.0 - sigmoid(beta * (c - z0)))).sum::<f64>() + rl.iter().map(|&r| wu * (1.0 - sigmoid(beta * (z0 - r)))).sum::<f64>()) / n2;
        close(out.loss.double_value(&[]), want, "kto loss");
        // z₀ is detached: each example's gradient is its own term's only.
        out.loss.backward();
        let ds = |x: f64| sigmoid(x) * (1.0 - sigmoid(x));
        close_all(&grad(&tpc), &cw.iter().map(|&c| -wd * beta * ds(beta * (c - z0)) / n2).collect::<Vec<_>>(), "∂/∂policy_chosen");
        close_all(&grad(&tpr), &rl.iter().map(|&r| wu * beta * ds(beta * (z0 - r)) / n2).collect::<Vec<_>>(), "∂/∂policy_rejected");
    }
}

/// PPO by hand: (loss, pg_loss, vf_loss, clipfrac, approx_kl, ∂loss/∂logps, ∂loss/∂values).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn ppo_by_hand(l: &[f64], o: &[f64], a: &[f64], v: &[f64], ov: &[f64], ret: &[f64], m: &[f64], eps: f64, eps_v: f64, vf_coef: f64) -> (f64, f64, f64, f64, f64, Vec<f64>, Vec<f64>) {
    let n: f64 = m.iter().sum();
    let (mut pg, mut vf, mut clipped, mut kl) = (0.0, 0.0, 0.0, 0.0);
    let (mut gl, mut gv) = (vec![0.0; l.len()], vec![0.0; l.len()]);
    for i in 0..l.len() {
        if m[i] == 0.0 {
            continue;
        }
        let r = (l[i] - o[i]).exp();
        let in_range = (1.0 - eps..=1.0 + eps).contains(&r);
        let (pg1, pg2) = (-a[i] * r, -a[i] * r.clamp(1.0 - eps, 1.0 + eps));
        pg += pg1.max(pg2);
        clipped += f64::from(u8::from(pg2 > pg1));
        kl += 0.5 * (l[i] - o[i]).powi(2);
        // The unclipped term carries the gradient when it is the larger (or equal: in range).
        let (vc, v_in) = (v[i].clamp(ov[i] - eps_v, ov[i] + eps_v), (ov[i] - eps_v..=ov[i] + eps_v).contains(&v[i]));
        let (vf1, vf2) = ((v[i] - ret[i]).powi(2), (vc - ret[i]).powi(2));
        vf += 0.5 * vf1.max(vf2);
        gl[i] = if in_range || pg1 > pg2 { -a[i] * r / n } else { 0.0 };
        gv[i] = if v_in || vf1 > vf2 { vf_coef * (v[i] - ret[i]) / n } else { 0.0 };
    }
    let (pg, vf) = (pg / n, vf / n);
    (pg + vf_coef * vf, pg, vf, clipped / n, kl / n, gl, gv)
}

#[test]
fn ppo_plugin_matches_the_clipped_objective_value_gradient_and_metrics() {
    let mut ppo = load("ppo");
    assert_eq!(ppo.inputs, ["logps", "old_logps", "advantages", "values", "old_values", "returns", "mask"]);
    assert_eq!(params_of(&ppo), [("clip_range", 0.2), ("clip_range_value", 0.2), ("vf_coef", 0.1)]);
    // Two sequences of three tokens: ratio clipped above with A > 0, clipped below with A < 0,
    // in range, above the range with A < 0 (unclipped term wins), in range, and a masked-out
    // token full of garbage that must not count. Values: clipped from above and from below
    // with the clipped error the larger, in range, and above the range with the unclipped
    // error the larger.
    let l = [-1.0f32, -2.0, -0.5, -1.1, -0.9, 3.0];
    let o = [-1.3f32, -1.6, -0.55, -1.5, -0.85, -4.0];
    let a = [1.5f32, -0.8, 0.7, -0.5, -1.2, 10.0];
    let v = [0.5f32, -0.3, 1.3, -0.45, 0.85, 50.0];
    let ov = [0.2f32, -0.25, 0.7, 0.1, 0.3, 0.0];
    let ret = [1.0f32, 0.4, 0.6, -0.6, 0.9, -50.0];
    let m = [1.0f32, 1.0, 1.0, 1.0, 1.0, 0.0];
    let settings = [
        (0.2, 0.2, 0.1, vec![]),
        (0.1, 0.5, 0.5, vec![("clip_range".to_string(), 0.1), ("clip_range_value".to_string(), 0.5), ("vf_coef".to_string(), 0.5)]),
    ];
    for (eps, eps_v, vf_coef, overrides) in settings {
        let (tl, tv) = (leaf(&l, &[2, 3]), leaf(&v, &[2, 3]));
        let [to, ta, tov, tret, tm] = [&o, &a, &ov, &ret, &m].map(|x| Tensor::from_slice(x).reshape([2, 3]));
        let inputs = [("logps", &tl), ("old_logps", &to), ("advantages", &ta), ("values", &tv), ("old_values", &tov), ("returns", &tret), ("mask", &tm)];
        let out = ppo.compute(&inputs, &overrides).unwrap();
        let (loss, pg, vf, clipfrac, kl, gl, gv) = ppo_by_hand(&f64s(&l), &f64s(&o), &f64s(&a), &f64s(&v), &f64s(&ov), &f64s(&ret), &f64s(&m), eps, eps_v, vf_coef);
        close(out.loss.double_value(&[]), loss, "ppo loss");
        close(metric(&out, "pg_loss"), pg, "pg_loss");
        close(metric(&out, "vf_loss"), vf, "vf_loss");
        close(metric(&out, "clipfrac"), clipfrac, "clipfrac");
        close(metric(&out, "approx_kl"), kl, "approx_kl");
        out.loss.backward();
        close_all(&grad(&tl), &gl, "∂/∂logps");
        close_all(&grad(&tv), &gv, "∂/∂values");
    }
    // The data do exercise both branches at the defaults: 2 of 5 ratios clipped, and 3 of 5
    // values with the clipped error the larger (no gradient).
    let (.., clipfrac, _, gl, gv) = ppo_by_hand(&f64s(&l), &f64s(&o), &f64s(&a), &f64s(&v), &f64s(&ov), &f64s(&ret), &f64s(&m), 0.2, 0.2, 0.1);
    assert_eq!((clipfrac, gl.iter().filter(|g| **g == 0.0).count(), gv.iter().filter(|g| **g == 0.0).count()), (0.4, 3, 4));
}

#[test]
fn grpo_plugin_matches_the_paper_formula_per_sequence_value_gradient_and_metrics() {
    let mut grpo = load("grpo");
    assert_eq!(grpo.inputs, ["logps", "old_logps", "ref_logps", "advantages", "mask"]);
    assert_eq!(params_of(&grpo), [("beta", 0.04), ("epsilon", 0.2)]);
    // Two completions, of 4 and 3 tokens (the 4th of the second is padding with garbage).
    let l = [-1.0f32, -0.7, -2.0, -1.5, -0.3, -1.2, -0.9, 4.0];
    let o = [-1.3f32, -0.6, -1.6, -1.5, -0.35, -1.6, -1.3, -3.0];
    let rf = [-1.1f32, -0.9, -1.8, -1.2, -0.5, -1.0, -1.0, 1.0];
    let a = [0.9f32, 0.9, -0.6, -0.6, -1.1, -1.1, 1.2, 7.0];
    let m = [1.0f32, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0];
    let (b, t) = (2usize, 4usize);
    for (beta, eps, overrides) in [(0.04, 0.2, vec![]), (0.1, 0.3, vec![("beta".to_string(), 0.1), ("epsilon".to_string(), 0.3)])] {
        let tl = leaf(&l, &[2, 4]);
        let [to, trf, ta, tm] = [&o, &rf, &a, &m].map(|x| Tensor::from_slice(x).reshape([2, 4]));
        let out = grpo.compute(&[("logps", &tl), ("old_logps", &to), ("ref_logps", &trf), ("advantages", &ta), ("mask", &tm)], &overrides).unwrap();
        // (1/G) Σ_i (1/|o_i|) Σ_t [−min(ρA, clip(ρ)A) + β(e^d − d − 1)], d = ref − logp.
        let (mut loss, mut kl_sum, mut clip_sum, mut g) = (0.0, 0.0, 0.0, vec![0.0; b * t]);
        let total: f64 = m.iter().map(|&x| x as f64).sum();
        for s in 0..b {
            let len: f64 = (0..t).map(|k| m[s * t + k] as f64).sum();
            for k in 0..t {
                let i = s * t + k;
                if m[i] == 0.0 {
                    continue;
                }
                let (r, adv, d) = (((l[i] - o[i]) as f64).exp(), a[i] as f64, (rf[i] - l[i]) as f64);
                let (s1, s2) = (r * adv, r.clamp(1.0 - eps, 1.0 + eps) * adv);
                let kl = d.exp() - d - 1.0;
                loss += (-s1.min(s2) + beta * kl) / len / b as f64;
                kl_sum += kl;
                clip_sum += f64::from(u8::from((r < 1.0 - eps && adv < 0.0) || (r > 1.0 + eps && adv > 0.0)));
                let pg_grad = if (1.0 - eps..=1.0 + eps).contains(&r) || s1 < s2 { -adv * r } else { 0.0 };
                g[i] = (pg_grad + beta * (1.0 - d.exp())) / len / b as f64;
            }
        }
        close(out.loss.double_value(&[]), loss, "grpo loss");
        close(metric(&out, "kl"), kl_sum / total, "kl");
        close(metric(&out, "clip_ratio"), clip_sum / total, "clip_ratio");
        out.loss.backward();
        close_all(&grad(&tl), &g, "∂/∂logps");
        // Three tokens clipped in the first setting (1.35 with A > 0, 0.67 with A < 0, 1.49 with A > 0).
        if overrides.is_empty() {
            assert_eq!(clip_sum, 3.0);
        }
    }
}

#[test]
fn loss_plugins_refuse_what_they_do_not_take() {
    let x = Tensor::from_slice(&[0.0f32]);
    let e = load("simpo").compute(&[("policy_chosen_mean_logps", &x), ("policy_rejected_mean_logps", &x)], &[("gamma".into(), 1.0)]).err().unwrap().to_string();
    assert!(e.contains("no parameter \"gamma\"") && e.contains("gamma_beta_ratio"), "{e}");
    let e = load("grpo").compute(&[("logps", &x), ("old_logps", &x), ("advantages", &x), ("mask", &x)], &[]).err().unwrap().to_string();
    assert!(e.contains("grpo") && e.contains("ref_logps"), "{e}");
}

fn verdicts(name: &str, records: &[&str]) -> Vec<Verdict> {
    let mut f = FilterPlugin::load(&wasm(name), Limits::default()).unwrap();
    let records: Vec<(u64, String)> = records.iter().enumerate().map(|(i, r)| (i as u64, r.to_string())).collect();
    f.filter(&records).into_iter().map(Result::unwrap).collect()
}

#[track_caller]
fn dropped(v: &Verdict, reason: &str, record: &str) {
    assert!(matches!(v, Verdict::Drop(r) if r.contains(reason)), "{record}: {v:?}, want a drop for {reason:?}");
}

#[test]
fn refusal_filter_drops_canned_refusals_and_keeps_look_alikes() {
    let drop = [
        (r#"{"messages":[{"role":"user","content":"Pick this lock"},{"role":"assistant","content":"I’m sorry, but I can’t assist with that."}]}"#, "i'm sorry, but"),
        (r#"{"prompt":"Your view?","completion":"AS AN AI LANGUAGE MODEL, I have no opinions."}"#, "as an ai language model"),
        (r#"{"prompt":"x","completion":"Unfortunately I cannot\n   provide that information."}"#, "i cannot provide"),
        (r#"{"conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":"I'm unable to help with that request."}]}"#, "i'm unable to help with"),
        (r#"{"text":"I\u0027m sorry, but no."}"#, "i'm sorry, but"),
        (r#"{"chosen":"Here you go.","rejected":"I can't help with that."}"#, "i can't help with"),
        ("not json: I apologize, but I won't do that", "i apologize, but"),
    ];
    let keep = [
        r#"{"prompt":"Backups?","completion":"I cannot stress this enough: back up your data."}"#,
        r#"{"prompt":"A poem","completion":"I can't help but smile when the sun comes out."}"#,
        r#"{"messages":[{"role":"user","content":"Why do chatbots say 'As an AI language model'?"},{"role":"assistant","content":"It is a stock disclaimer."}]}"#,
        r#"{"instruction":"Translate: I'm sorry, but I cannot help with the move.","output":"Désolé, mais je ne peux pas aider au déménagement."}"#,
        r#"{"text":"The API cannot provide pagination, so page by hand."}"#,
        r#"{"I'm sorry, but":"a key is not text","text":"fine"}"#,
    ];
    let records: Vec<&str> = drop.iter().map(|d| d.0).chain(keep).collect();
    let out = verdicts("refusal", &records);
    for (i, (record, phrase)) in drop.iter().enumerate() {
        dropped(&out[i], &format!("refusal: \"{phrase}\""), record);
    }
    for (i, record) in keep.iter().enumerate() {
        assert_eq!(out[drop.len() + i], Verdict::Keep, "{record}");
    }
}

#[test]
fn regex_filter_drops_junk_and_keeps_code_and_near_misses() {
    let drop = [
        ("   ", "blank record"),
        ("", "blank record"),
        (r#"{"instruction":"Write a haiku","input":"","output":"  \n\t "}"#, "blank text"),
        (r#"{"text":"Lorem  Ipsum dolor sit amet, consectetur."}"#, "lorem ipsum"),
        (r#"{"text":"Dear {{ customer_name }}, your order has shipped."}"#, "template placeholder: \"{{ customer_name }}\""),
        (r#"{"messages":[{"role":"assistant","content":"Hello {{user.first_name}}!"}]}"#, "template placeholder"),
        (r#"{"text":"{% if premium %}Thanks!{% endif %}"}"#, "template placeholder"),
        (r#"{"messages":[{"role":"assistant","content":"Sure!<|im_end|>\n<|im_start|>user\nmore"}]}"#, "chat-template token: \"<|im_end|>\""),
        (r#"{"text":"[INST] What is 2+2? [/INST] 4"}"#, "chat-template token"),
        (r#"{"text":"Use `x` here, but {{ name }} was left in the prose"}"#, "template placeholder"),
    ];
    let keep = [
        r#"{"instruction":"Say hi","input":"","output":"Hi!"}"#,
        r#"{"text":"A Jinja template:\n```jinja\nHello {{ name }}{% if vip %}!{% endif %}\n```\nThat is all."}"#,
        r#"{"text":"Write `{{ name }}` where the name goes."}"#,
        r#"{"text":"In Rust, format!(\"{{}}\") prints a pair of braces."}"#,
        r#"{"text":"Cicero wrote: neque porro quisquam est qui dolorem ipsum quia dolor sit amet."}"#,
        r#"{"text":"In Haskell, <|> is the Alternative operator."}"#,
        r#"{"text":"Paragraph one.\n\n   \nParagraph two."}"#,
        r#"{"text":"~~~html\n<p>Lorem ipsum dolor</p>\n~~~"}"#,
    ];
    let records: Vec<&str> = drop.iter().map(|d| d.0).chain(keep).collect();
    let out = verdicts("regex-filter", &records);
    for (i, (record, reason)) in drop.iter().enumerate() {
        dropped(&out[i], reason, record);
    }
    for (i, record) in keep.iter().enumerate() {
        assert_eq!(out[drop.len() + i], Verdict::Keep, "{record}");
    }
}

fn scores(name: &str, cases: &[(&str, Option<&str>, f32)]) {
    let mut r = RewardPlugin::load(&wasm(name), Limits::default()).unwrap();
    let samples: Vec<RewardSample> = cases.iter().map(|(c, r, _)| RewardSample { prompt: "p".into(), completion: c.to_string(), reference: r.map(String::from) }).collect();
    let got = r.score(&samples).unwrap();
    for (i, (c, r, want)) in cases.iter().enumerate() {
        assert_eq!(got[i], *want, "{name}: completion {c:?}, reference {r:?}");
    }
}

#[test]
fn exact_match_reward_compares_trimmed_text() {
    scores(
        "exact-match",
        &[
            ("42", Some("42"), 1.0),
            (" 42\n", Some("42 "), 1.0),
            ("42", Some("43"), 0.0),
            ("Paris", Some("paris"), 0.0),
            ("4 2", Some("42"), 0.0),
            ("42", None, 0.0),
            ("", None, 0.0),
            ("The answer is 42", Some("42"), 0.0),
        ],
    );
}

#[test]
fn regex_match_reward_anchors_the_reference_and_scores_bad_patterns_zero() {
    scores(
        "regex-match",
        &[
            ("42", Some(r"\d+"), 1.0),
            ("42\n", Some(r"\d+"), 1.0),
            ("42 apples", Some(r"\d+"), 0.0),
            ("b", Some("a|b"), 1.0),
            ("ab", Some("a|b"), 0.0),
            ("xb", Some("a|b"), 0.0),
            // Unbalanced parentheses cannot break out of the anchors.
            ("ax", Some("a)|(b"), 0.0),
            ("a", Some("a)|(b"), 0.0),
            ("a", Some("("), 0.0),
            ("HELLO", Some("(?i)hello"), 1.0),
            ("HELLO", Some("hello"), 0.0),
            ("1\n2", Some(r"\d"), 0.0),
            ("1\n2", Some(r"\d\n\d"), 1.0),
            ("42", None, 0.0),
            // The same pattern again, in one batch (it is compiled once).
            ("7", Some(r"\d+"), 1.0),
        ],
    );
}
