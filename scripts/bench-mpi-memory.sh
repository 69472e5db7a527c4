#!/usr/bin/env bash
# A dictionary too large for comfort on one box, sharded: `mpirun -np 2 saekit train --shards 2` for a
# few real steps of D_SAE latents (default 1M) on d_in 576, then each rank's peak resident memory
# (VmHWM, from training_summary.json's `mpi`, and /usr/bin/time's maximum RSS of each rank's whole
# process, the final gather and the SAELens write included) and the steps' tokens/s.
# Each rank builds only its own slice of the weights and Adam state; rank 0 alone gathers the
# trained SAE (not the Adam state) for the output folder.
#
# Needs about 2 x 9 GB at 1M latents (weights + two Adam moments = 3 x 2 x 576 x 4 bytes per latent,
# split over the ranks, plus the batch's buffers): run it on a quiet box with the memory free.
# The trainer's up-front memory estimate is for the whole run and counts dense [batch, d_sae]
# buffers that the TopK step does not hold (it encodes in chunks), so this script lifts it with
# SAEKIT_MAX_MEMORY (override it to keep the check); what counts is the measured peak.
# After the steps rank 0 evaluates the saved SAE on the first rows (norm_estimate_rows of them, set
# here to one batch): at 1M latents that forward pass is ~1.2 TFLOP per 1,024 rows on rank 0's one
# thread, part of the wall time but not of the steps' tokens/s. On a box shared with compilers
# (load 8 on 2 cores) 4 steps of 1,024 took 9 minutes and the evaluation of 8,192 rows did not end
# within 6 more; measure on a quiet box.
#
#   cargo build --workspace --bin saekit --features saekit/mpi
#   SAEKIT_BIN=target/debug/saekit bash scripts/bench-mpi-memory.sh [D_SAE] [STEPS >= 3] [BATCH]
set -euo pipefail
BIN=${SAEKIT_BIN:-target/debug/saekit}
D_SAE=${1:-1048576}
STEPS=${2:-4}
BATCH=${3:-4096}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export SAEKIT_MAX_MEMORY=${SAEKIT_MAX_MEMORY:-1T}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 "$(dirname "$0")/mpi-bench-data.py" "$WORK/acts.npy" 65536
echo "norm_estimate_rows = $BATCH" > "$WORK/config.toml"
# each rank's /usr/bin/time report goes to time.RANK
mpirun -np 2 sh -c 'exec /usr/bin/time -v -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' "$WORK/time" "$BIN" --threads 1 train \
  --acts "$WORK/acts.npy" --d-sae "$D_SAE" --k 32 --tokens $((STEPS * BATCH)) --batch-size "$BATCH" \
  --shards 2 --quiet --checkpoint-every 0 --config "$WORK/config.toml" --out "$WORK/out" >/dev/null
python3 - "$WORK" "$D_SAE" <<'PY'
import glob, json, sys
work, d_sae = sys.argv[1], int(sys.argv[2])
s = json.load(open(f"{work}/out/training_summary.json"))
m = s["mpi"]
print(f"d_sae {d_sae} on 2 shards: {s['steps']} steps of {s['tokens'] // s['steps']} rows, {s['tokens_per_s']:.0f} tokens/s "
      f"(steady steps), {100 * m['share_of_wall']:.1f}% of it in MPI calls, {m['bytes_sent_per_step'] / 2**20:.1f} MiB sent/step")
for r, p in enumerate(m["peak_rss_bytes_per_rank"]):
    print(f"rank {r}: peak RSS after training and the gather {p / 2**30:.2f} GiB")
for f in sorted(glob.glob(f"{work}/time.*")):
    kb = next(int(l.split()[-1]) for l in open(f) if "Maximum resident set size" in l)
    print(f"{f.rsplit('/', 1)[1]}: maximum RSS of the whole process {kb / 2**20:.2f} GiB")
PY
