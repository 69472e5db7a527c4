#!/usr/bin/env bash
# Harvest throughput with bf16 linear layers: `saekit harvest --precision f32` and `--precision bf16` on the
# same contexts (layer 15 of SmolLM2, release build), beside HF transformers' forward to layer 15 in float32
# and bfloat16 on as many tokens (random ids, the same context length and batch), in one command so every
# run sees the same machine. Needs the baseline venv of ../shared/bench/run_all.sh setup ($SAEKIT_REF,
# default ~/.cache/saekit-ref) and a CPU with AMX or AVX512-BF16 (the bf16 harvest refuses to run without).
# Usage: bash scripts/bench-harvest-bf16.sh TOKENS_DIR [tokens] [batch]
#   TOKENS_DIR from `saekit tokenize` (its train split is read); tokens default 64k; batch (contexts per
#   forward pass, both sides) default 8.
#   Prints JSON lines on stdout: the CPU's bf16 flags, then one line per run; the ratios go to stderr.
# SAEKIT_BIN=path uses that binary instead of building target/release/saekit (to check the script with a
# dev build; such figures are not the release build's). THREADS (default: all cores) for both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bench-harvest-bf16.sh TOKENS_DIR [tokens] [batch]}
TOKENS=${2:-64k}
BATCH=${3:-8}
THREADS=${THREADS:-$(nproc)}
REF=${SAEKIT_REF:-$HOME/.cache/saekit-ref}
BENCH=${SAEKIT_BENCH_DIR:-../shared/bench}
HOOK=blocks.15.hook_resid_post
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

flags=$(grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | paste -sd' ' || true)
echo "{\"cpu_bf16_flags\": \"$flags\", \"threads\": $THREADS}"

BIN=${SAEKIT_BIN:-}
if [[ -z $BIN ]]; then
  cargo build --release --locked -p saekit >/dev/null 2>&1
  BIN=./target/release/saekit
fi

# saekit: the harvest's own timing (manifest extra.last_run: the loop over contexts, shard writes
# included, model loading and auto's probe not), plus the forward passes alone.
for p in f32 bf16; do
  "$BIN" --threads "$THREADS" harvest --precision "$p" --hooks "$HOOK" --contexts "$DATA" --tokens "$TOKENS" \
    --batch "$BATCH" "$OUT/acts-$p" > /dev/null 2>> "$OUT/log" || { cat "$OUT/log" >&2; exit 1; }
  python3 - "$OUT/acts-$p/manifest.json" "$p" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
run = m["extra"]["last_run"]
print(json.dumps({"run": "saekit harvest", "precision": sys.argv[2], "recorded_precision": m["model"]["precision"],
                  "tokens": m["n_tokens"], "context": m["context"], "batch": run["batch"], "threads": run["threads"],
                  "tokens_per_s": run["tokens_per_s"], "forward_tokens_per_s": run["tokens"] / run["forward_seconds"]}))
PY
done > "$OUT/saekit.jsonl"
cat "$OUT/saekit.jsonl"
read -r N_TOKENS CONTEXT < <(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readline()); print(r["tokens"], r["context"])' "$OUT/saekit.jsonl")

# HF transformers: the decoder cut after layer 15 (as bench_forward.py's L15 mode), batch by batch over
# N_TOKENS tokens, after one warm-up batch.
for dtype in f32 bf16; do
  "$REF/venv/bin/python" - "$BENCH" "$dtype" "$N_TOKENS" "$CONTEXT" "$BATCH" "$THREADS" 2>> "$OUT/log" <<'PY' ||
import json, os, sys, time
sys.path.insert(0, os.path.abspath(sys.argv[1]))
import torch
from common import load_model_and_tokenizer, set_threads
dtype, tokens, seq, batch, threads = sys.argv[2], *map(int, sys.argv[3:])
set_threads(threads)
model, _tok, _ = load_model_and_tokenizer(dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:16])
ids = torch.randint(100, 49000, (tokens // seq, seq), generator=torch.Generator().manual_seed(0))
def forward(chunk):
    with torch.inference_mode():
        return model.model(input_ids=chunk, use_cache=False).last_hidden_state
forward(ids[:batch])
t = time.perf_counter()
for i in range(0, len(ids), batch):
    forward(ids[i:i + batch])
sec = time.perf_counter() - t
print(json.dumps({"run": "hf forward L15", "precision": dtype, "tokens": len(ids) * seq, "context": seq, "batch": batch,
                  "threads": torch.get_num_threads(), "tokens_per_s": len(ids) * seq / sec, "torch": torch.__version__}))
PY
    { cat "$OUT/log" >&2; exit 1; }
done > "$OUT/hf.jsonl"
cat "$OUT/hf.jsonl"

python3 - "$OUT/saekit.jsonl" "$OUT/hf.jsonl" <<'PY'
import json, sys
rate = {}
for f in sys.argv[1:]:
    for line in open(f):
        r = json.loads(line)
        rate[(r["run"].split()[0], r["precision"])] = r
s, h = lambda p: rate[("saekit", p)], lambda p: rate[("hf", p)]
print(f'saekit harvest: f32 {s("f32")["tokens_per_s"]:.0f} tok/s, bf16 {s("bf16")["tokens_per_s"]:.0f} tok/s '
      f'({s("bf16")["tokens_per_s"] / s("f32")["tokens_per_s"]:.2f}x; forward alone '
      f'{s("bf16")["forward_tokens_per_s"] / s("f32")["forward_tokens_per_s"]:.2f}x)', file=sys.stderr)
print(f'HF forward L15: f32 {h("f32")["tokens_per_s"]:.0f} tok/s, bf16 {h("bf16")["tokens_per_s"]:.0f} tok/s '
      f'({h("bf16")["tokens_per_s"] / h("f32")["tokens_per_s"]:.2f}x)', file=sys.stderr)
for p in ("f32", "bf16"):
    print(f'{p}: saekit harvest / HF forward = {s(p)["tokens_per_s"] / h(p)["tokens_per_s"]:.2f}x', file=sys.stderr)
PY
