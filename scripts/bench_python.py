#!/usr/bin/env python3
"""Python-binding benchmarks (run on a quiet machine, one at a time; numbers go to BENCHMARKS.md).

  python3 scripts/bench_python.py overhead   # binding vs CLI on the same work (target: < 3% apart)
  python3 scripts/bench_python.py forward    # run_with_cache tokens/s vs HF transformers with a hook
                                             #   (and TransformerLens when it can load SmolLM2 offline)
  python3 scripts/bench_python.py saelens    # saekit.train vs SAELens' SAETrainer on the same numpy rows

`forward` and `saelens` need torch, transformers and sae-lens (the venv of `bash ../shared/bench/run_all.sh
setup`, with saekit installed into it); HF transformers loads the same GGUF saekit runs (dequantized to f32).
`overhead` times `saekit activations` and `saekit train` (CLI, $SAEKIT_BIN) against Model.run_with_cache
and saekit.train on the same text / .npy, each the best of 3, and prints the ratio.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import saekit

HOOK = "blocks.15.hook_resid_post"
LAYER = 15
TEXT = ("The Golden Gate Bridge spans the strait between San Francisco Bay and the Pacific Ocean. " * 90)[:6000]
BIN = os.environ.get("SAEKIT_BIN", "target/release/saekit")
CORPUS = Path(__file__).resolve().parent.parent / "tests/fixtures/mini-corpus/mini.jsonl"
THREADS = int(os.environ.get("SAEKIT_THREADS", "2"))


def best(f, n=3):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def corpus_windows(model, seq, n_windows):
    """[n_windows, seq] token ids cut from the mini corpus (real text), as int64."""
    ids = []
    for line in open(CORPUS):
        ids.extend(model.to_tokens(json.loads(line)["text"], prepend_bos=False).reshape(-1).tolist())
        if len(ids) >= seq * n_windows:
            break
    n = min(n_windows, len(ids) // seq)
    return np.asarray(ids[: n * seq], dtype=np.int64).reshape(n, seq)
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
        fresh = (Path(d) / f"out{i}" for i in range(1_000))  # a fresh run needs an empty folder
        cli = best(lambda: subprocess.run([BIN, "train", "--acts", x, "--out", next(fresh), "--quiet", "--d-sae", "4096",
                                           "--k", "32", "--tokens", "400k"], check=True, capture_output=True), 2)
        py = best(lambda: saekit.train(str(x), next(fresh), **args), 2)
        print(f"train: binding {py:.2f} s, CLI {cli:.2f} s, ratio {py / cli:.3f}")


def load_hf():
    """SmolLM2 in HF transformers from the same GGUF saekit runs (transformers dequantizes it to f32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(saekit.default_model_path())
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tok


class StopForward(Exception):
    pass


def forward():
    import torch
    torch.set_num_threads(THREADS)
    model = saekit.Model.load()
    ids = corpus_windows(model, 256, 8)
    n = ids.size
    hf, tok = load_hf()
    store = {}

    def keep(m, i, o):
        store["x"] = o[0] if isinstance(o, tuple) else o

    def keep_and_stop(m, i, o):
        keep(m, i, o)
        raise StopForward

    x = torch.from_numpy(ids)
    with torch.no_grad():
        h = hf.model.layers[LAYER].register_forward_hook(keep)
        t_full = best(lambda: hf(x))
        h.remove()
        full = store["x"].numpy()
        h = hf.model.layers[LAYER].register_forward_hook(keep_and_stop)

        def stopped():
            try:
                hf(x)
            except StopForward:
                pass

        t_stop = best(stopped)
        h.remove()
    t_sk = best(lambda: model.run_with_cache(ids, names=[HOOK]))
    _, cache = model.run_with_cache(ids, names=[HOOK])
    rel = np.linalg.norm(cache[HOOK] - full) / np.linalg.norm(full)
    print(f"{ids.shape[0]} x {ids.shape[1]} tokens of the mini corpus, {THREADS} threads, torch {torch.__version__}")
    print(f"  hook values: saekit vs HF relative L2 {rel:.2e}")
    print(f"  saekit run_with_cache (stops after block {LAYER}): {n / t_sk:,.0f} tokens/s")
    print(f"  HF, forward hook raising after block {LAYER}:      {n / t_stop:,.0f} tokens/s  -> saekit {t_stop / t_sk:.2f}x")
    print(f"  HF, full forward with the hook:                  {n / t_full:,.0f} tokens/s  -> saekit {t_full / t_sk:.2f}x")
    transformer_lens(hf, tok, ids, t_sk)


def transformer_lens(hf, tok, ids, t_sk):
    """TransformerLens' run_with_cache(stop_at_layer) when it can build SmolLM2 from the local HF copy."""
    try:
        import torch
        from transformer_lens import HookedTransformer

        tl = HookedTransformer.from_pretrained_no_processing(
            "HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf, tokenizer=tok, device="cpu", dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - reported, the comparison above stands without it
        print(f"  TransformerLens could not load SmolLM2 here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return
    x = torch.from_numpy(ids)
    with torch.no_grad():
        t_tl = best(lambda: tl.run_with_cache(x, names_filter=[HOOK], stop_at_layer=LAYER + 1))
    print(f"  TransformerLens run_with_cache(stop_at_layer={LAYER + 1}): {ids.size / t_tl:,.0f} tokens/s "
          f"-> saekit {t_tl / t_sk:.2f}x")


def real_rows(model, n_rows):
    """Residual rows at HOOK over the mini corpus, position 0 of each window (the sink) left out."""
    ids = corpus_windows(model, 128, n_rows // 127 + 1)
    _, cache = model.run_with_cache(ids, names=[HOOK])
    return np.ascontiguousarray(cache[HOOK][:, 1:, :].reshape(-1, cache[HOOK].shape[-1])[:n_rows])


def fvu(x, x_hat):
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def saelens():
    """The same rows, shape and token budget through saekit.train and SAELens' SAETrainer (TopK)."""
    import sae_lens
    import torch
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.set_num_threads(THREADS)
    d_sae, k, batch, steps = 4096, 32, 4096, 24
    rows = real_rows(saekit.Model.load(), 60_000)
    train_rows, eval_rows = rows[:50_000], rows[50_000:]
    tokens = steps * batch
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        saekit.train(train_rows, Path(d) / "sae", d_sae=d_sae, k=k, tokens=tokens, batch_size=batch,
                     threads=THREADS, progress=False)
        t_sk = time.perf_counter() - t0
        sae = saekit.SAE.load(Path(d) / "sae")
        q_sk = fvu(eval_rows, sae.decode(sae.encode(eval_rows)))

    torch.manual_seed(0)
    data = torch.from_numpy(train_rows)

    def batches():
        while True:
            for s in range(0, data.shape[0] - batch + 1, batch):
                yield data[s: s + batch]

    cfg = TopKTrainingSAEConfig(d_in=rows.shape[1], d_sae=d_sae, k=k, dtype="float32", device="cpu",
                                normalize_activations="expected_average_only_in")
    tcfg = SAETrainerConfig(total_training_samples=tokens, train_batch_size_samples=batch, lr=4e-4,
                            lr_end=4e-5, lr_scheduler_name="constant", device="cpu", n_batches_for_norm_estimate=2)
    os.environ.setdefault("WANDB_MODE", "disabled")
    t0 = time.perf_counter()
    trained = SAETrainer(cfg=tcfg, sae=TopKTrainingSAE(cfg), data_provider=batches()).fit()
    t_sl = time.perf_counter() - t0
    trained.eval()
    with torch.no_grad():
        ev = torch.from_numpy(eval_rows)
        q_sl = fvu(eval_rows, trained.decode(trained.encode(ev)).numpy())
    print(f"TopK d_sae {d_sae}, k {k}, batch {batch}, {tokens:,} tokens of real SmolLM2 rows at {HOOK}, "
          f"{THREADS} threads; SAELens {sae_lens.__version__}, torch {torch.__version__}")
    print(f"  saekit.train: {t_sk:.1f} s ({tokens / t_sk:,.0f} tokens/s), held-out FVU {q_sk:.3f}")
    print(f"  SAELens SAETrainer.fit: {t_sl:.1f} s ({tokens / t_sl:,.0f} tokens/s), held-out FVU {q_sl:.3f}")
    print(f"  -> saekit {t_sl / t_sk:.1f}x SAELens (whole call, setup included)")


if __name__ == "__main__":
    {"overhead": overhead, "forward": forward, "saelens": saelens}[sys.argv[1] if len(sys.argv) > 1 else "overhead"]()
