//! bf16 encoder GEMMs against f32: training reaches the same reconstruction, and encoding selects the
//! same latents. On a CPU without AMX or AVX512-BF16 the portable bf16 path runs the same numerics.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saekit_kernels::Bf16Path;
use saekit_sae::source::write_npy_f32;
use saekit_sae::{evaluate, load_sae, train, NpySource, RunOptions, TrainConfig};
use std::path::Path;

const D: usize = 64;

/// Rows made of 2-6 of 512 random directions with random positive weights (what an SAE should find).
fn synth(rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let dirs: Vec<f32> = (0..512 * D).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = vec![0.0f32; rows * D];
    for r in 0..rows {
        for _ in 0..rng.gen_range(2..=6) {
            let (j, a) = (rng.gen_range(0..512), rng.gen::<f32>() * 3.0);
            for i in 0..D {
                x[r * D + i] += a * dirs[j * D + i];
            }
        }
    }
    x
}

fn bf16_choice() -> &'static str {
    match Bf16Path::fastest() {
        Some(p) => {
            eprintln!("bf16 path: {}", p.name());
            "bf16"
        }
        None => {
            eprintln!("no AMX / AVX512-BF16 here: bf16 numerics on the portable path");
            "bf16-reference"
        }
    }
}

fn train_at(dir: &Path, acts: &Path, precision: &str) -> saekit_sae::Sae {
    let c = TrainConfig {
        acts: Some(acts.display().to_string()),
        out: dir.display().to_string(),
        tokens: 256 * 1000,
        batch_size: 256,
        d_sae: 512,
        k: 8,
        threads: 2,
        log_every: 50,
        checkpoint_every: 0,
        norm_estimate_rows: 2048,
        precision: Some(precision.into()),
        ..Default::default()
    };
    let mut src = NpySource::open(acts, c.seed, true).unwrap();
    train(&c, &mut src, &RunOptions::default()).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("training_summary.json")).unwrap()).unwrap();
    let recorded = if precision == "f32" { "f32" } else { "bf16" };
    assert_eq!(summary["precision"], recorded, "the output records the precision it was trained in");
    load_sae(dir).unwrap()
}

#[test]
fn bf16_training_reaches_the_f32_reconstruction_and_selects_the_same_latents() {
    let t = tempfile::tempdir().unwrap();
    let acts = t.path().join("train.npy");
    write_npy_f32(&acts, &synth(20_000, 1), 20_000, D).unwrap();
    let held_out = synth(4096, 2);

    let f32_sae = train_at(&t.path().join("f32"), &acts, "f32");
    let choice = bf16_choice();
    let bf16_sae = train_at(&t.path().join("bf16"), &acts, choice);
    let (m32, m16) = (evaluate(&f32_sae, &held_out), evaluate(&bf16_sae, &held_out));
    eprintln!("held-out FVU: f32 {:.5}, bf16 {:.5}; L0 {:.3} / {:.3}", m32.fvu, m16.fvu, m32.l0, m16.l0);
    assert!(m32.fvu < 0.5, "the f32 run learned nothing (FVU {})", m32.fvu);
    assert!((m16.fvu - m32.fvu).abs() <= 0.02 * m32.fvu, "bf16 FVU {} vs f32 {}", m16.fvu, m32.fvu);

    // one SAE, both precisions: the selected (row, latent) pairs agree
    let path = Bf16Path::fastest().unwrap_or(Bf16Path::Reference);
    let (a, b) = (f32_sae.encode(&held_out), f32_sae.encode_with(&held_out, saekit_kernels::Precision::Bf16(path)));
    let (mut same, mut total) = (0usize, 0usize);
    for r in 0..a.rows() {
        let (ra, rb) = (&a.idx[a.indptr[r]..a.indptr[r + 1]], &b.idx[b.indptr[r]..b.indptr[r + 1]]);
        same += ra.iter().filter(|j| rb.contains(j)).count();
        total += ra.len().max(rb.len());
    }
    let agreement = same as f64 / total as f64;
    eprintln!("top-k agreement f32 vs bf16 encode: {agreement:.5} of {total} pairs");
    assert!(agreement >= 0.99, "bf16 selects the f32 latents on only {agreement:.4} of pairs");
}

#[test]
fn an_unknown_precision_is_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let acts = t.path().join("a.npy");
    write_npy_f32(&acts, &synth(512, 3), 512, D).unwrap();
    let c = TrainConfig {
        acts: Some(acts.display().to_string()),
        out: t.path().join("o").display().to_string(),
        tokens: 1024,
        batch_size: 256,
        d_sae: 64,
        precision: Some("fp8".into()),
        ..Default::default()
    };
    let mut src = NpySource::open(&acts, 0, true).unwrap();
    let err = format!("{:#}", train(&c, &mut src, &RunOptions::default()).unwrap_err());
    assert!(err.contains("precision") && err.contains("fp8"), "{err}");
}
