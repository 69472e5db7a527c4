"""saekit.FeatureDb and saekit.search / search_contrast against the CLI's JSON on the same inputs."""

import json
import shutil
import sqlite3

import pytest

import saekit
from conftest import TEXT, cli


@pytest.fixture(scope="session")
def feature_db(work, cli_sae):
    """A small feature database: the CLI tokenizes a few texts and analyzes them with the tiny SAE."""
    corpus = work / "corpus"
    corpus.mkdir()
    for i, part in enumerate(TEXT.split(". ")):
        (corpus / f"doc{i}.txt").write_text((part + ". ") * 4)
    tokens = work / "tokens"
    cli("tokenize", corpus, "-o", tokens, "--context", "32")
    db = work / "features.sqlite"
    cli("analyze", cli_sae, "--contexts", tokens, "--split", "train", "--tokens", "2k", "--out", db)
    return db


def test_feature_db_matches_cli(feature_db):
    db = saekit.FeatureDb(feature_db)
    top = db.features(sort="max_act", limit=5)
    assert len(top) == 5 and top[0]["max_act"] >= top[-1]["max_act"]
    f = top[0]["id"]
    rec = db.feature(f)
    assert rec["max_act"] == pytest.approx(top[0]["max_act"])
    assert rec["top_contexts"] and "tokens" in rec["top_contexts"][0]
    assert len(db) > 0
    word = rec["top_contexts"][0]["tokens"][rec["top_contexts"][0]["peak"]].strip()
    if any(c.isalnum() for c in word):
        assert db.search(word)
    assert db.search(str(f))[0]["id"] == f
    with pytest.raises(ValueError):
        db.feature(10**6)
    with pytest.raises(ValueError):
        db.features(sort="nonsense")
    with pytest.raises(FileNotFoundError):
        saekit.FeatureDb(feature_db.parent / "missing.sqlite")


def test_errors_are_raised_by_their_kind(feature_db, tmp_path):
    """A damaged database saekit wrote raises CorruptFileError (a ValueError naming the file), a file that
    is no database at all a plain ValueError, a missing one FileNotFoundError."""
    damaged = tmp_path / "damaged.sqlite"
    shutil.copy(feature_db, damaged)
    with sqlite3.connect(damaged) as c:
        c.execute("DELETE FROM vocab WHERE id = 7")
    db = saekit.FeatureDb(damaged)
    f = db.features(limit=1)[0]["id"]
    with pytest.raises(saekit.CorruptFileError, match="damaged.sqlite.*gap at id 8"):
        db.feature(f)
    assert issubclass(saekit.CorruptFileError, ValueError)
    not_a_db = tmp_path / "notes.sqlite"
    not_a_db.write_text("plain text, not SQLite")
    with pytest.raises(ValueError) as e:
        saekit.FeatureDb(not_a_db)
    assert not isinstance(e.value, saekit.CorruptFileError), e.value
    with pytest.raises(FileNotFoundError):
        saekit.FeatureDb(tmp_path / "missing.sqlite")


def test_search_equals_cli(model, cli_sae):
    text = "Paris is the capital of France."
    ours = saekit.search(model, saekit.SAE.load(cli_sae), text)
    theirs = json.loads(cli("search", cli_sae, "--text", text, "--json"))
    assert ours == theirs


def test_search_contrast_equals_cli(model, cli_sae, tmp_path):
    pos = ["def f(x):\n    return x + 1", "for i in range(3):\n    print(i)"]
    neg = ["The weather is lovely today.", "She walked to the market."]
    (tmp_path / "pos.txt").write_text("\n".join(p.replace("\n", " ") for p in pos))
    (tmp_path / "neg.txt").write_text("\n".join(neg))
    pos_lines = [p.replace("\n", " ") for p in pos]
    ours = saekit.search_contrast(model, cli_sae, pos_lines, neg)
    theirs = json.loads(cli("search", cli_sae, "--pos", tmp_path / "pos.txt", "--neg", tmp_path / "neg.txt", "--json"))
    assert ours == theirs
