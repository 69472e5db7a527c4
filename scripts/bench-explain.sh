#!/usr/bin/env bash
# Explain + score throughput (features/min, tokens) of `saekit explain` against the local `saekit serve`
# (SmolLM2-135M on this machine's CPUs) at concurrency 1, 4 and 8, each on its own copy of the database
# so no run resumes another's work. Prints one JSON summary per concurrency.
# Usage: bash scripts/bench-explain.sh FEATURES.sqlite SAE_DIR [features-per-run]
# Measure on a quiet machine: the server and the explainer share the CPUs, so any other load skews it.
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${1:?usage: bench-explain.sh FEATURES.sqlite SAE_DIR [n]}
SAE=${2:?usage: bench-explain.sh FEATURES.sqlite SAE_DIR [n]}
N=${3:-16}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cargo build --release --locked -p saekit >/dev/null 2>&1
for c in 1 4 8; do
    cp "$DB" "$OUT/c$c.sqlite"
    ./target/release/saekit explain --db "$OUT/c$c.sqlite" --sae "$SAE" --sample "$N" --seed 1 \
        --concurrency "$c" --json 2>/dev/null |
        python3 -c "import json,sys; s=json.load(sys.stdin); s['concurrency']=$c; s['features_per_min']=s['explained']/max(s['seconds'],1e-9)*60; print(json.dumps(s))"
done
