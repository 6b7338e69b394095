#!/usr/bin/env bash
# The demo, on a fresh machine or a warm one: `bash tests/demo.sh`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FTX_ROOT"
cargo build --release --locked -p ftx-host
# The preference stage trains through the first-party orpo plugin, built into ftx.
exec ./target/release/ftx demo "$@"
