"""saekit.FeatureDb and saekit.search / search_contrast against the CLI's JSON on the same inputs."""

import json
import re
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
    # byte-level BPE splits these characters across tokens: the readable-text test needs them
    (corpus / "doc_ja.txt").write_text("東京は日本の首都です。富士山は日本で一番高い山です。" * 4)
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


def token_bytes(t: str) -> bytes:
    """A token text's bytes: the tokenizer writes a byte that is no whole character as a \\xNN escape."""
    out, i = bytearray(), 0
    while i < len(t):
        if re.match(r"\\x[0-9a-f]{2}", t[i : i + 4]):
            out.append(int(t[i + 2 : i + 4], 16))
            i += 4
        else:
            out += t[i].encode()
            i += 1
    return bytes(out)


def test_contexts_read_as_text(feature_db):
    """Each context's `text` is its tokens' bytes decoded (Python's own UTF-8 decoder, escaping what never
    completes a character as \\xNN too), and each piece carries the highest activation of its tokens."""
    db = saekit.FeatureDb(feature_db)
    split = 0
    for f in db.features(sort="max_act", limit=200):
        rec = db.feature(f["id"])
        for c in rec["top_contexts"] + [c for q in rec["quantiles"] for c in q["contexts"]]:
            whole = b"".join(token_bytes(t) for t in c["tokens"])
            assert c["text"] == whole.decode("utf-8", errors="backslashreplace"), c
            assert sum(p["len"] for p in c["pieces"]) == len(c["tokens"])
            for p in c["pieces"]:
                assert p["act"] == max(c["acts"][p["first"] : p["first"] + p["len"]])
                split += p["len"] > 1
    assert split > 0, "no context had a character split across tokens"


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


def test_steering_features_equal_cli(model, cli_sae, feature_db, tmp_path):
    """steering_features is `saekit search --steer N`: the same features, lifts and order as the CLI's JSON."""
    pos = ["def f(x): return x + 1", "for i in range(3): print(i)"]
    neg = ["The weather is lovely today.", "She walked to the market."]
    (tmp_path / "pos.txt").write_text("\n".join(pos))
    (tmp_path / "neg.txt").write_text("\n".join(neg))
    ours = saekit.steering_features(model, cli_sae, pos, neg, feature_db, candidates=3)
    theirs = json.loads(cli("search", cli_sae, "--pos", tmp_path / "pos.txt", "--neg", tmp_path / "neg.txt",
                            "--db", feature_db, "--steer", "3", "--json"))["steering"]
    assert ours and len(ours) <= 3
    assert ours == [{**t["hit"], "lift": t["lift"], "max_act": t["max_act"]} for t in theirs]
    assert [o["lift"] for o in ours] == sorted((o["lift"] for o in ours), reverse=True)
    # the candidates: the first 3 by AUROC that fired in the database, each with its max activation there
    db = saekit.FeatureDb(feature_db)

    def max_act(i):
        try:
            return db.feature(i)["max_act"]
        except ValueError:  # never fired in the analysis
            return 0.0

    by_auroc = [h["id"] for h in saekit.search_contrast(model, cli_sae, pos, neg)]
    assert {o["id"] for o in ours} == set([i for i in by_auroc if max_act(i) > 0][:3])
    assert all(o["max_act"] == pytest.approx(max_act(o["id"])) for o in ours)


def test_steering_features_refuse_another_saes_db(model, cli_sae, feature_db, tmp_path):
    """A database analysed for another SAE would give other features' max activations: refused, named."""
    other = tmp_path / "other.sqlite"
    shutil.copy(feature_db, other)
    with sqlite3.connect(other) as c:
        info = json.loads(c.execute("SELECT value FROM meta WHERE key = 'info'").fetchone()[0])
        info["d_sae"] *= 2
        c.execute("UPDATE meta SET value = ? WHERE key = 'info'", (json.dumps(info),))
    with pytest.raises(ValueError, match="other.sqlite.*analysed 512 features"):
        saekit.steering_features(model, cli_sae, ["a b"], ["c d"], other)
    with pytest.raises(ValueError, match="other.sqlite"):
        saekit.search(model, cli_sae, "a b", db=other)
    with pytest.raises(ValueError, match="times"):
        saekit.steering_features(model, cli_sae, ["a b"], ["c d"], feature_db, times=0.0)
