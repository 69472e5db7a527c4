//! Where training rows come from: the [`ActivationSource`] trait and its `.npy` implementation.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A stream of activation rows `[d_in]` in a reproducible order, or of (input, target) row pairs
/// (a transcoder's data: [`ActivationSource::d_out`] is `Some`).
///
/// The trainer stores [`ActivationSource::cursor`] in every checkpoint and restores it with
/// [`ActivationSource::seek`], so a resumed run reads exactly the rows the uninterrupted run reads.
pub trait ActivationSource: Send {
    /// Width of a row (a pair's input).
    fn d_in(&self) -> usize;
    /// Width of a pair's target when the source yields (input, target) pairs; `None` when each row
    /// is its own target (an SAE's data).
    fn d_out(&self) -> Option<usize> {
        None
    }
    /// Fill `out` (`[rows, d_in]`) with the next rows; returns how many rows were written (fewer
    /// only if the source is finite and ran out).
    fn next_batch(&mut self, out: &mut [f32]) -> Result<usize>;
    /// A pair source's next pairs: inputs into `x` (`[rows, d_in]`) and their targets into `y`
    /// (`[rows, d_out]`, row `i` the target of input row `i`); returns how many pairs were written.
    fn next_pairs(&mut self, x: &mut [f32], y: &mut [f32]) -> Result<usize> {
        let _ = (x, y);
        bail!("{} yields single rows, not (input, target) pairs", self.describe())
    }
    /// Serialisable position (JSON) for resume.
    fn cursor(&self) -> serde_json::Value;
    /// Go back (or forward) to a position [`ActivationSource::cursor`] returned.
    fn seek(&mut self, cursor: &serde_json::Value) -> Result<()>;
    /// One line for logs: file name, rows, order.
    fn describe(&self) -> String;
    /// What the rows are (model, hook, tokens) and a fingerprint of their content. The trained SAE's
    /// metadata comes from here, and a resume refuses data whose fingerprint changed.
    fn provenance(&self) -> Result<Provenance> {
        Ok(Provenance::default())
    }
    /// `(replica, replicas)` when this source serves one data-parallel replica's own share of the
    /// data (`train --live` under mpirun: each replica forwards its own contexts), so that the replica
    /// reads only its rows of each batch; `None` when every replica reads the whole stream and
    /// trains on its rows of each batch.
    fn replica_share(&self) -> Option<(usize, usize)> {
        None
    }
}

/// Facts about a source's rows, as recorded with the SAE trained on them; empty fields are unknown.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Provenance {
    /// The model that made the rows.
    pub model_name: String,
    /// The hook point they were read at (a pair source's inputs).
    pub hook_name: String,
    /// A pair source's target hook point (empty: the rows are their own target).
    pub hook_name_out: String,
    /// Tokens per context.
    pub context_size: Option<usize>,
    /// Fingerprint of the tokenizer's vocabulary.
    pub tokenizer_fingerprint: String,
    /// Which rows the source leaves out as attention sinks, in words.
    pub sink_rule: String,
    /// Content fingerprint of the data (not its path).
    pub data_fingerprint: String,
}

/// A float32 C-order `.npy` file `[N, d_in]`, memory-mapped, read in a seeded random order that is
/// re-shuffled every epoch (cycles forever).
pub struct NpySource {
    path: PathBuf,
    map: Mmap,
    data_offset: usize,
    rows: usize,
    d_in: usize,
    seed: u64,
    shuffle: bool,
    epoch: u64,
    pos: usize,
    perm: Vec<u32>,
}

/// The parts of a `.npy` header saekit uses.
/// The header of a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    /// numpy dtype string, e.g. `<f4`
    pub descr: String,
    /// Column-major data (refused: saekit reads C order).
    pub fortran_order: bool,
    /// The array's shape.
    pub shape: Vec<usize>,
    /// Where the array data starts.
    pub data_offset: usize,
}

/// numpy never writes a header this long; a larger declared length is corruption, not data.
pub const NPY_MAX_HEADER_BYTES: usize = 1 << 20;

impl NpyHeader {
    /// Bytes of array data the header declares for `elem_bytes`-sized elements; `None` when the
    /// shape's product overflows (a corrupt or hostile header).
    pub fn data_bytes(&self, elem_bytes: usize) -> Option<usize> {
        self.shape.iter().try_fold(elem_bytes, |acc, &d| acc.checked_mul(d))
    }
}

/// Length of the `.npy` preamble (magic, version, header length) and the header text it declares.
/// `bytes` must hold at least the first 12 bytes of the file, or the whole file when shorter.
pub fn npy_preamble(bytes: &[u8], path: &Path) -> Result<(usize, usize)> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("{}: not a .npy file (bad magic)", path.display());
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                bail!("{}: truncated .npy header", path.display());
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => bail!("{}: .npy format version {v} is not supported (1, 2 or 3)", path.display()),
    };
    if hlen > NPY_MAX_HEADER_BYTES {
        bail!("{}: .npy header declares {hlen} bytes; numpy headers are far smaller (corrupt file?)", path.display());
    }
    Ok((start, hlen))
}

/// Parse a `.npy` header from the start of the file (`bytes` may hold more than the header).
pub fn npy_header(bytes: &[u8], path: &Path) -> Result<NpyHeader> {
    let (start, hlen) = npy_preamble(bytes, path)?;
    let end = start + hlen;
    if bytes.len() < end {
        bail!("{}: truncated .npy header", path.display());
    }
    let h =
        std::str::from_utf8(&bytes[start..end]).with_context(|| format!("{}: header is not UTF-8", path.display()))?;
    let descr = h.split("'descr':").nth(1).and_then(|s| s.split('\'').nth(1)).unwrap_or("").to_string();
    let shape_s = h
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .with_context(|| format!("{}: no shape in .npy header", path.display()))?;
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: bad shape {shape_s:?}", path.display()))?;
    Ok(NpyHeader { descr, fortran_order: h.contains("'fortran_order': True"), shape, data_offset: end })
}

/// Parse a `.npy` header: (data offset, shape). Only little-endian f32, C order.
pub fn npy_f32_header(bytes: &[u8], path: &Path) -> Result<(usize, Vec<usize>)> {
    let h = npy_header(bytes, path)?;
    if h.descr != "<f4" {
        bail!("{}: dtype {:?} unsupported; saekit reads float32 ('<f4') activations, convert with np.asarray(a, dtype=np.float32)", path.display(), h.descr);
    }
    if h.fortran_order {
        bail!("{}: Fortran-order array; save it with np.ascontiguousarray", path.display());
    }
    Ok((h.data_offset, h.shape))
}

/// Write a float32 `[rows, cols]` `.npy` (atomically: temp file + fsync + rename).
pub fn write_npy_f32(path: &Path, data: &[f32], rows: usize, cols: usize) -> Result<()> {
    assert_eq!(data.len(), rows * cols);
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let total = 10 + header.len() + 1;
    let pad = (64 - total % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    saekit_files::write_atomic_with(path, |f| {
        f.write_all(b"\x93NUMPY\x01\x00")?;
        f.write_all(&(header.len() as u16).to_le_bytes())?;
        f.write_all(header.as_bytes())?;
        f.write_all(&bytes)?;
        Ok(())
    })
}

impl NpySource {
    /// Map a float32 `[N, d_in]` .npy; rows are read in an order shuffled by `seed` each epoch
    /// (or in file order).
    pub fn open(path: impl AsRef<Path>, seed: u64, shuffle: bool) -> Result<NpySource> {
        let path = path.as_ref().to_path_buf();
        let f = File::open(&path).with_context(|| format!("opening activations {}", path.display()))?;
        // SAFETY: read-only map; the file is not expected to change while training.
        let map = unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
        let (off, shape) = npy_f32_header(&map, &path)?;
        if shape.len() != 2 {
            bail!("{}: expected a 2-D array [N, d_in], got shape {shape:?}", path.display());
        }
        let (rows, d_in) = (shape[0], shape[1]);
        if rows == 0 || d_in == 0 {
            bail!("{}: empty array {shape:?}", path.display());
        }
        let need = rows.checked_mul(d_in).and_then(|n| n.checked_mul(4)).and_then(|n| n.checked_add(off));
        if need.is_none_or(|need| map.len() < need) {
            bail!("{}: file is shorter than its header's shape {shape:?}", path.display());
        }
        if rows > u32::MAX as usize {
            bail!("{}: more than 2^32 rows", path.display());
        }
        let mut s =
            NpySource { path, map, data_offset: off, rows, d_in, seed, shuffle, epoch: 0, pos: 0, perm: Vec::new() };
        s.make_perm();
        Ok(s)
    }

    /// Rows in the file.
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn make_perm(&mut self) {
        self.perm = (0..self.rows as u32).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ self.epoch);
            self.perm.shuffle(&mut rng);
        }
    }

    /// Row `r` of the file (file order).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let b = &self.map[self.data_offset + r * self.d_in * 4..self.data_offset + (r + 1) * self.d_in * 4];
        for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }

    /// All rows in file order (eval).
    pub fn read_all(&self) -> Vec<f32> {
        let mut v = vec![0.0f32; self.rows * self.d_in];
        for (r, o) in v.chunks_mut(self.d_in).enumerate() {
            self.row(r, o);
        }
        v
    }
}

impl ActivationSource for NpySource {
    fn d_in(&self) -> usize {
        self.d_in
    }
    fn next_batch(&mut self, out: &mut [f32]) -> Result<usize> {
        let n = out.len() / self.d_in;
        let mut picked = Vec::with_capacity(n);
        for _ in 0..n {
            if self.pos >= self.rows {
                self.epoch += 1;
                self.pos = 0;
                self.make_perm();
            }
            picked.push(self.perm[self.pos] as usize);
            self.pos += 1;
        }
        // the rows are scattered over the file: copied in parallel, each read waits on its own pages
        out[..n * self.d_in].par_chunks_mut(self.d_in).zip(picked).for_each(|(o, r)| self.row(r, o));
        Ok(n)
    }
    fn cursor(&self) -> serde_json::Value {
        serde_json::json!({"kind": "npy", "epoch": self.epoch, "pos": self.pos, "seed": self.seed, "shuffle": self.shuffle, "rows": self.rows})
    }
    fn seek(&mut self, c: &serde_json::Value) -> Result<()> {
        let get = |k: &str| c.get(k).and_then(|v| v.as_u64()).with_context(|| format!("npy cursor lacks {k:?}: {c}"));
        if get("rows")? as usize != self.rows {
            bail!(
                "{}: has {} rows but the checkpoint was taken on a file with {}",
                self.path.display(),
                self.rows,
                get("rows")?
            );
        }
        self.seed = get("seed")?;
        self.shuffle = c.get("shuffle").and_then(|v| v.as_bool()).unwrap_or(true);
        self.epoch = get("epoch")?;
        self.pos = get("pos")? as usize;
        self.make_perm();
        Ok(())
    }
    fn describe(&self) -> String {
        format!(
            "{} [{} x {}] f32, {} order (seed {})",
            self.path.display(),
            self.rows,
            self.d_in,
            if self.shuffle { "shuffled" } else { "file" },
            self.seed
        )
    }
    fn provenance(&self) -> Result<Provenance> {
        // a bare array says nothing about its model or hook; its bytes are its identity
        let (bytes, crc) = saekit_files::file_crc32(&self.path)?;
        Ok(Provenance { data_fingerprint: format!("npy:{bytes}:{crc:08x}"), ..Default::default() })
    }
}

/// The two single-row sources behind a pair source, read in step: row `i` of both is one token.
pub(crate) struct Paired<S> {
    pub input: S,
    pub target: S,
    /// The cursor's `kind`.
    kind: &'static str,
}

impl<S: ActivationSource> Paired<S> {
    pub fn new(input: S, target: S, kind: &'static str) -> Paired<S> {
        Paired { input, target, kind }
    }

    /// Width of the targets.
    pub fn d_out(&self) -> usize {
        self.target.d_in()
    }

    /// The next inputs into `x` and as many targets into `y`; refuses a target count that differs.
    pub fn read(&mut self, x: &mut [f32], y: &mut [f32]) -> Result<usize> {
        let n = self.input.next_batch(x)?;
        let m = self.target.next_batch(&mut y[..n * self.d_out()])?;
        if n != m {
            bail!("{}: read {n} inputs but {m} targets", self.target.describe());
        }
        Ok(n)
    }

    pub fn cursor(&self) -> serde_json::Value {
        serde_json::json!({"kind": self.kind, "input": self.input.cursor(), "target": self.target.cursor()})
    }

    pub fn seek(&mut self, c: &serde_json::Value) -> Result<()> {
        let part = |k: &str| c.get(k).with_context(|| format!("not a {} position: {c}", self.kind));
        self.input.seek(part("input")?)?;
        self.target.seek(part("target")?)
    }
}

/// (input, target) row pairs from two float32 `.npy` files with the same number of rows: row `i` of
/// `target` is the target of row `i` of `input` (e.g. an MLP's input and output at the same
/// tokens). Both are read in the same seeded order.
pub struct NpyPairSource {
    rows: Paired<NpySource>,
}

impl NpyPairSource {
    /// Map both files; their row counts must agree.
    pub fn open(input: impl AsRef<Path>, target: impl AsRef<Path>, seed: u64, shuffle: bool) -> Result<NpyPairSource> {
        let (input, target) = (NpySource::open(input, seed, shuffle)?, NpySource::open(target, seed, shuffle)?);
        if input.rows() != target.rows() {
            bail!(
                "{} has {} rows but {} has {}: a transcoder's inputs and targets must be the same tokens, row for row",
                input.path.display(),
                input.rows(),
                target.path.display(),
                target.rows()
            );
        }
        Ok(NpyPairSource { rows: Paired::new(input, target, "npy_pair") })
    }
}

impl ActivationSource for NpyPairSource {
    fn d_in(&self) -> usize {
        self.rows.input.d_in
    }
    fn d_out(&self) -> Option<usize> {
        Some(self.rows.d_out())
    }
    fn next_batch(&mut self, _out: &mut [f32]) -> Result<usize> {
        bail!("{}: a pair source is read in pairs (next_pairs)", self.describe())
    }
    fn next_pairs(&mut self, x: &mut [f32], y: &mut [f32]) -> Result<usize> {
        self.rows.read(x, y)
    }
    fn cursor(&self) -> serde_json::Value {
        self.rows.cursor()
    }
    fn seek(&mut self, c: &serde_json::Value) -> Result<()> {
        self.rows.seek(c)
    }
    fn describe(&self) -> String {
        format!("inputs {} -> targets {}", self.rows.input.describe(), self.rows.target.describe())
    }
    fn provenance(&self) -> Result<Provenance> {
        let (a, b) = (self.rows.input.provenance()?, self.rows.target.provenance()?);
        Ok(Provenance { data_fingerprint: format!("{}+{}", a.data_fingerprint, b.data_fingerprint), ..a })
    }
}
