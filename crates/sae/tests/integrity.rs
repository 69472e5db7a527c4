//! Nothing lost, nothing mislabelled: an SAE trained on a store carries the store's hook and model, a
//! fresh run refuses an earlier run's folder, a resume refuses another config or other data, torn or
//! altered SAE folders and checkpoints are refused, and checkpoints are ordered by step number.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saekit_sae::source::write_npy_f32;
use saekit_sae::{load_sae, train, NpySource, RunOptions, StoreSource, TrainConfig};
use saekit_store::{ActivationWriter, Dtype, ModelInfo, SourceInfo, StoreConfig};
use std::path::Path;

const D: usize = 16;

fn rows(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * D).map(|i| rng.gen::<f32>() * 2.0 - 1.0 + (i % D) as f32 * 0.1).collect()
}

fn cfg(out: &Path, acts: &Path) -> TrainConfig {
    TrainConfig {
        acts: Some(acts.display().to_string()),
        out: out.display().to_string(),
        tokens: 64 * 20,
        batch_size: 64,
        d_sae: 32,
        k: 4,
        threads: 1,
        log_every: 5,
        checkpoint_every: 5,
        norm_estimate_rows: 256,
        ..Default::default()
    }
}

fn npy(dir: &Path, seed: u64) -> std::path::PathBuf {
    let p = dir.join(format!("x{seed}.npy"));
    write_npy_f32(&p, &rows(2000, seed), 2000, D).unwrap();
    p
}

fn run_npy(c: &TrainConfig, opts: &RunOptions) -> anyhow::Result<saekit_sae::TrainOutcome> {
    let mut src = NpySource::open(c.acts.as_ref().unwrap(), c.seed, true)?;
    Ok(train(c, &mut src, opts)?)
}

/// A one-hook store at layer 6 of a model named "TinyLM", as a harvest would write it.
fn layer6_store(dir: &Path) {
    let ctx = 8;
    let config = StoreConfig {
        model: ModelInfo { name: "TinyLM".into(), d_model: D, n_layers: 8, ..Default::default() },
        hooks: vec!["blocks.6.hook_resid_post".into()],
        d_model: D,
        dtype: Dtype::F32,
        context: ctx,
        contexts_per_shard: 32,
        bos_token: None,
        eot_tokens: vec![0],
        outlier_factor: None,
        source: SourceInfo {
            tokens: "synthetic".into(),
            split: "train".into(),
            first_context: 0,
            fingerprint: "t".into(),
        },
        tokenizer_fingerprint: "vocab100-abc".into(),
    };
    let mut w = ActivationWriter::create_or_resume(dir, config).unwrap();
    let n_ctx = 128;
    let tokens: Vec<u32> = (0..n_ctx * ctx).map(|i| 5 + (i % 50) as u32).collect();
    let x = rows(n_ctx * ctx, 3);
    w.push(&tokens, &[&x]).unwrap();
    w.finish().unwrap();
}

#[test]
fn an_sae_trained_on_a_store_carries_the_store_hook_and_model() {
    let t = tempfile::tempdir().unwrap();
    let store = t.path().join("acts");
    layer6_store(&store);
    let out = t.path().join("sae");
    // the config says nothing about the data (defaults: layer 15, SmolLM2): the store must win
    let c = TrainConfig { acts: Some(store.display().to_string()), ..cfg(&out, &store) };
    let mut src = StoreSource::open(&store, "", 0, true, c.batch_size).unwrap();
    train(&c, &mut src, &RunOptions::default()).unwrap();
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("cfg.json")).unwrap()).unwrap();
    let md = &j["metadata"];
    assert_eq!(md["hook_name"], "blocks.6.hook_resid_post", "{md}");
    assert_eq!(md["model_name"], "TinyLM");
    assert_eq!(md["context_size"], 8);
    assert_eq!(md["tokenizer_fingerprint"], "vocab100-abc");
    assert_eq!(md["sink_rule"], "position 0; end-of-text ids 0");
    assert!(md["input_scale"].as_f64().is_some_and(|s| s > 0.0), "{md}");
    // and a consumer asked to run it elsewhere refuses, naming both sides
    let sae = load_sae(&out).unwrap();
    let e = sae.hook_on("sae/", "TinyLM", D, Some("blocks.15.hook_resid_post")).unwrap_err().to_string();
    assert!(e.contains("blocks.6.hook_resid_post") && e.contains("blocks.15.hook_resid_post"), "{e}");
    let e = sae.hook_on("sae/", "SmolLM2-135M-Instruct", D, None).unwrap_err().to_string();
    assert!(e.contains("TinyLM") && e.contains("SmolLM2-135M-Instruct"), "{e}");
    let e = sae.hook_on("sae/", "TinyLM", 576, None).unwrap_err().to_string();
    assert!(e.contains("576") && e.contains(&D.to_string()), "{e}");
    assert_eq!(sae.hook_on("sae/", "tinylm", D, None).unwrap(), "blocks.6.hook_resid_post");
}

#[test]
fn a_fresh_run_refuses_an_earlier_runs_folder_unless_forced() {
    let t = tempfile::tempdir().unwrap();
    let acts = npy(t.path(), 1);
    let out = t.path().join("sae");
    let c = cfg(&out, &acts);
    run_npy(&c, &RunOptions { stop_after_steps: Some(12), ..Default::default() }).unwrap();
    let e = run_npy(&c, &RunOptions::default()).unwrap_err().to_string();
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    // --force starts afresh: the result equals a run in an empty folder
    run_npy(&c, &RunOptions { force: true, ..Default::default() }).unwrap();
    let clean = t.path().join("clean");
    run_npy(&cfg(&clean, &acts), &RunOptions::default()).unwrap();
    let w = |d: &Path| std::fs::read(d.join("sae_weights.safetensors")).unwrap();
    assert_eq!(w(&out), w(&clean));
    // files saekit did not write are never removed, even with --force
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    let e = run_npy(&c, &RunOptions { force: true, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("notes.txt"), "{e}");
    assert!(out.join("notes.txt").exists());
}

#[test]
fn the_runs_own_data_file_may_lie_in_its_output_folder() {
    // `saekit.train(array, out)` writes the array to out/train_acts.npy, then trains into out
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("sae");
    std::fs::create_dir(&out).unwrap();
    let acts = npy(&out, 1);
    run_npy(&cfg(&out, &acts), &RunOptions { stop_after_steps: Some(12), ..Default::default() }).unwrap();
    // --force clears the run and keeps its data: the result equals a run whose data lies elsewhere
    run_npy(&cfg(&out, &acts), &RunOptions { force: true, ..Default::default() }).unwrap();
    assert!(acts.exists());
    let clean = t.path().join("clean");
    run_npy(&cfg(&clean, &npy(t.path(), 1)), &RunOptions::default()).unwrap();
    let w = |d: &Path| std::fs::read(d.join("sae_weights.safetensors")).unwrap();
    assert_eq!(w(&out), w(&clean));
    // another .npy in the folder is not the run's data
    let e = run_npy(&cfg(&out, &npy(t.path(), 2)), &RunOptions::default()).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
}

#[test]
fn a_resume_refuses_another_config_or_other_data() {
    let t = tempfile::tempdir().unwrap();
    let acts = npy(t.path(), 1);
    let out = t.path().join("sae");
    let c = cfg(&out, &acts);
    run_npy(&c, &RunOptions { stop_after_steps: Some(12), ..Default::default() }).unwrap();
    let resume = RunOptions { resume: true, ..Default::default() };
    let e = run_npy(&TrainConfig { d_sae: 64, ..c.clone() }, &resume).unwrap_err().to_string();
    assert!(e.contains("d_sae = 64 vs 32"), "{e}");
    // the same path with other bytes is other data
    write_npy_f32(&acts, &rows(2000, 9), 2000, D).unwrap();
    let e = run_npy(&c, &resume).unwrap_err().to_string();
    assert!(e.contains("other data"), "{e}");
    write_npy_f32(&acts, &rows(2000, 1), 2000, D).unwrap();
    assert_eq!(run_npy(&c, &resume).unwrap().steps, 20);
}

#[test]
fn checkpoints_are_ordered_by_step_and_checked_before_a_resume() {
    let t = tempfile::tempdir().unwrap();
    let acts = npy(t.path(), 1);
    let out = t.path().join("sae");
    let c = cfg(&out, &acts);
    run_npy(&c, &RunOptions { stop_after_steps: Some(12), ..Default::default() }).unwrap();
    let cks = saekit_sae::checkpoint::list(&out).unwrap();
    assert!(cks[1].ends_with("step_000000010"), "{cks:?}");
    // a narrower name of a later step (as another tool or version might write) sorts by its number
    let odd = out.join("checkpoints/step_9");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::copy(cks[0].join("state.json"), odd.join("state.json")).unwrap();
    let cks = saekit_sae::checkpoint::list(&out).unwrap();
    assert!(cks.last().unwrap().ends_with("step_000000010"), "{cks:?}");
    std::fs::remove_dir_all(&odd).unwrap();
    // a flipped byte in the newest checkpoint is found before training continues from it
    let p = cks.last().unwrap().join("state.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n - 3] ^= 0x40;
    std::fs::write(&p, b).unwrap();
    let e = run_npy(&c, &RunOptions { resume: true, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("corrupt") && e.contains("state.safetensors"), "{e}");
    // state.json is outside the checksum: a token count no run could reach is refused, not overflowed
    let state = cks.last().unwrap().join("state.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    meta["tokens"] = u64::MAX.into();
    std::fs::write(&state, meta.to_string()).unwrap();
    let e = run_npy(&c, &RunOptions { resume: true, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("state.json") && e.contains("do not fit a run"), "{e}");
}

#[test]
fn a_torn_or_altered_sae_folder_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let acts = npy(t.path(), 1);
    let out = t.path().join("sae");
    run_npy(&cfg(&out, &acts), &RunOptions::default()).unwrap();
    load_sae(&out).unwrap();
    // a kill between the weights and the file list: the list is gone, the folder is refused
    let list = out.join(saekit_sae::format::FILE_LIST);
    let saved = std::fs::read(&list).unwrap();
    std::fs::remove_file(&list).unwrap();
    let e = load_sae(&out).unwrap_err().to_string();
    assert!(e.contains("incomplete"), "{e}");
    std::fs::write(&list, saved).unwrap();
    // new weights beside the old cfg.json (what a file-by-file write left): refused by the checksums
    let w = out.join("sae_weights.safetensors");
    let mut b = std::fs::read(&w).unwrap();
    let n = b.len();
    b[n - 1] ^= 1;
    std::fs::write(&w, b).unwrap();
    let e = load_sae(&out).unwrap_err().to_string();
    assert!(e.contains("sae_weights.safetensors") && e.contains("crc32"), "{e}");
}
