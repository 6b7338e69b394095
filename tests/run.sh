#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: `bash tests/run.sh`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FTX_ROOT"
# llama-cpp-python (tests only, so the demo doesn't wait for it): llama.cpp itself, which the GGUF tests load every exported family in
# (tests/gguf_llama_cpp.rs) and whose libggml quantisers the k-quant bytes are compared with
# (tests/gguf_check.py). PyPI has only its source: pip builds llama.cpp with CMake, CPU only,
# without llama.cpp's tests, examples and server measured here: 10 minutes of CPU time,
# about 6 minutes on two idle cores, 44 minutes while six other builds shared those two cores).
CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  install_once llamacpp 0.3.36 "llama.cpp for the GGUF tests: builds llama.cpp from source once" "llama-cpp-python==0.3.36"
# The first-party and hostile test plugins, as WebAssembly components the tests load.
cargo build --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
# The same sources built as native libraries, for the native-plugin tests.
cargo build --release --locked --manifest-path plugins/Cargo.toml -p length -p json-valid -p hostile-filter -p dpo -p rubric-judge -p npy-exporter
# Tests run in parallel (cargo's default: one per core). They share libtorch's process-global
# random generator: every test that seeds it or draws from it (random models, fresh adapters,
# training steps, dropout) holds `torch_rng_lock` (tests/common), so those comparing dropout
# masks across runs see no other test's draws; loading an adapter draws nothing
# (tests/rng_isolation.rs). RUST_TEST_THREADS=1 runs them one at a time.
cargo test --workspace --release --locked "$@"
