#!/usr/bin/env bash
# Check the quality floors of a `saekit demo` run (BENCHMARKS.md, "The demo run: quality floor"):
#   bash scripts/check-demo-quality.sh [DIR]     # DIR: the demo's --dir, default saekit-demo
# Runs the full default demo first when DIR has no summary.json (about 10 min on a quiet 2-core box).
# Floors: FVU < 0.25, dead (never fired in training) < 5%, CE loss score > 0.8. Exit 1 on a miss.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-saekit-demo}"
if [[ ! -f "$DIR/summary.json" ]]; then
  cargo build --release --locked -p saekit
  bash scripts/fetch-model.sh >/dev/null
  ./target/release/saekit demo --dir "$DIR" --no-serve
fi
python3 - "$DIR/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
e = s["eval"]
dead = s.get("dead_frac_training")
dead = e["dead_frac"] if dead is None else dead
checks = [
    ("FVU", e["fvu"], "<", 0.25),
    ("dead fraction", dead, "<", 0.05),
    ("CE loss score", e["ce_loss_score"], ">", 0.8),
]
bad = 0
for name, v, op, floor in checks:
    ok = v < floor if op == "<" else v > floor
    bad += not ok
    print(f"{name:14} {v:.4f}  (floor {op} {floor})  {'ok' if ok else 'MISSED'}")
sys.exit(1 if bad else 0)
PY
