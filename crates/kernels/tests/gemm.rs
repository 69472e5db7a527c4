//! Every bf16 path this CPU has, against f64 references: one on the bf16-rounded inputs (only the f32
//! accumulation may differ), one on the f32 inputs (the bf16 rounding itself must stay bf16-sized).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saekit_kernels::{bf16_bits, gemm_bf16, round_to_bf16, Bf16Path, PackedB};

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// `a[m, k] (lda) · w[n, k]ᵀ` in f64, inputs rounded through `round` first.
fn reference(a: &[f32], m: usize, lda: usize, w: &[f32], n: usize, k: usize, round: fn(f32) -> f32) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| round(a[i * lda + p]) as f64 * round(w[j * k + p]) as f64).sum();
        }
    }
    out
}

/// The checks of one shape on one path; `lda`/`ldc` wider than `k`/`n` and `accumulate` included.
fn check(path: Bf16Path, m: usize, k: usize, n: usize) {
    let (lda, ldc) = (k + 3, n + 5);
    let a = random(m * lda, 1 + m as u64);
    let w = random(n * k, 2 + n as u64);
    let packed = PackedB::from_nk(&w, n, k);
    let prior = random(m * ldc, 3);
    for accumulate in [false, true] {
        let mut c = prior.clone();
        gemm_bf16(path, &a, m, lda, &packed, &mut c, ldc, accumulate);
        let rounded = reference(&a, m, lda, &w, n, k, round_to_bf16);
        let exact = reference(&a, m, lda, &w, n, k, |x| x);
        for i in 0..m {
            for j in 0..n {
                let base = if accumulate { prior[i * ldc + j] as f64 } else { 0.0 };
                let got = c[i * ldc + j] as f64 - base;
                // f32 accumulation of k exact products of magnitude <= 1
                let acc_tol = 2.0 * k as f64 * f32::EPSILON as f64 + 1e-6;
                assert!(
                    (got - rounded[i * n + j]).abs() <= acc_tol,
                    "{}: {m}x{k}x{n} c[{i},{j}] = {got}, bf16-input f64 reference {}",
                    path.name(),
                    rounded[i * n + j]
                );
                // each input off by <= 2^-9 relative: the product sum by <= 2 * 2^-9 * sum|a||w|
                let bound = 2.0 * 2f64.powi(-9) * k as f64 + acc_tol;
                assert!(
                    (got - exact[i * n + j]).abs() <= bound,
                    "{}: {m}x{k}x{n} c[{i},{j}] off f32 input",
                    path.name()
                );
            }
            // columns past n are untouched
            for j in n..ldc.min(c.len() - i * ldc) {
                assert_eq!(c[i * ldc + j], prior[i * ldc + j], "{}: wrote past column n", path.name());
            }
        }
    }
}

#[test]
fn every_available_path_matches_f64_on_ragged_shapes() {
    let paths = Bf16Path::available_paths();
    eprintln!("bf16 paths on this CPU: {:?}", paths.iter().map(|p| p.name()).collect::<Vec<_>>());
    for path in paths {
        for (m, k, n) in [(1, 1, 1), (3, 31, 17), (32, 32, 32), (33, 33, 33), (70, 100, 65), (257, 576, 300)] {
            check(path, m, k, n);
        }
        // a weight over 2 MiB packed: jobs go column panel by column panel
        if path != Bf16Path::Reference {
            check(path, 130, 576, 1900);
        }
        // k long enough to go in passes (AVX512-BF16), with a last pass shorter than the others
        check(path, 70, 3000, 65);
    }
}

#[test]
fn paths_agree_with_each_other() {
    let (m, k, n) = (300, 577, 290);
    let a = random(m * k, 7);
    let packed = PackedB::from_nk(&random(n * k, 8), n, k);
    let mut reference = vec![0f32; m * n];
    gemm_bf16(Bf16Path::Reference, &a, m, k, &packed, &mut reference, n, false);
    for path in Bf16Path::available_paths() {
        let mut c = vec![0f32; m * n];
        gemm_bf16(path, &a, m, k, &packed, &mut c, n, false);
        let worst = c.iter().zip(&reference).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-3, "{} differs from the reference path by {worst}", path.name());
    }
}

#[test]
fn kn_and_nk_packings_are_the_same_matrix() {
    let (k, n) = (45, 37);
    let w_nk = random(n * k, 9);
    let mut w_kn = vec![0f32; k * n];
    for j in 0..n {
        for p in 0..k {
            w_kn[p * n + j] = w_nk[j * k + p];
        }
    }
    let a = random(5 * k, 10);
    let (mut c1, mut c2) = (vec![0f32; 5 * n], vec![0f32; 5 * n]);
    gemm_bf16(Bf16Path::Reference, &a, 5, k, &PackedB::from_nk(&w_nk, n, k), &mut c1, n, false);
    gemm_bf16(Bf16Path::Reference, &a, 5, k, &PackedB::from_kn(&w_kn, k, n), &mut c2, n, false);
    assert_eq!(c1, c2);
}

#[test]
fn rounding_matches_the_half_crate() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let specials = [0.0f32, -0.0, 1.0, f32::MAX, f32::MIN_POSITIVE, 1e-40, f32::INFINITY, f32::NEG_INFINITY];
    let values = specials.into_iter().chain((0..100_000).map(|_| f32::from_bits(rng.gen::<u32>())));
    for x in values.filter(|x| !x.is_nan()) {
        assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "bf16 of {x:e} ({:#x})", x.to_bits());
    }
    assert!(round_to_bf16(f32::NAN).is_nan());
}

#[test]
fn k_zero_clears_or_keeps_c() {
    let packed = PackedB::from_nk(&[], 3, 0);
    let mut c = vec![5f32; 6];
    gemm_bf16(Bf16Path::Reference, &[], 2, 0, &packed, &mut c, 3, true);
    assert_eq!(c, vec![5.0; 6]);
    gemm_bf16(Bf16Path::Reference, &[], 2, 0, &packed, &mut c, 3, false);
    assert_eq!(c, vec![0.0; 6]);
}

#[test]
fn a_column_range_is_that_slice_of_the_full_product() {
    let (m, k, n) = (70, 96, 300);
    let a = random(m * k, 12);
    let packed = PackedB::from_nk(&random(n * k, 13), n, k);
    let rows = saekit_kernels::PackedA::new(&a, m, k, k);
    for path in Bf16Path::available_paths() {
        let mut full = vec![0f32; m * n];
        gemm_bf16(path, &a, m, k, &packed, &mut full, n, false);
        let cols = 64..250;
        let mut part = vec![0f32; m * cols.len()];
        saekit_kernels::gemm_bf16_packed(path, &rows, &packed, cols.clone(), &mut part, cols.len(), false);
        for i in 0..m {
            assert_eq!(
                &part[i * cols.len()..(i + 1) * cols.len()],
                &full[i * n + cols.start..i * n + cols.end],
                "{}",
                path.name()
            );
        }
    }
}
