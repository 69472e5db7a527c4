#!/usr/bin/env bash
# Time and peak memory of `saekit attribute` on SmolLM2-135M-Instruct for a 16-token and a 64-token prompt.
# With TRANSCODERS=DIR (a set from `saekit train-transcoders`, e.g. KEEP=... of bench-train-transcoders.sh)
# it traces through those; without, through random TopK transcoders on all 30 layers (D_SAE features, K
# active per token: the node count of a trained set; the weights explain nothing, so only the sizes matter).
# With TORCH=VENV_PYTHON it then runs scripts/bench-attribute-torch.py (PyTorch autograd, circuit-tracer's
# batching) on each graph: its time, memory and largest edge difference. One process at a time; run it on a
# quiet box. Usage: bash scripts/bench-attribute.sh [D_SAE=4096] [K=32]
#   env: SAEKIT_BIN (a built binary; default: the dev build `cargo test` shares), TRANSCODERS, TORCH
set -euo pipefail
cd "$(dirname "$0")/.."
D_SAE="${1:-4096}"; K="${2:-32}"
bash scripts/fetch-model.sh >/dev/null
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
model="$(python3 -c 'import os;print(os.path.expanduser("~/.cache/saekit/SmolLM2-135M-Instruct.Q4_1.gguf"))')"
if [ -z "${SAEKIT_BIN:-}" ]; then
  # the workspace build that `cargo test --workspace` shares (a -p build would recompile dependencies)
  cargo build --locked --workspace --bins --examples 2>/dev/null
  target="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
  SAEKIT_BIN="$target/debug/saekit"
fi
tc="${TRANSCODERS:-}"
if [ -z "$tc" ]; then
  tc="$work/tc"
  cargo run --locked -q -p saekit-circuits --example random_transcoders -- "$model" "$tc" "$D_SAE" "$K"
fi
# the same text at both lengths, cut to whole words: 12 words are 16 tokens, 53 are 64 (SmolLM2's
# tokenizer, which adds no BOS)
text='The Eiffel Tower is in Paris, the capital of France. Every summer, tourists from Germany, Japan and Brazil climb its stairs to look over the river Seine, the old bridges and the museums. When the sun sets, the lights of the tower sparkle for five minutes every hour, and the city below them glows until the last train leaves'
words() { python3 -c "import sys; print(' '.join(sys.argv[2].split()[:int(sys.argv[1])]))" "$1" "$text"; }
grep -m1 'model name' /proc/cpuinfo
for n in 12 53; do
    p="$(words $n)"
    /usr/bin/time -f "%e s wall, %M KiB peak RSS" "$SAEKIT_BIN" attribute --transcoders "$tc" \
        --prompt "$p" --out "$work/g$n.json" 2>&1 | grep -E "tokens,|pruned|full|error nodes|peak RSS"
    if [ -n "${TORCH:-}" ]; then
        "$TORCH" scripts/bench-attribute-torch.py "$model" "$tc" "$work/g$n.full.safetensors"
    fi
done
