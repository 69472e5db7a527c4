#!/usr/bin/env bash
# The whole saekit pipeline on the built-in defaults, from a fresh clone:
# build, fetch SmolLM2-135M-Instruct, then run `saekit demo` (see README).
# Extra arguments go to `saekit demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p saekit
./target/release/saekit fetch-model
exec ./target/release/saekit demo "$@"
