#!/usr/bin/env bash
# Forward-pass throughput to layer 15 (128-token contexts): saekit beside HF transformers (PyTorch f32,
# 2 threads), in one command so both see the same machine. Needs the baseline venv of
# ../shared/bench/run_all.sh setup ($SAEKIT_REF, default ~/.cache/saekit-ref).
# Usage: bash scripts/bench-forward.sh [batches]   -> JSON lines on stdout, summary table on stderr
set -euo pipefail
cd "$(dirname "$0")/.."
BATCHES=${1:-1,4,16}
REF=${SAEKIT_REF:-$HOME/.cache/saekit-ref}
BENCH=${SAEKIT_BENCH_DIR:-../shared/bench}
OUT=$(mktemp -d)
cargo build --release --locked -p saekit >/dev/null 2>&1
./target/release/saekit bench gemm --shapes 512x576x1536,2048x576x1536 > "$OUT/gemm.jsonl"
"$REF/venv/bin/python" "$BENCH/bench_forward.py" --batches "$BATCHES" --no-wait --out "$OUT/hf.json" > /dev/null
./target/release/saekit --threads 2 bench forward --batches "$BATCHES" > "$OUT/saekit.jsonl"
cat "$OUT/gemm.jsonl" "$OUT/saekit.jsonl"
python3 - "$OUT" <<'PY'
import json, sys, os
d = sys.argv[1]
hf = {r["batch"]: r for r in json.load(open(os.path.join(d, "hf.json"))) if r["mode"] == "L15"}
gemm = [json.loads(l) for l in open(os.path.join(d, "gemm.jsonl"))]
peak = max(g["gflops"] for g in gemm)
print(json.dumps({"hf_L15": hf}))
print("batch  HF tok/s  saekit tok/s  ratio  saekit GFLOP/s  of gemm rate", file=sys.stderr)
for l in open(os.path.join(d, "saekit.jsonl")):
    s = json.loads(l); h = hf.get(s["batch"])
    if h:
        print(f'{s["batch"]:>5} {h["tokens_per_s"]:>9.0f} {s["tokens_per_s"]:>13.0f} {s["tokens_per_s"]/h["tokens_per_s"]:>6.2f}'
              f' {s["linear_gflops"]:>15.1f} {s["linear_gflops"]/peak:>13.0%}', file=sys.stderr)
PY
