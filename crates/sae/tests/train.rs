//! End-to-end trainer tests on small synthetic data: determinism, resume, NaN handling, output folder.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saekit_sae::source::write_npy_f32;
use saekit_sae::{evaluate, load_sae, train, Arch, NpySource, RunOptions, TrainConfig};
use std::path::Path;

const D: usize = 16;

/// Sparse-ish synthetic activations: a few of 48 directions per row, plus a handful of huge
/// "attention sink" rows that the default outlier filter must drop.
fn synth(path: &Path, rows: usize, nan_at: Option<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let dirs: Vec<f32> = (0..48 * D).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
    let mut x = vec![0.0f32; rows * D];
    for r in 0..rows {
        for _ in 0..3 {
            let j = rng.gen_range(0..48);
            let a = rng.gen::<f32>() * 3.0;
            for i in 0..D {
                x[r * D + i] += a * dirs[j * D + i];
            }
        }
        x[r * D] += 5.0; // non-zero mean
        if r % 997 == 0 {
            for i in 0..D {
                x[r * D + i] *= 300.0;
            }
        }
    }
    if let Some(r) = nan_at {
        x[r * D + 3] = f32::NAN;
    }
    write_npy_f32(path, &x, rows, D).unwrap();
}

fn cfg(dir: &Path, acts: &Path, threads: usize) -> TrainConfig {
    TrainConfig {
        acts: Some(acts.display().to_string()),
        out: dir.display().to_string(),
        tokens: 64 * 30,
        batch_size: 64,
        d_sae: 64,
        k: 4,
        threads,
        log_every: 5,
        checkpoint_every: 5,
        norm_estimate_rows: 512,
        dead_tokens: 256, // small, so AuxK actually runs in this short test
        ..Default::default()
    }
}

fn run(c: &TrainConfig, opts: RunOptions) -> saekit_sae::TrainOutcome {
    let mut src = NpySource::open(c.acts.as_ref().unwrap(), c.seed, true).unwrap();
    train(c, &mut src, &opts).unwrap()
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("sae_weights.safetensors")).unwrap()
}

#[test]
fn seeded_runs_are_identical_and_thread_count_does_not_matter() {
    let t = tempfile::tempdir().unwrap();
    let acts = t.path().join("a.npy");
    synth(&acts, 3000, None);
    let a = run(&cfg(&t.path().join("a"), &acts, 1), RunOptions::default());
    run(&cfg(&t.path().join("b"), &acts, 1), RunOptions::default());
    run(&cfg(&t.path().join("c"), &acts, 2), RunOptions::default());
    assert_eq!(a.steps, 30);
    assert!(a.excluded_rows > 0, "the outlier rows should have been excluded");
    assert_eq!(weights(&t.path().join("a")), weights(&t.path().join("b")));
    assert_eq!(weights(&t.path().join("a")), weights(&t.path().join("c")), "1 vs 2 threads differ");
    let mut c2 = cfg(&t.path().join("d"), &acts, 1);
    c2.seed = 1;
    run(&c2, RunOptions::default());
    assert_ne!(weights(&t.path().join("a")), weights(&t.path().join("d")));
}

#[test]
fn resume_after_interruption_is_bit_identical() {
    let t = tempfile::tempdir().unwrap();
    let acts = t.path().join("a.npy");
    synth(&acts, 3000, None);
    let full = t.path().join("full");
    run(&cfg(&full, &acts, 2), RunOptions::default());
    let part = t.path().join("part");
    // "killed" after step 13: the newest checkpoint is step 10
    let o = run(&cfg(&part, &acts, 2), RunOptions { stop_after_steps: Some(13), ..Default::default() });
    assert!(o.interrupted);
    assert!(!part.join("sae_weights.safetensors").exists());
    let cks = saekit_sae::checkpoint::list(&part).unwrap();
    assert_eq!(cks.len(), 2, "keeps the last two checkpoints: {cks:?}");
    assert!(cks[1].ends_with("step_000000010"));
    let o = run(&cfg(&part, &acts, 2), RunOptions { resume: true, ..Default::default() });
    assert_eq!(o.steps, 30);
    assert_eq!(weights(&full), weights(&part));
    // metrics.jsonl has each logged step once
    let m = std::fs::read_to_string(part.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> =
        m.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![5, 10, 15, 20, 25, 30]);
}

#[test]
fn nan_input_stops_with_the_step_and_keeps_the_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let acts = t.path().join("a.npy");
    // without shuffling, row 64*12+5 is read in step 12
    synth(&acts, 3000, Some(64 * 12 + 5));
    let c = TrainConfig { norm_estimate_rows: 256, outlier_norm_factor: 0.0, ..cfg(&t.path().join("o"), &acts, 1) };
    let mut src = NpySource::open(&acts, 0, false).unwrap();
    let err = train(&c, &mut src, &RunOptions::default()).unwrap_err().to_string();
    assert!(err.contains("step 12") && err.contains("non-finite") && err.contains("at row 5 of the batch"), "{err}");
    let cks = saekit_sae::checkpoint::list(&t.path().join("o")).unwrap();
    assert!(cks.last().unwrap().ends_with("step_000000010"));
}

#[test]
fn output_folder_loads_and_reconstructs() {
    let t = tempfile::tempdir().unwrap();
    let acts = t.path().join("a.npy");
    synth(&acts, 3000, None);
    let mut c = cfg(&t.path().join("o"), &acts, 2);
    c.tokens = 64 * 200;
    c.checkpoint_every = 0;
    run(&c, RunOptions::default());
    let out = t.path().join("o");
    for f in ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "metrics.jsonl"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfgj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfgj["architecture"], "topk");
    assert_eq!(cfgj["k"], 4);
    assert_eq!(cfgj["normalize_activations"], "none");
    assert_eq!(cfgj["metadata"]["hook_name"], "blocks.15.hook_resid_post");
    let sae = load_sae(&out).unwrap();
    let mut x = NpySource::open(&acts, 0, false).unwrap().read_all();
    saekit_sae::metrics::drop_outliers(&mut x, D, 100.0);
    let m = evaluate(&sae, &x);
    assert!(m.l0 <= 4.0 + 1e-9);
    assert!(m.fvu < 0.5, "raw-space FVU after folding the input scale: {}", m.fvu);
    // the input scale was folded: encoding raw rows gives the trained reconstruction quality
    let last: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().last().unwrap())
            .unwrap();
    assert!((last["fvu"].as_f64().unwrap() - m.fvu).abs() < 0.1);
    // sparsity.safetensors holds per-token firing frequencies: over all latents they add up to the
    // mean L0 of training (k = 4, a little less where a selected value is 0).
    let freq = saekit_sae::format::load_sparsity(&out).unwrap().unwrap();
    let l0: f64 = freq.iter().map(|&v| 10f64.powf(v as f64)).sum();
    assert!(l0 > 3.0 && l0 < 4.0 + 1e-3, "sum of firing frequencies {l0}, want the training L0 (~4)");
}

#[test]
fn multi_topk_and_geometric_median_run() {
    let t = tempfile::tempdir().unwrap();
    let acts = t.path().join("a.npy");
    synth(&acts, 2000, None);
    let mut c = cfg(&t.path().join("o"), &acts, 2);
    c.multi_topk = true;
    c.b_dec_init = saekit_sae::BDecInit::GeometricMedian;
    c.checkpoint_every = 0;
    let o = run(&c, RunOptions::default());
    assert!(o.last.multi_topk_fvu > 0.0);
    let _ = Arch::TopK;
}

#[test]
fn every_architecture_trains_saves_and_loads() {
    let t = tempfile::tempdir().unwrap();
    let acts = t.path().join("a.npy");
    synth(&acts, 3000, None);
    let mut x = NpySource::open(&acts, 0, false).unwrap().read_all();
    saekit_sae::metrics::drop_outliers(&mut x, D, 100.0);
    for (arch, want_arch) in [(Arch::BatchTopK, "jumprelu"), (Arch::JumpRelu, "jumprelu"), (Arch::Relu, "standard")] {
        let out = t.path().join(arch.name());
        let mut c = cfg(&out, &acts, 2);
        c.arch = arch;
        c.tokens = 64 * 100;
        c.checkpoint_every = 40;
        c.lr = Some(1e-3);
        c.l1_coefficient = 0.5;
        c.l0_coefficient = 0.05;
        let o = run(&c, RunOptions::default());
        assert!(o.last.loss.is_finite(), "{arch:?}");
        let cfgj: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("cfg.json")).unwrap()).unwrap();
        assert_eq!(cfgj["architecture"], want_arch, "{arch:?}");
        let sae = load_sae(&out).unwrap();
        if want_arch == "jumprelu" {
            assert!(sae.params.threshold.iter().all(|t| *t > 0.0), "{arch:?}: threshold not saved");
        }
        let m = evaluate(&sae, &x);
        assert!(m.fvu < 1.0 && m.l0 > 0.0, "{arch:?}: {m:?}");
        // resume from the checkpoint at step 40 reproduces the run
        let part = t.path().join(format!("{}_part", arch.name()));
        let mut c2 = c.clone();
        c2.out = part.display().to_string();
        run(&c2, RunOptions { stop_after_steps: Some(50), ..Default::default() });
        run(&c2, RunOptions { resume: true, ..Default::default() });
        assert_eq!(weights(&out), weights(&part), "{arch:?}: resume differs");
    }
}

/// (input, target) pairs: the target a fixed nonlinear map of the input to 12 columns, so a transcoder
/// has something to learn and its skip connection a linear part.
fn synth_pairs(dir: &Path, rows: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x: Vec<f32> = (0..rows * D).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
    let mix: Vec<f32> = (0..12 * D).map(|_| rng.gen::<f32>() - 0.5).collect();
    let y: Vec<f32> = (0..rows * 12)
        .map(|q| {
            let (r, o) = (q / 12, q % 12);
            let lin: f32 = (0..D).map(|i| mix[o * D + i] * x[r * D + i]).sum();
            lin + 2.0 * lin.max(0.0) + 0.5
        })
        .collect();
    let (xp, yp) = (dir.join("x.npy"), dir.join("y.npy"));
    write_npy_f32(&xp, &x, rows, D).unwrap();
    write_npy_f32(&yp, &y, rows, 12).unwrap();
    (xp, yp)
}

#[test]
fn a_skip_transcoder_resumes_bit_identically_and_refuses_what_it_cannot_train() {
    let t = tempfile::tempdir().unwrap();
    let (xp, yp) = synth_pairs(t.path(), 3000);
    let tc_cfg = |out: &Path| TrainConfig {
        hook_name: "blocks.0.ln2.hook_normalized".into(),
        hook_name_out: "blocks.0.hook_mlp_out".into(),
        skip: true,
        ..cfg(out, &xp, 2)
    };
    let run_pairs = |c: &TrainConfig, opts: RunOptions| {
        let mut src = saekit_sae::NpyPairSource::open(&xp, &yp, c.seed, true).unwrap();
        train(c, &mut src, &opts).unwrap()
    };
    let full = t.path().join("full");
    run_pairs(&tc_cfg(&full), RunOptions::default());
    let m = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
    let fvu: Vec<f64> =
        m.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["fvu"].as_f64().unwrap()).collect();
    assert!(fvu[fvu.len() - 1] < 0.8 * fvu[0], "the transcoder's FVU did not fall: {fvu:?}");
    let part = t.path().join("part");
    assert!(run_pairs(&tc_cfg(&part), RunOptions { stop_after_steps: Some(13), ..Default::default() }).interrupted);
    run_pairs(&tc_cfg(&part), RunOptions { resume: true, ..Default::default() });
    assert_eq!(weights(&full), weights(&part));
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("cfg.json")).unwrap()).unwrap();
    assert_eq!((cfg_json["architecture"].as_str(), cfg_json["d_out"].as_u64()), (Some("topk_transcoder"), Some(12)));
    let e = load_sae(&full).unwrap_err().to_string();
    assert!(e.contains("transcoder"), "{e}");

    // pairs without a target hook, a target hook without pairs, a skip on an SAE: each refused by name
    let mut src = saekit_sae::NpyPairSource::open(&xp, &yp, 0, true).unwrap();
    let no_hook = TrainConfig { hook_name_out: String::new(), ..tc_cfg(&t.path().join("a")) };
    assert!(train(&no_hook, &mut src, &RunOptions::default()).unwrap_err().to_string().contains("hook_name_out"));
    let mut single = NpySource::open(&xp, 0, true).unwrap();
    let e = train(&tc_cfg(&t.path().join("b")), &mut single, &RunOptions::default()).unwrap_err().to_string();
    assert!(e.contains("hook_name_out"), "{e}");
    let sae_skip = TrainConfig { skip: true, ..cfg(&t.path().join("c"), &xp, 1) };
    let e = train(&sae_skip, &mut single, &RunOptions::default()).unwrap_err().to_string();
    assert!(e.contains("skip"), "{e}");
    // inputs and targets of different lengths
    let short = t.path().join("short.npy");
    write_npy_f32(&short, &vec![0.5; 10 * 12], 10, 12).unwrap();
    assert!(saekit_sae::NpyPairSource::open(&xp, &short, 0, true).is_err());
}

#[test]
fn a_nan_target_stops_the_step_naming_its_row_and_column() {
    let t = tempfile::tempdir().unwrap();
    let (xp, yp) = synth_pairs(t.path(), 3000);
    // row 64*12+5 of the targets, read unshuffled in step 12, gets a NaN in column 3
    let mut y = saekit_sae::NpySource::open(&yp, 0, false).unwrap().read_all();
    y[(64 * 12 + 5) * 12 + 3] = f32::NAN;
    write_npy_f32(&yp, &y, 3000, 12).unwrap();
    let c = TrainConfig {
        hook_name: "blocks.0.ln2.hook_normalized".into(),
        hook_name_out: "blocks.0.hook_mlp_out".into(),
        norm_estimate_rows: 256,
        outlier_norm_factor: 0.0,
        ..cfg(&t.path().join("o"), &xp, 1)
    };
    let mut src = saekit_sae::NpyPairSource::open(&xp, &yp, 0, false).unwrap();
    let err = train(&c, &mut src, &RunOptions::default()).unwrap_err().to_string();
    assert!(err.contains("step 12: non-finite target activation (NaN at row 5 of the batch, column 3)"), "{err}");
}
