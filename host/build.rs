//! Lets `target/*/ftx` find libtorch without LD_LIBRARY_PATH: records, as a run path, the
//! libtorch folder it was linked against (and the CUDA runtime wheels beside it). On another
//! machine (the GPU one) LD_LIBRARY_PATH still wins, since the linker writes DT_RUNPATH.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&libtorch).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        if let Some(site) = std::path::Path::new(&libtorch).parent() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", site.join("nvidia/cu13/lib").display());
        }
    }
}
