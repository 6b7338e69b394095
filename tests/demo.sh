#!/usr/bin/env bash
# The demo, on a fresh machine or a warm one: `bash tests/demo.sh`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FTX_ROOT"
cargo build --release --locked -p ftx-host
# The preference stage trains through the orpo plugin.
[ -f plugins/target/wasm32-wasip2/release/orpo.wasm ] || cargo build --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml -p orpo
exec ./target/release/ftx demo "$@"
