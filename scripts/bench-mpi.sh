#!/usr/bin/env bash
# Training across processes vs one process, same run: `saekit train` on one process with 2 threads,
# then `mpirun -np 2` with 1 thread per rank (2 latent shards, then 2 data replicas), on the same
# data and config; prints each run's steady tokens/s (training_summary.json) and the ratio.
# Measure on a quiet box (no other jobs on the cores): timings taken while others run mean nothing.
#
#   cargo build --workspace --bin saekit --features saekit/mpi
#   SAEKIT_BIN=target/debug/saekit bash scripts/bench-mpi.sh [D_SAE] [TOKENS]
set -euo pipefail
BIN=${SAEKIT_BIN:-target/debug/saekit}
D_SAE=${1:-16384}
TOKENS=${2:-1M}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 - "$WORK/acts.npy" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(7)
atoms = rng.standard_normal((4096, 576)).astype(np.float32)
rows = 262144
x = np.zeros((rows, 576), np.float32)
for r0 in range(0, rows, 8192):
    codes = np.zeros((8192, 4096), np.float32)
    j = rng.integers(0, 4096, (8192, 16))
    np.put_along_axis(codes, j, rng.exponential(1.0, (8192, 16)).astype(np.float32), 1)
    x[r0:r0 + 8192] = codes @ atoms
np.save(sys.argv[1], x)
PY
common=(train --acts "$WORK/acts.npy" --d-sae "$D_SAE" --k 32 --tokens "$TOKENS" --batch-size 4096 --quiet --checkpoint-every 0)
rate() { python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["tokens_per_s"]))' "$1/training_summary.json"; }
"$BIN" --threads 2 "${common[@]}" --out "$WORK/one" >/dev/null
mpirun -np 2 "$BIN" --threads 1 "${common[@]}" --out "$WORK/shards" >/dev/null
mpirun -np 2 "$BIN" --threads 1 "${common[@]}" --shards 1 --out "$WORK/replicas" >/dev/null
one=$(rate "$WORK/one")
for layout in shards replicas; do
  r=$(rate "$WORK/$layout")
  printf '%-9s 2 ranks x 1 thread: %s tokens/s; 1 process x 2 threads: %s tokens/s; ratio %s\n' \
    "$layout" "$r" "$one" "$(python3 -c "print(round($r / $one, 3))")"
done
