//! Reading named tensors as f32 from a GGUF file or a folder of safetensors, with shape checks.
//!
//! Quantized GGUF blocks (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized once at load: on AVX2 CPUs
//! without VNNI the f32 GEMM is both the fastest and the only exact path (see BENCHMARKS.md).
//!
//! Safetensors files are memory-mapped and each tensor is decoded straight from the mapping into
//! its f32 copy, after which its pages are handed back to the kernel: a 2B model in bf16 is then
//! held once, not three times (mapped bf16, a bf16 copy and the f32 result). A token embedding can
//! also stay in the mapping ([`Table::Mapped`]): a model loaded without its head only looks rows up,
//! and only the rows looked up are then read.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use memmap2::{Mmap, UncheckedAdvice};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

/// candle attaches a multi-line backtrace to its errors when RUST_BACKTRACE is set; users need one line.
pub(crate) fn candle_msg(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(*inner),
        e => e.to_string().lines().next().unwrap_or_default().to_string(),
    }
}

pub enum WeightSource {
    Gguf { file: PathBuf, content: gguf_file::Content },
    Safetensors { files: Vec<PathBuf>, maps: Vec<Arc<Mmap>>, tensors: HashMap<String, StoredTensor> },
}

/// Where one tensor of a safetensors folder lies: which mapped file, and its bytes in it.
pub struct StoredTensor {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

impl WeightSource {
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut r = BufReader::new(f);
        // candle divides by general.alignment unchecked; read it first so 0 is an error, not a panic
        if let Some(a) =
            gguf_alignment(&mut r).map_err(|e| anyhow!("{}: not a valid GGUF file: {e}", path.display()))?
        {
            if a == 0 || !a.is_multiple_of(8) {
                bail!(
                    "{}: not a valid GGUF file: general.alignment = {a} (must be a non-zero multiple of 8)",
                    path.display()
                );
            }
        }
        r.seek(SeekFrom::Start(0)).with_context(|| format!("{}: cannot read", path.display()))?;
        let content = gguf_file::Content::read(&mut r)
            .map_err(|e| anyhow!("{}: not a valid GGUF file: {}", path.display(), candle_msg(e)))?;
        Ok(Self::Gguf { file: path.to_path_buf(), content })
    }

    /// Open every `*.safetensors` of a Hugging Face folder (the shards named by
    /// `model.safetensors.index.json` when it exists).
    pub fn open_safetensors(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let s = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&s).with_context(|| format!("{}: invalid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("{}: cannot list folder", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            bail!("{}: no *.safetensors files in the folder", dir.display());
        }
        for f in &files {
            if !f.exists() {
                bail!("{}: shard listed in the index is missing", f.display());
            }
        }
        let (mut maps, mut tensors) = (Vec::new(), HashMap::new());
        for (i, f) in files.iter().enumerate() {
            let map = map_file(f)?;
            let (header, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| anyhow!("{}: not a valid safetensors file (truncated or corrupt?): {e}", f.display()))?;
            let data = 8 + header;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                let t =
                    StoredTensor { file: i, dtype: info.dtype, shape: info.shape.clone(), bytes: data + a..data + b };
                tensors.insert(name, t);
            }
            maps.push(Arc::new(map));
        }
        Ok(Self::Safetensors { files, maps, tensors })
    }

    pub fn describe(&self) -> String {
        match self {
            WeightSource::Gguf { file, .. } => file.display().to_string(),
            WeightSource::Safetensors { files, .. } => {
                files.first().and_then(|f| f.parent()).map(|p| p.display().to_string()).unwrap_or_default()
            }
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            WeightSource::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            WeightSource::Safetensors { tensors, .. } => tensors.contains_key(name),
        }
    }

    /// The tensor's shape in PyTorch order (`[d_out, d_in]` for a linear weight).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            WeightSource::Gguf { content, .. } => content.tensor_infos.get(name).map(|t| t.shape.dims().to_vec()),
            WeightSource::Safetensors { tensors, .. } => tensors.get(name).map(|t| t.shape.clone()),
        }
    }

    /// Load a tensor as f32, checking that its shape is `expected` (PyTorch order).
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let shape = self.shape(name).ok_or_else(|| anyhow!("{}: missing tensor '{name}'", self.describe()))?;
        if shape != expected {
            bail!("{}: tensor '{name}' has shape {shape:?} but the model config implies {expected:?}", self.describe());
        }
        let t = match self {
            WeightSource::Gguf { file, content } => {
                let f = File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
                let mut r = BufReader::new(f);
                let q = content
                    .tensor(&mut r, name, &Device::Cpu)
                    .map_err(|e| anyhow!("{}: tensor '{name}': {}", file.display(), candle_msg(e)))?;
                let t = q
                    .dequantize(&Device::Cpu)
                    .map_err(|e| anyhow!("{}: cannot dequantize '{name}': {}", file.display(), candle_msg(e)))?;
                t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(|e| {
                    anyhow!("{}: tensor '{name}' cannot be read as f32: {}", self.describe(), candle_msg(e))
                })?
            }
            WeightSource::Safetensors { files, maps, tensors } => {
                let st = tensors.get(name).ok_or_else(|| anyhow!("{}: missing tensor '{name}'", self.describe()))?;
                let map = &maps[st.file];
                let t = decode_f32(&map[st.bytes.clone()], st.dtype).ok_or_else(|| {
                    anyhow!("{}: tensor '{name}' cannot be read as f32: dtype {:?}", files[st.file].display(), st.dtype)
                })?;
                // SAFETY: the map is a read-only private file mapping, so dropped pages are read back
                // from the file if touched again (a tied head reads the embedding twice); no reference
                // into them outlives this call.
                let _ =
                    unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, st.bytes.start, st.bytes.len()) };
                t
            }
        };
        if let Some(bad) = t.iter().position(|v| !v.is_finite()) {
            bail!("{}: tensor '{name}' holds a non-finite value at element {bad}", self.describe());
        }
        Ok(t)
    }

    /// A `[rows, width]` table (a token embedding), checked like [`get`](Self::get). With `mapped`, a
    /// safetensors tensor stored as f32, bf16 or f16 stays in the file's mapping and is decoded a row at
    /// a time; anything else is decoded now.
    pub fn table(&self, name: &str, expected: &[usize], mapped: bool) -> Result<Table> {
        let width = expected.last().copied().unwrap_or(1);
        let WeightSource::Safetensors { files, maps, tensors } = self else {
            return Ok(Table::Owned(self.get(name, expected)?));
        };
        match tensors.get(name) {
            Some(st) if mapped && width > 0 && matches!(st.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) => {
                let shape = &st.shape;
                if shape != expected {
                    bail!(
                        "{}: tensor '{name}' has shape {shape:?} but the model config implies {expected:?}",
                        self.describe()
                    );
                }
                let table =
                    Table::Mapped { map: maps[st.file].clone(), bytes: st.bytes.clone(), dtype: st.dtype, width };
                if let Some(bad) = table.first_non_finite() {
                    bail!("{}: tensor '{name}' holds a non-finite value at element {bad}", files[st.file].display());
                }
                Ok(table)
            }
            _ => Ok(Table::Owned(self.get(name, expected)?)),
        }
    }

    /// Like [`get`](Self::get) but `None` when the tensor is absent (optional biases, untied heads).
    pub fn get_opt(&self, name: &str, expected: &[usize]) -> Result<Option<Vec<f32>>> {
        if self.has(name) {
            self.get(name, expected).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match self {
            WeightSource::Gguf { content, .. } => Some(content),
            _ => None,
        }
    }
}

/// A `[rows, width]` table read a row at a time: a token embedding.
pub enum Table {
    /// Decoded to f32, row-major.
    Owned(Vec<f32>),
    /// Still in a safetensors file's read-only mapping (`bytes` of it, little-endian `dtype`): a row is
    /// decoded when looked up, and only the pages of rows looked up are ever read.
    Mapped { map: Arc<Mmap>, bytes: Range<usize>, dtype: Dtype, width: usize },
}

impl Table {
    /// Row `r` as f32 into `out` (one row's width of values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        match self {
            Table::Owned(v) => out.copy_from_slice(&v[r * out.len()..][..out.len()]),
            Table::Mapped { map, bytes, dtype, width } => {
                let w = byte_width(*dtype).expect("mapped tables are f32, bf16 or f16");
                decode_f32_into(&map[bytes.start + r * width * w..][..width * w], *dtype, out);
            }
        }
    }

    /// The whole table as f32: borrowed, or decoded from the mapping (a full copy).
    pub fn values(&self) -> Cow<'_, [f32]> {
        match self {
            Table::Owned(v) => Cow::Borrowed(v),
            Table::Mapped { map, bytes, dtype, .. } => {
                Cow::Owned(decode_f32(&map[bytes.clone()], *dtype).expect("mapped tables are f32, bf16 or f16"))
            }
        }
    }

    /// The first non-finite element of a mapped table, read a slice at a time, each slice's pages
    /// handed back once read: checking does not leave the table resident.
    fn first_non_finite(&self) -> Option<usize> {
        let Table::Mapped { map, bytes, dtype, .. } = self else { return None };
        const SLICE: usize = 1 << 20;
        let w = byte_width(*dtype)?;
        (bytes.start..bytes.end).step_by(SLICE * w).enumerate().find_map(|(i, at)| {
            let len = (SLICE * w).min(bytes.end - at);
            let found = decode_f32(&map[at..at + len], *dtype)?.iter().position(|v| !v.is_finite());
            // SAFETY: as in `WeightSource::get`: a read-only private mapping, no reference kept.
            let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, at, len) };
            found.map(|p| i * SLICE + p)
        })
    }
}

/// Map `path` read-only.
fn map_file(path: &Path) -> Result<Mmap> {
    let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: mapped read-only; modifying the files while saekit runs is not supported.
    unsafe { Mmap::map(&f) }.with_context(|| format!("{}: cannot map", path.display()))
}

/// Bytes per element of the dtypes [`decode_f32_into`] reads; `None` for any other.
fn byte_width(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::BF16 | Dtype::F16 => Some(2),
        Dtype::F64 => Some(8),
        _ => None,
    }
}

/// Little-endian f32 / f16 / bf16 / f64 bytes as a new f32 vector; `None` for any other dtype.
fn decode_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    let mut out = vec![0f32; bytes.len() / byte_width(dtype)?];
    decode_f32_into(bytes, dtype, &mut out);
    Some(out)
}

/// Little-endian f32 / f16 / bf16 / f64 bytes as f32 into `out`, one value per element (in parallel:
/// a 2B model is gigabytes of them); other dtypes leave `out` as it is ([`byte_width`] says which).
fn decode_f32_into(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    match dtype {
        Dtype::F32 => decode::<4>(bytes, out, f32::from_le_bytes),
        Dtype::BF16 => decode::<2>(bytes, out, |b| half::bf16::from_le_bytes(b).to_f32()),
        Dtype::F16 => decode::<2>(bytes, out, |b| half::f16::from_le_bytes(b).to_f32()),
        Dtype::F64 => decode::<8>(bytes, out, |b| f64::from_le_bytes(b) as f32),
        _ => {}
    }
}

fn decode<const W: usize>(bytes: &[u8], out: &mut [f32], value: impl Fn([u8; W]) -> f32 + Sync) {
    const CHUNK: usize = 1 << 16;
    let run = |o: &mut [f32], b: &[u8]| {
        for (v, c) in o.iter_mut().zip(b.chunks_exact(W)) {
            *v = value(c.try_into().expect("chunks_exact gives W bytes"));
        }
    };
    if out.len() <= CHUNK {
        run(out, bytes); // one embedding row per looked-up token: no hand-off to the thread pool
    } else {
        out.par_chunks_mut(CHUNK).zip(bytes.par_chunks(CHUNK * W)).for_each(|(o, b)| run(o, b));
    }
}

/// The value of `general.alignment` as candle would read it (an integer key of any width; a
/// negative one means the default), without keeping the metadata. A header this walk cannot get
/// past is left for candle's reader to report.
fn gguf_alignment(r: &mut BufReader<File>) -> std::io::Result<Option<u64>> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut buf = [0u8; 8];
    let mut int = |r: &mut BufReader<File>, n: usize| -> std::io::Result<u64> {
        buf = [0; 8];
        r.read_exact(&mut buf[..n])?;
        Ok(u64::from_le_bytes(buf))
    };
    let magic = int(r, 4)?;
    let version = int(r, 4)?;
    if magic != 0x4655_4747 || !(1..=3).contains(&version) {
        return Ok(None);
    }
    let len_bytes = if version == 1 { 4 } else { 8 };
    let _n_tensors = int(r, len_bytes)?;
    let n_kv = int(r, len_bytes)?;
    // Byte size of a fixed-size value type (u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64).
    let fixed = |t: u64| match t {
        0 | 1 | 7 => Some(1u64),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    let skip = |r: &mut BufReader<File>, n: u64| -> std::io::Result<()> {
        r.seek_relative(i64::try_from(n).map_err(|_| bad("length overflows"))?)
    };
    for _ in 0..n_kv {
        let klen = int(r, len_bytes)?;
        if klen > 1 << 16 {
            return Ok(None);
        }
        let mut key = vec![0u8; klen as usize];
        r.read_exact(&mut key)?;
        let t = int(r, 4)?;
        if key == b"general.alignment" {
            let v: i64 = match t {
                0 => int(r, 1)? as i64,
                1 => int(r, 1)? as u8 as i8 as i64,
                2 => int(r, 2)? as i64,
                3 => int(r, 2)? as u16 as i16 as i64,
                4 => int(r, 4)? as i64,
                5 => int(r, 4)? as u32 as i32 as i64,
                _ => return Ok(None),
            };
            return Ok((v >= 0).then_some(v as u64));
        }
        if let Some(n) = fixed(t) {
            skip(r, n)?;
        } else if t == 8 {
            let n = int(r, len_bytes)?;
            skip(r, n)?;
        } else if t == 9 {
            let et = int(r, 4)?;
            let n = int(r, len_bytes)?;
            if let Some(sz) = fixed(et) {
                skip(r, n.checked_mul(sz).ok_or_else(|| bad("array size overflows"))?)?;
            } else if et == 8 {
                for _ in 0..n {
                    let l = int(r, len_bytes)?;
                    skip(r, l)?;
                }
            } else {
                return Ok(None); // nested arrays: candle's reader walks and bounds them
            }
        } else {
            return Ok(None);
        }
    }
    Ok(None)
}
