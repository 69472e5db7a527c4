#!/usr/bin/env bash
# Training across processes vs one process, same run: `saekit train` on one process with 2 threads,
# then `mpirun -np 2` with 1 thread per rank (2 latent shards, then 2 data replicas), on the same
# data and config; prints each run's steady tokens/s (training_summary.json) and the ratio, and beside
# it the MPI meter of rank 0 (training_summary.json's `mpi`): the share of the steady steps' wall time
# spent inside MPI calls, the payload bytes handed to MPI per step, MPI calls per step, and each
# rank's peak resident memory.
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
python3 "$(dirname "$0")/mpi-bench-data.py" "$WORK/acts.npy" 262144
common=(train --acts "$WORK/acts.npy" --d-sae "$D_SAE" --k 32 --tokens "$TOKENS" --batch-size 4096 --quiet --checkpoint-every 0)
rate() { python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["tokens_per_s"]))' "$1/training_summary.json"; }
meter() {
  python3 - "$1/training_summary.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["mpi"]
peaks = ", ".join(f"{p / 2**20:.0f}" for p in m["peak_rss_bytes_per_rank"])
print(f"          in MPI calls: {100 * m['share_of_wall']:.1f}% of the wall time ({m['seconds_in_calls']:.2f} s of "
      f"{m['wall_seconds']:.2f} s, {m['steps']:.0f} steps); sent {m['bytes_sent_per_step'] / 2**20:.2f} MiB/step "
      f"in {m['calls_per_step']:.1f} calls; peak RSS per rank {peaks} MiB")
PY
}
"$BIN" --threads 2 "${common[@]}" --out "$WORK/one" >/dev/null
mpirun -np 2 "$BIN" --threads 1 "${common[@]}" --out "$WORK/shards" >/dev/null
mpirun -np 2 "$BIN" --threads 1 "${common[@]}" --shards 1 --out "$WORK/replicas" >/dev/null
one=$(rate "$WORK/one")
for layout in shards replicas; do
  r=$(rate "$WORK/$layout")
  printf '%-9s 2 ranks x 1 thread: %s tokens/s; 1 process x 2 threads: %s tokens/s; ratio %s\n' \
    "$layout" "$r" "$one" "$(python3 -c "print(round($r / $one, 3))")"
  meter "$WORK/$layout"
done
