//! 1. Lets `target/*/ftx` find libtorch without LD_LIBRARY_PATH: records, as a run path, the
//!    libtorch folder it was linked against (and the CUDA runtime wheels beside it). On another
//!    machine (the GPU one) LD_LIBRARY_PATH still wins, since the linker writes DT_RUNPATH.
//! 2. Compiles the small C++ shims against libtorch's headers: the CUDA caching allocator's
//!    peak statistics (src/gpu/allocator.cpp), and the autograd nodes ftx defines itself
//!    (src/model/swiglu.cpp, src/model/nf4_linear.cpp, src/model/dora_linear.cpp,
//!    src/model/sliced_sdpa.cpp, src/model/lora_block.cpp, src/model/dora_block.cpp, src/train/fused_adamw.cpp), the
//!    count of what autograd saves for backward (src/train/saved_tensors.cpp), and the nodes
//!    over the fused NVRTC kernels of ftx-kernels (src/gpu/kernels.cpp), and libtorch's CUDA
//!    graphs reached without linking its CUDA half (src/gpu/graph.cpp), and the step ledger's
//!    RecordFunction callbacks (src/gpu/ledger.cpp).
//! 3. Compiles the shim over libtorch's distributed engine, c10d (src/dist/c10d.cpp): the
//!    TCPStore rendezvous, Gloo and NCCL process groups and their collectives.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=src/gpu/allocator.cpp");
    println!("cargo:rerun-if-changed=src/model/sliced_sdpa.cpp");
    println!("cargo:rerun-if-changed=src/model/swiglu.cpp");
    println!("cargo:rerun-if-changed=src/model/nf4_linear.cpp");
    println!("cargo:rerun-if-changed=src/model/nf4_dequantize.h");
    println!("cargo:rerun-if-changed=src/model/dora_linear.cpp");
    println!("cargo:rerun-if-changed=src/model/lora_block.cpp");
    println!("cargo:rerun-if-changed=src/model/lora_block.h");
    println!("cargo:rerun-if-changed=src/model/fp8.h");
    println!("cargo:rerun-if-changed=src/model/dora_block.cpp");
    println!("cargo:rerun-if-changed=src/model/swiglu.h");
    println!("cargo:rerun-if-changed=src/train/fused_adamw.cpp");
    println!("cargo:rerun-if-changed=src/train/saved_tensors.cpp");
    println!("cargo:rerun-if-changed=src/gpu/kernels.cpp");
    println!("cargo:rerun-if-changed=src/gpu/kernels.h");
    println!("cargo:rerun-if-changed=src/gpu/graph.cpp");
    println!("cargo:rerun-if-changed=src/gpu/ledger.cpp");
    println!("cargo:rerun-if-changed=src/gpu/ledger.h");
    println!("cargo::rustc-check-cfg=cfg(ftx_allocator_stats)");
    println!("cargo::rustc-check-cfg=cfg(ftx_torch_shim)");
    println!("cargo:rerun-if-changed=src/dist/c10d.cpp");
    println!("cargo:rerun-if-changed=src/dist/c10d_decls");
    println!("cargo::rustc-check-cfg=cfg(ftx_c10d)");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    // `.libtorch` (.cargo/config.toml) is a link into the venv: resolve it, so that the run
    // paths name the real folders and the CUDA wheels are found beside the torch package.
    let libtorch = std::fs::canonicalize(&libtorch).unwrap_or_else(|_| libtorch.into());
    let libtorch = libtorch.as_path();
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if let Some(site) = libtorch.parent() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", site.join("nvidia/cu13/lib").display());
    }
    compile_c10d(libtorch);
    if !libtorch.join("include/c10/core/CachingDeviceAllocator.h").exists() {
        return; // an older libtorch: no device-generic allocator statistics
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(libtorch.join("include"))
        .warnings(false)
        .file("src/gpu/allocator.cpp")
        .compile("ftx_allocator");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .warnings(false)
        .file("src/model/sliced_sdpa.cpp")
        .file("src/model/swiglu.cpp")
        .file("src/model/nf4_linear.cpp")
        .file("src/model/dora_linear.cpp")
        .file("src/model/lora_block.cpp")
        .file("src/model/dora_block.cpp")
        .file("src/train/fused_adamw.cpp")
        .file("src/train/saved_tensors.cpp")
        .file("src/gpu/kernels.cpp")
        .file("src/gpu/graph.cpp")
        .file("src/gpu/ledger.cpp")
        .compile("ftx_torch_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    // dlsym, for the CUDA graph members (src/gpu/graph.cpp).
    println!("cargo:rustc-link-lib=dylib=dl");
    println!("cargo:rustc-cfg=ftx_allocator_stats");
    println!("cargo:rustc-cfg=ftx_torch_shim");
}

/// The c10d shim, when this libtorch ships the distributed headers (every Linux wheel does).
/// It links against libtorch_cpu (already linked by tch) and libdl (NCCL is looked up at run time).
fn compile_c10d(libtorch: &Path) {
    let include = libtorch.join("include");
    if !include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp").exists() {
        return;
    }
    let built = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // The Gloo names ProcessGroupGloo.hpp mentions (the wheel ships no Gloo headers).
        .include("src/dist/c10d_decls")
        .warnings(false)
        .file("src/dist/c10d.cpp")
        .try_compile("ftx_c10d");
    // A libtorch whose c10d headers differ from the ones the shim was written for still builds
    // ftx: distributed runs then say so (dist::DistError::NotBuilt) instead of the build failing.
    if let Err(e) = built {
        println!("cargo:warning=ftx: distributed training disabled: the c10d shim did not compile against this libtorch: {e}");
        return;
    }
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=dl");
    println!("cargo:rustc-cfg=ftx_c10d");
}
