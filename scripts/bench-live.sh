#!/usr/bin/env bash
# `saekit train --live` beside the two-step path it replaces (harvest to a store, then train from it),
# same tokens, same SAE shape, one command. Prints one JSON line per run and a summary on stderr.
# Usage: bash scripts/bench-live.sh TOKENS_DIR [tokens]   (TOKENS_DIR from `saekit tokenize`)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bench-live.sh TOKENS_DIR [tokens]}
TOKENS=${2:-400k}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cargo build --release --locked -p saekit >/dev/null 2>&1
BIN=./target/release/saekit
SAE=(--d-sae 16384 --k 32 --batch-size 4096 --tokens "$TOKENS" --checkpoint-every 0 --quiet)
secs() { local t0=$EPOCHREALTIME; "$@" > /dev/null 2>> "$OUT/log"; python3 -c "print($EPOCHREALTIME - $t0)"; }
live=$(secs $BIN --threads 2 train --live --contexts "$DATA" "${SAE[@]}" --out "$OUT/live")
harvest=$(secs $BIN --threads 2 harvest --contexts "$DATA" --tokens "$TOKENS" "$OUT/acts")
train=$(secs $BIN --threads 2 train --acts "$OUT/acts" "${SAE[@]}" --out "$OUT/stored")
python3 - "$OUT" "$live" "$harvest" "$train" <<'PY'
import json, sys
out, live, harvest, train = sys.argv[1], *map(float, sys.argv[2:])
s = lambda d: json.load(open(f"{out}/{d}/training_summary.json"))
lv, st = s("live"), s("stored")
r = {"tokens": lv["tokens"], "live_s": live, "harvest_s": harvest, "train_from_store_s": train,
     "live_tokens_per_s": lv["tokens"] / live, "two_step_tokens_per_s": st["tokens"] / (harvest + train),
     "live_fvu": lv["last"]["fvu"], "stored_fvu": st["last"]["fvu"]}
print(json.dumps(r))
print(f'live {live:.0f} s ({r["live_tokens_per_s"]:.0f} tok/s) vs harvest {harvest:.0f} s + train {train:.0f} s '
      f'({r["two_step_tokens_per_s"]:.0f} tok/s): live = {r["live_tokens_per_s"]/r["two_step_tokens_per_s"]:.2f}x, '
      f'no disk; last-batch FVU {r["live_fvu"]:.3f} live vs {r["stored_fvu"]:.3f} stored', file=sys.stderr)
PY
