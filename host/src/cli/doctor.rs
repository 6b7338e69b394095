//! `ftx doctor`: what this machine offers ftx, and why CUDA is off when it is.

use crate::gpu::{self, CudaStatus};

pub fn run(cuda: &CudaStatus) -> anyhow::Result<()> {
    println!("ftx {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch     {} (tch {})", libtorch_version(), "0.24.0");
    println!("cpu threads  {}", tch::get_num_threads());
    match cuda {
        CudaStatus::Enabled { devices } => {
            println!("cuda         enabled, {devices} device(s), cuDNN {}", tch::utils::version_cudnn());
            for g in gpu::gpus() {
                println!(
                    "  cuda:{}     {}, {:.1} GiB, compute capability {}.{}",
                    g.index,
                    g.name,
                    g.total_bytes as f64 / (1u64 << 30) as f64,
                    g.capability.0,
                    g.capability.1
                );
            }
        }
        CudaStatus::NoDevice { reason } | CudaStatus::NotLoaded { reason } => {
            println!("cuda         not available: {reason}");
            println!("             models run on the CPU (--device cpu)");
        }
    }
    println!("wasm         wasmtime 48.0.8 (component model, cranelift); plugin API ftx:plugin@{}; target wasm32-wasip2", crate::plugins::API_VERSION);
    println!("native       plugin ABI {}.{}", ftx_plugin_api::native::ABI_MAJOR, ftx_plugin_api::native::ABI_MINOR);
    let home = crate::paths::ftx_home();
    println!("ftx home     {}", home.display());
    println!("  plugins    {} (installed), {} (trusted keys)", crate::plugins::manifest::store_dir().display(), home.join("trusted-keys").display());
    println!("  cache      {} (compiled components, tagged with the key {})", home.join("cache").join("components").display(), home.join(crate::plugins::cache::KEY_FILE).display());
    Ok(())
}

/// The libtorch version tch was built against (its build script checks it matches).
fn libtorch_version() -> String {
    // torch-sys refuses to build against any other version, so this is exact.
    "2.11.0".to_owned()
}
