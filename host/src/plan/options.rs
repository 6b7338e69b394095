//! The method and optimizer choices, spelled once for `FromStr`, `Display` and clap.

use super::PlanError;
use std::fmt;
use std::str::FromStr;

/// What gets trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Every parameter, mixed precision.
    Full,
    /// Low-rank adapters on a frozen bf16 base.
    Lora,
    /// LoRA on a frozen NF4-quantized base.
    Qlora,
    /// LoRA plus a trained per-output magnitude (weight-decomposed LoRA).
    Dora,
}

impl Method {
    /// Every method, in the order help text lists them.
    pub const ALL: [Method; 4] = [Method::Full, Method::Lora, Method::Qlora, Method::Dora];

    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Lora => "lora",
            Method::Qlora => "qlora",
            Method::Dora => "dora",
        }
    }
}

/// Which optimizer holds state for the trainable parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optimizer {
    /// AdamW with fp32 `m` and `v`.
    Adamw,
    /// bitsandbytes-style blockwise 8-bit AdamW.
    Adamw8bit,
    /// SGD with momentum (one fp32 buffer).
    Sgd,
}

impl Optimizer {
    /// Every optimizer, in the order help text lists them.
    pub const ALL: [Optimizer; 3] = [Optimizer::Adamw, Optimizer::Adamw8bit, Optimizer::Sgd];

    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            Optimizer::Adamw => "adamw",
            Optimizer::Adamw8bit => "adamw-8bit",
            Optimizer::Sgd => "sgd",
        }
    }

    /// Bytes of optimizer state for `n` trainable parameters.
    pub fn state_bytes(self, n: u64) -> u64 {
        match self {
            // m and v, fp32 each.
            Optimizer::Adamw => 8 * n,
            // m and v at 1 byte each, plus one fp32 absmax per 256-element block per state
            // (bitsandbytes' blocksize). Rounded over the total rather than per tensor, and
            // ignoring that bitsandbytes keeps tensors under 4096 elements in fp32.
            Optimizer::Adamw8bit => 2 * n + 2 * 4 * n.div_ceil(256),
            // One fp32 momentum buffer.
            Optimizer::Sgd => 4 * n,
        }
    }
}

// One spelling list serves FromStr, Display and clap.
macro_rules! spelled {
    ($ty:ident, $err:ident) => {
        impl FromStr for $ty {
            type Err = PlanError;
            fn from_str(s: &str) -> Result<Self, PlanError> {
                $ty::ALL
                    .into_iter()
                    .find(|v| v.name().eq_ignore_ascii_case(s.trim()))
                    .ok_or_else(|| PlanError::$err(s.to_string()))
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
        impl clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &$ty::ALL
            }
            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(self.name()))
            }
        }
    };
}
spelled!(Method, UnknownMethod);
spelled!(Optimizer, UnknownOptimizer);

/// "a, b, c", for the error messages that list valid spellings.
pub(super) fn names<const N: usize>(list: [&str; N]) -> String {
    list.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_state() {
        assert_eq!(Optimizer::Adamw.state_bytes(1000), 8000);
        // 2 bytes + two fp32 absmax per ceil(1000/256) = 4 blocks
        assert_eq!(Optimizer::Adamw8bit.state_bytes(1000), 2000 + 2 * 4 * 4);
        assert_eq!(Optimizer::Sgd.state_bytes(1000), 4000);
    }

    #[test]
    fn parse_names() {
        assert_eq!("QLoRA".parse::<Method>(), Ok(Method::Qlora));
        assert_eq!("adamw-8bit".parse::<Optimizer>(), Ok(Optimizer::Adamw8bit));
        for m in Method::ALL {
            assert_eq!(m.to_string().parse::<Method>(), Ok(m));
        }
        let err = "ia3".parse::<Method>().unwrap_err().to_string();
        assert_eq!(err, "unknown method `ia3` (valid: full, lora, qlora, dora)");
        let err = "adam".parse::<Optimizer>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown optimizer `adam` (valid: adamw, adamw-8bit, sgd)"
        );
        let v = <Optimizer as clap::ValueEnum>::from_str("adamw-8bit", false);
        assert_eq!(v, Ok(Optimizer::Adamw8bit));
    }
}
