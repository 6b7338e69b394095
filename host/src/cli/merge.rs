//! `ftx merge --adapter A --adapter B [--weight 0.7 --weight 0.3] --method svd --out DIR`

use crate::peft::merge::{self, Method};
use std::path::PathBuf;

/// Arguments of `ftx merge`.
#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// A PEFT LoRA adapter folder (repeat, two or more).
    #[arg(long = "adapter", required = true)]
    pub adapters: Vec<PathBuf>,
    /// One weight per adapter, in order (default: 1 each).
    #[arg(long = "weight", allow_negative_numbers = true)]
    pub weights: Vec<f64>,
    /// cat, linear, svd, ties or dare.
    #[arg(long, default_value = "svd")]
    pub method: String,
    /// Target rank of svd, ties and dare (default: the largest input rank).
    #[arg(long)]
    pub rank: Option<i64>,
    /// ties: fraction of each ΔW's entries kept (by magnitude).
    #[arg(long, default_value_t = 0.5)]
    pub density: f64,
    /// dare: probability of dropping an entry.
    #[arg(long, default_value_t = 0.5)]
    pub drop: f64,
    /// dare: seed of the random drop.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// dare: combine the rescaled deltas with TIES sign election instead of a weighted sum.
    #[arg(long)]
    pub dare_ties: bool,
    /// The merged adapter's folder.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: MergeArgs) -> anyhow::Result<()> {
    let method = match a.method.as_str() {
        "cat" => Method::Cat,
        "linear" => Method::Linear,
        "svd" => Method::Svd,
        "ties" => Method::Ties { density: a.density },
        "dare" => Method::Dare { drop: a.drop, seed: a.seed, ties: a.dare_ties },
        other => anyhow::bail!("unknown merge method '{other}': use cat, linear, svd, ties or dare"),
    };
    let weights = if a.weights.is_empty() { vec![1.0; a.adapters.len()] } else { a.weights.clone() };
    let loaded = a.adapters.iter().map(|p| merge::read_adapter(p)).collect::<Result<Vec<_>, _>>()?;
    let merged = merge::merge(&loaded, &weights, &method, a.rank)?;
    merge::save(&merged, &a.out, &method)?;
    println!("wrote {} (rank {}, {} modules, {})", a.out.display(), merged.rank, merged.modules.len(), a.method);
    Ok(())
}
