//! The on-disk activation store: a directory of immutable shards plus `manifest.json`.
//!
//! ```text
//! OUT/manifest.json            model, hooks, dtype, counts, running statistics, one entry per shard (+ CRC32)
//! OUT/shard-000000.bin         header | tokens u32[n] | positions u32[n] | marks u8[n] | hook 0 acts | hook 1 acts ...
//! ```
//! Each section starts on a 64-byte boundary, so a memory map can be viewed as `&[u32]`, `&[u16]` or
//! `&[f32]` directly. Rows are token positions, context after context; every position is stored, and the
//! attention sinks (position 0, BOS, end-of-text) carry a bit in `marks` so training can skip them.
//!
//! The manifest is the source of truth: a shard exists once the manifest lists it. Shards are written
//! `tmp + fsync + rename`, then the manifest is rewritten the same way, so a crash at any point leaves
//! either a listed, complete shard or an unlisted file that the next writer deletes and recomputes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{bad_input, corrupt, ensure_input, ensure_intact, StoreResult};
use saekit_files::Fault;
use saekit_files::{read_json, sync_dir, write_atomic_with, write_json_atomic};

/// The manifest's file name inside a store folder.
pub const MANIFEST: &str = "manifest.json";
/// The manifest's `format`: what tells an activation store from other folders.
pub const STORE_FORMAT: &str = "saekit-activations";
/// The manifest version this saekit writes and reads.
pub const STORE_VERSION: u32 = 1;
const SHARD_MAGIC: &[u8; 8] = b"SAEKACT1";
const HEADER_BYTES: usize = 64;
const ALIGN: usize = 64;

/// Row marks (bit flags). Rows are kept on disk; readers skip marked rows by default.
pub mod marks {
    /// First position of a context: an attention sink whatever the token.
    pub const POS0: u8 = 1;
    /// The BOS token.
    pub const BOS: u8 = 2;
    /// The end-of-text / document separator token (also an attention sink in SmolLM2).
    pub const EOT: u8 = 4;
    /// Norm above `outlier_factor` × the shard's median norm at any hook: the attention sinks found by
    /// measurement (in SmolLM2 a few tokens away from position 0 carry ~100× the median norm and most of
    /// the variance; which ones depends on the text, so no token id is assumed to be one).
    pub const OUTLIER: u8 = 8;
    /// Every mark: skip any marked row.
    pub const ALL: u8 = POS0 | BOS | EOT | OUTLIER;
}

/// Element type of the stored activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit IEEE floats: exact, twice the size of the others.
    F32,
    /// 16-bit IEEE floats: finer than bf16, but values above 65504 do not fit (refused on write).
    F16,
    /// bfloat16: f32's range with 8 bits of mantissa, the default.
    #[default]
    Bf16,
}

impl Dtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
    fn code(self) -> u32 {
        match self {
            Dtype::F32 => 0,
            Dtype::F16 => 1,
            Dtype::Bf16 => 2,
        }
    }
    /// Append `src` converted to this dtype (round to nearest even) to `dst`.
    pub fn encode(self, src: &[f32], dst: &mut Vec<u8>) {
        match self {
            Dtype::F32 => {
                for v in src {
                    dst.extend_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::F16 => {
                for v in src {
                    dst.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            Dtype::Bf16 => {
                for v in src {
                    dst.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
        }
    }
    /// Convert little-endian stored bytes to f32.
    pub fn decode(self, src: &[u8], dst: &mut [f32]) {
        debug_assert_eq!(src.len(), dst.len() * self.size());
        match self {
            Dtype::F32 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
            Dtype::F16 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
                }
            }
            Dtype::Bf16 => {
                // bf16 is the top half of an f32: a shift, which the compiler vectorises.
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
                }
            }
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = crate::StoreError;
    fn from_str(s: &str) -> StoreResult<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Dtype::F32),
            "f16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            _ => Err(bad_input!("unknown dtype {s:?} (expected f32, f16 or bf16)").into()),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        })
    }
}

/// Byte offsets of the sections of one shard file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShardLayout {
    pub n_rows: usize,
    pub tokens: usize,
    pub positions: usize,
    pub marks: usize,
    pub acts: usize,
    pub hook_stride: usize,
    pub total: usize,
}

impl ShardLayout {
    /// The layout of a shard of `n_rows` rows; `None` when its size overflows (a corrupt manifest).
    pub fn new(n_rows: usize, d_model: usize, n_hooks: usize, dtype: Dtype) -> Option<Self> {
        let up = |x: usize| x.checked_next_multiple_of(ALIGN);
        let tokens = HEADER_BYTES;
        let positions = up(tokens.checked_add(n_rows.checked_mul(4)?)?)?;
        let marks = up(positions.checked_add(n_rows.checked_mul(4)?)?)?;
        let acts = up(marks.checked_add(n_rows)?)?;
        let hook_stride = up(n_rows.checked_mul(d_model)?.checked_mul(dtype.size())?)?;
        let total = acts.checked_add(hook_stride.checked_mul(n_hooks)?)?;
        Some(ShardLayout { n_rows, tokens, positions, marks, acts, hook_stride, total })
    }
}

/// Where the harvested tokens came from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SourceInfo {
    /// The tokenized dataset directory (or a free-form description).
    pub tokens: String,
    /// The split of the dataset.
    pub split: String,
    /// Index of the first context of the split used by this store.
    pub first_context: u64,
    /// Content fingerprint of the token dataset (its manifest, which lists every shard's CRC32): a
    /// dataset rebuilt at the same path is another dataset.
    #[serde(default)]
    pub fingerprint: String,
}

/// Model facts recorded in the manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// The model's name.
    pub name: String,
    /// The model file or folder the activations came from.
    pub path: String,
    /// The model's blocks.
    pub n_layers: usize,
    /// The model's residual width.
    pub d_model: usize,
    /// The model's vocabulary size.
    pub vocab_size: usize,
    /// What the forward pass's products ran in, `"f32"` or `"bf16"` (`saekit harvest --precision`);
    /// stores from before the choice existed were f32. Part of the config, so a resumed harvest does
    /// not mix the two.
    #[serde(default = "f32_precision")]
    pub precision: String,
}

fn f32_precision() -> String {
    "f32".into()
}

impl Default for ModelInfo {
    fn default() -> Self {
        let precision = f32_precision();
        ModelInfo { name: String::new(), path: String::new(), n_layers: 0, d_model: 0, vocab_size: 0, precision }
    }
}

/// Everything that defines a store; a resumed harvest must present the same config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoreConfig {
    /// The model the activations came from.
    pub model: ModelInfo,
    /// The hook points stored, in the order of each shard's activation blocks.
    pub hooks: Vec<String>,
    /// Width of each row.
    pub d_model: usize,
    /// How values are stored.
    pub dtype: Dtype,
    /// Tokens per context (rows per context).
    pub context: usize,
    /// Contexts per shard file.
    pub contexts_per_shard: usize,
    /// Token ids marked `marks::BOS`: the BOS the tokenizer puts at the start of each context, `None`
    /// when it adds none (a chat model's `<|im_start|>` is then an ordinary token, kept unless its norm
    /// says otherwise).
    pub bos_token: Option<u32>,
    /// Token ids marked `marks::EOT` (end-of-text, EOS, document separator).
    pub eot_tokens: Vec<u32>,
    /// Mark rows whose norm exceeds this multiple of the shard median (`marks::OUTLIER`); the reference
    /// harvest drops the same rows (10 × median). `None` disables.
    pub outlier_factor: Option<f32>,
    /// The tokens the activations are of.
    pub source: SourceInfo,
    /// Fingerprint of the tokenizer vocabulary the tokens were made with (empty: unknown).
    #[serde(default)]
    pub tokenizer_fingerprint: String,
}

impl StoreConfig {
    /// The marking rule in words, as recorded with an SAE trained on the store.
    pub fn sink_rule(&self) -> String {
        sink_rule_text(self.bos_token, &self.eot_tokens, self.outlier_factor)
    }
}

/// One wording of the sink rule for stores and live rows, so an SAE says what its data left out.
pub fn sink_rule_text(bos: Option<u32>, eot: &[u32], outlier_factor: Option<f32>) -> String {
    let mut parts = vec!["position 0".to_string()];
    if let Some(b) = bos {
        parts.push(format!("BOS id {b}"));
    }
    if !eot.is_empty() {
        let ids: Vec<String> = eot.iter().map(|t| t.to_string()).collect();
        parts.push(format!("end-of-text ids {}", ids.join(",")));
    }
    if let Some(f) = outlier_factor {
        parts.push(format!("norm > {f}x shard median"));
    }
    parts.join("; ")
}

/// One shard file as the manifest lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    /// The file's name inside the store folder (`shard-NNNNNN.bin`).
    pub file: String,
    /// Rows (tokens) in the shard.
    pub n_rows: u64,
    /// Contexts in the shard.
    pub n_contexts: u64,
    /// Index (within the store) of the shard's first context.
    pub first_context: u64,
    /// Rows with any mark.
    pub n_marked: u64,
    /// The file's size.
    pub bytes: u64,
    /// CRC32 of the whole file, checked on open.
    pub crc32: u32,
    /// Per hook (manifest order): the median norm of the rows not marked by position or token, the base
    /// of the outlier threshold (empty in stores written before it was recorded).
    #[serde(default)]
    pub median_norms: Vec<f32>,
    /// Rows marked `marks::OUTLIER` (by their norm).
    #[serde(default)]
    pub n_outliers: u64,
}

/// Running statistics of one hook: over unmarked rows (what training sees), plus norms of marked rows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct HookStats {
    /// Unmarked rows the statistics cover.
    pub n_rows: u64,
    /// Per-dimension mean.
    pub mean: Vec<f32>,
    /// Per-dimension variance (population).
    pub var: Vec<f32>,
    /// Sum of `var`: E‖x − mean‖², the denominator of FVU.
    pub total_variance: f64,
    /// Mean L2 norm of rows.
    pub mean_norm: f64,
    /// Mean squared L2 norm of rows (SAELens `expected_average_only_in` wants √d / √this).
    pub mean_sq_norm: f64,
    /// Largest L2 norm of an unmarked row.
    pub max_norm: f64,
    /// Marked rows seen (not in the statistics above).
    pub marked_rows: u64,
    /// Mean L2 norm of the marked rows.
    pub marked_mean_norm: f64,
    /// Largest L2 norm of a marked row.
    pub marked_max_norm: f64,
    /// Exact running sums, so a resumed harvest continues the statistics bit for bit.
    #[serde(default)]
    pub sums: StatSums,
}

/// The exact sums behind [`HookStats`], in f64.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct StatSums {
    /// Per-dimension sum of the unmarked rows.
    pub sum: Vec<f64>,
    /// Per-dimension sum of squares of the unmarked rows.
    pub sum_sq: Vec<f64>,
    /// Sum of the unmarked rows' L2 norms.
    pub norm: f64,
    /// Sum of the unmarked rows' squared L2 norms.
    pub sq_norm: f64,
    /// Sum of the marked rows' L2 norms.
    pub marked_norm: f64,
}

impl HookStats {
    pub(crate) fn new(d: usize) -> Self {
        HookStats {
            mean: vec![0.0; d],
            var: vec![0.0; d],
            sums: StatSums { sum: vec![0.0; d], sum_sq: vec![0.0; d], ..Default::default() },
            ..Default::default()
        }
    }

    /// Accumulate one row.
    fn add(&mut self, row: &[f32], marked: bool) {
        let sq: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let norm = sq.sqrt();
        if marked {
            self.marked_rows += 1;
            self.sums.marked_norm += norm;
            self.marked_max_norm = self.marked_max_norm.max(norm);
            return;
        }
        self.n_rows += 1;
        self.sums.norm += norm;
        self.sums.sq_norm += sq;
        self.max_norm = self.max_norm.max(norm);
        for ((s, q), &v) in self.sums.sum.iter_mut().zip(self.sums.sum_sq.iter_mut()).zip(row) {
            let v = v as f64;
            *s += v;
            *q += v * v;
        }
    }

    pub(crate) fn merge(&mut self, o: &HookStats) {
        self.n_rows += o.n_rows;
        self.marked_rows += o.marked_rows;
        self.max_norm = self.max_norm.max(o.max_norm);
        self.marked_max_norm = self.marked_max_norm.max(o.marked_max_norm);
        self.sums.norm += o.sums.norm;
        self.sums.sq_norm += o.sums.sq_norm;
        self.sums.marked_norm += o.sums.marked_norm;
        for (a, b) in self.sums.sum.iter_mut().zip(&o.sums.sum) {
            *a += b;
        }
        for (a, b) in self.sums.sum_sq.iter_mut().zip(&o.sums.sum_sq) {
            *a += b;
        }
        self.finalize();
    }

    fn finalize(&mut self) {
        let n = self.n_rows.max(1) as f64;
        let mut total = 0.0;
        for i in 0..self.sums.sum.len() {
            let m = self.sums.sum[i] / n;
            let v = (self.sums.sum_sq[i] / n - m * m).max(0.0);
            self.mean[i] = m as f32;
            self.var[i] = v as f32;
            total += v;
        }
        self.total_variance = total;
        self.mean_norm = self.sums.norm / n;
        self.mean_sq_norm = self.sums.sq_norm / n;
        self.marked_mean_norm = self.sums.marked_norm / self.marked_rows.max(1) as f64;
    }

    /// The scalar that makes E‖s·x‖² = d_model (Anthropic April 2024 / SAELens `expected_average_only_in`).
    pub fn norm_scale(&self) -> f64 {
        (self.mean.len() as f64 / self.mean_sq_norm.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// `manifest.json` of an activation store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoreManifest {
    /// Always [`STORE_FORMAT`].
    pub format: String,
    /// [`STORE_VERSION`] when written.
    pub version: u32,
    /// What defines the store (flattened into the manifest's top level).
    #[serde(flatten)]
    pub config: StoreConfig,
    /// Rows stored, over all shards.
    pub n_tokens: u64,
    /// Contexts stored, over all shards.
    pub n_contexts: u64,
    /// Rows with any mark, over all shards.
    pub n_marked: u64,
    /// True once the writer reached its target and closed the store.
    pub complete: bool,
    /// The shard files, in order.
    pub shards: Vec<ShardEntry>,
    /// Statistics per hook name.
    pub stats: BTreeMap<String, HookStats>,
    /// Free-form facts from the producer (harvest timing, tokens/s, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl StoreManifest {
    /// Width of each row.
    pub fn d_model(&self) -> usize {
        self.config.d_model
    }
    /// The hook points stored.
    pub fn hooks(&self) -> &[String] {
        &self.config.hooks
    }
    /// How values are stored.
    pub fn dtype(&self) -> Dtype {
        self.config.dtype
    }
    /// Rows stored.
    pub fn n_tokens(&self) -> u64 {
        self.n_tokens
    }
    /// The marking rule with what was measured: the median norm the outlier threshold is a multiple of
    /// (the median over shards, per hook) and the share of rows it marked. Recorded with an SAE.
    pub fn sink_rule(&self) -> String {
        let c = &self.config;
        let mut rule = sink_rule_text(c.bos_token, &c.eot_tokens, c.outlier_factor);
        let measured: Vec<String> = c
            .hooks
            .iter()
            .enumerate()
            .filter_map(|(h, name)| {
                let mut m: Vec<f32> = self.shards.iter().filter_map(|s| s.median_norms.get(h).copied()).collect();
                if m.is_empty() {
                    return None;
                }
                let mid = m.len() / 2;
                let med = *m.select_nth_unstable_by(mid, f32::total_cmp).1;
                Some(format!("{med:.3} at {name}"))
            })
            .collect();
        if c.outlier_factor.is_some() && !measured.is_empty() {
            let outliers: u64 = self.shards.iter().map(|s| s.n_outliers).sum();
            let pct = 100.0 * outliers as f64 / self.n_tokens.max(1) as f64;
            rule.push_str(&format!(" (median {}; {outliers} rows, {pct:.2}%, above it)", measured.join(", ")));
        }
        rule
    }

    /// Statistics of one hook (over unmarked rows).
    pub fn stats(&self, hook: &str) -> Option<&HookStats> {
        self.stats.get(hook)
    }
    /// Index of `hook` in `hooks`; an empty name picks the only hook.
    pub fn hook_index(&self, hook: &str) -> StoreResult<usize> {
        if hook.is_empty() {
            ensure_input!(
                self.config.hooks.len() == 1,
                "the store holds several hooks ({}); name one",
                self.config.hooks.join(", ")
            );
            return Ok(0);
        }
        let position = self.config.hooks.iter().position(|h| h == hook);
        let missing = || bad_input!("hook {hook:?} is not in the store (it has {})", self.config.hooks.join(", "));
        Ok(position.ok_or_else(missing)?)
    }
}

/// Mark (`marks::OUTLIER`) every row whose norm at any hook exceeds `factor` × that hook's median norm
/// over the rows not already marked (position 0, BOS, end-of-text). Returns the medians per hook (0
/// when every row is marked) and how many rows were marked by norm alone or in addition.
fn mark_outliers(acts: &[Vec<u8>], mk: &mut [u8], factor: f32, d: usize, dtype: Dtype) -> (Vec<f32>, u64) {
    let row_bytes = d * dtype.size();
    let per_hook: Vec<(f32, Vec<bool>)> = acts
        .par_iter()
        .map(|a| {
            let mut row = vec![0f32; d];
            let norms: Vec<f32> = a
                .chunks_exact(row_bytes)
                .map(|b| {
                    dtype.decode(b, &mut row);
                    row.iter().map(|v| v * v).sum::<f32>().sqrt()
                })
                .collect();
            let mut base: Vec<f32> = norms.iter().zip(mk.iter()).filter(|(_, &m)| m == 0).map(|(&x, _)| x).collect();
            if base.is_empty() {
                return (0.0, vec![false; norms.len()]);
            }
            let mid = base.len() / 2;
            let median = *base.select_nth_unstable_by(mid, f32::total_cmp).1;
            (median, norms.iter().map(|&x| x > factor * median).collect())
        })
        .collect();
    for (_, flags) in &per_hook {
        for (m, &o) in mk.iter_mut().zip(flags) {
            if o {
                *m |= marks::OUTLIER;
            }
        }
    }
    let n_outliers = mk.iter().filter(|&&m| m & marks::OUTLIER != 0).count() as u64;
    (per_hook.into_iter().map(|(med, _)| med).collect(), n_outliers)
}

/// The statistics of stored rows (`(row bytes, mark)` in store order), as a shard adds them to its hook's.
fn rows_stats<'a>(rows: impl Iterator<Item = (&'a [u8], u8)>, c: &StoreConfig) -> HookStats {
    let mut st = HookStats::new(c.d_model);
    let mut row = vec![0f32; c.d_model];
    for (b, m) in rows {
        c.dtype.decode(b, &mut row);
        st.add(&row, m != 0);
    }
    st
}

/// The statistics of hook `h`'s rows in a listed shard, equal to those its writer merged.
pub(crate) fn shard_hook_stats(view: &ShardView<'_>, h: usize, c: &StoreConfig) -> HookStats {
    rows_stats((0..view.n_rows()).map(|r| (view.row_bytes(h, r), view.marks()[r])), c)
}

// ------------------------------------------------------------------------------------------ writer

/// Appends contexts to a store, flushing a shard every `contexts_per_shard` contexts.
pub struct ActivationWriter {
    dir: PathBuf,
    manifest: StoreManifest,
    layout_rows: usize,
    tokens: Vec<u32>,
    acts: Vec<Vec<u8>>,
    /// Test hook: fail a shard write after this many bytes, as a full disk would.
    #[doc(hidden)]
    pub fail_after_bytes: Option<u64>,
}

impl ActivationWriter {
    /// Create a new store in `dir` (which must be empty or missing), or resume the one there if its
    /// manifest matches `config` and every listed shard has its recorded size and CRC32. Leftovers of
    /// an interrupted write (the next shard renamed just before a crash, `*.tmp`) are removed.
    pub fn create_or_resume(dir: &Path, config: StoreConfig) -> StoreResult<Self> {
        ensure_input!(
            config.context > 0 && config.contexts_per_shard > 0,
            "context and contexts_per_shard must be > 0"
        );
        ensure_input!(!config.hooks.is_empty(), "no hook points given");
        let mpath = dir.join(MANIFEST);
        if !mpath.exists() {
            // no manifest: nothing here is ours, and a store must not delete someone else's files
            saekit_files::ensure_only_owned(dir, "activation store", saekit_files::is_temp_name)
                .map_err(|e| Fault::BadInput.mark(e))?;
        }
        fs::create_dir_all(dir).with_context(|| format!("cannot create output directory {}", dir.display()))?;
        let manifest = if mpath.exists() {
            let m: StoreManifest = read_json(&mpath)?;
            ensure_input!(m.format == STORE_FORMAT, "{} is not an activation store manifest", mpath.display());
            let (then, now) = (&m.config.source, &config.source);
            if then.fingerprint != now.fingerprint && then.tokens == now.tokens {
                return Err(bad_input!(
                    "{} was harvested from the token dataset at {}, which has changed since (fingerprint {} then, {} now); harvest into a new directory",
                    dir.display(),
                    now.tokens,
                    then.fingerprint,
                    now.fingerprint
                )
                .into());
            }
            if m.config != config {
                return Err(bad_input!(
                    "{} holds a store with a different configuration; use a new directory or the same options\n  existing: {}\n  requested: {}",
                    dir.display(),
                    serde_json::to_string(&m.config).unwrap_or_default(),
                    serde_json::to_string(&config).unwrap_or_default()
                )
                .into());
            }
            m
        } else {
            let d = config.d_model;
            let stats = config.hooks.iter().map(|h| (h.clone(), HookStats::new(d))).collect();
            let m = StoreManifest {
                format: STORE_FORMAT.into(),
                version: STORE_VERSION,
                config,
                n_tokens: 0,
                n_contexts: 0,
                n_marked: 0,
                complete: false,
                shards: vec![],
                stats,
                extra: BTreeMap::new(),
            };
            write_json_atomic(&mpath, &m).with_context(|| format!("cannot write the manifest in {}", dir.display()))?;
            m
        };
        remove_interrupted_writes(dir, &manifest)?;
        verify_listed_shards(dir, &manifest)?;
        let d = manifest.config.d_model;
        let n_hooks = manifest.config.hooks.len();
        let layout_rows = manifest.config.context * manifest.config.contexts_per_shard;
        Ok(ActivationWriter {
            dir: dir.to_path_buf(),
            layout_rows,
            tokens: Vec::with_capacity(layout_rows),
            acts: (0..n_hooks).map(|_| Vec::with_capacity(layout_rows * d * manifest.config.dtype.size())).collect(),
            manifest,
            fail_after_bytes: None,
        })
    }

    /// The manifest as last written (or about to be).
    pub fn manifest(&self) -> &StoreManifest {
        &self.manifest
    }

    /// Contexts safely on disk; a resumed harvest continues from here.
    pub fn contexts_done(&self) -> u64 {
        self.manifest.n_contexts
    }

    /// Contexts accepted so far (on disk + buffered).
    pub fn contexts_pushed(&self) -> u64 {
        self.manifest.n_contexts + (self.tokens.len() / self.manifest.config.context) as u64
    }

    fn mark(&self, pos: usize, tok: u32) -> u8 {
        let c = &self.manifest.config;
        let mut m = 0;
        if pos == 0 {
            m |= marks::POS0;
        }
        if c.bos_token == Some(tok) {
            m |= marks::BOS;
        }
        if c.eot_tokens.contains(&tok) {
            m |= marks::EOT;
        }
        m
    }

    /// Append whole contexts: `tokens` holds k·context ids, `acts[h]` the matching k·context·d_model values
    /// of hook h (in manifest hook order).
    pub fn push(&mut self, tokens: &[u32], acts: &[&[f32]]) -> StoreResult<()> {
        let ctx = self.manifest.config.context;
        let d = self.manifest.config.d_model;
        let dtype = self.manifest.config.dtype;
        ensure_input!(
            tokens.len().is_multiple_of(ctx),
            "push: {} tokens is not a whole number of {ctx}-token contexts",
            tokens.len()
        );
        ensure_input!(acts.len() == self.acts.len(), "push: {} hook arrays for {} hooks", acts.len(), self.acts.len());
        for a in acts {
            ensure_input!(
                a.len() == tokens.len() * d,
                "push: activation array has {} values, expected {}",
                a.len(),
                tokens.len() * d
            );
        }
        let mut start = 0;
        while start < tokens.len() {
            let room = self.layout_rows - self.tokens.len();
            let take = room.min(tokens.len() - start);
            for (h, a) in acts.iter().enumerate() {
                let part = &a[start * d..(start + take) * d];
                if dtype == Dtype::F16 {
                    // f16 saturates to infinity above 65504; attention sinks of larger models get there.
                    if let Some(v) = part.iter().find(|v| v.abs() > 65504.0) {
                        return Err(bad_input!(
                            "activation {v} of hook {} does not fit f16 (max 65504); store as bf16 or f32",
                            self.manifest.config.hooks[h]
                        )
                        .into());
                    }
                }
                dtype.encode(part, &mut self.acts[h]);
            }
            self.tokens.extend_from_slice(&tokens[start..start + take]);
            start += take;
            if self.tokens.len() == self.layout_rows {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Write the buffered contexts as one shard and record it in the manifest. The buffer is kept when
    /// the write fails, so the caller may retry after freeing space.
    pub fn flush(&mut self) -> StoreResult<()> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let c = self.manifest.config.clone();
        let n = self.tokens.len();
        let idx = self.manifest.shards.len();
        let file = format!("shard-{idx:06}.bin");
        let path = self.dir.join(&file);
        let layout = ShardLayout::new(n, c.d_model, c.hooks.len(), c.dtype).context("shard size overflows")?;
        let positions: Vec<u32> = (0..n).map(|r| (r % c.context) as u32).collect();
        let mut mk: Vec<u8> = (0..n).map(|r| self.mark(r % c.context, self.tokens[r])).collect();
        let d = c.d_model;
        let row_bytes = d * c.dtype.size();
        // Outliers: norm far above the median of this shard's rows not marked by position or token.
        let (median_norms, n_outliers) = match c.outlier_factor {
            Some(factor) => mark_outliers(&self.acts, &mut mk, factor, d, c.dtype),
            None => (vec![], 0),
        };
        let n_marked = mk.iter().filter(|&&m| m != 0).count() as u64;
        // Statistics of the stored (rounded) values: what a reader will return.
        let shard_stats: Vec<HookStats> =
            self.acts.par_iter().map(|a| rows_stats(a.chunks_exact(row_bytes).zip(mk.iter().copied()), &c)).collect();

        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(SHARD_MAGIC);
        header[8..12].copy_from_slice(&STORE_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&c.dtype.code().to_le_bytes());
        header[16..24].copy_from_slice(&(n as u64).to_le_bytes());
        header[24..28].copy_from_slice(&(c.d_model as u32).to_le_bytes());
        header[28..32].copy_from_slice(&(c.hooks.len() as u32).to_le_bytes());
        header[32..36].copy_from_slice(&(c.context as u32).to_le_bytes());

        let mut crc = crc32fast::Hasher::new();
        let fail_after = self.fail_after_bytes;
        let acts = &self.acts;
        let tokens = &self.tokens;
        write_atomic_with(&path, |f| {
            let mut w =
                CrcWriter { inner: BufWriter::with_capacity(1 << 20, f), crc: &mut crc, written: 0, fail_after };
            w.write_all(&header)?;
            w.write_all(as_bytes_u32(tokens))?;
            w.pad_to(layout.positions)?;
            w.write_all(as_bytes_u32(&positions))?;
            w.pad_to(layout.marks)?;
            w.write_all(&mk)?;
            for (h, a) in acts.iter().enumerate() {
                w.pad_to(layout.acts + h * layout.hook_stride)?;
                w.write_all(a)?;
            }
            w.pad_to(layout.total)?;
            w.inner.flush()?;
            Ok(())
        })
        .with_context(|| {
            format!(
                "the store in {} is unchanged; free space or fix permissions and rerun to resume",
                self.dir.display()
            )
        })?;

        let n_contexts = (n / c.context) as u64;
        let mut m = self.manifest.clone();
        m.complete = false;
        m.shards.push(ShardEntry {
            file,
            n_rows: n as u64,
            n_contexts,
            first_context: m.n_contexts,
            n_marked,
            bytes: layout.total as u64,
            crc32: crc.finalize(),
            median_norms,
            n_outliers,
        });
        m.n_tokens += n as u64;
        m.n_contexts += n_contexts;
        m.n_marked += n_marked;
        for (h, name) in c.hooks.iter().enumerate() {
            if let Some(st) = m.stats.get_mut(name) {
                st.merge(&shard_stats[h]);
            }
        }
        if let Err(e) = write_json_atomic(&self.dir.join(MANIFEST), &m) {
            // The shard is on disk but unlisted: remove it so the directory matches the old manifest.
            let _ = fs::remove_file(&path);
            let dir = self.dir.display();
            return Err(e.context(format!("cannot update the manifest in {dir}; the store is unchanged")).into());
        }
        self.manifest = m;
        self.tokens.clear();
        for a in &mut self.acts {
            a.clear();
        }
        Ok(())
    }

    /// Record a free-form fact in the manifest (written with the next shard or at `finish`).
    pub fn set_extra(&mut self, key: &str, value: serde_json::Value) {
        self.manifest.extra.insert(key.to_string(), value);
    }

    /// Flush what is buffered and mark the store complete.
    pub fn finish(mut self) -> StoreResult<StoreManifest> {
        self.flush()?;
        self.manifest.complete = true;
        write_json_atomic(&self.dir.join(MANIFEST), &self.manifest)?;
        Ok(self.manifest)
    }
}

/// Remove what an interrupted write leaves: temporaries, and shard files numbered at or past the
/// manifest's count (written, not yet listed). Other files are not the store's and are kept.
fn remove_interrupted_writes(dir: &Path, manifest: &StoreManifest) -> Result<()> {
    let listed = manifest.shards.len();
    for ent in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let ent = ent?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let unlisted_shard = name
            .strip_prefix("shard-")
            .and_then(|n| n.strip_suffix(".bin"))
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|i| i >= listed);
        if unlisted_shard || saekit_files::is_temp_name(&name) {
            tracing::info!("removing {} (not in the manifest: left by an interrupted write)", name);
            fs::remove_file(ent.path()).with_context(|| format!("cannot remove {}", ent.path().display()))?;
        }
    }
    Ok(())
}

/// Before appending, every listed shard must be there with its recorded size and CRC32: a resumed
/// harvest must not build on a missing or corrupt shard that a reader would only find later.
fn verify_listed_shards(dir: &Path, manifest: &StoreManifest) -> Result<()> {
    let bad: Vec<String> = manifest
        .shards
        .par_iter()
        .filter_map(|s| {
            let p = dir.join(&s.file);
            match saekit_files::file_crc32(&p) {
                Err(_) => Some(format!("{} is missing or unreadable", p.display())),
                Ok((len, _)) if len != s.bytes => {
                    Some(format!("{} has {len} bytes, the manifest says {}", p.display(), s.bytes))
                }
                Ok((_, crc)) if crc != s.crc32 => {
                    Some(format!("{} has crc32 {crc:08x}, the manifest says {:08x}", p.display(), s.crc32))
                }
                Ok(_) => None,
            }
        })
        .collect();
    ensure_intact!(
        bad.is_empty(),
        "cannot resume the store in {}: {}; harvest into a new folder (or --overwrite)",
        dir.display(),
        bad.join("; ")
    );
    Ok(())
}

struct CrcWriter<'a, W: Write> {
    inner: W,
    crc: &'a mut crc32fast::Hasher,
    written: usize,
    fail_after: Option<u64>,
}

impl<W: Write> CrcWriter<'_, W> {
    fn write_all(&mut self, b: &[u8]) -> Result<()> {
        if let Some(limit) = self.fail_after {
            if (self.written + b.len()) as u64 > limit {
                return Err(std::io::Error::from_raw_os_error(28).into()); // ENOSPC
            }
        }
        self.crc.update(b);
        self.inner.write_all(b)?;
        self.written += b.len();
        Ok(())
    }
    fn pad_to(&mut self, off: usize) -> Result<()> {
        debug_assert!(off >= self.written);
        let zeros = vec![0u8; off - self.written];
        self.write_all(&zeros)
    }
}

fn as_bytes_u32(v: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u8; the store is little-endian only.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

// ------------------------------------------------------------------------------------------ store

/// Options for [`ActivationStore::open_with`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Verify every shard's CRC32 (reads the whole store once; parallel).
    pub verify: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { verify: true }
    }
}

pub(crate) struct StoreInner {
    pub dir: PathBuf,
    pub manifest: StoreManifest,
    pub maps: Vec<Mmap>,
    pub layouts: Vec<ShardLayout>,
}

/// A read-only, memory-mapped activation store. Cheap to clone.
#[derive(Clone)]
pub struct ActivationStore {
    pub(crate) inner: Arc<StoreInner>,
}

impl ActivationStore {
    /// Open the store in `dir`, checking every shard's size and CRC32.
    pub fn open(dir: &Path) -> StoreResult<ActivationStore> {
        Self::open_with(dir, &OpenOptions::default())
    }

    /// Open the store in `dir`, checking every shard's size and header, and its CRC32 if `opts` asks.
    pub fn open_with(dir: &Path, opts: &OpenOptions) -> StoreResult<ActivationStore> {
        let mpath = dir.join(MANIFEST);
        ensure_input!(mpath.exists(), "{} is not an activation store (no {MANIFEST})", dir.display());
        let manifest: StoreManifest = read_json(&mpath)?;
        ensure_input!(manifest.format == STORE_FORMAT, "{} is not an activation store manifest", mpath.display());
        ensure_input!(
            manifest.version == STORE_VERSION,
            "{}: unsupported store version {}",
            mpath.display(),
            manifest.version
        );
        let layouts = check_manifest(&manifest, &mpath)?;
        let mut maps = Vec::with_capacity(manifest.shards.len());
        for (s, layout) in manifest.shards.iter().zip(&layouts) {
            let p = dir.join(&s.file);
            let f = File::open(&p).with_context(|| format!("shard {} is missing or unreadable", p.display()))?;
            let len = f.metadata().with_context(|| format!("cannot read {}", p.display()))?.len();
            ensure_intact!(
                len == s.bytes && len == layout.total as u64,
                "shard {} is truncated or has the wrong size: {} bytes, expected {}",
                p.display(),
                len,
                s.bytes
            );
            // SAFETY: shards are immutable once listed; the store never rewrites a listed file.
            let map = unsafe { Mmap::map(&f) }.with_context(|| format!("cannot map {}", p.display()))?;
            ensure_intact!(&map[..8] == SHARD_MAGIC, "shard {} has a bad header", p.display());
            #[cfg(unix)]
            let _ = map.advise(memmap2::Advice::WillNeed);
            maps.push(map);
        }
        if opts.verify {
            let bad: Vec<String> = manifest
                .shards
                .par_iter()
                .zip(maps.par_iter())
                .filter_map(|(s, m)| {
                    let crc = crc32fast::hash(m);
                    (crc != s.crc32)
                        .then(|| format!("{} (crc32 {crc:08x}, manifest {:08x})", dir.join(&s.file).display(), s.crc32))
                })
                .collect();
            ensure_intact!(bad.is_empty(), "corrupt shard(s): {}", bad.join("; "));
        }
        Ok(ActivationStore { inner: Arc::new(StoreInner { dir: dir.to_path_buf(), manifest, maps, layouts }) })
    }

    /// The manifest read at open.
    pub fn manifest(&self) -> &StoreManifest {
        &self.inner.manifest
    }

    /// The store's folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Shard files in the store.
    pub fn n_shards(&self) -> usize {
        self.inner.maps.len()
    }

    /// A view of one shard: token ids, positions, marks and rows of any hook.
    pub fn shard(&self, i: usize) -> ShardView<'_> {
        ShardView { store: &self.inner, i }
    }
}

/// Borrowed view of one shard file.
pub struct ShardView<'a> {
    store: &'a StoreInner,
    i: usize,
}

impl<'a> ShardView<'a> {
    /// Rows in the shard.
    pub fn n_rows(&self) -> usize {
        self.store.layouts[self.i].n_rows
    }
    /// The shard's manifest entry.
    pub fn entry(&self) -> &'a ShardEntry {
        &self.store.manifest.shards[self.i]
    }
    fn bytes(&self, off: usize, len: usize) -> &'a [u8] {
        &self.store.maps[self.i][off..off + len]
    }
    /// Token id of each row.
    pub fn tokens(&self) -> &'a [u32] {
        let l = self.store.layouts[self.i];
        cast_u32(self.bytes(l.tokens, 4 * l.n_rows))
    }
    /// Position of each row within its context.
    pub fn positions(&self) -> &'a [u32] {
        let l = self.store.layouts[self.i];
        cast_u32(self.bytes(l.positions, 4 * l.n_rows))
    }
    /// Marks of each row (`marks::*` bits).
    pub fn marks(&self) -> &'a [u8] {
        let l = self.store.layouts[self.i];
        self.bytes(l.marks, l.n_rows)
    }
    /// Raw stored bytes of row `r` of hook `h`.
    pub fn row_bytes(&self, h: usize, r: usize) -> &'a [u8] {
        row_bytes(self.store, self.i, h, r)
    }
    /// Row `r` of hook `h` as f32.
    pub fn row(&self, h: usize, r: usize, out: &mut [f32]) {
        self.store.manifest.config.dtype.decode(self.row_bytes(h, r), out)
    }
}

pub(crate) fn row_bytes(s: &StoreInner, shard: usize, h: usize, r: usize) -> &[u8] {
    let l = s.layouts[shard];
    let row = s.manifest.config.d_model * s.manifest.config.dtype.size();
    let off = l.acts + h * l.hook_stride + r * row;
    &s.maps[shard][off..off + row]
}

fn cast_u32(b: &[u8]) -> &[u32] {
    assert!((b.as_ptr() as usize).is_multiple_of(4) && b.len().is_multiple_of(4));
    // SAFETY: alignment and length checked; u32 accepts any bit pattern.
    unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u32, b.len() / 4) }
}

fn is_store_file(name: &str) -> bool {
    name == MANIFEST
        || name.starts_with("shard-")
        || saekit_files::is_temp_name(name)
        || crate::parts::is_part_dir_name(name)
}

/// Everything a reader assumes of a manifest, checked before any shard is mapped or indexed:
/// widths and counts that agree with each other, layouts whose sizes do not overflow, shard files
/// that are plain names inside the store. Returns each shard's layout.
fn check_manifest(m: &StoreManifest, mpath: &Path) -> Result<Vec<ShardLayout>> {
    let c = &m.config;
    let bad = |what: String| corrupt!("{}: inconsistent manifest: {what}", mpath.display());
    if c.d_model == 0 || c.hooks.is_empty() || c.context == 0 || c.contexts_per_shard == 0 {
        return Err(bad("d_model, hooks, context and contexts_per_shard must be non-empty".into()));
    }
    let mut next_context = 0u64;
    let mut layouts = Vec::with_capacity(m.shards.len());
    for s in &m.shards {
        let plain = s.file.starts_with("shard-") && !s.file.contains(['/', '\\']) && s.file != "..";
        if !plain {
            return Err(bad(format!("shard file name {:?} is not a shard-* file of the store", s.file)));
        }
        let rows = s.n_contexts.checked_mul(c.context as u64);
        if rows != Some(s.n_rows) || s.n_contexts > c.contexts_per_shard as u64 || s.first_context != next_context {
            return Err(bad(format!(
                "{}: {} rows, {} contexts from {} (context {}, {} per shard, expected first context {next_context})",
                s.file, s.n_rows, s.n_contexts, s.first_context, c.context, c.contexts_per_shard
            )));
        }
        next_context += s.n_contexts;
        let layout = usize::try_from(s.n_rows)
            .ok()
            .and_then(|n| ShardLayout::new(n, c.d_model, c.hooks.len(), c.dtype))
            .ok_or_else(|| {
                bad(format!("{}: the size of {} rows of width {} overflows", s.file, s.n_rows, c.d_model))
            })?;
        layouts.push(layout);
    }
    if next_context != m.n_contexts {
        return Err(bad(format!("the shards hold {next_context} contexts, the manifest says {}", m.n_contexts)));
    }
    for (hook, st) in &m.stats {
        if st.mean.len() != c.d_model || st.var.len() != c.d_model {
            return Err(bad(format!("statistics of {hook} have width {}, not d_model {}", st.mean.len(), c.d_model)));
        }
    }
    Ok(layouts)
}

/// Delete a store directory's files (manifest, shards, temporaries), for `--overwrite`; a folder that
/// holds anything else is refused, untouched.
pub fn remove_store(dir: &Path) -> StoreResult<()> {
    if !dir.exists() {
        return Ok(());
    }
    saekit_files::ensure_only_owned(dir, "activation store (--overwrite)", is_store_file)
        .map_err(|e| Fault::BadInput.mark(e))?;
    for ent in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let ent = ent.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if crate::parts::is_part_dir_name(&name) {
            fs::remove_dir_all(ent.path()).with_context(|| format!("cannot remove {}", ent.path().display()))?;
        } else if is_store_file(&name) {
            fs::remove_file(ent.path()).with_context(|| format!("cannot remove {}", ent.path().display()))?;
        }
    }
    Ok(sync_dir(dir)?)
}
