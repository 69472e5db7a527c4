#!/usr/bin/env bash
# Rebuild tests/fixtures/{qwen2,qwen3,phi3,pythia,gemma2,gemma3}/model.gguf from the committed HF fixtures with llama.cpp's gguf-py
# (see make_gguf_fixtures.py). Needs PyPI only; shares the venv of make_model_fixtures.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SAEKIT_FIXTURE_VENV:-$HOME/.cache/saekit-fixtures/venv}
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
"$VENV/bin/python" -c 'import gguf, safetensors, numpy' 2>/dev/null || "$VENV/bin/pip" install -q gguf safetensors numpy
"$VENV/bin/python" scripts/make_gguf_fixtures.py tests/fixtures "$@"
