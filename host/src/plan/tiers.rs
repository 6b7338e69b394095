//! The hardware tiers `ftx plan` sizes a run against, and how much of each card a plan may
//! fill.

use std::fmt;

/// A hardware tier: `gpus` cards of `gib` GiB each (an "80GB" card has 80 GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// Number of GPUs.
    pub gpus: u64,
    /// Memory per GPU in GiB.
    pub gib: u64,
}

/// The tiers `ftx plan` checks, smallest first. Past the last one a run "does not fit on 8x80GB".
pub const TIERS: [Tier; 8] = [
    Tier { gpus: 1, gib: 16 },
    Tier { gpus: 1, gib: 24 },
    Tier { gpus: 1, gib: 40 },
    Tier { gpus: 1, gib: 48 },
    Tier { gpus: 1, gib: 80 },
    Tier { gpus: 2, gib: 80 },
    Tier { gpus: 4, gib: 80 },
    Tier { gpus: 8, gib: 80 },
];

/// Percent of each card's memory a plan may fill; the rest covers the CUDA context,
/// allocator fragmentation and the transient buffers this model does not count.
pub const USABLE_PERCENT: u64 = 90;

impl Tier {
    /// Bytes one GPU of this tier may fill.
    pub fn usable_bytes(self) -> u64 {
        (self.gib << 30) * USABLE_PERCENT / 100
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x {}GB", self.gpus, self.gib)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_usable_bytes() {
        assert_eq!(TIERS[0].usable_bytes(), 16 * (1 << 30) * 9 / 10);
        assert_eq!(TIERS[7].to_string(), "8x 80GB");
    }
}
