# Labelled probing sets (JSONL: text, label) from the demo corpus built by scripts/build-corpus.py.
# usage: python3 make_probe_sets.py [CORPUS_DIR=/tmp/corpus-demo]  -> langid.jsonl, kind.jsonl in the current dir
import json, glob, random, sys
src = sys.argv[1] if len(sys.argv) > 1 else '/tmp/corpus-demo'
docs = [json.loads(l) for f in sorted(glob.glob(src + '/*.jsonl')) for l in open(f)]
def chunk(t):
    t = t[200:] if len(t) > 900 else t
    return t[:500]
def build(name, key, labels, per):
    rng = random.Random(0)
    out = []
    for lab in labels:
        ds = [d for d in docs if key(d) == lab and len(d['text']) > 200]
        rng.shuffle(ds)
        out += [{'text': chunk(d['text']), 'label': lab} for d in ds[:per]]
    rng.shuffle(out)
    with open(name, 'w') as f:
        for o in out: f.write(json.dumps(o, ensure_ascii=False) + '\n')
    print(name, len(out))
build('langid.jsonl', lambda d: d.get('lang') if d.get('kind') == 'manpage' else None, ['en', 'de', 'es', 'ja', 'ru'], 40)
build('kind.jsonl', lambda d: d.get('kind'), ['code', 'prose', 'latex', 'dictionary', 'speech', 'scripture', 'manpage', 'bio-genbank'], 30)
# one-text-per-line sets for `saekit search --pos de.txt --neg en.txt`
rows = [json.loads(l) for l in open('langid.jsonl')]
for lab in ('de', 'en'):
    with open(lab + '.txt', 'w') as f:
        f.write('\n'.join(r['text'].replace('\n', ' ') for r in rows if r['label'] == lab) + '\n')
