#!/usr/bin/env bash
# Time and peak memory of `saekit attribute` on SmolLM2-135M-Instruct for a 16-token and a 64-token prompt,
# through random TopK transcoders on all 30 layers (D_SAE features, K active per token: the node count of a
# trained set; the weights explain nothing, so the graph's content is not the point). One process at a time;
# run it on a quiet box. Usage: bash scripts/bench-attribute.sh [D_SAE=4096] [K=32]
set -euo pipefail
cd "$(dirname "$0")/.."
D_SAE="${1:-4096}"; K="${2:-32}"
bash scripts/fetch-model.sh >/dev/null
# the workspace build that `cargo test --workspace` shares (a -p build would recompile dependencies)
cargo build --locked --workspace --bins --examples 2>/dev/null
target="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
model="$(python3 -c 'import os;print(os.path.expanduser("~/.cache/saekit/SmolLM2-135M-Instruct.Q4_1.gguf"))')"
"$target/debug/examples/random_transcoders" "$model" "$work/tc" "$D_SAE" "$K"
words() { python3 -c "import sys; w='the quick brown fox jumps over a lazy dog'.split() * 20; print(' '.join(w[:int(sys.argv[1])]))" "$1"; }
grep -m1 'model name' /proc/cpuinfo
for n in 15 63; do  # + BOS = 16 and 64 tokens
    /usr/bin/time -f "%e s wall, %M KiB peak RSS" "$target/debug/saekit" attribute --transcoders "$work/tc" \
        --prompt "$(words $n)" --out "$work/g$n.json" 2>&1 | grep -E "tokens,|pruned|full|error nodes|peak RSS"
done
