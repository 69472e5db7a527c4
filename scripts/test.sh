#!/usr/bin/env bash
# Every test of the project: the Rust tests (unit, real-model parity, the reduced end-to-end demo, the bad-input
# mutation campaign), the browser tests of `saekit serve` in headless Chromium with its 64-client load test
# (p99 limit on feature pages), and the Python bindings' pytest suite. All three use one build: the workspace's
# dev profile (see Cargo.toml). The real-model tests need SmolLM2-135M-Instruct in the cache: it is fetched
# first. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh >/dev/null
cargo test --workspace --locked "$@"
# training across processes: real `mpirun -np 2` / `-np 4 --oversubscribe` runs against one process (.ci/run
# installs Open MPI); Open MPI refuses root unless told
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 cargo test --workspace --features saekit/mpi --test mpi --locked
bash scripts/e2e.sh --load
bash scripts/test-python.sh
