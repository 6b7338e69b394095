//! libtorch errors that reach the CLI as panics become the command's error. tch's infallible
//! tensor ops unwrap libtorch's result, so an error inside a forward or backward pass — above
//! all CUDA running out of memory — would otherwise end the run with a panic trace.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

/// Runs `f` (the command) on this thread; a panic carrying a libtorch error comes back as an
/// `Err` naming it (with what to do when the GPU's memory ran out). Any other panic — a bug —
/// goes on as a panic.
pub fn run_catching_torch_errors(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    install_quiet_hook();
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => match payload_text(&*payload).and_then(torch_error) {
            Some(msg) => Err(anyhow::anyhow!("{}", with_advice(&msg))),
            None => panic::resume_unwind(payload),
        },
    }
}

/// Keeps the default hook for every panic but a libtorch error on the thread that runs the
/// command (caught and reported as an error there); `RUST_BACKTRACE` set shows those too.
fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let on_main = std::thread::current().name() == Some("main");
            let torch = payload_text(info.payload()).and_then(torch_error).is_some();
            if !(on_main && torch && std::env::var_os("RUST_BACKTRACE").is_none()) {
                default(info);
            }
        }));
    });
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied())
}

/// libtorch's message in a tch panic (`… Err value: Torch("…")`), unescaped, without the C++
/// frames libtorch appends.
fn torch_error(text: &str) -> Option<String> {
    let start = text.find("Torch(\"")? + "Torch(\"".len();
    let quoted = text[start..].strip_suffix("\")").unwrap_or(&text[start..]);
    let unescaped = quoted.replace("\\n", "\n").replace("\\\"", "\"").replace("\\\\", "\\");
    let message: Vec<&str> = unescaped.lines().take_while(|l| !l.starts_with("Exception raised from")).filter(|l| !l.trim().is_empty()).collect();
    Some(message.join(" ").trim().to_owned())
}

fn with_advice(msg: &str) -> String {
    if msg.contains("out of memory") {
        format!(
            "libtorch: {msg}\nthe run does not fit this GPU's memory: lower [train] batch_size or [data] max_seq_len, \
             turn on grad_checkpointing (--grad-checkpointing, --offload), train QLoRA instead of LoRA, \
             or ask `ftx plan` for a set-up that fits"
        )
    } else {
        format!("libtorch: {msg}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn a_libtorch_error_inside_the_command_becomes_its_error() {
        let err = run_catching_torch_errors(|| {
            // Shapes that cannot multiply: libtorch raises, tch's matmul unwraps.
            let _ = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)).matmul(&Tensor::zeros([4, 5], (Kind::Float, tch::Device::Cpu)));
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("libtorch: "), "{err}");
        assert!(err.contains("cannot be multiplied"), "{err}");
        assert!(!err.contains("Exception raised from"), "{err}");
    }

    #[test]
    fn out_of_memory_says_what_to_do() {
        let payload = r#"called `Result::unwrap()` on an `Err` value: Torch("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB\nException raised from malloc at c10/cuda/CUDACachingAllocator.cpp:1234 (most recent call first):\nframe #0: ...")"#;
        let msg = with_advice(&torch_error(payload).unwrap());
        assert!(msg.starts_with("libtorch: CUDA out of memory. Tried to allocate 2.00 GiB."), "{msg}");
        assert!(msg.contains("ftx plan") && msg.contains("batch_size") && !msg.contains("frame #0"), "{msg}");
    }

    #[test]
    fn other_panics_stay_panics() {
        let caught = std::panic::catch_unwind(|| run_catching_torch_errors(|| panic!("a bug")));
        assert!(caught.is_err());
        assert_eq!(torch_error("index out of bounds"), None);
    }
}
