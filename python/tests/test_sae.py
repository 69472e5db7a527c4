"""saekit.SAE: weights equal the file's tensors, encode/decode agree with `saekit eval`, views are safe."""

import gc
import json
import struct

import numpy as np
import pytest

import saekit
from conftest import eval_json


def read_safetensors(path):
    """A minimal reader (header + little-endian f32 data): independent of saekit's own."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32"
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(t["shape"])
    return out


def test_weights_are_the_file_tensors_without_copies(cli_sae):
    sae = saekit.SAE.load(cli_sae)
    t = read_safetensors(cli_sae / "sae_weights.safetensors")
    for name in ["W_enc", "W_dec", "b_enc", "b_dec"]:
        w = getattr(sae, name)
        assert np.array_equal(w, t[name]), name
        assert not w.flags.owndata and not w.flags.writeable, name
    assert sae.W_enc.shape == (sae.d_in, sae.d_sae) and sae.W_enc.flags.f_contiguous  # transposed view
    cfg = json.loads((cli_sae / "cfg.json").read_text())
    assert sae.cfg["d_sae"] == cfg["d_sae"] and sae.cfg["k"] == 8
    assert sae.cfg["metadata"]["hook_name"] == cfg["metadata"]["hook_name"]


def test_encode_matches_cli_eval(cli_sae, cli_acts):
    x, _, x_path = cli_acts
    sae = saekit.SAE.load(cli_sae)
    f = sae.encode(x)
    assert f.shape == (x.shape[0], sae.d_sae) and f.dtype == np.float32
    recon = sae.decode(f)
    m = eval_json(cli_sae, x_path)
    l0 = (f != 0).sum(axis=1).mean()
    mse = ((x.astype(np.float64) - recon) ** 2).sum(axis=1).mean()
    assert m["rows"] == x.shape[0]
    assert abs(l0 - m["l0"]) < 1e-9
    assert abs(mse - m["mse"]) <= 1e-4 * m["mse"]
    # the same codes from numpy: TopK of relu(x W_enc + b_enc)
    pre = (x - sae.b_dec * sae.cfg["apply_b_dec_to_input"]) @ sae.W_enc + sae.b_enc
    top = np.argsort(-pre, axis=1)[:, : sae.cfg["k"]]
    assert all(set(np.flatnonzero(f[r])) <= set(top[r]) for r in range(len(x)))
    np.testing.assert_allclose(np.take_along_axis(f, top, 1), np.maximum(np.take_along_axis(pre, top, 1), 0),
                               rtol=1e-4, atol=1e-4)


def test_encode_shapes_and_sparse_forms(cli_sae, cli_acts):
    x = cli_acts[0]
    sae = saekit.SAE.load(cli_sae)
    dense = sae.encode(x)
    assert sae.encode(x[None]).shape == (1, len(x), sae.d_sae)
    sp = sae.encode(x, sparse=True)
    try:
        import scipy.sparse  # noqa: F401

        assert np.array_equal(sp.toarray(), dense)
        assert np.array_equal(sae.decode(sp), sae.decode(dense))
    except ImportError:
        indices, values = sp
        rebuilt = np.zeros_like(dense)
        rebuilt[indices[0], indices[1]] = values
        assert np.array_equal(rebuilt, dense)


def test_view_outlives_the_sae(cli_sae):
    sae = saekit.SAE.load(cli_sae)
    w, b = sae.W_dec, sae.b_dec
    expect_w, expect_b = w.copy(), b.copy()
    del sae
    gc.collect()
    junk = [np.full((256, 576), 7.0, dtype=np.float32) for _ in range(64)]  # reuse freed memory if any
    assert np.array_equal(w, expect_w) and np.array_equal(b, expect_b)
    del junk


def test_save_and_reload(cli_sae, tmp_path):
    sae = saekit.SAE.load(cli_sae)
    sae.save(tmp_path / "copy")
    again = saekit.SAE.load(tmp_path / "copy")
    for name in ["W_enc", "W_dec", "b_enc", "b_dec"]:
        assert np.array_equal(getattr(sae, name), getattr(again, name))


def test_bad_sae_inputs(cli_sae, cli_acts, tmp_path):
    x = cli_acts[0]
    sae = saekit.SAE.load(cli_sae)
    with pytest.raises(FileNotFoundError):
        saekit.SAE.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="cfg.json"):  # a folder without the SAE's files
        saekit.SAE.load(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError):
        saekit.SAE.load(tmp_path / "bad")
    with pytest.raises(TypeError, match="float32"):
        sae.encode(x.astype(np.float64))
    with pytest.raises(TypeError, match="numpy array"):
        sae.encode(x.tolist())
    with pytest.raises(ValueError, match="shape"):
        sae.encode(x[:, :100].copy())
    with pytest.raises(ValueError, match="contiguous"):
        sae.encode(np.asfortranarray(x))
    with pytest.raises(ValueError, match="shape"):
        sae.decode(np.zeros((2, 3), dtype=np.float32))
