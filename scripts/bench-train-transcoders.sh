#!/usr/bin/env bash
# `saekit train-transcoders` on SmolLM2: all 30 layers from one pass of the model (one forward per
# shuffle block feeds 30 trainers), then the replacement model's CE score. Prints per-layer FVU, L0,
# dead % and tokens/s, the total time, the model's share of it and the peak RSS, and one JSON line.
# Needs a quiet box (every trainer and the forward share the cores).
# Usage: bash scripts/bench-train-transcoders.sh TOKENS_DIR [tokens per layer] [layers]
#   env: SAEKIT_BIN (a built binary; default: build --release), KEEP (a folder that keeps the trained set, for attribute), D_SAE (default 4096), K (32), BATCH (4096), LR (the trainer's default), BLOCK_TOKENS (8192), THREADS (2), NORM_ROWS (16384),
#     EVAL_TOKENS (8k: the replacement model's CE score, all 30 layers spliced and each alone, 64 forwards a batch of 4 contexts)
#   TOKENS_DIR from `saekit tokenize`. Memory grows with the layers: each holds its trainer (d_sae x 576
#   weights, Adam moments, [BATCH, D_SAE] step buffers) and a few blocks of its two hooks.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bench-train-transcoders.sh TOKENS_DIR [tokens per layer] [layers]}
TOKENS=${2:-400k}
LAYERS=${3:-0-29}
if [ -n "${KEEP:-}" ]; then OUT=$KEEP; mkdir -p "$OUT"; else OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT; fi
if [ -z "${SAEKIT_BIN:-}" ]; then cargo build --release --locked -p saekit >/dev/null 2>&1; fi
BIN=${SAEKIT_BIN:-./target/release/saekit}
T=${THREADS:-2}
# the norm/scale read-ahead of 30 layers x 2 hooks then fits the 4 GiB of kept rows (no block computed twice)
echo "norm_estimate_rows = ${NORM_ROWS:-16384}" > "$OUT/train.toml"
t0=$EPOCHREALTIME
$BIN --threads "$T" train-transcoders --layers "$LAYERS" --contexts "$DATA" --skip --config "$OUT/train.toml" \
  --d-sae "${D_SAE:-4096}" --k "${K:-32}" --batch-size "${BATCH:-4096}" ${LR:+--lr "$LR"} --tokens "$TOKENS" \
  --live-block-tokens "${BLOCK_TOKENS:-8192}" --checkpoint-every 0 --quiet --out "$OUT/tcs" >/dev/null 2>"$OUT/log" \
  || { cat "$OUT/log" >&2; exit 1; }
train_s=$(python3 -c "print($EPOCHREALTIME - $t0)")
# the replacement model (every MLP replaced) needs the whole set: only when all layers were trained
if [ "$LAYERS" = "0-29" ]; then
  $BIN --threads "$T" eval-model --transcoders "$OUT/tcs" --contexts "$DATA" --tokens "${EVAL_TOKENS:-8k}" --json > "$OUT/eval.json" 2>>"$OUT/log"
else
  echo '{}' > "$OUT/eval.json"
fi
python3 - "$OUT" "$train_s" <<'PY'
import json, sys
out, train_s = sys.argv[1], float(sys.argv[2])
s = json.load(open(f"{out}/tcs/summary.json"))
e = json.load(open(f"{out}/eval.json"))
run = s["this_run"]
print("layer   FVU(first rows)  last-batch FVU     L0   dead %   tokens/s", file=sys.stderr)
for r in s["layers"]:
    print(f'{r["layer"]:>5} {r["fvu"]:>16.4f} {r["last_batch_fvu"]:>15.4f} {r["l0"]:>6.1f} {r["dead_pct"]:>8.2f} '
          f'{r["tokens_per_s"]:>10.0f}', file=sys.stderr)
rss = run["peak_rss_bytes"] or 0
print(f'{len(s["layers"])} layers x {s["layers"][0]["tokens"]} tokens in {train_s:.0f} s '
      f'({run["layer_tokens_per_s"]:.0f} layer-tokens/s); model forward {run["forward_s"]:.0f} s over '
      f'{run["forward_tokens"]} tokens; peak RSS {rss / 2**30:.2f} GiB', file=sys.stderr)
print(json.dumps({"layers": s["layers"], "total_s": train_s, "forward_s": run["forward_s"],
    "forward_tokens": run["forward_tokens"], "layer_tokens_per_s": run["layer_tokens_per_s"],
    "peak_rss_bytes": rss, "ce_loss_score": e.get("all", {}).get("ce_loss_score")}))
PY
