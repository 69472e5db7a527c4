//! Reading named tensors as f32 from a GGUF file or a folder of safetensors, with shape checks.
//!
//! Quantized GGUF blocks (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized once at load: on AVX2 CPUs
//! without VNNI the f32 GEMM is both the fastest and the only exact path (see BENCHMARKS.md).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};

/// candle attaches a multi-line backtrace to its errors when RUST_BACKTRACE is set; users need one line.
pub(crate) fn candle_msg(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(*inner),
        e => e.to_string().lines().next().unwrap_or_default().to_string(),
    }
}

pub enum WeightSource {
    Gguf { file: PathBuf, content: gguf_file::Content },
    Safetensors { files: Vec<PathBuf>, tensors: candle_core::safetensors::MmapedSafetensors },
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
        // SAFETY: the files are mapped read-only; modifying them while saekit runs is not supported.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
            anyhow!("{}: not a valid safetensors file (truncated or corrupt?): {}", files[0].display(), candle_msg(e))
        })?;
        Ok(Self::Safetensors { files, tensors })
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
            WeightSource::Safetensors { tensors, .. } => tensors.get(name).is_ok(),
        }
    }

    /// The tensor's shape in PyTorch order (`[d_out, d_in]` for a linear weight).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self {
            WeightSource::Gguf { content, .. } => content.tensor_infos.get(name).map(|t| t.shape.dims().to_vec()),
            WeightSource::Safetensors { tensors, .. } => tensors.get(name).ok().map(|v| v.shape().to_vec()),
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
                q.dequantize(&Device::Cpu)
                    .map_err(|e| anyhow!("{}: cannot dequantize '{name}': {}", file.display(), candle_msg(e)))?
            }
            WeightSource::Safetensors { tensors, .. } => tensors
                .load(name, &Device::Cpu)
                .map_err(|e| anyhow!("{}: tensor '{name}': {}", self.describe(), candle_msg(e)))?,
        };
        let t =
            t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(|e| {
                anyhow!("{}: tensor '{name}' cannot be read as f32: {}", self.describe(), candle_msg(e))
            })?;
        if let Some(bad) = t.iter().position(|v| !v.is_finite()) {
            bail!("{}: tensor '{name}' holds a non-finite value at element {bad}", self.describe());
        }
        Ok(t)
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
