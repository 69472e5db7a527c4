#!/usr/bin/env bash
# Browser tests of `saekit serve`: installs Debian's Chromium (if missing) and the playwright-core harness,
# builds the saekit binary and a fixture (random-init SAE on the real model, feature database computed on
# built-in texts; the same texts through `analyze` into SQLite, with two stored LLM explanations), then runs the end-to-end tests in headless Chromium and the OpenAI-API tests
# with the real `openai` Python client (pip-installed when missing) and curl. `--load` also runs the 64-client load
# test (failing when feature pages' p99 latency exceeds ${SAEKIT_LOAD_P99_MS:-250} ms; the quiet-box p99 is ~40 ms).
# Needs: the model (scripts/fetch-model.sh), node + npm, apt-get (as root) when Chromium is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null; then
    command -v apt-get >/dev/null || { echo "e2e: no chromium and no apt-get to install it" >&2; exit 1; }
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
command -v npm >/dev/null || { echo "e2e: needs node and npm" >&2; exit 1; }
(cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
# the real `openai` Python client (PyPI) for the OpenAI-API tests (.ci/run installs it too)
command -v curl >/dev/null || { echo "e2e: needs curl" >&2; exit 1; }
python3 -c 'import openai' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check "openai>=1.40"

bash scripts/fetch-model.sh >/dev/null
# the workspace's dev profile, which `cargo test --workspace` shares: nothing compiles again after it
cargo build --locked --workspace --bins --examples
fixture="$(mktemp -d)"
trap 'rm -rf "$fixture"' EXIT
target="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
"$target/debug/examples/fixture" "$fixture" >/dev/null
export SAEKIT_E2E_FIXTURE="$fixture" SAEKIT_BIN="$target/debug/saekit"

(cd tests/e2e && node --test --test-reporter=spec browser.test.mjs)
python3 tests/e2e/openai_client.py
if [ "${1:-}" = "--load" ]; then
    (cd tests/e2e && node load.mjs --clients 64 --requests 20000 --seconds 60 --p99-feature-ms "${SAEKIT_LOAD_P99_MS:-250}")
fi
