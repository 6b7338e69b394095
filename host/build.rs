//! 1. Lets `target/*/ftx` find libtorch without LD_LIBRARY_PATH: records, as a run path, the
//!    libtorch folder it was linked against (and the CUDA runtime wheels beside it). On another
//!    machine (the GPU one) LD_LIBRARY_PATH still wins, since the linker writes DT_RUNPATH.
//! 2. Compiles the small C++ shims against libtorch's headers: the CUDA caching allocator's
//!    peak statistics (src/gpu/allocator.cpp), and the autograd nodes ftx defines itself
//!    (src/model/swiglu.cpp, src/model/nf4_linear.cpp, src/train/fused_adamw.cpp).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=src/gpu/allocator.cpp");
    println!("cargo:rerun-if-changed=src/model/swiglu.cpp");
    println!("cargo:rerun-if-changed=src/model/nf4_linear.cpp");
    println!("cargo:rerun-if-changed=src/train/fused_adamw.cpp");
    println!("cargo::rustc-check-cfg=cfg(ftx_allocator_stats)");
    println!("cargo::rustc-check-cfg=cfg(ftx_torch_shim)");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let libtorch = Path::new(&libtorch);
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if let Some(site) = libtorch.parent() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", site.join("nvidia/cu13/lib").display());
    }
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
        .file("src/model/swiglu.cpp")
        .file("src/model/nf4_linear.cpp")
        .file("src/train/fused_adamw.cpp")
        .compile("ftx_torch_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-cfg=ftx_allocator_stats");
    println!("cargo:rustc-cfg=ftx_torch_shim");
}
