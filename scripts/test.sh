#!/usr/bin/env bash
# Every test of the workspace. The real-model tests need SmolLM2-135M-Instruct in the cache: fetch it first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh >/dev/null
cargo test --workspace --locked "$@"
