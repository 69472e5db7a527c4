#!/usr/bin/env bash
# Gemma-2-2B-shaped random-weight model (google/gemma-2-2b's exact config, random weights, bf16 safetensors as
# published), forward to layer 12 (Gemma Scope's favourite hook, blocks.12.hook_resid_post): saekit vs HF
# transformers on the same weights, tokens/s and peak RSS, in one command. Run it on a quiet machine only.
#   [SAEKIT_BIN=target/debug/saekit] bash scripts/bench-gemma2-2b.sh [OUT_DIR]   (default: a release build)
# Then harvests 4,096 tokens of blocks.12.hook_resid_post (tokens/s and peak RSS).
# saekit runs at each of $PRECISIONS (default "f32 bf16"; bf16 needs AVX512-BF16 or AMX, see `saekit bench
# gemm`), HF transformers at each of $HF_DTYPES (default "float32 bfloat16", the weights' own dtype).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${SAEKIT_CACHE:-$HOME/.cache/saekit}/gemma-2-2b-random}
PRECISIONS=${PRECISIONS:-f32 bf16}
HF_DTYPES=${HF_DTYPES:-float32 bfloat16}
VENV=${SAEKIT_FIXTURE_VENV:-$HOME/.cache/saekit-fixtures/venv}
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
"$VENV/bin/python" -c 'import torch, transformers' 2>/dev/null || "$VENV/bin/pip" install -q torch transformers safetensors tokenizers numpy
if [[ ! -f $OUT/config.json ]]; then
  "$VENV/bin/python" - "$OUT" <<'PY'
import os, sys, torch
from transformers import Gemma2Config, Gemma2ForCausalLM
sys.path.insert(0, "scripts")
from make_model_fixtures import ARCHS, make_tokenizer
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
# google/gemma-2-2b config.json, verbatim in every size field; the vocabulary is the fixture tokenizer's,
# padded to Gemma's 256000 rows so the embedding and unembedding cost what they cost in the real model.
tok, _ = make_tokenizer(ARCHS["gemma2"], out)
cfg = Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                   tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
torch.manual_seed(0)
Gemma2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
PY
fi
# saekit loads only the 13 blocks layer 12 needs (LoadOptions::blocks); HF gets the same by
# num_hidden_layers=13, as a user who knows transformers would do it.
BIN=${SAEKIT_BIN:-}
if [[ -z $BIN ]]; then cargo build --release --locked -q -p saekit; BIN=target/release/saekit; fi
grep -m1 'model name' /proc/cpuinfo; { grep -o 'avx2\|avx512f\|avx512_bf16\|amx_bf16' /proc/cpuinfo || true; } | sort -u | tr '\n' ' '; echo
for p in $PRECISIONS; do
  echo "saekit --precision $p"
  /usr/bin/time -v "$BIN" bench forward -m "$OUT" --layer 12 --batches 1,4 --seq 128 --precision "$p" \
    2>&1 | grep -E "tokens_per_s|Maximum resident"
done
for dtype in $HF_DTYPES; do
/usr/bin/time -v "$VENV/bin/python" - "$OUT" "$dtype" <<'PY' 2>&1 | grep -E "tok/s|Maximum resident"
import sys, time, torch
from transformers import AutoModelForCausalLM
from transformers import AutoConfig
cfg = AutoConfig.from_pretrained(sys.argv[1])
cfg.num_hidden_layers = 13  # stop after blocks.12, load no more
if getattr(cfg, "layer_types", None):
    cfg.layer_types = cfg.layer_types[:13]
dtype = getattr(torch, sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], config=cfg, dtype=dtype, attn_implementation="eager").eval()
for batch in (1, 4):
    ids = torch.randint(3, 400, (batch, 128))
    with torch.no_grad():
        m.model(ids)
        t0, n = time.time(), 0
        while time.time() - t0 < 8:
            m.model(ids); n += batch * 128
    print(f"HF transformers {sys.argv[2]} batch {batch}: {n / (time.time() - t0):.0f} tok/s")
PY
done
# harvest at Gemma Scope's hook: the repository's own documents as text, through the model's tokenizer
H=$(mktemp -d)
trap 'rm -rf "$H"' EXIT
"$BIN" tokenize -m "$OUT" --context 128 --validation-fraction 0 --out "$H/tokens" README.md BENCHMARKS.md DEVELOPERS.md >/dev/null 2>&1
for p in $PRECISIONS; do
  echo "saekit harvest --precision $p"
  /usr/bin/time -v "$BIN" harvest -m "$OUT" --contexts "$H/tokens" --hooks blocks.12.hook_resid_post --tokens 4096 \
    --batch 4 --precision "$p" "$H/acts-$p" 2>&1 | grep -E "this run|Maximum resident"
done
