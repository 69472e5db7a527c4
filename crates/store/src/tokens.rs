//! Tokenized datasets: fixed-length contexts in memory-mappable u32 shards plus `manifest.json`.
//!
//! ```text
//! DIR/manifest.json          context, special tokens, seed, splits with their shards (+ CRC32), read stats
//! DIR/train-00000.u32        u32 little-endian [n_contexts, context], no header
//! DIR/validation-00000.u32
//! DIR/docs.jsonl             one line per document: split, source, kind, lang, tokens, offset in the split's stream
//! ```
//! Documents are split train/validation by document (seeded), each split's documents are shuffled
//! (seeded), then joined with the separator (end-of-text) token into one stream that is cut into
//! consecutive contexts; BOS starts each context only when the tokenizer adds one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::corpus::{Document, ReadStats, StopReading};
use crate::error::{bad_input, ensure_input, ensure_intact, StoreResult};
use saekit_files::Fault;
use saekit_files::{read_json, write_atomic_with, write_json_atomic};

/// The manifest's `format`: what tells a tokenized dataset from other folders.
pub const TOKENS_FORMAT: &str = "saekit-tokens";

/// How to cut documents into contexts and split them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenizeOptions {
    /// Tokens per context.
    pub context: usize,
    /// Seed of the train/validation split and the document order.
    pub seed: u64,
    /// Fraction of documents held out for validation.
    pub validation_fraction: f64,
    /// Contexts per `.u32` shard file.
    pub contexts_per_shard: usize,
    /// Placed between documents (SmolLM2: `<|endoftext|>`, id 0).
    pub separator: u32,
    /// Put at position 0 of every context when set (models whose tokenizer adds BOS).
    pub bos: Option<u32>,
    /// Stop reading documents once this many tokens are collected.
    pub max_tokens: Option<u64>,
    /// Fingerprint of the tokenizer's vocabulary (`harvest::tokenizer_fingerprint`): harvest and
    /// `train --live` refuse a model whose tokenizer differs. Empty: unknown (older datasets).
    #[serde(default)]
    pub tokenizer_fingerprint: String,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            context: 128,
            seed: 0,
            validation_fraction: 0.01,
            contexts_per_shard: 1 << 16,
            separator: 0,
            bos: None,
            max_tokens: None,
            tokenizer_fingerprint: String::new(),
        }
    }
}

/// One `.u32` shard file of a split.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenShard {
    /// The file's name inside the dataset folder.
    pub file: String,
    /// Contexts in the file.
    pub n_contexts: u64,
    /// CRC32 of the file, checked when the split is mapped.
    pub crc32: u32,
}

/// One split (`train` or `validation`) of a tokenized dataset.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct SplitInfo {
    /// Documents in the split.
    pub n_docs: u64,
    /// Whole contexts in the split.
    pub n_contexts: u64,
    /// Tokens in the joined stream (documents + separators).
    pub stream_tokens: u64,
    /// Stream tokens after the last whole context, dropped.
    pub dropped_tail: u64,
    /// The shard files, in order.
    pub shards: Vec<TokenShard>,
    /// Document tokens per `kind` (documents without a kind count under "").
    pub tokens_by_kind: BTreeMap<String, u64>,
}

/// `manifest.json` of a tokenized dataset.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokensManifest {
    /// Always [`TOKENS_FORMAT`].
    pub format: String,
    /// The manifest version (1).
    pub version: u32,
    /// Free-form tokenizer/model description (the model path).
    pub tokenizer: String,
    /// The options the dataset was made with.
    pub options: TokenizeOptions,
    /// The splits by name.
    pub splits: BTreeMap<String, SplitInfo>,
    /// What reading the corpus produced and dropped.
    pub read: ReadStats,
    /// The input paths as given.
    pub inputs: Vec<String>,
}

#[derive(Serialize)]
struct DocLine<'a> {
    doc: u64,
    split: &'a str,
    source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lang: Option<&'a str>,
    tokens: u64,
    /// Offset of the document's first token in the split's stream (context = offset / stride).
    offset: u64,
}

struct Tokenized {
    doc: Document,
    ids: Vec<u32>,
}

/// Tokenize documents from `read` (a function that drives a corpus reader into a sink) and write a
/// dataset in `out`. `encode` turns text into ids without special tokens; it is called from several
/// threads.
pub fn tokenize_corpus(
    read: impl FnOnce(&mut dyn FnMut(Document) -> Result<()>) -> StoreResult<ReadStats>,
    encode: &(dyn Fn(&str) -> Result<Vec<u32>> + Sync),
    opts: &TokenizeOptions,
    out: &Path,
    tokenizer: &str,
    inputs: &[PathBuf],
    progress: Option<&indicatif::ProgressBar>,
) -> StoreResult<TokensManifest> {
    ensure_input!(opts.context >= 2, "context must be at least 2 tokens");
    ensure_input!((0.0..1.0).contains(&opts.validation_fraction), "validation fraction must be in [0, 1)");
    ensure_replaceable_dataset(out)?;
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;

    // Tokenize in batches of documents, in parallel, preserving order.
    let mut docs: Vec<Tokenized> = Vec::new();
    let mut batch: Vec<Document> = Vec::new();
    let mut total: u64 = 0;
    let mut batch_bytes: u64 = 0;
    let mut enc_err: Option<anyhow::Error> = None;
    let flush = |batch: &mut Vec<Document>, docs: &mut Vec<Tokenized>, total: &mut u64| -> Result<()> {
        let done: Vec<Result<Tokenized>> = std::mem::take(batch)
            .into_par_iter()
            .map(|doc| {
                let ids = encode(&doc.text).with_context(|| format!("tokenizing {}", doc.source))?;
                Ok(Tokenized { doc: Document { text: String::new(), ..doc }, ids })
            })
            .collect();
        for t in done {
            let t = t?;
            *total += t.ids.len() as u64 + 1;
            if let Some(p) = progress {
                p.inc(t.ids.len() as u64 + 1);
            }
            docs.push(t);
        }
        Ok(())
    };
    let max = opts.max_tokens.unwrap_or(u64::MAX);
    let stats = read(&mut |doc: Document| {
        if total >= max {
            // Enough: stop the reader quickly.
            anyhow::bail!(StopReading);
        }
        batch_bytes += doc.text.len() as u64;
        batch.push(doc);
        // A token is at least ~1 byte of text: flush early enough that the budget check above can bite.
        if batch.len() >= 512 || batch_bytes >= 8 << 20 || total + batch_bytes >= max {
            batch_bytes = 0;
            if let Err(e) = flush(&mut batch, &mut docs, &mut total) {
                enc_err = Some(e);
                anyhow::bail!(StopReading);
            }
        }
        Ok(())
    });
    if let Some(e) = enc_err {
        return Err(e.into());
    }
    let stats = stats?;
    flush(&mut batch, &mut docs, &mut total)?;
    if let Some(max) = opts.max_tokens {
        // Keep documents up to the one that crosses the budget.
        let mut acc = 0;
        if let Some(cut) = docs.iter().position(|t| {
            acc += t.ids.len() as u64 + 1;
            acc >= max
        }) {
            docs.truncate(cut + 1);
        }
    }
    ensure_input!(!docs.is_empty(), "no documents to tokenize ({})", stats.summary());

    // Split by document, then shuffle each split's documents.
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut train = vec![];
    let mut val = vec![];
    for (i, _) in docs.iter().enumerate() {
        if rng.gen::<f64>() < opts.validation_fraction {
            val.push(i);
        } else {
            train.push(i);
        }
    }
    // Never an empty training split when there is any data.
    if train.is_empty() {
        train = std::mem::take(&mut val);
    }
    train.shuffle(&mut rng);
    val.shuffle(&mut rng);

    // A re-run replaces the dataset (checked above to be one): the manifest goes first, so a crash
    // from here on leaves a folder no reader takes for a dataset.
    ensure_replaceable_dataset(out)?;
    let listing = || format!("cannot list {}", out.display());
    for ent in fs::read_dir(out).with_context(listing)? {
        let ent = ent.with_context(listing)?;
        fs::remove_file(ent.path()).with_context(|| format!("cannot remove {}", ent.path().display()))?;
    }
    let mut splits = BTreeMap::new();
    write_atomic_with(&out.join("docs.jsonl"), |f| {
        let mut doc_lines = BufWriter::new(f);
        for (name, order) in [("train", &train), ("validation", &val)] {
            if order.is_empty() {
                continue;
            }
            let info = write_split(out, name, order, &docs, opts, &mut doc_lines)?;
            splits.insert(name.to_string(), info);
        }
        doc_lines.flush()?;
        Ok(())
    })?;

    let m = TokensManifest {
        format: TOKENS_FORMAT.into(),
        version: 1,
        tokenizer: tokenizer.to_string(),
        options: opts.clone(),
        splits,
        read: stats,
        inputs: inputs.iter().map(|p| p.display().to_string()).collect(),
    };
    write_json_atomic(&out.join("manifest.json"), &m)?;
    Ok(m)
}

fn is_dataset_file(name: &str) -> bool {
    name.ends_with(".u32") || name == "docs.jsonl" || name == "manifest.json" || saekit_files::is_temp_name(name)
}

/// `tokenize -o DIR` may replace a tokenized dataset, never anything else: DIR must be missing,
/// empty, or hold only a dataset's files with a tokenized-dataset manifest.
fn ensure_replaceable_dataset(out: &Path) -> Result<()> {
    saekit_files::ensure_only_owned(out, "tokenized dataset", is_dataset_file).map_err(|e| Fault::BadInput.mark(e))?;
    let m = out.join("manifest.json");
    if m.exists() {
        let v: serde_json::Value = read_json(&m).map_err(|e| Fault::BadInput.mark(e))?;
        ensure_input!(
            v.get("format").and_then(|f| f.as_str()) == Some(TOKENS_FORMAT),
            "{}: refusing to replace it: not a tokenized-dataset manifest (choose an empty or new folder)",
            m.display()
        );
    } else if fs::read_dir(out)
        .is_ok_and(|mut rd| rd.any(|e| e.is_ok_and(|e| !saekit_files::is_temp_name(&e.file_name().to_string_lossy()))))
    {
        return Err(bad_input!(
            "{}: refusing to write the tokenized dataset: the folder holds token files but no manifest.json (choose an empty or new folder)",
            out.display()
        ));
    }
    Ok(())
}

fn write_split(
    out: &Path,
    name: &str,
    order: &[usize],
    docs: &[Tokenized],
    opts: &TokenizeOptions,
    doc_lines: &mut impl Write,
) -> Result<SplitInfo> {
    let ctx = opts.context;
    let body = if opts.bos.is_some() { ctx - 1 } else { ctx };
    let mut info = SplitInfo { n_docs: order.len() as u64, ..Default::default() };
    let mut stream: Vec<u32> = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let t = &docs[i];
        if k > 0 {
            stream.push(opts.separator);
        }
        let line = DocLine {
            doc: i as u64,
            split: name,
            source: &t.doc.source,
            kind: t.doc.kind.as_deref(),
            lang: t.doc.lang.as_deref(),
            tokens: t.ids.len() as u64,
            offset: stream.len() as u64,
        };
        serde_json::to_writer(&mut *doc_lines, &line)?;
        doc_lines.write_all(b"\n")?;
        *info.tokens_by_kind.entry(t.doc.kind.clone().unwrap_or_default()).or_default() += t.ids.len() as u64;
        stream.extend_from_slice(&t.ids);
    }
    info.stream_tokens = stream.len() as u64;
    let n_ctx = stream.len() / body;
    info.n_contexts = n_ctx as u64;
    info.dropped_tail = (stream.len() - n_ctx * body) as u64;
    let mut c = 0;
    let mut shard = 0;
    let mut buf: Vec<u8> = Vec::new();
    while c < n_ctx {
        let n = opts.contexts_per_shard.min(n_ctx - c);
        buf.clear();
        buf.reserve(n * ctx * 4);
        for j in c..c + n {
            if let Some(b) = opts.bos {
                buf.extend_from_slice(&b.to_le_bytes());
            }
            for t in &stream[j * body..(j + 1) * body] {
                buf.extend_from_slice(&t.to_le_bytes());
            }
        }
        let file = format!("{name}-{shard:05}.u32");
        write_atomic_with(&out.join(&file), |f| f.write_all(&buf).map_err(Into::into))?;
        info.shards.push(TokenShard { file, n_contexts: n as u64, crc32: crc32fast::hash(&buf) });
        c += n;
        shard += 1;
    }
    Ok(info)
}

/// A tokenized dataset on disk.
pub struct TokenDataset {
    dir: PathBuf,
    manifest: TokensManifest,
    fingerprint: String,
}

impl TokenDataset {
    /// Open the tokenized dataset in `dir` (its manifest only; [`TokenDataset::split`] maps the shards).
    pub fn open(dir: &Path) -> StoreResult<TokenDataset> {
        let p = dir.join("manifest.json");
        ensure_input!(
            p.exists(),
            "{} is not a tokenized dataset (no manifest.json; run `saekit tokenize`)",
            dir.display()
        );
        let bytes = fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let manifest: TokensManifest =
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid: cannot parse it", p.display()))?;
        ensure_input!(manifest.format == TOKENS_FORMAT, "{} is not a tokenized-dataset manifest", p.display());
        // the manifest lists every shard's CRC32, so its bytes identify the dataset's content
        let fingerprint = saekit_files::fingerprint_bytes([bytes.as_slice()]);
        Ok(TokenDataset { dir: dir.to_path_buf(), manifest, fingerprint })
    }
    /// Content fingerprint of the dataset (resumes compare it, not the path).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
    /// The dataset's manifest.
    pub fn manifest(&self) -> &TokensManifest {
        &self.manifest
    }
    /// The dataset's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Tokens per context.
    pub fn context(&self) -> usize {
        self.manifest.options.context
    }
    /// Map one split (checks sizes and CRC32 of its shards).
    pub fn split(&self, name: &str) -> StoreResult<TokenSplit> {
        let info = self.manifest.splits.get(name).ok_or_else(|| {
            let names = self.manifest.splits.keys().cloned().collect::<Vec<_>>().join(", ");
            bad_input!("{} has no split {name:?} (it has {names})", self.dir.display())
        })?;
        let ctx = self.context();
        let mut maps = vec![];
        let mut starts = vec![];
        let mut n = 0u64;
        ensure_intact!(ctx > 0, "{}: manifest declares contexts of 0 tokens", self.dir.display());
        for s in &info.shards {
            ensure_intact!(
                !s.file.is_empty() && !s.file.contains(['/', '\\']) && s.file != "..",
                "{}: token shard name {:?} is not a file of the dataset",
                self.dir.display(),
                s.file
            );
            let p = self.dir.join(&s.file);
            let f = File::open(&p).with_context(|| format!("token shard {} is missing", p.display()))?;
            let len = f.metadata().with_context(|| format!("cannot read {}", p.display()))?.len();
            let want = (ctx as u64).checked_mul(4).and_then(|b| s.n_contexts.checked_mul(b));
            ensure_intact!(want == Some(len), "token shard {} has the wrong size ({len} bytes)", p.display());
            ensure_intact!(n.checked_add(s.n_contexts).is_some(), "{}: context counts overflow", self.dir.display());
            // SAFETY: shards are written once, atomically, and never modified.
            let map = unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", p.display()))?;
            ensure_intact!(crc32fast::hash(&map) == s.crc32, "token shard {} is corrupt (CRC32 mismatch)", p.display());
            starts.push(n);
            n += s.n_contexts;
            maps.push(map);
        }
        Ok(TokenSplit { maps, starts, n_contexts: n, context: ctx })
    }
}

/// The contexts of one split, memory-mapped.
pub struct TokenSplit {
    maps: Vec<Mmap>,
    starts: Vec<u64>,
    n_contexts: u64,
    context: usize,
}

impl TokenSplit {
    /// Contexts in the split.
    pub fn n_contexts(&self) -> u64 {
        self.n_contexts
    }
    /// Tokens per context.
    pub fn context_len(&self) -> usize {
        self.context
    }
    /// Context `i` as token ids.
    pub fn context(&self, i: u64) -> &[u32] {
        let s = match self.starts.binary_search(&i) {
            Ok(s) => s,
            Err(s) => s - 1,
        };
        let j = (i - self.starts[s]) as usize;
        let all = &self.maps[s];
        assert!((all.as_ptr() as usize).is_multiple_of(4));
        // SAFETY: mmap is page-aligned; the length was checked to be a whole number of contexts.
        let ids = unsafe { std::slice::from_raw_parts(all.as_ptr() as *const u32, all.len() / 4) };
        &ids[j * self.context..(j + 1) * self.context]
    }
}
