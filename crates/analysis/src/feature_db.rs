//! The feature database: one SQLite file per analysed SAE (schema in `docs/feature-db.md`).
//!
//! Writers go through [`FeatureDbWriter`] (a `*.tmp` file renamed into place when complete, so a
//! reader never sees half a database); readers (the CLI, the web browser) through [`FeatureDb`].

use crate::error::{bad_input, bail_corrupt, bail_input, AnalysisResult};
use crate::AnalysisError;
use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, Context as _, Result};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::autointerp_db::{self, Explanation, HeldOutWindow};

/// `meta.format` of every feature database.
pub const DB_FORMAT: &str = "saekit-feature-db";
/// Bumped when the schema or the detail blob changes incompatibly.
pub const DB_VERSION: u32 = 1;
/// The most one feature's detail record may decode to (real ones are a few KiB).
const MAX_DETAIL_BYTES: u64 = 16 << 20;

/// One context window around a token where the feature fired.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Context {
    /// Token texts of the window, as the tokenizer decodes them (a leading space stays).
    pub tokens: Vec<String>,
    /// The feature's activation on each token of the window (0 where it did not fire or the row
    /// was an attention sink that analysis skips).
    pub acts: Vec<f32>,
    /// Index of the peak token in `tokens`.
    pub peak: usize,
    /// The activation at the peak (the context's rank among the feature's contexts).
    pub max_act: f32,
}

/// Contexts whose peak activation lies in `[lo, hi)` of the feature's range (sae_vis / Anthropic
/// "subsample intervals"); `count` is how many contexts fell in the interval during analysis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantileGroup {
    /// The interval's lower bound (activation units).
    pub lo: f32,
    /// Its upper bound.
    pub hi: f32,
    /// Contexts whose peak fell in the interval during the analysis.
    pub count: u64,
    /// A uniform sample of them.
    pub contexts: Vec<Context>,
}

/// Activation histogram over log-spaced bins: `counts[i]` activations fell in `[edges[i], edges[i+1])`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Histogram {
    /// Bin edges in activation units, one more than `counts`.
    pub edges: Vec<f32>,
    /// Activations per bin.
    pub counts: Vec<u64>,
}

/// One token of a feature's direct logit effect: what its decoder direction, through the final norm's
/// gain and the unembedding, adds to that token's logit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenLogit {
    /// The token's text.
    pub token: String,
    /// The token id.
    pub id: u32,
    /// The logit change per unit of activation (positive: promoted, negative: suppressed).
    pub logit: f32,
}

/// A feature whose decoder direction is close to another's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Neighbour {
    /// The neighbour's id.
    pub id: u32,
    /// Cosine similarity of the two decoder directions.
    pub cosine: f32,
}

/// Everything a feature page shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeatureRecord {
    /// The feature id (its row in the SAE's decoder).
    pub id: u32,
    /// Fraction of analysed tokens on which the feature is non-zero.
    pub density: f64,
    /// Its highest activation on the analysed tokens.
    pub max_act: f32,
    /// Mean activation over the tokens where it fires.
    pub mean_act: f32,
    /// Number of analysed tokens on which it fired.
    pub n_fired: u64,
    /// A one-line description: the template `analyze` writes ("fires on: ...; promotes: ..."), or one
    /// a person wrote; the LLM explanations are in `explanations`.
    pub explanation: Option<String>,
    /// True when `explanation` was generated from the statistics (not written by a person or an LLM).
    pub explanation_auto: bool,
    /// The highest-activating contexts, highest first (one per source context).
    pub top_contexts: Vec<Context>,
    /// Contexts sampled from equal-width intervals of `[0, max_act]`.
    pub quantiles: Vec<QuantileGroup>,
    /// Its activations over the analysed tokens, in log-spaced bins.
    pub histogram: Histogram,
    /// The tokens whose logits its decoder direction raises most, most first.
    pub promoted: Vec<TokenLogit>,
    /// The tokens whose logits it lowers most, most first.
    pub suppressed: Vec<TokenLogit>,
    /// The features with the closest decoder directions, closest first.
    pub neighbours: Vec<Neighbour>,
    /// The x coordinate on the 2-D feature map (in [-1, 1]).
    pub x: f32,
    /// The y coordinate on the 2-D feature map (in [-1, 1]).
    pub y: f32,
    /// LLM explanations with their scores (`saekit explain`), best-scoring first.
    #[serde(default)]
    pub explanations: Vec<Explanation>,
}

/// A feature as a list or a search result shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeatureSummary {
    /// The feature id.
    pub id: u32,
    /// Fraction of analysed tokens on which it is non-zero.
    pub density: f64,
    /// Its highest activation.
    pub max_act: f32,
    /// The most frequent peak tokens of the top contexts.
    pub top_tokens: Vec<String>,
}

/// A feature's point on the 2-D map of decoder directions (`DbInfo::map_method` says how it was made).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MapPoint {
    /// The feature id.
    pub id: u32,
    /// The x coordinate, in [-1, 1].
    pub x: f32,
    /// The y coordinate, in [-1, 1].
    pub y: f32,
    /// Fraction of analysed tokens on which it is non-zero (the point's colour).
    pub density: f64,
    /// Its highest activation.
    pub max_act: f32,
}

/// What a feature database describes and how it was made (`meta.info`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct DbInfo {
    /// [`DB_FORMAT`]; the writer sets it.
    pub format: String,
    /// [`DB_VERSION`] of the writer; the writer sets it.
    pub version: u32,
    /// The model's name (`SmolLM2-135M-Instruct`).
    pub model: String,
    /// The hook point the SAE reads (`blocks.6.hook_resid_post`).
    pub hook: String,
    /// The SAE as it was given to `saekit analyze` (a path or hub name).
    pub sae_path: String,
    /// Features in the SAE.
    pub d_sae: u32,
    /// Tokens the statistics were computed over (attention-sink rows excluded).
    pub n_tokens: u64,
    /// Contexts the statistics were computed over.
    pub n_contexts: u64,
    /// Tokens per context.
    pub context_len: u32,
    /// The tokenized dataset and split read (`data/tokens (validation)`).
    pub dataset: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// How the 2-D map was made (e.g. "pca(decoder)").
    pub map_method: String,
    /// How neighbours were found ("exact" or "ivf(...)").
    pub neighbour_method: String,
}

/// The order of [`FeatureDb::list`]; parsed from `density`, `max_act` (or `max`) and `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortBy {
    /// By the fraction of tokens a feature fires on.
    Density,
    /// By its highest activation.
    MaxAct,
    /// By id.
    Id,
}

impl std::str::FromStr for SortBy {
    type Err = crate::AnalysisError;
    fn from_str(s: &str) -> AnalysisResult<Self> {
        match s.to_ascii_lowercase().as_str() {
            "density" => Ok(SortBy::Density),
            "max_act" | "maxact" | "max" => Ok(SortBy::MaxAct),
            "id" => Ok(SortBy::Id),
            _ => bail_input!("unknown sort key {s:?} (density, max_act or id)"),
        }
    }
}

/// A context as stored: token ids, sparse activations (offset in window, value).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredContext {
    /// Index of the source context in the dataset split.
    pub ctx: u64,
    /// Position of the window's first token in the source context.
    pub start: u32,
    /// The window's token ids (looked up in the `vocab` table when read).
    pub ids: Vec<u32>,
    /// The feature's non-zero activations in the window: (offset in `ids`, activation).
    pub acts: Vec<(u16, f32)>,
    /// Offset of the peak token in `ids`.
    pub peak: u16,
    /// The activation at the peak.
    pub max_act: f32,
}

/// A [`QuantileGroup`] as stored: its contexts as token ids.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredGroup {
    /// The interval's lower bound (activation units).
    pub lo: f32,
    /// Its upper bound.
    pub hi: f32,
    /// Contexts whose peak fell in the interval.
    pub count: u64,
    /// A uniform sample of them.
    pub contexts: Vec<StoredContext>,
}

/// The per-feature blob in `feature_detail.data` (zstd-compressed JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StoredDetail {
    /// The top-activating contexts, highest first.
    pub top: Vec<StoredContext>,
    /// The activation intervals and their sampled contexts.
    pub quantiles: Vec<StoredGroup>,
    /// Index of the first histogram bin in `hist`; bins before it and after its end are zero.
    pub hist_first: u32,
    /// Histogram counts from bin `hist_first` on (the bins of `meta.hist_edges`).
    pub hist: Vec<u64>,
    /// (token id, logit change) of the most promoted tokens, most first.
    pub promoted: Vec<(u32, f32)>,
    /// (token id, logit change) of the most suppressed tokens, most first.
    pub suppressed: Vec<(u32, f32)>,
    /// (feature id, cosine) of the nearest decoder directions, nearest first.
    pub neighbours: Vec<(u32, f32)>,
}

/// One feature for [`FeatureDbWriter::insert`]: the `features` row, its search text and its detail blob.
/// The fields mean what [`FeatureRecord`]'s of the same name do.
#[derive(Debug, Clone, Default)]
pub struct FeatureRow {
    /// The feature id.
    pub id: u32,
    /// Fraction of analysed tokens on which it is non-zero.
    pub density: f64,
    /// Its highest activation.
    pub max_act: f32,
    /// Its mean activation over the tokens where it fires.
    pub mean_act: f32,
    /// Analysed tokens on which it fired.
    pub n_fired: u64,
    /// The most frequent peak tokens of its top contexts, most frequent first.
    pub top_tokens: Vec<String>,
    /// Its one-line description, if any (indexed for search too).
    pub explanation: Option<String>,
    /// Whether `explanation` was generated from the statistics.
    pub explanation_auto: bool,
    /// The x coordinate on the feature map.
    pub x: f32,
    /// The y coordinate on the feature map.
    pub y: f32,
    /// Free text indexed for search (peak tokens and their neighbourhood, promoted tokens).
    pub search_text: String,
    /// Contexts, histogram, logit effects and neighbours: the zstd-compressed blob.
    pub detail: StoredDetail,
}

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY,
    density REAL NOT NULL,
    max_act REAL NOT NULL,
    mean_act REAL NOT NULL,
    n_fired INTEGER NOT NULL,
    top_tokens TEXT NOT NULL,
    explanation TEXT,
    explanation_auto INTEGER NOT NULL,
    x REAL NOT NULL,
    y REAL NOT NULL
);
CREATE TABLE feature_detail (id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE VIRTUAL TABLE feature_text USING fts5(body, content='', tokenize='unicode61 remove_diacritics 2');
";

const INDEXES: &str = "
CREATE INDEX features_density ON features(density);
CREATE INDEX features_max_act ON features(max_act);
";

/// Builds a feature database at `path` through `path.tmp`; nothing appears at `path` until
/// [`FeatureDbWriter::finish`].
pub struct FeatureDbWriter {
    conn: Connection,
    tmp: PathBuf,
    path: PathBuf,
    pending: usize,
}

impl FeatureDbWriter {
    /// Start a database at `path` (written to `path.tmp`) with its `meta` (`info`, the histogram's bin
    /// edges) and `vocab` (token id `i` has text `vocab[i]`) tables.
    pub fn create(path: &Path, info: &DbInfo, hist_edges: &[f32], vocab: &[String]) -> AnalysisResult<Self> {
        let tmp = tmp_path(path);
        if tmp.exists() {
            std::fs::remove_file(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        let conn = Connection::open(&tmp).with_context(|| format!("creating feature database {}", tmp.display()))?;
        // A crash loses the tmp file anyway (it is rebuilt from the analysis checkpoint), so the
        // journal only costs time here.
        conn.execute_batch("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA page_size=8192;")?;
        conn.execute_batch(SCHEMA).with_context(|| format!("{}: creating schema", tmp.display()))?;
        let mut w = FeatureDbWriter { conn, tmp, path: path.to_path_buf(), pending: 0 };
        w.write_header(info, hist_edges, vocab).with_context(|| w.writing())?;
        Ok(w)
    }

    fn write_header(&mut self, info: &DbInfo, hist_edges: &[f32], vocab: &[String]) -> Result<()> {
        self.conn.execute_batch("BEGIN")?;
        let mut info = info.clone();
        info.format = DB_FORMAT.into();
        info.version = DB_VERSION;
        self.set_meta("format", DB_FORMAT)?;
        self.set_meta("info", &serde_json::to_string(&info)?)?;
        self.set_meta("hist_edges", &serde_json::to_string(hist_edges)?)?;
        let mut st = self.conn.prepare("INSERT INTO vocab (id, text) VALUES (?1, ?2)")?;
        for (i, t) in vocab.iter().enumerate() {
            st.execute(params![i as i64, t])?;
        }
        Ok(())
    }

    /// Context for a failed write: the file, and what the OS said (SQLite reports a full disk or a
    /// file-size limit only as a generic I/O error).
    fn writing(&self) -> String {
        // SAFETY: the handle belongs to the open connection `self.conn`; the call only reads its errno.
        let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(self.conn.handle()) };
        let os = if errno != 0 { format!(" ({})", std::io::Error::from_raw_os_error(errno)) } else { String::new() };
        format!("writing feature database {}{os}", self.tmp.display())
    }

    fn set_meta(&mut self, key: &str, value: &str) -> AnalysisResult<()> {
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)", params![key, value])?;
        Ok(())
    }

    /// Add one feature (its detail compressed here). Rows may come in any order; ids must be distinct.
    pub fn insert(&mut self, row: &FeatureRow) -> AnalysisResult<()> {
        let json = serde_json::to_vec(&row.detail)?;
        let blob = zstd::bulk::compress(&json, 3).context("compressing a feature record")?;
        self.insert_raw(row, &blob)
    }

    /// Insert with an already-compressed detail blob (the synthetic benchmark fill reuses one).
    pub fn insert_raw(&mut self, row: &FeatureRow, blob: &[u8]) -> AnalysisResult<()> {
        Ok(self.insert_row(row, blob).with_context(|| self.writing())?)
    }

    fn insert_row(&mut self, row: &FeatureRow, blob: &[u8]) -> Result<()> {
        let id = row.id as i64;
        self.conn
            .prepare_cached(
                "INSERT INTO features (id, density, max_act, mean_act, n_fired, top_tokens, explanation, \
                 explanation_auto, x, y) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                id,
                row.density,
                row.max_act as f64,
                row.mean_act as f64,
                row.n_fired as i64,
                serde_json::to_string(&row.top_tokens)?,
                row.explanation,
                row.explanation_auto as i64,
                row.x as f64,
                row.y as f64
            ])?;
        self.conn
            .prepare_cached("INSERT INTO feature_detail (id, data) VALUES (?1, ?2)")?
            .execute(params![id, blob])?;
        if !row.search_text.is_empty() || row.explanation.is_some() {
            let body = format!("{} {}", row.search_text, row.explanation.as_deref().unwrap_or(""));
            self.conn
                .prepare_cached("INSERT INTO feature_text (rowid, body) VALUES (?1, ?2)")?
                .execute(params![id, body])?;
        }
        self.pending += 1;
        if self.pending >= 20_000 {
            self.conn.execute_batch("COMMIT; BEGIN")?;
            self.pending = 0;
        }
        Ok(())
    }

    /// Build the indexes, fsync and move the file into place.
    pub fn finish(self) -> AnalysisResult<PathBuf> {
        let sql = ["COMMIT", INDEXES, "INSERT INTO feature_text(feature_text) VALUES('optimize'); ANALYZE;"];
        for q in sql {
            self.conn.execute_batch(q).with_context(|| self.writing())?;
        }
        self.conn.close().map_err(|(_, e)| anyhow!("{}: closing: {e}", self.tmp.display()))?;
        // SQLite needs a path of its own: the shared helper moves the finished file into place
        saekit_files::persist_path(&self.tmp, &self.path)?;
        Ok(self.path)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|s| s.to_str()).unwrap_or("features.sqlite");
    path.with_file_name(format!("{name}.tmp"))
}

/// Read-only access to a feature database. `Send + Sync`: one connection behind a mutex (reads are
/// sub-millisecond, so a server can share one).
pub struct FeatureDb {
    conn: Mutex<Connection>,
    path: PathBuf,
    info: DbInfo,
    hist_edges: Vec<f32>,
    vocab: OnceLock<Vec<String>>,
}

impl FeatureDb {
    /// Open read-only; a clear error if `path` is not a saekit feature database.
    pub fn open(path: &Path) -> AnalysisResult<FeatureDb> {
        if !path.exists() {
            bail_input!("{}: no such feature database (run `saekit analyze` first)", path.display());
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .with_context(|| format!("{}: cannot open as SQLite", path.display()))?;
        let format: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| r.get(0))
            .optional()
            .map_err(|_| bad_input!("{}: not a saekit feature database (no meta table)", path.display()))?;
        if format.as_deref() != Some(DB_FORMAT) {
            bail_input!("{}: not a saekit feature database (meta.format is {:?})", path.display(), format);
        }
        let get = |k: &str| -> Result<String> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))
                .with_context(|| format!("{}: meta.{k} is missing", path.display()))
        };
        let info: DbInfo = serde_json::from_str(&get("info")?)
            .with_context(|| format!("{}: meta.info is not valid", path.display()))?;
        if info.version > DB_VERSION {
            bail_input!(
                "{}: feature database version {} is newer than this saekit ({DB_VERSION})",
                path.display(),
                info.version
            );
        }
        let hist_edges: Vec<f32> = serde_json::from_str(&get("hist_edges")?)
            .with_context(|| format!("{}: meta.hist_edges is not valid", path.display()))?;
        Ok(FeatureDb { conn: Mutex::new(conn), path: path.to_path_buf(), info, hist_edges, vocab: OnceLock::new() })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the database describes (read once at open).
    pub fn info(&self) -> AnalysisResult<DbInfo> {
        Ok(self.info.clone())
    }

    /// Refuse an SAE this database was not made from (another width or hook): its feature ids would
    /// name other features, and every description and max activation read from here would be wrong.
    pub fn check_made_for(&self, sae: &saekit_sae::Sae) -> AnalysisResult<()> {
        let hook = &sae.metadata.hook_name;
        if self.info.d_sae as usize != sae.d_sae || &self.info.hook != hook {
            bail_input!(
                "{}: analysed {} features at {}, but the SAE has {} at {} (analyse this SAE with `saekit analyze`)",
                self.path.display(),
                self.info.d_sae,
                self.info.hook,
                sae.d_sae,
                hook
            );
        }
        Ok(())
    }

    /// Errors of a query name the database: SQLite's own say only what broke ("database disk image is
    /// malformed"), not where.
    fn named<T>(&self, r: Result<T>) -> AnalysisResult<T> {
        r.map_err(|e| {
            let p = self.path.display().to_string();
            if format!("{e:#}").contains(&p) {
                e
            } else {
                e.context(p)
            }
        })
        .map_err(AnalysisError::from)
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn.lock().map_err(|_| anyhow!("feature database lock poisoned"))
    }

    fn vocab(&self) -> Result<&[String]> {
        if let Some(v) = self.vocab.get() {
            return Ok(v);
        }
        let v = self.named(self.read_vocab())?;
        Ok(self.vocab.get_or_init(|| v))
    }

    fn read_vocab(&self) -> Result<Vec<String>> {
        let conn = self.conn()?;
        let mut st = conn.prepare("SELECT id, text FROM vocab ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut v = Vec::new();
        for row in rows {
            let (id, t) = row?;
            if id as usize != v.len() {
                bail_corrupt!("{}: vocab table has a gap at id {id}", self.path.display());
            }
            v.push(t);
        }
        Ok(v)
    }

    /// The text of token `id` (`<id>` when outside the stored vocabulary).
    pub fn token_text(&self, id: u32) -> AnalysisResult<String> {
        Ok(self.vocab()?.get(id as usize).cloned().unwrap_or_else(|| format!("<{id}>")))
    }

    /// The raw stored detail of a feature (for tools that want ids rather than strings).
    pub fn detail(&self, id: u32) -> AnalysisResult<Option<StoredDetail>> {
        self.named(self.read_detail(id))
    }

    fn read_detail(&self, id: u32) -> Result<Option<StoredDetail>> {
        let blob: Option<Vec<u8>> = self
            .conn()?
            .prepare_cached("SELECT data FROM feature_detail WHERE id = ?1")?
            .query_row([id as i64], |r| r.get(0))
            .optional()?;
        let Some(blob) = blob else { return Ok(None) };
        // bounded: a corrupt frame can declare (and an RLE block produce) gigabytes from a few bytes
        let mut json = Vec::new();
        zstd::stream::read::Decoder::new(&blob[..])
            .and_then(|d| d.take(MAX_DETAIL_BYTES + 1).read_to_end(&mut json))
            .with_context(|| format!("{}: feature {id}: corrupt detail blob", self.path.display()))?;
        if json.len() as u64 > MAX_DETAIL_BYTES {
            bail_corrupt!(
                "{}: feature {id}: detail blob decodes to more than {MAX_DETAIL_BYTES} bytes",
                self.path.display()
            );
        }
        Ok(Some(
            serde_json::from_slice(&json)
                .with_context(|| format!("{}: feature {id}: bad detail record", self.path.display()))?,
        ))
    }

    /// Feature `id` as its page shows it (`None` past the last feature): the `features` row, its explanations,
    /// and its detail blob with token ids turned into text. The browser's `GET /api/features/{id}` ends here
    /// (the whole path: DEVELOPERS.md, "Where things are").
    pub fn feature(&self, id: u32) -> AnalysisResult<Option<FeatureRecord>> {
        self.named(self.read_feature(id))
    }

    fn read_feature(&self, id: u32) -> Result<Option<FeatureRecord>> {
        type Row = (f64, f64, f64, i64, Option<String>, i64, f64, f64);
        let row: Option<Row> = self
            .conn()?
            .prepare_cached(
                "SELECT density, max_act, mean_act, n_fired, explanation, explanation_auto, x, y \
                 FROM features WHERE id = ?1",
            )?
            .query_row([id as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?))
            })
            .optional()?;
        let Some((density, max_act, mean_act, n_fired, explanation, auto, x, y)) = row else { return Ok(None) };
        let explanations = autointerp_db::explanations_of(&*self.conn()?, id)
            .with_context(|| format!("{}: feature {id}: reading its explanations", self.path.display()))?;
        let d = self.detail(id)?.unwrap_or_default();
        let vocab = self.vocab()?;
        let text = |t: u32| vocab.get(t as usize).cloned().unwrap_or_else(|| format!("<{t}>"));
        // A stored context whose peak or activations point outside its tokens is corrupt: say so
        // here rather than let every page and command index out of bounds.
        let ctx = |c: &StoredContext| -> Result<Context> {
            let n = c.ids.len();
            if c.peak as usize >= n || c.acts.iter().any(|&(o, _)| o as usize >= n) {
                bail_corrupt!(
                    "{}: feature {id}: a stored context has its peak at {} or activations past its {n} tokens",
                    self.path.display(),
                    c.peak
                );
            }
            let mut acts = vec![0f32; n];
            for &(o, a) in &c.acts {
                acts[o as usize] = a;
            }
            Ok(Context {
                tokens: c.ids.iter().map(|&t| text(t)).collect(),
                acts,
                peak: c.peak as usize,
                max_act: c.max_act,
            })
        };
        let logits =
            |v: &[(u32, f32)]| v.iter().map(|&(t, l)| TokenLogit { token: text(t), id: t, logit: l }).collect();
        let first = d.hist_first as usize;
        let nb = self.hist_edges.len().saturating_sub(1);
        let mut counts = vec![0u64; nb];
        for (i, &c) in d.hist.iter().enumerate() {
            if let Some(slot) = counts.get_mut(first + i) {
                *slot = c;
            }
        }
        Ok(Some(FeatureRecord {
            id,
            density,
            max_act: max_act as f32,
            mean_act: mean_act as f32,
            n_fired: n_fired as u64,
            explanation,
            explanation_auto: auto != 0,
            top_contexts: d.top.iter().map(ctx).collect::<Result<_>>()?,
            quantiles: d
                .quantiles
                .iter()
                .map(|g| {
                    Ok(QuantileGroup {
                        lo: g.lo,
                        hi: g.hi,
                        count: g.count,
                        contexts: g.contexts.iter().map(ctx).collect::<Result<_>>()?,
                    })
                })
                .collect::<Result<_>>()?,
            histogram: Histogram { edges: self.hist_edges.clone(), counts },
            promoted: logits(&d.promoted),
            suppressed: logits(&d.suppressed),
            neighbours: d.neighbours.iter().map(|&(i, c)| Neighbour { id: i, cosine: c }).collect(),
            x: x as f32,
            y: y as f32,
            explanations,
        }))
    }

    /// The held-out windows `analyze` kept for the autointerp scorers (empty for older databases).
    pub fn heldout(&self) -> AnalysisResult<Vec<HeldOutWindow>> {
        let windows = autointerp_db::heldout_windows(&*self.conn()?);
        Ok(windows.with_context(|| format!("{}: held-out windows", self.path.display()))?)
    }

    /// A page of features: `limit` of them from `offset` on, in `sort` order (ties by id).
    pub fn list(
        &self,
        sort: SortBy,
        descending: bool,
        offset: usize,
        limit: usize,
    ) -> AnalysisResult<Vec<FeatureSummary>> {
        self.named(self.read_list(sort, descending, offset, limit))
    }

    fn read_list(&self, sort: SortBy, descending: bool, offset: usize, limit: usize) -> Result<Vec<FeatureSummary>> {
        let col = match sort {
            SortBy::Density => "density",
            SortBy::MaxAct => "max_act",
            SortBy::Id => "id",
        };
        let dir = if descending { "DESC" } else { "ASC" };
        // ties broken by id so pages are stable
        let sql = format!(
            "SELECT id, density, max_act, top_tokens FROM features ORDER BY {col} {dir}, id {dir} LIMIT ?1 OFFSET ?2"
        );
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(&sql)?;
        let rows = st.query_map(params![limit as i64, offset as i64], summary_row)?;
        rows.map(|r| r.map_err(Into::into).and_then(|r| r)).collect()
    }

    /// A feature id, or words matched (all of them, prefix-free) against each feature's peak tokens,
    /// their surrounding context, promoted tokens and explanation; best matches first (bm25).
    pub fn search(&self, query: &str, limit: usize) -> AnalysisResult<Vec<FeatureSummary>> {
        self.named(self.read_search(query, limit))
    }

    fn read_search(&self, query: &str, limit: usize) -> Result<Vec<FeatureSummary>> {
        let q = query.trim();
        if let Ok(id) = q.trim_start_matches('#').parse::<u32>() {
            return Ok(self.summary(id)?.into_iter().collect());
        }
        let words: Vec<String> = q
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(|w| format!("\"{}\"", w.replace('"', "")))
            .collect();
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let fts = words.join(" ");
        // features whose LLM explanation matches come first, then matches in contexts and tokens
        let explained = autointerp_db::search_explanations(&*self.conn()?, &fts, limit)?;
        let mut out: Vec<FeatureSummary> = Vec::new();
        for id in explained {
            out.extend(self.summary(id)?);
        }
        let conn = self.conn()?;
        let mut st = conn.prepare_cached(
            "SELECT f.id, f.density, f.max_act, f.top_tokens FROM \
             (SELECT rowid AS id, rank FROM feature_text WHERE feature_text MATCH ?1 ORDER BY rank LIMIT ?2) m \
             JOIN features f ON f.id = m.id ORDER BY m.rank",
        )?;
        let rows = st.query_map(params![fts, limit as i64], summary_row)?;
        for r in rows {
            let r = r??;
            if out.len() < limit && !out.iter().any(|o| o.id == r.id) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Feature `id`'s summary (`None` when the database has no such feature).
    pub fn summary(&self, id: u32) -> AnalysisResult<Option<FeatureSummary>> {
        self.named(self.read_summary(id))
    }

    fn read_summary(&self, id: u32) -> Result<Option<FeatureSummary>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached("SELECT id, density, max_act, top_tokens FROM features WHERE id = ?1")?;
        st.query_row([id as i64], summary_row).optional()?.transpose()
    }

    /// Summaries of many features in one call (ids that are missing are skipped).
    pub fn summaries(&self, ids: &[u32]) -> AnalysisResult<HashMap<u32, FeatureSummary>> {
        let mut out = HashMap::new();
        for &id in ids {
            if let Some(s) = self.summary(id)? {
                out.insert(id, s);
            }
        }
        Ok(out)
    }

    /// Every feature's point on the 2-D map, by id.
    pub fn map(&self) -> AnalysisResult<Vec<MapPoint>> {
        self.named(self.read_map())
    }

    fn read_map(&self) -> Result<Vec<MapPoint>> {
        let conn = self.conn()?;
        let mut st = conn.prepare_cached("SELECT id, x, y, density, max_act FROM features ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok(MapPoint {
                id: r.get::<_, i64>(0)? as u32,
                x: r.get::<_, f64>(1)? as f32,
                y: r.get::<_, f64>(2)? as f32,
                density: r.get(3)?,
                max_act: r.get::<_, f64>(4)? as f32,
            })
        })?;
        rows.map(|r| r.map_err(Into::into)).collect()
    }

    /// The number of features in the database.
    pub fn len(&self) -> AnalysisResult<u64> {
        let n = self.conn()?.query_row("SELECT COUNT(*) FROM features", [], |r| r.get::<_, i64>(0));
        Ok(self.named(n.map_err(Into::into))? as u64)
    }

    /// Whether the database holds no feature.
    pub fn is_empty(&self) -> AnalysisResult<bool> {
        Ok(self.len()? == 0)
    }
}

fn summary_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<FeatureSummary>> {
    let id = r.get::<_, i64>(0)? as u32;
    let tt: String = r.get(3)?;
    Ok(serde_json::from_str(&tt).with_context(|| format!("feature {id}: bad top_tokens")).map(|top_tokens| {
        FeatureSummary {
            id,
            density: r.get(1).unwrap_or(0.0),
            max_act: r.get::<_, f64>(2).unwrap_or(0.0) as f32,
            top_tokens,
        }
    }))
}
