"""saekit.train: an array trains the same SAE as the CLI on the same .npy; Ctrl-C checkpoints, resume
finishes bit-identically; bad configs raise."""

import builtins
import os
import signal
import threading
import time

import numpy as np
import pytest

import saekit
from conftest import TRAIN


def test_train_from_array_equals_cli(cli_acts, cli_sae, tmp_path):
    x = cli_acts[0]
    m = saekit.train(x, tmp_path / "py", progress=False, **TRAIN)
    assert m["steps"] == TRAIN["tokens"] // TRAIN["batch_size"] and not m["interrupted"]
    assert (tmp_path / "py" / "sae_weights.safetensors").read_bytes() == (
        cli_sae / "sae_weights.safetensors"
    ).read_bytes()
    # and from the .npy path
    saekit.train(cli_acts[2], tmp_path / "py-npy", progress=False, **TRAIN)
    assert (tmp_path / "py-npy" / "sae_weights.safetensors").read_bytes() == (
        cli_sae / "sae_weights.safetensors"
    ).read_bytes()


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler: a test runner started in the background (`cmd &` in a shell without job
    control) inherits SIGINT ignored, and Python then installs none, so the signal would do nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_checkpoints_and_resume_is_bit_identical(cli_acts, tmp_path, capsys, ctrl_c_raises):
    x = cli_acts[0]
    # long enough that the Ctrl-C lands mid-run on a fast, quiet box (the binding polls every 200 ms)
    cfg = dict(TRAIN, tokens=256 * 6000, checkpoint_every=500)
    full = tmp_path / "full"
    saekit.train(x, full, progress=False, **cfg)
    out = tmp_path / "cut"
    metrics = out / "metrics.jsonl"

    def interrupt_once_running():
        for _ in range(3000):
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    t = threading.Thread(target=interrupt_once_running)
    t.start()
    with pytest.raises(KeyboardInterrupt, match="resume"):
        saekit.train(x, out, progress=True, **cfg)
    t.join()
    assert "step " in capsys.readouterr().out  # progress lines reached Python's stdout
    assert any((out / "checkpoints").iterdir())
    m = saekit.train(resume=out, progress=False)
    assert m["steps"] == 6000
    assert (out / "sae_weights.safetensors").read_bytes() == (full / "sae_weights.safetensors").read_bytes()


def test_a_ctrl_c_inside_a_progress_line_still_stops_the_run(cli_acts, tmp_path, monkeypatch, ctrl_c_raises):
    # Python runs a pending Ctrl-C's handler at its next bytecode, wherever that is: here, inside the
    # `print` the binding calls for a progress line, which must not swallow it
    real_print, sent = builtins.print, []

    def print_then_ctrl_c(*args, **kwargs):
        real_print(*args, **kwargs)
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(builtins, "print", print_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt, match="resume"):
        saekit.train(cli_acts[0], tmp_path / "cut", progress=True, **dict(TRAIN, tokens=256 * 6000))
    assert sent


def test_bad_train_arguments(cli_acts, tmp_path):
    x = cli_acts[0]
    with pytest.raises(ValueError, match="unknown field"):
        saekit.train(x, tmp_path / "a", no_such_setting=1)
    with pytest.raises(ValueError, match="arch|variant"):
        saekit.train(x, tmp_path / "b", arch="nope")
    with pytest.raises(ValueError, match="2-D"):
        saekit.train(x[0], tmp_path / "c")
    with pytest.raises(TypeError):
        saekit.train(x.astype(np.float16), tmp_path / "d")
    with pytest.raises(FileNotFoundError):
        saekit.train(tmp_path / "none.npy", tmp_path / "e")
    with pytest.raises(ValueError, match="checkpoint"):
        saekit.train(resume=tmp_path / "f")
    with pytest.raises(ValueError, match="out="):
        saekit.train(x)
