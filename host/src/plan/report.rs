//! The table `ftx plan` prints.

use super::{mlp_recompute_applies, plan, recompute_extra_flops, Method, Plan, USABLE_PERCENT};
use std::fmt;

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n => format!("{:.1}K", n as f64 / 1e3),
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.request;
        let method = match r.method {
            Method::Full => "full".to_string(),
            m if r.fp8_base => format!("{m} r={} on an FP8 base", r.lora_rank),
            m => format!("{m} r={}", r.lora_rank),
        };
        writeln!(
            f,
            "{} · {method} · seq {} × batch {} · grad ckpt {}{} · {} · {} cross-entropy",
            r.shape.name,
            r.seq_len,
            r.batch,
            match (r.grad_checkpointing, r.offload) {
                (_, true) => "offloaded",
                (true, false) => "on",
                (false, false) => "off",
            },
            if mlp_recompute_applies(r) { " · recompute mlp" } else { "" },
            r.optimizer,
            if r.chunked_ce { "chunked" } else { "full" },
        )?;
        let pct = 100.0 * self.trainable_params as f64 / self.total_params as f64;
        writeln!(
            f,
            "params {} total, {} trainable ({pct:.2}%)\n",
            count(self.total_params),
            count(self.trainable_params)
        )?;
        writeln!(f, "  {:<12} {:>9} {:>9}", "", "GiB", "GB")?;
        for (label, b) in [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("total", self.total),
        ] {
            writeln!(f, "  {label:<12} {:>9.1} {:>9.1}", gib(b), gb(b))?;
        }
        writeln!(
            f,
            "\n  {:<12} {:>13} {:>13}  fits",
            "tier", "GiB per GPU", "usable GiB"
        )?;
        for ((tier, ok), &b) in self.fits.iter().zip(&self.per_gpu) {
            let mark = if *ok { "✓" } else { "✗" };
            let name = tier.to_string();
            writeln!(
                f,
                "  {name:<12} {:>13.1} {:>13.1}  {mark}",
                gib(b),
                gib(tier.usable_bytes())
            )?;
        }
        match self.smallest_tier() {
            Some(t) => writeln!(f, "\nrecommendation: {t}")?,
            None => writeln!(f, "\nrecommendation: does not fit on 8x80GB")?,
        }
        // Selective MLP recompute: what it saves and costs, whether on or offered.
        let with = { let mut q = r.clone(); q.recompute_mlp = true; q };
        if mlp_recompute_applies(&with) && !r.grad_checkpointing {
            let without = { let mut q = r.clone(); q.recompute_mlp = false; plan(&q) };
            let on = if r.recompute_mlp { self.clone() } else { plan(&with) };
            let (extra, step) = recompute_extra_flops(&with);
            let saved = gib(without.activations - on.activations);
            let cost = 100.0 * extra / step;
            if r.recompute_mlp {
                writeln!(f, "selective MLP recompute: −{saved:.1} GiB of gate/up outputs for one more gate/up GEMM per layer in backward (+{cost:.0}% of the step's arithmetic)")?;
            } else {
                writeln!(f, "with --recompute mlp: {:.1} GiB in all (−{saved:.1} GiB of gate/up outputs) for +{cost:.0}% of the step's arithmetic", gib(on.total))?;
            }
        }
        write!(
            f,
            "({USABLE_PERCENT}% of each card usable; multi-GPU rows assume FSDP/ZeRO-3 sharding \
             and split the batch across GPUs)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn display_table() {
        // QLoRA 8b at seq 2048: a 5.5 GB NF4 base and 7.7 GB of activations fit one 16GB card.
        let req = PlanRequest::new(ModelShape::named("llama-3.1-8b").unwrap(), Method::Qlora);
        let text = plan(&req).to_string();
        for needle in [
            "weights",
            "activations",
            "total",
            "1x 16GB  ",
            "8x 80GB  ",
            "recommendation: 1x 16GB",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
