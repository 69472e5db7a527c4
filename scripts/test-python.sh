#!/usr/bin/env bash
# The Python bindings' tests: install the `saekit` package from python/ with pip (the README's
# `pip install ./python`), then run pytest against the real model and the saekit CLI (the reference the tests
# compare with). The extension is built with the workspace's dev profile (MATURIN_PEP517_ARGS), which
# `cargo test --workspace` has already compiled every library crate with: only PyO3 and the binding compile.
# A user's plain `pip install ./python` builds the release profile instead.
# Needs: pip (maturin comes from PyPI through pip's build isolation), numpy and pytest. Extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import numpy, pytest" 2>/dev/null || { echo "test-python: needs numpy and pytest (pip install numpy pytest)" >&2; exit 1; }
cargo build --locked --workspace --bins --quiet
t0=$(date +%s)
MATURIN_PEP517_ARGS="--profile dev" python3 -m pip install --quiet --force-reinstall --no-deps ./python
echo "test-python: pip install ./python took $(( $(date +%s) - t0 )) s" >&2
SAEKIT_BIN="$PWD/target/debug/saekit" python3 -m pytest -q python/tests "$@"
