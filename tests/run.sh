#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: `bash tests/run.sh`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FTX_ROOT"
# The first-party and hostile test plugins, as WebAssembly components the tests load.
cargo build --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
# The same sources built as native libraries, for the native-plugin tests.
cargo build --release --locked --manifest-path plugins/Cargo.toml -p length -p json-valid -p hostile-filter -p dpo -p rubric-judge -p npy-exporter
# One test at a time: the tests share libtorch's process-global random generator, and those
# that compare dropout masks across runs (checkpointed recompute) must see no other test's draws.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-1}"
cargo test --workspace --release --locked "$@"
