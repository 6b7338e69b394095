//! Many LoRA adapters in one forward pass, row by row (as multi-LoRA servers do): every
//! projection carries a [`RowAdapters`] holding each loaded adapter's factors for that layer,
//! and a [`RowPlan`] shared by all projections says which adapter (or the base) each batch row
//! uses. The base GEMM runs once over the whole batch; each adapter's low-rank term is computed
//! on its rows only (`index_select`) and added back in place (`index_add`). DoRA rows, whose
//! magnitude rescales the base output too, run the adapter's own forward on their rows.
//! A batch that uses a single adapter (or none) runs exactly as that adapter alone.

use crate::model::linear::{Adapter, BaseLinear};
use crate::model::CausalLm;
use crate::peft::lora::LoraAdapter;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// Which adapter each row of the next forward uses.
#[derive(Default)]
struct Plan {
    /// `Some(a)`: every row uses `a` (`None`: the base model).
    uniform: Option<Option<String>>,
    /// Mixed batches: each adapter's rows (int64 indices on the model's device).
    groups: Vec<(String, Tensor)>,
}

/// The per-row adapter choice, shared by every projection of the model.
#[derive(Clone, Default)]
pub struct RowPlan(Arc<Mutex<Plan>>);

impl RowPlan {
    /// Sets the adapter of each row of the next forward (`None`: the base model).
    pub fn set(&self, rows: &[Option<String>], device: Device) {
        let mut plan = Plan::default();
        match rows.first() {
            Some(first) if rows.iter().all(|r| r == first) => plan.uniform = Some(first.clone()),
            None => plan.uniform = Some(None),
            Some(_) => {
                let mut groups: Vec<(String, Vec<i64>)> = Vec::new();
                for (i, name) in rows.iter().enumerate() {
                    let Some(name) = name else { continue };
                    match groups.iter_mut().find(|(n, _)| n == name) {
                        Some((_, v)) => v.push(i as i64),
                        None => groups.push((name.clone(), vec![i as i64])),
                    }
                }
                plan.groups = groups.into_iter().map(|(n, v)| (n, Tensor::from_slice(&v).to_device(device))).collect();
            }
        }
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = plan;
    }
}

/// One projection's adapters, by name, applied to the rows the plan gives them.
pub struct RowAdapters {
    by_name: HashMap<String, LoraAdapter>,
    plan: RowPlan,
}

impl RowAdapters {
    /// The factors of each `(name, adapter)` (LoRA or DoRA; their tensors are shared, not
    /// copied). An adapter without low-rank factors cannot be batched by row: its name comes back.
    pub fn new<'a>(adapters: impl IntoIterator<Item = (&'a str, &'a dyn Adapter)>, plan: RowPlan) -> Result<RowAdapters, String> {
        let mut by_name = HashMap::new();
        for (name, a) in adapters {
            let lr = a.low_rank().ok_or_else(|| name.to_owned())?;
            let copy = LoraAdapter {
                a: lr.a.shallow_clone(),
                b: lr.b.shallow_clone(),
                magnitude: lr.magnitude.map(Tensor::shallow_clone),
                base_row_sq: lr.base_row_sq.map(Tensor::shallow_clone),
                scaling: lr.scaling,
                dropout: lr.dropout,
            };
            by_name.insert(name.to_owned(), copy);
        }
        Ok(RowAdapters { by_name, plan })
    }
}

impl Adapter for RowAdapters {
    fn forward(&self, x: &Tensor, base: &BaseLinear, _train: bool) -> Tensor {
        let plan = self.plan.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(one) = &plan.uniform {
            return match one.as_ref().and_then(|n| self.by_name.get(n)) {
                Some(a) => a.forward(x, base, false),
                None => base.forward(x),
            };
        }
        let mut y = base.forward(x);
        for (name, rows) in &plan.groups {
            // An adapter that does not target this projection leaves its rows on the base.
            let Some(a) = self.by_name.get(name) else { continue };
            let xs = x.index_select(0, rows);
            y = match a.magnitude {
                None => {
                    let delta = (xs.linear::<Tensor>(&a.a, None) * a.scaling).linear::<Tensor>(&a.b, None);
                    y.index_add(0, rows, &delta.to_kind(y.kind()))
                }
                Some(_) => y.index_copy(0, rows, &a.forward(&xs, base, false)),
            };
        }
        y
    }

    /// Not saved: the adapters are saved from their own folders.
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// The planned adapter's weight change when the batch uses one; zero otherwise.
    fn delta_weight(&self, base: &BaseLinear) -> Tensor {
        let plan = self.plan.0.lock().unwrap_or_else(|e| e.into_inner());
        match plan.uniform.as_ref().and_then(|n| n.as_ref()).and_then(|n| self.by_name.get(n)) {
            Some(a) => a.delta_weight(base),
            None => {
                let (out, inp) = base.shape();
                Tensor::zeros([out, inp], (Kind::Float, base.dense_weight().device()))
            }
        }
    }
}

/// Adapters moved out of the model, one slot per projection (`linears_mut` order); the
/// model's projections carry [`RowAdapters`] views of all of them, routed by `plan`.
#[derive(Default)]
pub struct AdapterStore {
    /// Each adapter's modules by name.
    pub stored: HashMap<String, Vec<Option<Box<dyn Adapter>>>>,
    /// Which adapter each row of the next forward uses.
    pub plan: RowPlan,
    /// The stored adapters that adapt mixture-of-experts expert projections.
    on_experts: std::collections::HashSet<String>,
}

impl AdapterStore {
    /// No adapters yet.
    pub fn new() -> AdapterStore {
        AdapterStore::default()
    }

    /// Gives every projection the row-routed view of the stored adapters that target it.
    pub fn mount(&self, model: &mut CausalLm) -> Result<(), String> {
        for (i, (_, lin)) in model.linears_mut().into_iter().enumerate() {
            let here: Vec<(&str, &dyn Adapter)> =
                self.stored.iter().filter_map(|(n, slots)| slots.get(i).and_then(|s| s.as_deref()).map(|a| (n.as_str(), a))).collect();
            lin.adapter = if here.is_empty() {
                None
            } else {
                let rows = RowAdapters::new(here, self.plan.clone()).map_err(|n| format!("the adapter '{n}' is neither LoRA nor DoRA; ftx serve batches only those"))?;
                Some(Box::new(rows))
            };
        }
        Ok(())
    }

    /// Whether a forward of rows using `adapters` must run one adapter at a time: rows that
    /// differ, one of them through an adapter of expert projections. The experts see their
    /// tokens sorted by expert, not in batch rows, so the row plan cannot route them.
    pub fn needs_one_adapter_per_forward(&self, adapters: &[Option<String>]) -> bool {
        let mixed = adapters.windows(2).any(|w| w[0] != w[1]);
        mixed && adapters.iter().flatten().any(|a| self.on_experts.contains(a))
    }

    /// Forgets an adapter's modules.
    pub fn unload(&mut self, model: &mut CausalLm, name: &str) -> bool {
        self.on_experts.remove(name);
        let known = self.stored.remove(name).is_some();
        // Views of the remaining adapters only: mounting them worked before.
        let _ = self.mount(model);
        known
    }

    /// Attaches the PEFT adapter folder `path` under `name` (the model is left with the
    /// row-routed views of every stored adapter, whether or not it worked).
    pub fn load(&mut self, model: &mut CausalLm, name: &str, path: &std::path::Path) -> Result<(), String> {
        // Row routing covers projections; an adapter of the experts' stacked parameters would
        // stay attached to the model and change every request.
        if crate::peft::read_adapter_config(path).is_ok_and(|s| s.targets_expert_parameters()) {
            return Err(format!(
                "adapter {}: adapts the experts' stacked parameters (target_parameters mlp.experts.*), which ftx serve cannot route per request; \
                 merge it into the base (ftx export --format merged) and serve the merged model",
                path.display()
            ));
        }
        for (_, lin) in model.linears_mut() {
            lin.adapter = None;
        }
        let result = crate::peft::load_adapter(model, path).map(|_| ());
        // On success the fresh modules go to the store; on failure they are dropped.
        let (names, slots): (Vec<String>, Vec<_>) = model.linears_mut().into_iter().map(|(n, l)| (n, l.adapter.take())).unzip();
        let result = result.map_err(|e| format!("adapter {}: {e}", path.display()));
        if result.is_ok() {
            if names.iter().zip(&slots).any(|(n, s)| s.is_some() && n.contains(".experts.")) {
                self.on_experts.insert(name.to_owned());
            } else {
                self.on_experts.remove(name);
            }
            self.stored.insert(name.to_owned(), slots);
        }
        let mounted = self.mount(model);
        if mounted.is_err() {
            self.stored.remove(name);
            self.on_experts.remove(name);
            let _ = self.mount(model);
        }
        result.and(mounted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linear::Linear;

    fn lora(inp: i64, out: i64, r: i64, dora: bool, seed: i64) -> LoraAdapter {
        tch::manual_seed(seed);
        let base = BaseLinear { weight: crate::model::linear::Weight::Dense(Tensor::randn([out, inp], (Kind::Float, Device::Cpu))), bias: None };
        let mut a = LoraAdapter::init(&base, r, 0.5 + seed as f64, 0.0, dora);
        a.b = Tensor::randn([out, r], (Kind::Float, Device::Cpu));
        if let Some(m) = &mut a.magnitude {
            *m = Tensor::rand([out], (Kind::Float, Device::Cpu)) + 0.5;
        }
        a
    }

    /// Rows for two adapters of different ranks (one DoRA) and the base, in one call, equal
    /// each row run through its own adapter alone.
    #[test]
    fn mixed_rows_equal_each_adapter_alone() {
        let _g = tch::no_grad_guard();
        let (inp, out) = (8, 6);
        tch::manual_seed(0);
        let w = Tensor::randn([out, inp], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([out], (Kind::Float, Device::Cpu));
        let layer = Linear::new(w, Some(bias));
        let adapters = [("a", lora(inp, out, 2, false, 1)), ("b", lora(inp, out, 4, true, 2))];
        let plan = RowPlan::default();
        let rows = RowAdapters::new(adapters.iter().map(|(n, a)| (*n, a as &dyn Adapter)), plan.clone()).unwrap();
        let x = Tensor::randn([5, 3, inp], (Kind::Float, Device::Cpu));
        let who = [Some("a"), None, Some("b"), Some("a"), Some("b")];
        plan.set(&who.map(|w| w.map(str::to_owned)), Device::Cpu);
        let got = rows.forward(&x, &layer.base, false);
        for (r, name) in who.iter().enumerate() {
            let xr = x.narrow(0, r as i64, 1);
            let want = match name {
                Some(n) => adapters.iter().find(|(m, _)| m == n).unwrap().1.forward(&xr, &layer.base, false),
                None => layer.base.forward(&xr),
            };
            let d = (got.narrow(0, r as i64, 1) - want).abs().max().double_value(&[]);
            assert!(d < 1e-5, "row {r} ({name:?}): {d}");
        }
        // A batch of one adapter runs as that adapter.
        plan.set(&[Some("b".to_owned()), Some("b".to_owned())], Device::Cpu);
        let x2 = x.narrow(0, 0, 2);
        let d = (rows.forward(&x2, &layer.base, false) - adapters[1].1.forward(&x2, &layer.base, false)).abs().max().double_value(&[]);
        assert_eq!(d, 0.0);
    }
}
