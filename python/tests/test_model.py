"""saekit.Model against the CLI: activations bit for bit, tokens, greedy and steered generations."""

import numpy as np
import pytest

import saekit
from conftest import HOOK, TEXT, cli


def test_run_with_cache_equals_cli_activations(model, cli_acts):
    x_cli, ids_cli, _ = cli_acts
    logits, cache = model.run_with_cache(TEXT, names=[HOOK])
    assert logits is None  # the pass stopped after block 15
    x = cache[HOOK]
    assert x.dtype == np.float32 and x.shape == (1, len(ids_cli), model.cfg["d_model"])
    assert np.array_equal(x[0], x_cli), "run_with_cache differs from `saekit activations`"
    assert np.array_equal(model.to_tokens(TEXT)[0], ids_cli.astype(np.int64))


def test_full_pass_logits_agree_with_the_early_stop_and_generation(model):
    text = "The capital of France is"
    _, early = model.run_with_cache(text, names=[HOOK, "hook_embed"])
    logits, full = model.run_with_cache(text, names=[HOOK], return_logits=True)
    assert np.array_equal(early[HOOK], full[HOOK])
    assert logits.shape == (1, early[HOOK].shape[1], model.cfg["d_vocab"])
    first = model.to_string([int(logits[0, -1].argmax())])
    assert model.generate(text, max_new_tokens=1).startswith(first)


def test_batches_and_ids(model):
    ids = model.to_tokens(["one two three", "four five six"])
    assert ids.shape[0] == 2
    assert model.to_string(ids) == ["one two three", "four five six"]
    _, a = model.run_with_cache(ids, names=["blocks.2.hook_mlp_out"])
    _, b = model.run_with_cache("four five six", names=["blocks.2.hook_mlp_out"])
    assert a["blocks.2.hook_mlp_out"].shape[0] == 2
    # rows of a batch do not see each other
    np.testing.assert_allclose(a["blocks.2.hook_mlp_out"][1], b["blocks.2.hook_mlp_out"][0], rtol=1e-4, atol=1e-4)


def test_generate_equals_cli(model):
    prompt = "Tell me about your weekend."
    ours = model.generate(prompt, max_new_tokens=12, chat=True)
    theirs = cli("generate", "--chat", "-p", prompt, "-n", "12")
    assert ours.removesuffix("<|im_end|>") == theirs.rstrip("\n")


def test_steered_generate_equals_cli(model, cli_sae):
    sae = saekit.SAE.load(cli_sae)
    prompt = "Tell me about your weekend."
    ours = model.generate(prompt, max_new_tokens=12, sae=sae, steer={5: 40.0}, add={7: -20}, ablate=[9])
    theirs = cli("generate", "-p", prompt, "-n", "12", "--sae", cli_sae, "--steer", "5=40", "--add", "7=-20",
                 "--ablate", "9")
    assert ours.removesuffix("<|im_end|>") == theirs.rstrip("\n")
    assert ours != model.generate(prompt, max_new_tokens=12)


def test_bad_model_inputs(model):
    with pytest.raises(FileNotFoundError):
        saekit.Model.load("/nonexistent/model.gguf")
    with pytest.raises(ValueError, match="hook"):
        model.run_with_cache("hi", names=["blocks.99.hook_resid_post"])
    with pytest.raises(ValueError):
        model.run_with_cache("hi", names=["not_a_hook"])
    with pytest.raises(ValueError, match="vocabulary"):
        model.run_with_cache([[1, 2, 10**8]], names=[HOOK])
    with pytest.raises(ValueError, match="different token lengths"):
        model.to_tokens(["a", "a much longer text than the first"])
    with pytest.raises(ValueError):
        model.generate("hi", temperature=-1)
    with pytest.raises(ValueError, match="sae"):
        model.generate("hi", steer={1: 2.0})
