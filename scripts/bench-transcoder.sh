#!/usr/bin/env bash
# Transcoder training on SmolLM2: harvest one layer's MLP input and output in one pass, train a skip
# transcoder beside an SAE of the same shape on the same store, and evaluate the transcoder in the model
# (MLP L replaced, CE loss score against zero-ablation). Prints one JSON line; needs a quiet box.
# Usage: bash scripts/bench-transcoder.sh TOKENS_DIR [layer] [tokens]   (TOKENS_DIR from `saekit tokenize`)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bench-transcoder.sh TOKENS_DIR [layer] [tokens]}
L=${2:-0}
TOKENS=${3:-400k}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cargo build --release --locked -p saekit >/dev/null 2>&1
BIN=./target/release/saekit
IN="blocks.$L.ln2.hook_normalized"
TGT="blocks.$L.hook_mlp_out"
SHAPE=(--d-sae 16384 --k 32 --batch-size 4096 --tokens "$TOKENS" --checkpoint-every 0 --quiet)
secs() { local t0=$EPOCHREALTIME; "$@" > /dev/null 2>> "$OUT/log"; python3 -c "print($EPOCHREALTIME - $t0)"; }
harvest=$(secs $BIN --threads 2 harvest --contexts "$DATA" --hooks "$IN,$TGT" --tokens "$TOKENS" "$OUT/acts")
tc=$(secs $BIN --threads 2 train --acts "$OUT/acts" --input-hook "$IN" --target-hook "$TGT" --skip "${SHAPE[@]}" --out "$OUT/tc")
sae=$(secs $BIN --threads 2 train --acts "$OUT/acts" --hook "$IN" "${SHAPE[@]}" --out "$OUT/sae")
$BIN --threads 2 eval-model --transcoders "$OUT/tc" --contexts "$DATA" --tokens 64k --json > "$OUT/eval.json" 2>> "$OUT/log"
python3 - "$OUT" "$harvest" "$tc" "$sae" <<'PY'
import json, sys
out, harvest, tc, sae = sys.argv[1], *map(float, sys.argv[2:])
s = lambda d: json.load(open(f"{out}/{d}/training_summary.json"))
t, a, e = s("tc"), s("sae"), json.load(open(f"{out}/eval.json"))
print(json.dumps({"tokens": t["tokens"], "harvest_s": harvest, "transcoder_train_s": tc, "sae_train_s": sae,
    "transcoder_tokens_per_s": t["tokens_per_s"], "sae_tokens_per_s": a["tokens_per_s"],
    "transcoder_fvu_first_rows": t["final_on_first_rows"]["fvu"], "ce_loss_score": e["all"]["ce_loss_score"],
    "ce_loss_clean": e["ce_loss_clean"], "ce_loss_replaced": e["all"]["ce_loss_replaced"],
    "ce_loss_ablated": e["all"]["ce_loss_ablated"]}))
PY
