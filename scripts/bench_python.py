#!/usr/bin/env python3
"""Python-binding benchmarks (run on a quiet machine; numbers go to BENCHMARKS.md).

  python3 scripts/bench_python.py overhead        # binding vs CLI on the same work (target: < 3% apart)
  python3 scripts/bench_python.py hf              # run_with_cache tokens/s vs HF transformers with a hook
                                                  #   (needs torch + transformers and an HF copy of SmolLM2 in $HF_MODEL)

`overhead` times `saekit activations` and `saekit train` (CLI, $SAEKIT_BIN) against Model.run_with_cache
and saekit.train on the same text / .npy, each the best of 3, and prints the ratio.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import saekit

HOOK = "blocks.15.hook_resid_post"
TEXT = ("The Golden Gate Bridge spans the strait between San Francisco Bay and the Pacific Ocean. " * 90)[:6000]
BIN = os.environ.get("SAEKIT_BIN", "target/release/saekit")


def best(f, n=3):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def overhead():
    model = saekit.Model.load()
    with tempfile.TemporaryDirectory() as d:
        x = Path(d) / "x.npy"
        # the CLI time includes its model load; subtract a load measured the same way
        load = best(lambda: saekit.Model.load())
        cli = best(lambda: subprocess.run([BIN, "activations", "--text", TEXT, "--hook", HOOK, "--out", x], check=True,
                                          capture_output=True)) - load
        py = best(lambda: model.run_with_cache(TEXT, names=[HOOK]))
        print(f"run_with_cache: binding {py:.3f} s, CLI (minus load) {cli:.3f} s, ratio {py / cli:.3f}")
        acts = np.load(x)
        acts = np.ascontiguousarray(np.tile(acts, (max(1, 200_000 // len(acts)), 1)))
        np.save(x, acts)
        args = dict(d_sae=4096, k=32, tokens="400k", progress=False)
        cli = best(lambda: subprocess.run([BIN, "train", "--acts", x, "--out", Path(d) / "c", "--quiet", "--d-sae", "4096",
                                           "--k", "32", "--tokens", "400k"], check=True, capture_output=True), 2)
        py = best(lambda: saekit.train(str(x), Path(d) / "p", **args), 2)
        print(f"train: binding {py:.2f} s, CLI {cli:.2f} s, ratio {py / cli:.3f}")


def hf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.environ["HF_MODEL"]
    tok, hf_model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(TEXT, return_tensors="pt").input_ids
    store = {}
    hf_model.model.layers[15].register_forward_hook(lambda m, i, o: store.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        t_hf = best(lambda: hf_model(ids))
    model = saekit.Model.load()
    t_sk = best(lambda: model.run_with_cache(TEXT, names=[HOOK]))
    n = ids.shape[1]
    print(f"{n} tokens: saekit {n / t_sk:.0f} tokens/s (stops after block 15), HF transformers {n / t_hf:.0f} tokens/s (full pass)")


if __name__ == "__main__":
    {"overhead": overhead, "hf": hf}[sys.argv[1] if len(sys.argv) > 1 else "overhead"]()
