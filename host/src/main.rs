//! The `ftx` binary: enables CUDA first (before any CUDA query), then hands over to the CLI.

fn main() {
    // A CUDA query made before libtorch_cuda is loaded caches "no CUDA" for the whole process.
    let cuda = ftx::gpu::enable_cuda();
    std::process::exit(ftx::cli::main(cuda));
}
