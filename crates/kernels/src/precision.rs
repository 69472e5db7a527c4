//! Which precision the big products run in: what the user asked for (`--precision`) turned into
//! what this CPU will do, once.

use crate::{gemm_bf16, Bf16Path, PackedB};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

/// `--precision`: what the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PrecisionChoice {
    /// bf16 where this CPU runs it at least [`AUTO_MIN_SPEEDUP`] times faster than f32, else f32.
    #[default]
    Auto,
    /// bf16 products with f32 accumulation; an error on a CPU without AMX or AVX512-BF16.
    Bf16,
    /// f32 throughout (bit for bit what every parity test checks).
    F32,
    /// bf16 numerics on the portable scalar path: slow, for checking bf16 results on any CPU.
    Bf16Reference,
}

impl std::str::FromStr for PrecisionChoice {
    type Err = PrecisionError;
    fn from_str(s: &str) -> Result<Self, PrecisionError> {
        match s {
            "auto" => Ok(Self::Auto),
            "bf16" => Ok(Self::Bf16),
            "f32" => Ok(Self::F32),
            "bf16-reference" => Ok(Self::Bf16Reference),
            other => Err(PrecisionError::Unknown(other.to_string())),
        }
    }
}

/// The precision products run in on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 GEMMs (the gemm crate), the default.
    #[default]
    F32,
    /// bf16 GEMMs on this path, accumulating in f32.
    Bf16(Bf16Path),
}

/// `auto` takes bf16 only where it is at least this much faster than f32 on this CPU.
pub const AUTO_MIN_SPEEDUP: f64 = 1.3;

/// A `--precision` that cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    /// Not one of the three names.
    #[error("unknown precision '{0}': expected auto, bf16, f32 or bf16-reference")]
    Unknown(String),
    /// bf16 asked for on a CPU that cannot run it fast.
    #[error("--precision bf16: this CPU has neither AMX-BF16 nor AVX512-BF16 (`saekit bench gemm` lists what it has); use f32 or auto")]
    NoBf16Hardware,
}

impl Precision {
    /// Resolve a choice on this CPU; `Auto` measures once per process ([`auto_precision`]).
    pub fn resolve(choice: PrecisionChoice) -> Result<Precision, PrecisionError> {
        match choice {
            PrecisionChoice::F32 => Ok(Precision::F32),
            PrecisionChoice::Bf16 => Bf16Path::fastest().map(Precision::Bf16).ok_or(PrecisionError::NoBf16Hardware),
            PrecisionChoice::Auto => Ok(auto_precision().0),
            PrecisionChoice::Bf16Reference => Ok(Precision::Bf16(Bf16Path::Reference)),
        }
    }

    /// `"f32"` or `"bf16"`: what outputs record.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16(_) => "bf16",
        }
    }

    /// The `--precision` that resolves to this precision on this CPU: `f32`, `bf16`, or
    /// `bf16-reference` for the portable path.
    pub fn choice_name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16(Bf16Path::Reference) => "bf16-reference",
            Precision::Bf16(_) => "bf16",
        }
    }

    /// The bf16 path, if any.
    pub fn bf16_path(self) -> Option<Bf16Path> {
        match self {
            Precision::F32 => None,
            Precision::Bf16(p) => Some(p),
        }
    }
}

/// What `auto` picks on this CPU and the bf16 / f32 speed ratio behind it (1.0 where no bf16 path
/// exists). AMX is taken without measuring: it ran 3.0-3.7x the f32 GEMM on every benchmark shape
/// (BENCHMARKS.md), and a pick that cannot flip keeps every rank of an MPI job and every resume on the
/// same numerics (the ratio reported is then `f64::INFINITY`). AVX512-BF16 alone, whose `vdpbf16ps`
/// runs at full rate on some CPUs and slower than f32 on others (2.0x and 0.5x f32 on the AMD Zen 5
/// and Intel AMX boxes of BENCHMARKS.md), is measured on an SAE-encoder-like product (512 x 576 x 4096):
/// the median ratio of seven back-to-back pairs, about 0.2 s, once per machine (pairs, because a machine
/// busy during part of the probe slows both sides of a pair alike). The ratio is kept in
/// [`auto_cache_file`], so two runs of the same
/// command on one machine pick the same precision even when the machine is busy during one of them
/// (a fresh measurement per process flipped near the threshold under load). Delete the file to
/// measure again.
pub fn auto_precision() -> (Precision, f64) {
    static PICK: OnceLock<(Precision, f64)> = OnceLock::new();
    *PICK.get_or_init(|| {
        let Some(path) = Bf16Path::fastest() else { return (Precision::F32, 1.0) };
        if path == Bf16Path::Amx {
            return (Precision::Bf16(path), f64::INFINITY);
        }
        let file = auto_cache_file(path);
        let speedup = read_speedup(&file).unwrap_or_else(|| {
            let measured = probe_speedup(path);
            write_speedup(&file, measured);
            measured
        });
        let pick = if speedup >= AUTO_MIN_SPEEDUP { Precision::Bf16(path) } else { Precision::F32 };
        tracing::debug!(path = path.name(), speedup, pick = pick.name(), file = ?file, "precision auto");
        (pick, speedup)
    })
}

/// Where `auto` keeps this machine's measured bf16 / f32 ratio for `path`:
/// `precision-auto-HASH.txt` in [`saekit_files::cache_dir`], the hash over the CPU's model name and flags,
/// the path, the probe and this crate's version, so another CPU, kernel or probe measures anew.
pub fn auto_cache_file(path: Bf16Path) -> PathBuf {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_line = |key: &str| cpuinfo.lines().find(|l| l.starts_with(key)).unwrap_or_default();
    let (m, k, n) = PROBE_SHAPE;
    let probe = format!("{m}x{k}x{n}, median of {PROBE_PAIRS} alternating pairs");
    let parts = [cpu_line("model name"), cpu_line("flags"), path.name(), &probe, env!("CARGO_PKG_VERSION")];
    let hash = saekit_files::fingerprint_bytes(parts.map(str::as_bytes));
    saekit_files::cache_dir().join(format!("precision-auto-{hash}.txt"))
}

/// The ratio kept in `file`, if it holds one (a missing or damaged file is measured again).
fn read_speedup(file: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().next()?.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s > 0.0)
}

/// Keep `speedup` in `file`, written whole or not at all; a cache that cannot be written costs only a
/// measurement next time.
fn write_speedup(file: &Path, speedup: f64) {
    let text = format!("{speedup}\nbf16's speed-up over f32 (f32 GEMM time / bf16 GEMM time), measured by saekit's `--precision auto` on this machine; delete to measure again\n");
    let dir_made = file.parent().map_or(Ok(()), std::fs::create_dir_all).map_err(|e| e.to_string());
    let kept = dir_made.and_then(|()| saekit_files::write_atomic(file, text.as_bytes()).map_err(|e| format!("{e:#}")));
    if let Err(e) = kept {
        tracing::debug!(file = %file.display(), error = %e, "precision auto: ratio not kept");
    }
}

fn probe_speedup(path: Bf16Path) -> f64 {
    let (m, k, n) = PROBE_SHAPE;
    let a: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect();
    let packed = PackedB::from_nk(&w, n, k);
    let (mut c_f32, mut c_bf16) = (vec![0f32; m * n], vec![0f32; m * n]);
    let mut f32_gemm = || timed(|| f32_gemm_abt(&a, m, k, &w, n, &mut c_f32));
    let mut bf16_gemm = || timed(|| gemm_bf16(path, &a, m, k, &packed, &mut c_bf16, n, false));
    // warm-up
    f32_gemm();
    bf16_gemm();
    // back-to-back pairs, the order alternating: a pair sees one load, so a machine that is busy for
    // part of the probe slows both sides of a pair alike instead of one side of the whole measurement
    let mut ratios: Vec<f64> = (0..PROBE_PAIRS)
        .map(|i| {
            let (f, b) = if i % 2 == 0 {
                (f32_gemm(), bf16_gemm())
            } else {
                let b = bf16_gemm();
                (f32_gemm(), b)
            };
            f / b
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios[PROBE_PAIRS / 2]
}

/// (f32, bf16) pairs [`probe_speedup`] times; the ratio kept is their median.
const PROBE_PAIRS: usize = 7;

/// The (m, k, n) of the product [`probe_speedup`] times: SAE-encoder-like. With [`PROBE_PAIRS`] it is part
/// of the cache key, so a ratio measured another way is measured again.
const PROBE_SHAPE: (usize, usize, usize) = (512, 576, 4096);

/// Seconds `run` takes once.
fn timed(run: impl FnOnce()) -> f64 {
    let t = Instant::now();
    run();
    t.elapsed().as_secs_f64()
}

/// `c = a · wᵀ` with the gemm crate: the f32 path the model and the SAE encoder run.
fn f32_gemm_abt(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, c: &mut [f32]) {
    assert!(a.len() >= m * k && w.len() >= n * k && c.len() >= m * n);
    // SAFETY: the assert bounds every access these strides make.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_ratio_reads_back_and_a_damaged_one_is_measured_again() {
        let dir = std::env::temp_dir().join(format!("saekit-precision-test-{}", std::process::id()));
        let file = dir.join("nested").join("precision-auto-test.txt");
        assert_eq!(read_speedup(&file), None, "no file yet");
        write_speedup(&file, 1.2875);
        assert_eq!(read_speedup(&file), Some(1.2875));
        for damaged in ["", "fast\n", "-1\n", "NaN\n", "inf\n"] {
            std::fs::write(&file, damaged).unwrap();
            assert_eq!(read_speedup(&file), None, "{damaged:?}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(file.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "the temporary file was renamed, not left behind");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn each_path_has_its_own_cache_file_and_the_name_is_stable() {
        let (a, b) = (auto_cache_file(Bf16Path::Avx512Bf16), auto_cache_file(Bf16Path::Reference));
        assert_ne!(a, b);
        assert_eq!(a, auto_cache_file(Bf16Path::Avx512Bf16));
        assert_eq!(a.parent(), Some(saekit_files::cache_dir().as_path()));
    }
}
