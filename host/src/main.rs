//! The `ftx` binary: enables CUDA first (before any CUDA query), then hands over to the CLI.

fn main() {
    // Expandable segments unless the user chose an allocator setting: long sequences allocate
    // activations of many sizes, and the fixed-size segments of the default fragment (a QLoRA
    // 8b run of 65k tokens fits 16 GiB with them, not without).
    if std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_none() {
        std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True");
    }
    // A CUDA query made before libtorch_cuda is loaded caches "no CUDA" for the whole process.
    let cuda = ftx::gpu::enable_cuda();
    std::process::exit(ftx::cli::main(cuda));
}
