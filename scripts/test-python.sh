#!/usr/bin/env bash
# The Python bindings' tests: build and install the `saekit` package from python/ (the README's
# `pip install ./python`; maturin compiles the extension in release mode into python/target), then run
# pytest against the real model and the saekit CLI (the reference the tests compare with).
# Needs: pip, and numpy + pytest (`.ci/run` installs them). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import numpy, pytest" 2>/dev/null || { echo "test-python: needs numpy and pytest (pip install numpy pytest)" >&2; exit 1; }
# the CLI the tests compare with: `cargo test --workspace` builds target/debug/saekit with the test
# profile, so after scripts/test.sh this is a no-op (a `cargo build`, or `-p saekit` with its own feature
# resolution, would compile dependencies again)
cargo test --workspace --locked --no-run --quiet
t0=$(date +%s)
python3 -m pip install --quiet ./python
echo "pip install ./python: $(( $(date +%s) - t0 )) s" >&2
SAEKIT_BIN="$PWD/target/debug/saekit" python3 -m pytest -q python/tests "$@"
