#!/usr/bin/env bash
# SAE training in bf16 against f32, one command, same activations and tokens: saekit f32, saekit bf16
# (`--precision`), SAELens TopK f32 and SAELens TopK with `autocast` (bf16 on the CPU), each on 245,760
# tokens of SmolLM2-135M's layer-15 residual stream (d_sae 16384, k 32, batch 4096, 2 threads), then
# FVU / L0 / dead on the same held-out rows. Also each precision's encoder GEMM alone.
#   bash scripts/bench-train-bf16.sh        # needs `bash ../shared/bench/run_all.sh setup harvest`
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
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
echo "== $(date -u) $(grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ') $(uptime)"
for P in f32 bf16; do
  "$BIN" --gemm-only --threads 2 --d-sae 16384 --batch 4096 --precision $P
done
for P in f32 bf16; do
  rm -rf "$OUT/saekit_topk_$P"   # an earlier run's output: the trainer refuses to overwrite it
  "$BIN" --acts "$OUT/train.npy" --eval "$OUT/eval.npy" --d-sae 16384 --k 32 --batch 4096 --threads 2 \
    --tokens $TOKENS --precision $P --out "$OUT/saekit_topk_$P" | grep RESULT
  echo "== $(date -u) $(uptime)"
done
$PY "$BENCH/bench_sae.py" --impl saelens --arch topk --data real --tokens $TOKENS --threads 2 --no-wait \
  --out "$OUT/py_bf16.jsonl" | grep RESULT
echo "== $(date -u) $(uptime)"
# SAELens' own mixed precision: SAETrainerConfig(autocast=True) runs the step under
# torch.autocast(device_type="cpu", dtype=torch.bfloat16)
$PY - "$BENCH/bench_sae.py" --impl saelens --arch topk --data real --tokens $TOKENS --threads 2 --no-wait \
  --out "$OUT/py_bf16_autocast.jsonl" <<'PYEOF' | grep RESULT | sed 's/^RESULT /RESULT autocast=bf16 /'
import functools, runpy, sys
import sae_lens.config
sae_lens.config.SAETrainerConfig = functools.partial(sae_lens.config.SAETrainerConfig, autocast=True)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
PYEOF
echo "== $(date -u) $(uptime)"
