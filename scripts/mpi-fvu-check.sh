#!/usr/bin/env bash
# The issue's long check, too long for CI: every architecture trained on TOKENS (default 1M) tokens in one
# process, on 2 latent shards, on 2 data replicas and on 2 shards x 2 replicas (4 ranks, oversubscribed),
# from the same data and seed; prints each layout's final FVU (training_summary.json's
# final_on_first_rows, the same rows for every run) and its relative gap to one process (limit: 1%).
#   cargo build --workspace --bin saekit --features saekit/mpi
#   SAEKIT_BIN=target/debug/saekit bash scripts/mpi-fvu-check.sh [TOKENS] [D_SAE]
set -euo pipefail
BIN=${SAEKIT_BIN:-target/debug/saekit}
TOKENS=${1:-1M}
D_SAE=${2:-512}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 "$(dirname "$0")/mpi-bench-data.py" "$WORK/acts.npy" 262144
# ReLU's default L1 coefficient (5.0) learns nothing on this data (FVU 1.0 on every layout, which proves nothing)
echo "l1_coefficient = 0.5" > "$WORK/relu.toml"
declare -A ARCH=(
  [topk]="--arch topk --k 32"
  [topk-multi]="--arch topk --k 32 --multi-topk"
  [batchtopk]="--arch batchtopk --k 32"
  [relu]="--arch relu --config $WORK/relu.toml"
  [jumprelu]="--arch jumprelu"
)
fvu() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["final_on_first_rows"]["fvu"])' "$1/training_summary.json"; }
printf '%-11s %10s %10s %10s %10s   %s\n' arch "1 process" "2 shards" "2 replicas" "2x2" "largest gap"
for a in topk topk-multi batchtopk relu jumprelu; do
  # shellcheck disable=SC2086
  common=(train --acts "$WORK/acts.npy" --d-sae "$D_SAE" ${ARCH[$a]} --tokens "$TOKENS" --batch-size 4096 --quiet --checkpoint-every 0)
  "$BIN" --threads 2 "${common[@]}" --out "$WORK/$a-one" >/dev/null 2>&1
  mpirun -np 2 "$BIN" --threads 1 "${common[@]}" --out "$WORK/$a-shards" >/dev/null 2>&1
  mpirun -np 2 "$BIN" --threads 1 "${common[@]}" --shards 1 --out "$WORK/$a-replicas" >/dev/null 2>&1
  mpirun -np 4 --oversubscribe "$BIN" --threads 1 "${common[@]}" --shards 2 --out "$WORK/$a-2x2" >/dev/null 2>&1
  one=$(fvu "$WORK/$a-one"); s=$(fvu "$WORK/$a-shards"); r=$(fvu "$WORK/$a-replicas"); q=$(fvu "$WORK/$a-2x2")
  python3 -c "
import sys
a, one, *many = sys.argv[1], *map(float, sys.argv[2:])
gap = max(abs(m - one) / one for m in many)
print(f'{a:<11} {one:>10.4f} ' + ' '.join(f'{m:>10.4f}' for m in many) + f'   {100 * gap:.2f}%' + ('' if gap <= 0.01 else '  > 1%'))
" "$a" "$one" "$s" "$r" "$q"
done
