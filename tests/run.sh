#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: `bash tests/run.sh`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FTX_ROOT"
cargo test --workspace --release --locked "$@"
