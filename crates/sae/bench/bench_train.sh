#!/usr/bin/env bash
# saekit TopK training vs SAELens TopK vs plain PyTorch TopK, one command, same activations
# (SmolLM2-135M layer 15, the split of ../shared/bench/bench_sae.py: first 90% of windows train,
# the rest eval), d_in 576, d_sae 16384, k 32, batch 4096, 2 threads.
#   bash crates/sae/bench/bench_train.sh            # throughput + quality at equal tokens
#   MEM=1 bash crates/sae/bench/bench_train.sh      # peak RSS at d_sae 16384 / 131072 / 1048576
# Needs `bash ../shared/bench/run_all.sh setup harvest` first (venv + activations under $SAEKIT_REF).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
REF=${SAEKIT_REF:-$HOME/.cache/saekit-ref}
PY=$REF/venv/bin/python
BENCH=${BENCH:-$ROOT/../shared/bench}
OUT=${OUT:-/tmp/saekit-bench}
TOKENS=${TOKENS:-245760}
export PYREF_MAX_WAIT=${PYREF_MAX_WAIT:-60}
mkdir -p "$OUT"
if [[ ! -f $OUT/train.npy ]]; then
  $PY "$ROOT/crates/sae/bench/split_acts.py" "$REF/acts" "$OUT"
fi
(cd "$ROOT" && cargo build --release -p saekit-sae --example bench_train)
BIN=$ROOT/target/release/examples/bench_train
echo "== $(date -u) $(uptime)"
if [[ ${MEM:-0} == 1 ]]; then
  for D in 16384 131072 1048576; do
    # 2 real steps of 4096 tokens each (first step includes the top-k warm-up of the buffers)
    /usr/bin/time -v "$BIN" --acts "$OUT/train.npy" --d-sae $D --k 32 --batch 4096 --threads 2 \
      --tokens 8192 --out "$OUT/mem_$D" 2> "$OUT/mem_$D.time" | grep RESULT
    grep -E "Maximum resident|Elapsed" "$OUT/mem_$D.time"
  done
  exit 0
fi
"$BIN" --gemm-only --threads 2 --d-sae 16384 --batch 4096
"$BIN" --acts "$OUT/train.npy" --eval "$OUT/eval.npy" --d-sae 16384 --k 32 --batch 4096 --threads 2 \
  --tokens $TOKENS --out "$OUT/saekit_topk" | grep RESULT
echo "== $(date -u) $(uptime)"
$PY "$BENCH/bench_sae.py" --impl saelens --arch topk --data real --tokens $TOKENS --threads 2 --out "$OUT/py.jsonl" | grep RESULT
echo "== $(date -u) $(uptime)"
$PY "$BENCH/bench_sae.py" --impl minimal --data real --tokens $TOKENS --threads 2 --out "$OUT/py.jsonl" | grep RESULT
echo "== $(date -u) $(uptime)"
"$BIN" --gemm-only --threads 2 --d-sae 16384 --batch 4096
"$BIN" --acts "$OUT/train.npy" --eval "$OUT/eval.npy" --d-sae 16384 --k 32 --batch 4096 --threads 2 \
  --tokens $TOKENS --out "$OUT/saekit_topk2" | grep RESULT
echo "== $(date -u) $(uptime)"
