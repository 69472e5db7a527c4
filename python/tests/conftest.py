"""Shared fixtures: the real model, the saekit CLI (the independent reference every test compares
with), activations and a tiny SAE made by that CLI."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import saekit

REPO = Path(__file__).resolve().parents[2]
HOOK = "blocks.15.hook_resid_post"

# ~400 tokens of ordinary prose and code: enough rows for a few training steps of a tiny SAE
TEXT = " ".join(
    [
        "The Golden Gate Bridge is a suspension bridge spanning the strait that connects San Francisco Bay",
        "and the Pacific Ocean. It was the longest and tallest suspension bridge in the world when it opened.",
        "def main():\n    for i in range(10):\n        print(i * i)\n    return 0\n",
        "Paris is the capital of France; Berlin is the capital of Germany; Madrid is the capital of Spain.",
        "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen.",
        "In 1969 two astronauts walked on the Moon while a third orbited above them in the command module.",
        "SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name ORDER BY count(*) DESC;",
        "Le chat dort sur le canapé pendant que la pluie tombe doucement sur les toits de la ville.",
        "A sparse autoencoder learns an overcomplete dictionary of directions in the residual stream.",
    ]
    * 3
)


def saekit_bin() -> str:
    exe = os.environ.get("SAEKIT_BIN", str(REPO / "target" / "debug" / "saekit"))
    if not Path(exe).is_file():
        pytest.fail(f"{exe}: the saekit CLI is not built (cargo build -p saekit, or set SAEKIT_BIN)")
    return exe


def cli(*args: str) -> str:
    r = subprocess.run([saekit_bin(), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"saekit {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r.stdout


@pytest.fixture(scope="session")
def model():
    path = saekit.default_model_path()
    if not Path(path).is_file():
        pytest.fail(f"{path}: the model is missing; run scripts/fetch-model.sh")
    return saekit.Model.load()


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("saekit")


@pytest.fixture(scope="session")
def cli_acts(work):
    """(activations [N, d_model], token ids) of TEXT, written by `saekit activations`."""
    x, ids = work / "x.npy", work / "ids.npy"
    cli("activations", "--text", TEXT, "--hook", HOOK, "--out", x, "--ids-out", ids)
    return np.load(x), np.load(ids), x


TRAIN = dict(d_sae=256, k=8, tokens=8192, batch_size=256, seed=3)


@pytest.fixture(scope="session")
def cli_sae(work, cli_acts):
    """A tiny TopK SAE trained by the CLI on cli_acts."""
    out = work / "sae-cli"
    cli(
        "train", "--acts", cli_acts[2], "--out", out, "--quiet",
        "--d-sae", TRAIN["d_sae"], "--k", TRAIN["k"], "--tokens", TRAIN["tokens"],
        "--batch-size", TRAIN["batch_size"], "--seed", TRAIN["seed"],
        # saekit.train is the library's f32; the CLI's default `auto` is bf16 on an AMX CPU
        "--precision", "f32",
    )
    return out


def eval_json(sae_dir: Path, acts: Path) -> dict:
    return json.loads(cli("eval", sae_dir, "--acts", acts, "--json", "--outlier-norm-factor", "0"))
