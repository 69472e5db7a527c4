//! Measurement helpers for the benchmark commands (`examples/bench_train.rs`, `saekit bench`).

use crate::kernels;
use saekit_kernels::Precision;
use std::time::Instant;

/// GFLOP/s of the encoder GEMM `[rows, d_in] · [d_in, d_sae]` as the trainer calls it (encoder
/// stored latent-major; in bf16 the weights packed once, the rows rounded per call), best and mean of
/// `reps` timed runs after one warm-up, in the current rayon pool.
pub fn encoder_gemm_gflops(rows: usize, d_in: usize, d_sae: usize, reps: usize, precision: Precision) -> (f64, f64) {
    let a: Vec<f32> = (0..rows * d_in).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
    let b: Vec<f32> = (0..d_sae * d_in).map(|i| ((i % 89) as f32 - 44.0) * 0.01).collect();
    let mut c = vec![0.0f32; rows * d_sae];
    let flop = 2.0 * rows as f64 * d_in as f64 * d_sae as f64;
    let weights = kernels::EncoderWeights::packed(precision, &b, (d_sae, d_in));
    let gemm = |c: &mut [f32]| weights.product(&a, rows).chunk(&a, rows, 0..d_sae, c);
    gemm(&mut c);
    let mut best = 0.0f64;
    let mut sum = 0.0;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        gemm(&mut c);
        let g = flop / t.elapsed().as_secs_f64() / 1e9;
        best = best.max(g);
        sum += g;
    }
    (best, sum / reps.max(1) as f64)
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if available.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
