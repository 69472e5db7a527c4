#!/usr/bin/env bash
# ReLU+L1 three ways in one command, same activations and seed: the dense step only, the sparse step
# only, and the default (sparse below L0 = d_sae/16). The trajectories agree (the paths differ only in
# float summation order); the per-window tokens/s at each L0 shows where the paths break even.
#   bash crates/sae/bench/bench_relu_paths.sh [acts.npy] [tokens]
# Default activations: $OUT/train.npy from crates/sae/bench/bench_train.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
OUT=${OUT:-/tmp/saekit-bench}
ACTS=${1:-$OUT/train.npy}
TOKENS=${2:-1M}
cd "$ROOT"
cargo build --release --locked -p saekit >/dev/null 2>&1
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
echo 'relu_sparse_below = 0.0' > "$W/dense.toml"
echo 'relu_sparse_below = 1.0' > "$W/sparse.toml"
echo "== $(date -u) $(uptime)"
for run in dense sparse default; do
  cfg=(); [[ $run != default ]] && cfg=(--config "$W/$run.toml")
  t0=$EPOCHREALTIME
  ./target/release/saekit --threads 2 train "${cfg[@]}" --arch relu --acts "$ACTS" --d-sae 4096 \
    --tokens "$TOKENS" --lr 1e-3 --checkpoint-every 0 --quiet --out "$W/$run" > /dev/null 2>> "$W/log"
  python3 -c "print('$run', round($EPOCHREALTIME - $t0, 1), 's')" > "$W/$run.wall"
done
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
runs = ("dense", "sparse", "default")
rows = {r: [json.loads(l) for l in open(f"{w}/{r}/metrics.jsonl")] for r in runs}
wall = {r: float(open(f"{w}/{r}.wall").read().split()[1]) for r in runs}
print("step  L0(dense)  tok/s: dense  sparse  default(sparse<d/16)")
for a, b, c in list(zip(*(rows[r] for r in runs)))[::2]:
    print(f'{a["step"]:>4} {a["l0"]:>10.1f} {a["tokens_per_s"]:>12.0f} {b["tokens_per_s"]:>7.0f} {c["tokens_per_s"]:>8.0f}')
last = {r: rows[r][-1] for r in runs}
print("final FVU / L0: " + ", ".join(f'{r} {last[r]["fvu"]:.4f} / {last[r]["l0"]:.1f}' for r in runs))
print("wall: " + ", ".join(f"{r} {wall[r]:.0f} s" for r in runs) + f'; default vs dense {wall["dense"] / wall["default"]:.2f}x')
PY
