#!/usr/bin/env python3
"""Cross-check saekit's SAE folders against SAELens (not in CI: needs torch and sae-lens, ~3 GB).

  pip install ./python sae-lens torch      # CPU torch is enough
  python3 scripts/saelens_crosscheck.py [ACTS.npy]

1. an SAE trained by saekit.train, loaded with sae_lens.SAE.load_from_disk, encodes like saekit;
2. an SAE trained with SAELens' own TopKSAE module (a few Adam steps of its forward pass on the same
   activations) and written with its save_model, loaded by saekit.SAE.load, encodes like SAELens.
Activations default to `saekit activations` of a paragraph at blocks.15.hook_resid_post.
Exits non-zero on any disagreement beyond float32 rounding.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE, TopKSAE, TopKSAEConfig

import saekit

HOOK = "blocks.15.hook_resid_post"
TEXT = "The Golden Gate Bridge spans the strait between San Francisco Bay and the Pacific Ocean. " * 20


def activations(work: Path) -> np.ndarray:
    if len(sys.argv) > 1:
        return np.load(sys.argv[1]).astype(np.float32)
    _, cache = saekit.Model.load().run_with_cache(TEXT, names=[HOOK])
    return np.ascontiguousarray(cache[HOOK][0, 1:])  # drop the position-0 attention sink


def compare(name: str, ours: np.ndarray, theirs: np.ndarray) -> bool:
    err = np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12)
    same_support = np.mean((ours != 0) == (theirs != 0))
    ok = err < 1e-4 and same_support > 0.999
    print(f"{name}: max relative error {err:.2e}, same active set on {100 * same_support:.2f}% of entries:",
          "ok" if ok else "MISMATCH")
    return ok


def saekit_to_saelens(x: np.ndarray, work: Path) -> bool:
    out = work / "saekit-sae"
    saekit.train(x, out, d_sae=1024, k=16, tokens=len(x) * 8, batch_size=256, progress=False)
    theirs = SAE.load_from_disk(str(out), device="cpu")
    with torch.no_grad():
        f_theirs = theirs.encode(torch.from_numpy(x)).numpy()
    return compare("saekit SAE, SAELens encode vs saekit encode", saekit.SAE.load(out).encode(x), f_theirs)


def saelens_to_saekit(x: np.ndarray, work: Path) -> bool:
    sae = TopKSAE(TopKSAEConfig(d_in=x.shape[1], d_sae=1024, k=16, dtype="float32", device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    xt = torch.from_numpy(x)
    for _ in range(50):
        loss = ((sae(xt) - xt) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = work / "saelens-sae"
    sae.save_model(str(out))
    with torch.no_grad():
        f_theirs = sae.encode(xt).numpy()
    return compare("SAELens SAE, saekit encode vs SAELens encode", saekit.SAE.load(out).encode(x), f_theirs)


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        x = activations(work)
        ok = saekit_to_saelens(x, work) & saelens_to_saekit(x, work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
