#!/usr/bin/env python3
"""Does the feature `saekit search` ranks first for a concept steer toward it more often than the tenth?

For each concept of the demo corpus (the CONCEPTS of crates/analysis/src/concepts.rs), `saekit search
--pos/--neg` ranks the SAE's features on a dozen concept texts against a dozen other texts (drawn round-robin
over every source file and language that is not the concept, so that e.g. Russian manual pages are among the
negatives of "German"). A second search on a dozen held-out texts per side says whether the 1st and the 10th
feature still fire on the concept's text (held-out AUROC and firing rates).

The 1st and the 10th feature are then each steered, at every strength of --conditions (`clamp:3` sets the
feature to 3x its max activation in the database; `add:10` adds 10x its max along its decoder direction),
while the model answers neutral chat prompts and continues neutral text prompts (`/v1/chat/completions` and
`/v1/completions` of `saekit serve`, with the `saekit.steer` extension), each for --prompts prompts x --seeds
seeds. Every reply is judged by a classifier that knows nothing of the model or the SAE: a character
1-3-gram naive Bayes trained on the concept's corpus documents against the rest (documents not used in the
searches; its held-out accuracy is printed). Two criteria per reply:
  hard:    the classifier calls the reply the concept (total log-odds > 0);
  toward:  the reply's concept log-odds per character n-gram is higher than the unsteered reply's for the
           same prompt and seed (paired; the per-gram mean, so reply length does not decide it).
Also counted: how often the 1st feature's reply beats the 10th's (same prompt, seed and strength).
Prints one table per concept, then one JSON object (--json-out FILE writes it to a file as well).

Usage: python3 scripts/bench-concept-steering.py DEMO_DIR [--bin target/debug/saekit] [--prompts 4]
       [--seeds 2] [--conditions clamp:3,clamp:10,add:10] [--tokens 32] [--concepts German,Arabic]
DEMO_DIR is a `saekit demo` folder (corpus/, sae/, features.sqlite); nothing in it is written.
"""
import argparse
import collections
import concurrent.futures
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
    ("Chinese", set(), {"zh", "zh_CN", "lzh", "cmn"}),
    ("Japanese", set(), {"ja", "jpn"}),
    ("German", set(), {"de", "deu"}),
    ("Arabic", set(), {"ar", "arb"}),
]
TEXT_CHARS = 700
TEXT_PROMPTS = [
    "The",
    "Here is what happened next:",
    "Today I want to write about",
    "Notes:\n",
    "Once upon a time",
    "The following text",
]
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
    """{concept or 'other:FILE:LANG': [text, ...]} from the demo corpus's JSONL files, first 700 characters
    each. Documents of no concept are kept apart by file and language, so negatives can cover them all."""
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
                docs[concept_of(v.get("kind", ""), v.get("lang", "")) or f"other:{f}:{v.get('lang', '')}"].append(text)
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

    def log_odds(self, text):
        """(total, per n-gram) log-odds of the concept; equal priors: a reply is judged on its characters."""
        grams = self.grams(text)
        score = 0.0
        for g in grams:
            p1 = (self.counts[1][g] + 1) / (self.totals[1] + self.vocab)
            p0 = (self.counts[0][g] + 1) / (self.totals[0] + self.vocab)
            score += math.log(p1) - math.log(p0)
        return score, score / max(1, len(grams))

    def is_concept(self, text):
        return self.log_odds(text)[0] > 0


def round_robin(groups, rng):
    """Every group's texts shuffled, then interleaved one group at a time (groups in a shuffled order)."""
    lists = [rng.sample(v, len(v)) for _, v in sorted(groups.items())]
    rng.shuffle(lists)
    out = []
    for i in range(max(map(len, lists), default=0)):
        out.extend(v[i] for v in lists if i < len(v))
    return out


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


def parse_conditions(spec):
    out = []
    for part in spec.split(","):
        mode, value = part.split(":")
        if mode not in ("clamp", "add"):
            raise SystemExit(f"--conditions: '{part}': the mode is clamp or add")
        out.append((mode, float(value)))
    return out


def feature_on(hits, fid):
    """A feature's AUROC and firing rates in a search's hits (a feature that fired on no text is absent)."""
    for h in hits:
        if h["id"] == fid:
            return {"auroc": round(h["auroc"], 3), "freq_pos": round(h["freq_pos"], 3), "freq_neg": round(h["freq_neg"], 3)}
    return {"auroc": 0.5, "freq_pos": 0.0, "freq_neg": 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo")
    ap.add_argument("--bin", default="target/debug/saekit")
    ap.add_argument("--texts", type=int, default=12, help="search texts per side")
    ap.add_argument("--prompts", type=int, default=4, help="prompts of each kind (chat, text)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--conditions", default="clamp:3,clamp:10,add:10",
                    help="steering strengths, MODE:VALUE in multiples of the feature's max activation")
    ap.add_argument("--ranks", default="1,10")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=2, help="requests in flight (serve's model workers)")
    ap.add_argument("--concepts", default="", help="only these concepts (comma-separated names)")
    ap.add_argument("--judge-docs", type=int, default=300, help="judge training documents per side")
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()
    conditions = parse_conditions(a.conditions)
    ranks = [int(r) for r in a.ranks.split(",")]
    corpus, sae, db = (os.path.join(a.demo, p) for p in ("corpus", "sae", "features.sqlite"))
    docs = corpus_docs(corpus)
    rng = random.Random(0)
    port = free_port()
    serve = subprocess.Popen([a.bin, "serve", "--db", db, "--sae", sae, "--port", str(port), "--queue", "64"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    wanted = {c.strip() for c in a.concepts.split(",") if c.strip()}
    try:
        work = tempfile.mkdtemp()
        rows = []
        for name, _, _ in CONCEPTS:
            texts = docs.get(name, [])
            if (wanted and name not in wanted) or len(texts) < a.texts * 3:
                continue
            rng.shuffle(texts)
            neg_pool = round_robin({k: v for k, v in docs.items() if k != name}, rng)
            pos, neg = texts[:a.texts], neg_pool[:a.texts]
            hits = search(a.bin, sae, pos, neg, work)
            held_pos, held_neg = texts[a.texts:2 * a.texts], neg_pool[a.texts:2 * a.texts]
            held_hits = search(a.bin, sae, held_pos, held_neg, work)
            rest, rest_neg = texts[2 * a.texts:], neg_pool[2 * a.texts:]
            split = max(1, len(rest) // 5)
            # the judge trains on at most --judge-docs documents per side: enough for its held-out accuracy
            clf = NaiveBayes(rest[split:][:a.judge_docs], rest_neg[len(rest_neg) // 5:][:a.judge_docs])
            held = [(t, True) for t in rest[:split]] + [(t, False) for t in rest_neg[:len(rest_neg) // 5][:4 * split]]
            acc = sum(clf.is_concept(t) == y for t, y in held) / len(held)
            feats = []
            for rank in ranks:
                h = hits[rank - 1]
                feats.append({"rank": rank, "feature": h["id"], "auroc": round(h["auroc"], 3),
                              "effect": round(h["effect"], 3), "heldout": feature_on(held_hits, h["id"])})
            rows.append({"concept": name, "classifier_heldout_accuracy": round(acc, 3), "clf": clf,
                         "tied_at_top_auroc": sum(1 for h in hits if h["auroc"] == hits[0]["auroc"]),
                         "features": feats})
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/models", timeout=5).read()
                break
            except OSError:
                time.sleep(1)
        model = json.load(urllib.request.urlopen(base + "/models"))["data"][0]["id"]
        pool = concurrent.futures.ThreadPoolExecutor(max(1, a.parallel))

        def one(kind, p, seed, steer):
            body = {"model": model, "max_tokens": a.tokens, "temperature": 0.7, "seed": seed}
            if kind == "chat":
                body["messages"] = [{"role": "user", "content": p}]
            else:
                body["prompt"] = p
            if steer is not None:
                fid, mode, value = steer
                body["saekit"] = {"steer": [{"feature": fid, "mode": mode, "value": value, "unit": "max"}]}
            r = post(f"{base}/{'chat/completions' if kind == 'chat' else 'completions'}", body)["choices"][0]
            return r["message"]["content"] if kind == "chat" else r["text"]

        def replies(steer):
            """{kind: [reply per (prompt, seed)]}, the same order for every steer."""
            jobs = {kind: [pool.submit(one, kind, p, seed, steer) for p in prompts[:a.prompts] for seed in range(a.seeds)]
                    for kind, prompts in (("chat", PROMPTS), ("text", TEXT_PROMPTS))}
            return {kind: [j.result() for j in js] for kind, js in jobs.items()}

        plain = replies(None)
        result = []
        for r in rows:
            clf = r.pop("clf")
            judged_plain = {k: [clf.log_odds(t) for t in v] for k, v in plain.items()}
            r["unsteered"] = {k: sum(lo[0] > 0 for lo in v) for k, v in judged_plain.items()}
            r["cells"] = []
            per_gram = {}
            for f in r["features"]:
                for mode, value in conditions:
                    said = replies((f["feature"], mode, value))
                    for kind, texts in said.items():
                        lo = [clf.log_odds(t) for t in texts]
                        per_gram[(f["rank"], mode, value, kind)] = [x[1] for x in lo]
                        r["cells"].append({
                            "rank": f["rank"], "feature": f["feature"], "mode": mode, "value": value, "kind": kind,
                            "hard": sum(x[0] > 0 for x in lo),
                            "toward": sum(x[1] > u[1] for x, u in zip(lo, judged_plain[kind])),
                            "mean_delta_per_gram": round(sum(x[1] - u[1] for x, u in zip(lo, judged_plain[kind]))
                                                         / len(lo), 3),
                            "of": len(lo), "example": texts[0][:70]})
            if len(ranks) >= 2:
                first, last = ranks[0], ranks[-1]
                for c in r["cells"]:
                    if c["rank"] == first:
                        mine = per_gram[(first, c["mode"], c["value"], c["kind"])]
                        theirs = per_gram[(last, c["mode"], c["value"], c["kind"])]
                        c[f"beats_rank{last}"] = sum(x > y for x, y in zip(mine, theirs))
            result.append(r)
            print_table(r, ranks, file=sys.stderr)
    finally:
        serve.terminate()
        serve.wait()
    summary = {"conditions": a.conditions, "prompts_per_kind": a.prompts, "seeds": a.seeds, "tokens": a.tokens,
               "temperature": 0.7, "concepts": result}
    out = json.dumps(summary, ensure_ascii=False, indent=1)
    if a.json_out:
        with open(a.json_out, "w", encoding="utf-8") as f:
            f.write(out)
    for r in result:
        print_table(r, ranks)
    print(out)


def print_table(r, ranks, file=sys.stdout):
    """One concept's table: a row per (feature, strength, prompt kind)."""
    p = lambda *x: print(*x, file=file)
    p(f"\n### {r['concept']}  (judge held-out accuracy {r['classifier_heldout_accuracy']:.2f}; "
      f"{r['tied_at_top_auroc']} features tied at the top AUROC)")
    for f in r["features"]:
        ho = f["heldout"]
        p(f"rank {f['rank']}: #{f['feature']}, search AUROC {f['auroc']:.3f}, effect {f['effect']:+.3f}; on held-out "
          f"texts AUROC {ho['auroc']:.3f}, fires on {100 * ho['freq_pos']:.0f}% concept / {100 * ho['freq_neg']:.0f}% other")
    p(f"unsteered, judged the concept (hard): chat {r['unsteered']['chat']}, text {r['unsteered']['text']}")
    last = ranks[-1]
    p(f"\n| rank | feature | steer | prompts | hard (concept) | toward (vs unsteered) | mean Δ log-odds/gram | "
      f"1st beats {last}th | example |")
    p("|---|---|---|---|---|---|---|---|---|")
    for c in r["cells"]:
        beats = c.get(f"beats_rank{last}")
        beats = "" if beats is None else f"{beats}/{c['of']}"
        p(f"| {c['rank']} | #{c['feature']} | {c['mode']} {c['value']:g}x max | {c['kind']} | {c['hard']}/{c['of']} | "
          f"{c['toward']}/{c['of']} | {c['mean_delta_per_gram']:+.3f} | "
          f"{beats} | {json.dumps(c['example'], ensure_ascii=False)[:60]} |")


if __name__ == "__main__":
    main()
