//! The preference driver's own part: a preference run (DPO, ORPO, SimPO, KTO through a loss
//! plugin) trains in the SFT loop ([`super::sft`]) with the objective set up here, the loss
//! plugin of the run's `[[plugins]]` and its reference log-probs arranged.

use crate::align::{PreferenceObjective, Reference};
use crate::model::CausalLm;
use crate::plugins::loss::LossPlugin;
use crate::train::dataset::{collate, PreparedData};
use crate::train::TrainConfig;
use anyhow::{bail, Result};
use tch::Device;

/// The loss plugin of a preference run, with its reference log-probs arranged.
pub fn preference_objective(cfg: &TrainConfig, model: &CausalLm, adapters: bool, data: &PreparedData, pad_id: i64, device: Device) -> Result<PreferenceObjective> {
    let mut loss = None;
    for entry in &cfg.plugin_entries() {
        let path = crate::plugins::manifest::locate(&entry.path)?;
        // The kind first (the component is compiled once per process; loading reuses it).
        let (kind, _) = crate::plugins::kind_of(&path)?;
        if kind == crate::plugins::PluginKind::Loss {
            let plugin = LossPlugin::load_granted(&path, entry.limits(), device, &entry.grant)?;
            loss = Some((plugin, entry.params.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>()));
            break;
        }
    }
    let Some((plugin, params)) = loss else {
        bail!("the data are preference pairs: name a loss plugin (method.objective = \"dpo\" in ftx.toml, `ftx --plugin dpo train …`, or a [[plugins]] table; first-party: dpo, orpo, simpo, kto)");
    };
    let name = plugin.name.clone();
    let loss = crate::align::PreferenceLoss::Plugin(plugin);
    let reference = if !loss.needs_reference() {
        Reference::None
    } else if adapters && cfg.model.adapter.is_none() {
        Reference::AdaptersOff
    } else {
        // Full fine-tuning, or adapters that start from model.adapter (the reference is then
        // base + that adapter, as loaded): the initial model's log-probs, computed once.
        // Validation pairs too, keyed apart from the training pairs (see VALIDATION_PAIRS).
        let split = |examples: &'_ [crate::data::TokenizedExample], key: usize| {
            let units: Vec<usize> = (0..examples.len() / 2).collect();
            units
                .chunks(cfg.train.batch_size)
                .map(|c| {
                    let idx: Vec<usize> = c.iter().flat_map(|&u| [2 * u, 2 * u + 1]).collect();
                    (c.iter().map(|u| key + u).collect(), collate(examples, &idx, cfg, pad_id, device, true))
                })
                .collect::<Vec<_>>()
        };
        let batches = split(&data.train, 0).into_iter().chain(split(&data.validation, crate::align::VALIDATION_PAIRS));
        Reference::Precomputed(crate::align::precompute_reference(model, batches))
    };
    tracing::info!(plugin = %name, reference = ?std::mem::discriminant(&reference), "preference objective");
    Ok(PreferenceObjective { loss, params, reference })
}
