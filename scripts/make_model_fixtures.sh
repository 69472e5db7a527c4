#!/usr/bin/env bash
# Rebuild tests/fixtures/{gemma2,gemma3,pythia,qwen2,qwen3,phi3,llama} with transformers (see make_model_fixtures.py).
# Needs PyPI only; the venv lives in $SAEKIT_FIXTURE_VENV (default ~/.cache/saekit-fixtures/venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SAEKIT_FIXTURE_VENV:-$HOME/.cache/saekit-fixtures/venv}
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
"$VENV/bin/python" -c 'import torch, transformers, safetensors, tokenizers, numpy, gguf' 2>/dev/null \
  || "$VENV/bin/pip" install -q torch transformers safetensors tokenizers numpy gguf
"$VENV/bin/python" scripts/make_model_fixtures.py tests/fixtures "$@"
# the GGUF copies of qwen2, qwen3 and phi3 follow the HF fixtures they are made from
"$VENV/bin/python" scripts/make_gguf_fixtures.py tests/fixtures
