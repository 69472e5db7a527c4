#!/usr/bin/env bash
# Explain + score throughput (features/min, tokens) of `saekit explain` against the local `saekit serve`
# (SmolLM2-135M on this machine's CPUs) at concurrency 1, 4 and 8, each on its own copy of the database
# so no run resumes another's work. Prints one JSON summary per concurrency.
# Usage: bash scripts/bench-explain.sh FEATURES.sqlite SAE_DIR [features-per-run [concurrencies]]
#   e.g. bash scripts/bench-explain.sh demo/features.sqlite demo/sae 16 "1 4 8"
# SAEKIT_BENCH_PROFILE=dev runs the development build instead of --release (a quick check that the
# script works, e.g. with 3 features at concurrency 1; not for numbers).
# Measure on a quiet machine: the server and the explainer share the CPUs, so any other load skews it.
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${1:?usage: bench-explain.sh FEATURES.sqlite SAE_DIR [n [concurrencies]]}
SAE=${2:?usage: bench-explain.sh FEATURES.sqlite SAE_DIR [n [concurrencies]]}
N=${3:-16}
CONCURRENCIES=${4:-1 4 8}
case "${SAEKIT_BENCH_PROFILE:-release}" in
    release) cargo build --release --locked --workspace --bins >/dev/null; profile=release ;;
    dev) cargo build --locked --workspace --bins >/dev/null; profile=debug ;;
    *) echo "bench-explain: SAEKIT_BENCH_PROFILE is release or dev" >&2; exit 1 ;;
esac
BIN="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/$profile/saekit"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for c in $CONCURRENCIES; do
    cp "$DB" "$OUT/c$c.sqlite"
    if ! "$BIN" explain --db "$OUT/c$c.sqlite" --sae "$SAE" --sample "$N" --seed 1 --concurrency "$c" --json \
        >"$OUT/c$c.json" 2>"$OUT/c$c.log"; then
        echo "bench-explain: concurrency $c failed:" >&2
        tail -20 "$OUT/c$c.log" >&2
        exit 1
    fi
    python3 -c "import json,sys; s=json.load(open(sys.argv[1])); s['concurrency']=$c; s['features_per_min']=s['explained']/max(s['seconds'],1e-9)*60; print(json.dumps(s))" "$OUT/c$c.json"
done
