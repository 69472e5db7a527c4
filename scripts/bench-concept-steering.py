#!/usr/bin/env python3
"""Does the feature `saekit search` ranks first for a concept steer toward it more often than the tenth?

For each concept of the demo corpus (the CONCEPTS of crates/analysis/src/concepts.rs), `saekit search
--pos/--neg` ranks the SAE's features on a dozen concept texts against a dozen other texts. The first and
the tenth feature are then each clamped at VALUE x their max activation (the database's) while the model
answers neutral chat prompts, through `saekit serve`'s OpenAI endpoint with the `saekit.steer` extension,
and every reply is judged by a classifier that knows nothing of the model or the SAE: a character 1-3-gram
naive Bayes trained on the concept's corpus documents against the rest (documents not used in the search;
its held-out accuracy is printed). A reply "steers toward" the concept when the classifier gives it the
concept. Prints one JSON object; `--markdown` adds the table for BENCHMARKS.md.

Usage: python3 scripts/bench-concept-steering.py DEMO_DIR [--bin target/release/saekit] [--prompts 6]
       [--seeds 2] [--value 3] [--tokens 40]
DEMO_DIR is a `saekit demo` folder (corpus/, sae/, features.sqlite).
"""
import argparse
import collections
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

# crates/analysis/src/concepts.rs, in the same order (a document counts for the first concept it fits)
CONCEPTS = [
    ("Python code", {"code"}, {"python"}),
    ("base64", {"base64", "base64-pem"}, set()),
    ("DNA / protein (GenBank)", {"bio-genbank", "bio"}, set()),
    ("LaTeX math", {"latex"}, set()),
    ("Chinese", set(), {"zh", "lzh"}),
    ("Japanese", set(), {"ja"}),
    ("German", set(), {"de"}),
    ("Arabic", set(), {"ar"}),
]
TEXT_CHARS = 700
PROMPTS = [
    "Tell me about your weekend.",
    "What should I cook for dinner tonight?",
    "Describe your favourite place.",
    "Write a short note to a friend.",
    "What is a good way to start the day?",
    "Give me some advice about learning.",
    "Tell me a short story.",
    "What do you think about the weather?",
]


def concept_of(kind, lang):
    for name, kinds, langs in CONCEPTS:
        if (not kinds or kind in kinds) and (not langs or lang in langs):
            return name
    return None


def corpus_docs(corpus):
    """{concept or 'other:FILE': [text, ...]} from the demo corpus's JSONL files, first 700 characters each."""
    docs = collections.defaultdict(list)
    for f in sorted(os.listdir(corpus)):
        if not f.endswith(".jsonl"):
            continue
        for line in open(os.path.join(corpus, f), encoding="utf-8"):
            try:
                v = json.loads(line)
            except ValueError:
                continue
            text = v.get("text", "").lstrip()[:TEXT_CHARS]
            if len(text) > 40:
                docs[concept_of(v.get("kind", ""), v.get("lang", "")) or f"other:{f}"].append(text)
    return docs


class NaiveBayes:
    """Character 1-3-gram multinomial naive Bayes, concept (1) against everything else (0), Laplace-smoothed."""

    def __init__(self, pos, neg):
        self.counts = [collections.Counter(), collections.Counter()]
        for label, texts in ((1, pos), (0, neg)):
            for t in texts:
                self.counts[label].update(self.grams(t))
        self.totals = [sum(c.values()) for c in self.counts]
        self.vocab = len(set(self.counts[0]) | set(self.counts[1]))

    @staticmethod
    def grams(t):
        return [t[i:i + n] for n in (1, 2, 3) for i in range(len(t) - n + 1)]

    def is_concept(self, text):
        score = 0.0  # equal priors: a reply is judged on its own characters
        for g in self.grams(text):
            p1 = (self.counts[1][g] + 1) / (self.totals[1] + self.vocab)
            p0 = (self.counts[0][g] + 1) / (self.totals[0] + self.vocab)
            score += math.log(p1) - math.log(p0)
        return score > 0


def search(bin_, sae, pos, neg, work):
    paths = []
    for name, texts in (("pos", pos), ("neg", neg)):
        p = os.path.join(work, f"{name}.jsonl")
        with open(p, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
        paths.append(p)
    out = subprocess.run([bin_, "search", sae, "--pos", paths[0], "--neg", paths[1], "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo")
    ap.add_argument("--bin", default="target/release/saekit")
    ap.add_argument("--texts", type=int, default=12, help="search texts per side")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--value", type=float, default=3.0, help="clamp, in multiples of the feature's max")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    corpus, sae, db = (os.path.join(a.demo, p) for p in ("corpus", "sae", "features.sqlite"))
    docs = corpus_docs(corpus)
    rng = random.Random(0)
    others = [t for k, v in sorted(docs.items()) if k.startswith("other:") for t in v]
    port = free_port()
    serve = subprocess.Popen([a.bin, "serve", "--db", db, "--sae", sae, "--port", str(port), "--queue", "64"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        work = tempfile.mkdtemp()
        rows = []
        for name, _, _ in CONCEPTS:
            texts = docs.get(name, [])
            if len(texts) < a.texts * 2:
                continue
            rng.shuffle(texts)
            neg_pool = [t for k, v in docs.items() if k != name for t in v]
            rng.shuffle(neg_pool)
            pos, neg = texts[:a.texts], neg_pool[:a.texts]
            hits = search(a.bin, sae, pos, neg, work)
            rest, rest_neg = texts[a.texts:], neg_pool[a.texts:]
            split = max(1, len(rest) // 5)
            clf = NaiveBayes(rest[split:], rest_neg[len(rest_neg) // 5:])
            held = [(t, True) for t in rest[:split]] + [(t, False) for t in rest_neg[:len(rest_neg) // 5][:4 * split]]
            acc = sum(clf.is_concept(t) == y for t, y in held) / len(held)
            rows.append({"concept": name, "classifier_heldout_accuracy": round(acc, 3), "clf": clf, "hits": hits})
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/models", timeout=5).read()
                break
            except OSError:
                time.sleep(1)
        model = json.load(urllib.request.urlopen(base + "/models"))["data"][0]["id"]

        def replies(steer):
            out = []
            for p in PROMPTS[:a.prompts]:
                for seed in range(a.seeds):
                    body = {"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": a.tokens,
                            "temperature": 0.7, "seed": seed}
                    if steer is not None:
                        body["saekit"] = {"steer": [{"feature": steer, "mode": "clamp", "value": a.value,
                                                     "unit": "max"}]}
                    out.append(post(base + "/chat/completions", body)["choices"][0]["message"]["content"])
            return out

        plain = replies(None)
        result = []
        for r in rows:
            clf, hits = r.pop("clf"), r.pop("hits")
            r["unsteered"] = sum(map(clf.is_concept, plain))
            for rank in (1, 10):
                h = hits[rank - 1]
                said = replies(h["id"])
                r[f"rank{rank}"] = {"feature": h["id"], "auroc": round(h["auroc"], 3), "effect": round(h["effect"], 3),
                                    "toward": sum(map(clf.is_concept, said)), "example": said[0][:80]}
            r["of"] = len(plain)
            r["tied_at_top_auroc"] = sum(1 for h in hits if h["auroc"] == hits[0]["auroc"])
            result.append(r)
            print(json.dumps(r, ensure_ascii=False), file=sys.stderr)
    finally:
        serve.terminate()
        serve.wait()
    wins = sum(r["rank1"]["toward"] > r["rank10"]["toward"] for r in result)
    summary = {"value_x_max": a.value, "replies_per_feature": len(plain), "tokens": a.tokens,
               "rank1_beats_rank10": f"{wins}/{len(result)}", "concepts": result}
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    if a.markdown:
        print("\n| concept | classifier acc. | features tied at top AUROC | #1: feature, AUROC, effect, replies toward | "
              "#10: feature, AUROC, effect, replies toward | unsteered |\n|---|---|---|---|---|---|")
        for r in result:
            one, ten = r["rank1"], r["rank10"]
            print(f"| {r['concept']} | {r['classifier_heldout_accuracy']:.2f} | {r['tied_at_top_auroc']} | "
                  f"#{one['feature']}, {one['auroc']:.3f}, {one['effect']:+.3f}, **{one['toward']}/{r['of']}** | "
                  f"#{ten['feature']}, {ten['auroc']:.3f}, {ten['effect']:+.3f}, **{ten['toward']}/{r['of']}** | "
                  f"{r['unsteered']}/{r['of']} |")


if __name__ == "__main__":
    main()
