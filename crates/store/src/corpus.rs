//! Corpus readers: plain text files and folders, JSONL (optionally .gz / .zst), Parquet text columns.
//!
//! Bad rows (invalid UTF-8, invalid JSON, a missing or non-string text field, empty text) are counted
//! per reason with the first few locations, and reported; they never stop a run.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::error::{bad_input, StoreResult};
use serde::{Deserialize, Serialize};

/// One document of a corpus.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// The document's text, whole.
    pub text: String,
    /// Where it came from: the JSONL `src`/`source` field, else `file:line`.
    pub source: String,
    /// Content kind (`code`, `manpage`, `prose`, ...) when the input says so.
    pub kind: Option<String>,
    /// Language (ISO code or programming language) when the input says so.
    pub lang: Option<String>,
}

/// How to read a corpus.
#[derive(Clone, Debug)]
pub struct CorpusOptions {
    /// JSONL / Parquet field holding the text.
    pub text_field: String,
    /// Stop after this many documents.
    pub max_docs: Option<u64>,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        CorpusOptions { text_field: "text".into(), max_docs: None }
    }
}

/// What a read produced and what it had to drop.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReadStats {
    /// Input files opened.
    pub files: u64,
    /// Documents handed to the sink.
    pub docs: u64,
    /// Bytes of text in those documents.
    pub bytes: u64,
    /// Rows (or files) dropped because their text is not valid UTF-8.
    pub bad_utf8: u64,
    /// JSONL lines dropped because they do not parse.
    pub bad_json: u64,
    /// Rows dropped because they lack the text field.
    pub missing_field: u64,
    /// Rows dropped because their text is empty or whitespace.
    pub empty: u64,
    /// Files that could not be opened or decoded at all (counted, named in `examples`, skipped).
    pub unreadable_files: u64,
    /// Undecodable Parquet pages (the rest of that file is skipped).
    pub corrupt: u64,
    /// The first few bad rows as `file:line: reason`.
    pub examples: Vec<String>,
}

impl ReadStats {
    /// Rows dropped for any reason (unreadable files not included).
    pub fn bad_rows(&self) -> u64 {
        self.bad_utf8 + self.bad_json + self.missing_field + self.empty + self.corrupt
    }
    fn bad(&mut self, what: &str, loc: String) {
        match what {
            "invalid UTF-8" => self.bad_utf8 += 1,
            "invalid JSON" => self.bad_json += 1,
            "empty text" => self.empty += 1,
            "unreadable file" => self.unreadable_files += 1,
            "corrupt record" => self.corrupt += 1,
            _ => self.missing_field += 1,
        }
        if self.examples.len() < 10 {
            self.examples.push(format!("{loc}: {what}"));
        }
    }
    /// One line for the user, naming each kind of dropped row.
    pub fn summary(&self) -> String {
        format!(
            "{} files, {} documents, {:.1} MB of text; dropped: {} invalid UTF-8, {} invalid JSON, {} missing/non-string field, {} empty, {} corrupt, {} unreadable files",
            self.files,
            self.docs,
            self.bytes as f64 / 1e6,
            self.bad_utf8,
            self.bad_json,
            self.missing_field,
            self.empty,
            self.corrupt,
            self.unreadable_files
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Text,
    Jsonl,
    Parquet,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

fn classify(path: &Path) -> (Format, Compression) {
    let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let (stem, comp) = if let Some(s) = name.strip_suffix(".gz") {
        (s.to_string(), Compression::Gzip)
    } else if let Some(s) = name.strip_suffix(".zst") {
        (s.to_string(), Compression::Zstd)
    } else {
        (name.clone(), Compression::None)
    };
    let fmt = if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") {
        Format::Jsonl
    } else if stem.ends_with(".parquet") {
        Format::Parquet
    } else {
        Format::Text
    };
    (fmt, comp)
}

fn open_decoded(path: &Path, comp: Compression) -> Result<Box<dyn Read>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let f = BufReader::with_capacity(1 << 20, f);
    Ok(match comp {
        Compression::None => Box::new(f),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(f)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(f)
                .with_context(|| format!("{}: not a zstd stream", path.display()))?,
        ),
    })
}

/// The most bytes one document (a text file, a JSONL line) may decode to: a compressed bomb or a
/// binary file named `.txt` ends as one unreadable file instead of exhausting memory.
pub const MAX_DOC_BYTES: usize = 64 << 20;

/// All input files under `inputs`, folders walked recursively in sorted order (hidden entries skipped).
/// Symbolic links are followed, but a folder reached twice (a link loop, or a second link to it)
/// is an error: walking it again would never end, or count its documents twice.
pub fn list_inputs(inputs: &[PathBuf]) -> StoreResult<Vec<PathBuf>> {
    type Seen = std::collections::HashMap<(u64, u64), PathBuf>;
    fn walk(p: &Path, out: &mut Vec<PathBuf>, seen: &mut Seen) -> Result<()> {
        let meta = std::fs::metadata(p).with_context(|| format!("input {} does not exist", p.display()))?;
        if meta.is_dir() {
            use std::os::unix::fs::MetadataExt;
            if let Some(first) = seen.insert((meta.dev(), meta.ino()), p.to_path_buf()) {
                return Err(bad_input!(
                    "{}: this folder was already read as {} (a symbolic link loop or a second link to it)",
                    p.display(),
                    first.display()
                ));
            }
            let mut ents: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                // Hidden files and the manifests corpus builders leave beside their data are not documents.
                .filter(|e| {
                    !e.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        n.starts_with('.') || n == "manifest.tsv" || n == "manifest.json"
                    })
                })
                .collect();
            ents.sort();
            for e in ents {
                walk(&e, out, seen)?;
            }
        } else {
            out.push(p.to_path_buf());
        }
        Ok(())
    }
    let (mut out, mut seen) = (vec![], Seen::new());
    for p in inputs {
        walk(p, &mut out, &mut seen)?;
    }
    Ok(out)
}

/// Read every document under `inputs` and hand it to `sink`, in a deterministic order.
/// `sink` returning an error stops the read (that is the caller's error, not a bad row).
pub fn read_corpus(
    inputs: &[PathBuf],
    opts: &CorpusOptions,
    mut sink: impl FnMut(Document) -> Result<()>,
) -> StoreResult<ReadStats> {
    let files = list_inputs(inputs)?;
    if files.is_empty() {
        let listed = inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(bad_input!("no input files found under {listed}").into());
    }
    let mut st = ReadStats::default();
    for f in files {
        if opts.max_docs.is_some_and(|m| st.docs >= m) {
            break;
        }
        st.files += 1;
        let (fmt, comp) = classify(&f);
        let r = match fmt {
            Format::Text => read_text_file(&f, comp, &mut st, &mut sink),
            Format::Jsonl => read_jsonl(&f, comp, opts, &mut st, &mut sink),
            Format::Parquet => read_parquet(&f, opts, &mut st, &mut sink),
        };
        if let Err(e) = r {
            match e.downcast::<SinkError>() {
                // the sink's own error, kind and all: it is the caller's, not a bad file
                Ok(SinkError(inner)) if inner.is::<StopReading>() => return Ok(st),
                Ok(SinkError(inner)) => return Err(inner.into()),
                Err(e) => {
                    tracing::warn!("{}: {e:#}", f.display());
                    st.bad("unreadable file", format!("{} ({e:#})", f.display()));
                }
            }
        }
    }
    Ok(st)
}

/// Returned by a sink to end the read early (a token budget reached); `read_corpus` then returns
/// its statistics normally.
#[derive(Debug, thiserror::Error)]
#[error("enough documents read")]
pub struct StopReading;

/// Wraps errors raised by the sink so that they stop the read instead of counting as a bad file.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct SinkError(anyhow::Error);

fn emit(doc: Document, st: &mut ReadStats, sink: &mut impl FnMut(Document) -> Result<()>) -> Result<()> {
    let n = doc.text.len() as u64;
    sink(doc).map_err(|e| anyhow::Error::from(SinkError(e)))?;
    st.docs += 1;
    st.bytes += n;
    Ok(())
}

fn read_text_file(
    path: &Path,
    comp: Compression,
    st: &mut ReadStats,
    sink: &mut impl FnMut(Document) -> Result<()>,
) -> Result<()> {
    let mut bytes = vec![];
    open_decoded(path, comp)?
        .take(MAX_DOC_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() > MAX_DOC_BYTES {
        bail!("{}: decodes to more than {} MiB; split it into smaller documents", path.display(), MAX_DOC_BYTES >> 20);
    }
    let loc = path.display().to_string();
    match String::from_utf8(bytes) {
        Err(_) => st.bad("invalid UTF-8", loc),
        Ok(t) if t.trim().is_empty() => st.bad("empty text", loc),
        Ok(text) => emit(Document { text, source: loc, kind: None, lang: None }, st, sink)?,
    }
    Ok(())
}

fn str_field(v: &serde_json::Value, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| v.get(*k).and_then(|x| x.as_str()).map(str::to_string))
}

fn read_jsonl(
    path: &Path,
    comp: Compression,
    opts: &CorpusOptions,
    st: &mut ReadStats,
    sink: &mut impl FnMut(Document) -> Result<()>,
) -> Result<()> {
    let mut r = BufReader::with_capacity(1 << 20, open_decoded(path, comp)?);
    let mut line = Vec::new();
    let mut lineno = 0u64;
    loop {
        if opts.max_docs.is_some_and(|m| st.docs >= m) {
            return Ok(());
        }
        line.clear();
        let n = (&mut r)
            .take(MAX_DOC_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {} after line {lineno}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        if n > MAX_DOC_BYTES {
            bail!("{}: line {} is longer than {} MiB", path.display(), lineno + 1, MAX_DOC_BYTES >> 20);
        }
        lineno += 1;
        let loc = || format!("{}:{lineno}", path.display());
        let Ok(s) = std::str::from_utf8(&line) else {
            st.bad("invalid UTF-8", loc());
            continue;
        };
        if s.trim().is_empty() {
            continue; // blank line between records, not a row
        }
        let v: serde_json::Value = match serde_json::from_str(s) {
            Ok(v) => v,
            Err(_) => {
                st.bad("invalid JSON", loc());
                continue;
            }
        };
        let Some(text) = v.get(&opts.text_field).and_then(|t| t.as_str()) else {
            st.bad(&format!("missing or non-string field {:?}", opts.text_field), loc());
            continue;
        };
        if text.trim().is_empty() {
            st.bad("empty text", loc());
            continue;
        }
        let doc = Document {
            text: text.to_string(),
            source: str_field(&v, &["src", "source"]).unwrap_or_else(loc),
            kind: str_field(&v, &["kind"]),
            lang: str_field(&v, &["lang", "language"]),
        };
        emit(doc, st, sink)?;
    }
}

/// The parquet crate's decoders panic on some corrupt files (an index out of bounds in the RLE decoder,
/// an `unwrap` on a missing thrift field; parquet 57): a corrupt file must cost that file, not the run.
/// Panics raised by the sink are the caller's and keep unwinding.
#[cfg(feature = "parquet")]
fn read_parquet(
    path: &Path,
    opts: &CorpusOptions,
    st: &mut ReadStats,
    sink: &mut impl FnMut(Document) -> Result<()>,
) -> Result<()> {
    let in_sink = std::cell::Cell::new(false);
    let mut guarded = |d: Document| {
        in_sink.set(true);
        let r = sink(d);
        in_sink.set(false);
        r
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode_parquet(path, opts, st, &mut guarded)));
    match r {
        Ok(r) => r,
        Err(payload) if in_sink.get() => std::panic::resume_unwind(payload),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            bail!("{}: corrupt Parquet file (the decoder failed: {what})", path.display())
        }
    }
}

#[cfg(feature = "parquet")]
fn decode_parquet(
    path: &Path,
    opts: &CorpusOptions,
    st: &mut ReadStats,
    sink: &mut impl FnMut(Document) -> Result<()>,
) -> Result<()> {
    use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::reader::{FileReader, SerializedFileReader};

    // The column reader, not the record API: a value with invalid UTF-8 must cost one row, not the file.
    struct Col {
        reader: ColumnReaderImpl<ByteArrayType>,
        max_def: i16,
        defs: Vec<i16>,
        vals: Vec<ByteArray>,
    }
    impl Col {
        fn next_batch(&mut self, n: usize) -> Result<Vec<Option<ByteArray>>> {
            self.defs.clear();
            self.vals.clear();
            let defs = if self.max_def > 0 { Some(&mut self.defs) } else { None };
            let (recs, _, _) = self.reader.read_records(n, defs, None, &mut self.vals)?;
            if self.max_def == 0 {
                return Ok(self.vals.drain(..).map(Some).collect());
            }
            let mut it = self.vals.drain(..);
            let out: Vec<Option<ByteArray>> =
                self.defs.iter().map(|&d| if d == self.max_def { it.next() } else { None }).collect();
            debug_assert_eq!(out.len(), recs);
            Ok(out)
        }
    }

    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = SerializedFileReader::new(f).with_context(|| format!("{} is not a Parquet file", path.display()))?;
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema_descr();
    let find = |name: &str| -> Option<usize> {
        (0..schema.num_columns()).find(|&i| {
            let c = schema.column(i);
            c.path().parts().len() == 1 && c.name() == name && c.max_rep_level() == 0
        })
    };
    let Some(text_idx) = find(&opts.text_field) else {
        let cols: Vec<String> = (0..schema.num_columns()).map(|i| schema.column(i).path().string()).collect();
        bail!("{} has no column {:?} (columns: {})", path.display(), opts.text_field, cols.join(", "));
    };
    let meta_cols: Vec<(&str, usize)> =
        [("src", "src"), ("source", "src"), ("kind", "kind"), ("lang", "lang"), ("language", "lang")]
            .iter()
            .filter_map(|(col, role)| find(col).map(|i| (*role, i)))
            .collect();
    let mut row = 0u64;
    for g in 0..meta.num_row_groups() {
        let rg = reader.get_row_group(g).with_context(|| format!("{}: row group {g}", path.display()))?;
        let open = |i: usize| -> Result<Option<Col>> {
            Ok(match rg.get_column_reader(i)? {
                ColumnReader::ByteArrayColumnReader(reader) => {
                    Some(Col { reader, max_def: schema.column(i).max_def_level(), defs: vec![], vals: vec![] })
                }
                _ => None,
            })
        };
        let Some(mut text) = open(text_idx)? else {
            bail!("{}: column {:?} is not a string column", path.display(), opts.text_field);
        };
        let mut metas: Vec<(&str, Col)> = vec![];
        for (role, i) in &meta_cols {
            if let Some(c) = open(*i)? {
                metas.push((role, c));
            }
        }
        let n_rows = rg.metadata().num_rows() as usize;
        let mut done = 0;
        while done < n_rows {
            if opts.max_docs.is_some_and(|m| st.docs >= m) {
                return Ok(());
            }
            let want = 1024.min(n_rows - done);
            let texts = match text.next_batch(want) {
                Ok(t) => t,
                Err(e) => {
                    // A corrupt page makes the rest of this row group unreadable.
                    st.bad("corrupt record", format!("{}:row {row} ({e})", path.display()));
                    break;
                }
            };
            if texts.is_empty() {
                break;
            }
            let mut cols: Vec<(&str, Vec<Option<ByteArray>>)> = vec![];
            for (role, c) in &mut metas {
                cols.push((role, c.next_batch(texts.len()).unwrap_or_default()));
            }
            for (k, t) in texts.into_iter().enumerate() {
                let loc = format!("{}:row {}", path.display(), row + k as u64);
                let Some(t) = t else {
                    st.bad(&format!("missing or non-string field {:?}", opts.text_field), loc);
                    continue;
                };
                let Ok(s) = std::str::from_utf8(t.data()) else {
                    st.bad("invalid UTF-8", loc);
                    continue;
                };
                if s.trim().is_empty() {
                    st.bad("empty text", loc);
                    continue;
                }
                let get = |role: &str| -> Option<String> {
                    cols.iter()
                        .filter(|(r, _)| *r == role)
                        .find_map(|(_, v)| v.get(k).cloned().flatten())
                        .and_then(|b| std::str::from_utf8(b.data()).ok().map(str::to_string))
                };
                let doc = Document {
                    text: s.to_string(),
                    source: get("src").unwrap_or(loc),
                    kind: get("kind"),
                    lang: get("lang"),
                };
                emit(doc, st, sink)?;
            }
            done += want;
            row += want as u64;
        }
    }
    Ok(())
}

#[cfg(not(feature = "parquet"))]
fn read_parquet(
    path: &Path,
    _: &CorpusOptions,
    _: &mut ReadStats,
    _: &mut impl FnMut(Document) -> Result<()>,
) -> Result<()> {
    bail!("{}: saekit-store was built without the `parquet` feature", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn jsonl_bad_rows_are_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        let mut f = File::create(&p).unwrap();
        f.write_all(b"{\"text\":\"hello\",\"kind\":\"prose\",\"lang\":\"en\",\"src\":\"t\"}\n").unwrap();
        f.write_all(b"{\"text\":\"\"}\n").unwrap();
        f.write_all(b"{\"body\":\"x\"}\n").unwrap();
        f.write_all(b"{\"text\": 3}\n").unwrap();
        f.write_all(b"not json\n").unwrap();
        f.write_all(b"{\"text\":\"caf\xff\"}\n").unwrap();
        f.write_all(b"\n{\"text\":\"world\"}").unwrap();
        drop(f);
        let mut docs = vec![];
        let st = read_corpus(&[p], &CorpusOptions::default(), |d| {
            docs.push(d);
            Ok(())
        })
        .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].kind.as_deref(), Some("prose"));
        assert_eq!(docs[0].source, "t");
        assert!(docs[1].source.ends_with("a.jsonl:8"), "{}", docs[1].source);
        assert_eq!((st.empty, st.missing_field, st.bad_json, st.bad_utf8), (1, 2, 1, 1));
        assert_eq!(st.bad_rows(), 5);
        assert_eq!(st.examples.len(), 5);
    }

    #[test]
    fn compressed_jsonl_and_text_folders() {
        let dir = tempfile::tempdir().unwrap();
        let rows = b"{\"content\":\"one\"}\n{\"content\":\"two\"}\n";
        let mut gz =
            flate2::write::GzEncoder::new(File::create(dir.path().join("b.jsonl.gz")).unwrap(), Default::default());
        gz.write_all(rows).unwrap();
        gz.finish().unwrap();
        let zst = zstd::encode_all(&rows[..], 3).unwrap();
        std::fs::write(dir.path().join("c.jsonl.zst"), zst).unwrap();
        let sub = dir.path().join("texts");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("x.txt"), "plain text").unwrap();
        std::fs::write(sub.join("y.bin"), b"\xff\xfe\x00").unwrap();
        std::fs::write(sub.join("z.txt"), "  \n").unwrap();
        let opts = CorpusOptions { text_field: "content".into(), ..Default::default() };
        let mut texts = vec![];
        let st = read_corpus(&[dir.path().to_path_buf()], &opts, |d| {
            texts.push(d.text);
            Ok(())
        })
        .unwrap();
        assert_eq!(texts, vec!["one", "two", "one", "two", "plain text"]);
        assert_eq!((st.bad_utf8, st.empty, st.files), (1, 1, 5));
    }

    #[test]
    fn symlink_loops_end_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("corpus");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("a.txt"), "text").unwrap();
        // two links back to the folder: 2^40 paths before the kernel's link limit stops a naive walk
        std::os::unix::fs::symlink(&d, d.join("loop1")).unwrap();
        std::os::unix::fs::symlink(&d, d.join("loop2")).unwrap();
        let e = format!("{:#}", list_inputs(std::slice::from_ref(&d)).unwrap_err());
        assert!(e.contains("loop1") && e.contains("already read"), "{e}");
    }

    #[test]
    fn compressed_bombs_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let zeros = vec![b'a'; 1 << 20];
        for name in ["bomb.txt.gz", "bomb.jsonl.gz"] {
            let mut gz =
                flate2::write::GzEncoder::new(File::create(dir.path().join(name)).unwrap(), Default::default());
            // 80 MiB of one long line, a few hundred KiB on disk
            for _ in 0..80 {
                gz.write_all(&zeros).unwrap();
            }
            gz.finish().unwrap();
        }
        let mut n = 0;
        let st = read_corpus(&[dir.path().to_path_buf()], &CorpusOptions::default(), |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((n, st.unreadable_files), (0, 2), "{:?}", st.examples);
        assert!(st.examples.iter().all(|e| e.contains("bomb.") && e.contains("MiB")), "{:?}", st.examples);
    }
}

#[cfg(all(test, feature = "parquet"))]
mod parquet_tests {
    use super::*;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;

    /// A FineWeb-shaped file: required `text`, optional `kind`, one row with invalid UTF-8, one empty.
    fn write_fixture(path: &Path) {
        let schema = Arc::new(
            parquet::schema::parser::parse_message_type(
                "message schema { REQUIRED BYTE_ARRAY text (UTF8); OPTIONAL BYTE_ARRAY kind (UTF8); REQUIRED INT64 id; }",
            )
            .unwrap(),
        );
        let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
        let mut w = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let texts: Vec<ByteArray> = vec![
            b"first doc".to_vec().into(),
            b"bad \xff utf8".to_vec().into(),
            b" ".to_vec().into(),
            b"fourth".to_vec().into(),
        ];
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&texts, None, None).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let kinds: Vec<ByteArray> = vec![b"web".to_vec().into(), b"code".to_vec().into()];
        col.typed::<ByteArrayType>().write_batch(&kinds, Some(&[1, 0, 0, 1]), None).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<parquet::data_type::Int64Type>().write_batch(&[1, 2, 3, 4], None, None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
        w.close().unwrap();
    }

    #[test]
    fn parquet_text_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("part-0.parquet");
        write_fixture(&p);
        let mut docs = vec![];
        let st = read_corpus(std::slice::from_ref(&p), &CorpusOptions::default(), |d| {
            docs.push(d);
            Ok(())
        })
        .unwrap();
        assert_eq!(docs.iter().map(|d| d.text.as_str()).collect::<Vec<_>>(), ["first doc", "fourth"]);
        assert_eq!(docs[0].kind.as_deref(), Some("web"));
        assert_eq!(docs[1].kind.as_deref(), Some("code"));
        assert_eq!((st.bad_utf8, st.empty), (1, 1));
        let e = read_corpus(&[p], &CorpusOptions { text_field: "content".into(), ..Default::default() }, |_| Ok(()))
            .unwrap();
        assert_eq!(e.unreadable_files, 1);
        assert!(e.examples[0].contains("no column \"content\""), "{:?}", e.examples);
    }
}
