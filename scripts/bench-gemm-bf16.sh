#!/usr/bin/env bash
# GEMM rates on every path this CPU has, one command: saekit's f32 (gemm crate), AMX and AVX512-BF16
# kernels (`saekit bench gemm`), then PyTorch's f32 and bf16 matmul (oneDNN) on the same shapes.
# Shapes MxKxN: the SAE encoder (4096x576x16384), SmolLM2-135M's linear layers at 1024 rows (fused qkv,
# o, gate+up, down) and one Gemma-2-2B MLP product.
#   bash scripts/bench-gemm-bf16.sh            # needs the release binary and the bench venv
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${SAEKIT_BIN:-$ROOT/target/release/saekit}
PY=${SAEKIT_REF:-$HOME/.cache/saekit-ref}/venv/bin/python
SHAPES=${SHAPES:-4096x576x16384,1024x576x960,1024x576x576,1024x576x3072,1024x1536x576,2048x2304x9216}
echo "== $(date -u) $(grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ') $(nproc) cores"
"$BIN" bench gemm --shapes "$SHAPES" --min-time "${MIN_TIME:-3}"
SHAPES=$SHAPES "$PY" - <<'PYEOF'
import json, os, time, torch
torch.set_num_threads(os.cpu_count())
for s in os.environ["SHAPES"].split(","):
    m, k, n = map(int, s.split("x"))
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b
        times, t0 = [], time.perf_counter()
        while len(times) < 3 or time.perf_counter() - t0 < float(os.environ.get("MIN_TIME", 3)):
            t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
        sec = sorted(times)[len(times) // 2]
        print(json.dumps({"impl": "torch " + torch.__version__, "path": str(dtype).replace("torch.", ""), "m": m, "k": k, "n": n,
                          "threads": torch.get_num_threads(), "ms": sec * 1e3, "gflops": 2 * m * k * n / sec / 1e9}))
PYEOF
