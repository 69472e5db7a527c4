//! `saekit train-transcoders`: one forward per block feeds a trainer per layer. Checked against a
//! separate path per layer: the rows of two single-hook live readers (`LiveActivations`, the code
//! behind `train --live`) written to `.npy` files and trained in this process by `saekit_sae::train`
//! on an `NpyPairSource` in file order; the weights must be equal bit for bit. A run stopped by SIGINT
//! or SIGKILL and resumed ends with the bytes of the uninterrupted one; a finished layer is skipped on
//! resume and a deleted one retrained alone to the same bytes; the set loads (circuit-tracer layout and
//! SAELens folders agree) and `eval-model --transcoders` runs on it; `train --live --input-hook
//! --target-hook` trains the same transcoder as its layer.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use saekit_model::{HookPoint, LoadOptions, Model};
use saekit_sae::{NpyPairSource, RunOptions, TrainConfig};
use saekit_store::live::{LiveActivations, LiveOptions};
use saekit_store::TokenDataset;

const D_SAE: usize = 1024;
const K: usize = 8;
const BATCH: usize = 128;
const TOKENS: u64 = 16384;
const BLOCK_TOKENS: usize = 2048;
const CONFIG: &str = "norm_estimate_rows = 1024\nlog_every = 2\ncheckpoint_every = 8\n";

fn saekit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_saekit"))
}

fn ok(o: Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{what} failed:\n{}\n{stderr}", String::from_utf8_lossy(&o.stdout));
    stderr
}

fn tokenize(t: &Path) -> PathBuf {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mini-corpus");
    let tokens = t.join("tokens");
    let mut tok = saekit();
    tok.arg("tokenize").arg(&corpus).arg("-o").arg(&tokens);
    tok.args(["--context", "64", "--validation-fraction", "0.25", "--max-tokens", "40k"]);
    ok(tok.output().unwrap(), "tokenize");
    tokens
}

fn run_args(tokens: &Path, config: &Path, out: &Path) -> Vec<String> {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut v: Vec<String> = ["train-transcoders", "--layers", "0-1", "--skip", "--quiet"].map(String::from).to_vec();
    v.extend(["--contexts".into(), s(tokens), "--config".into(), s(config), "--out".into(), s(out)]);
    v.extend(
        ["--d-sae", &D_SAE.to_string(), "--k", &K.to_string(), "--batch-size", &BATCH.to_string()].map(String::from),
    );
    v.extend(["--tokens".into(), TOKENS.to_string(), "--live-block-tokens".into(), BLOCK_TOKENS.to_string()]);
    // the separate training below is the library's default, f32; `auto` would pick bf16 on an AMX box
    v.extend(["--precision".into(), "f32".into()]);
    v
}

/// Every tensor of a safetensors file, by name, as raw bytes.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    v.sort();
    v
}

fn weights(dir: &Path, layer: usize) -> Vec<u8> {
    std::fs::read(dir.join(format!("layer_{layer}/sae_weights.safetensors"))).unwrap()
}

/// The separate path: layer `l`'s input and target rows from two single-hook live readers with the
/// options train-transcoders uses, written to .npy and trained on in file order.
fn train_one_layer_separately(model: &Model, data: &TokenDataset, l: usize, out: &Path) {
    let rows = TOKENS as usize + 4096; // what the run reads, with room for excluded outliers
    let read = |hook: HookPoint| {
        let opts =
            LiveOptions { hook, batch: 8, block_tokens: BLOCK_TOKENS, seed: 0, keep_rows: 0, ..Default::default() };
        let mut live = LiveActivations::new(model, data, opts).unwrap();
        let mut m = vec![0f32; rows * live.d_model()];
        live.next_rows(&mut m).unwrap();
        m
    };
    let (x, y) = (read(HookPoint::Ln2Normalized(l)), read(HookPoint::MlpOut(l)));
    let (xp, yp) = (out.with_extension("x.npy"), out.with_extension("y.npy"));
    saekit_sae::source::write_npy_f32(&xp, &x, rows, 576).unwrap();
    saekit_sae::source::write_npy_f32(&yp, &y, rows, 576).unwrap();
    let cfg = TrainConfig {
        out: out.display().to_string(),
        d_sae: D_SAE,
        k: K,
        batch_size: BATCH,
        tokens: TOKENS,
        skip: true,
        norm_estimate_rows: 1024,
        log_every: 2,
        checkpoint_every: 8,
        hook_name: HookPoint::Ln2Normalized(l).to_string(),
        hook_name_out: HookPoint::MlpOut(l).to_string(),
        ..Default::default()
    };
    let mut src = NpyPairSource::open(&xp, &yp, 0, false).unwrap();
    saekit_sae::train(&cfg, &mut src, &RunOptions::default()).unwrap();
}

/// Start a run, wait until `ready` holds, send `signal`; returns (exit code, stderr).
fn run_and_signal(args: &[String], ready: impl Fn() -> bool, signal: &str) -> (Option<i32>, String) {
    let mut child = saekit().args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while !ready() {
        assert!(t0.elapsed() < Duration::from_secs(300), "the run was not ready in 300 s");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before the signal");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap().success());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().code(), err)
}

#[test]
fn every_layer_equals_its_separate_training_resumes_to_the_same_bytes_and_loads_as_a_set() {
    assert!(saekit_model::default_model_path().exists(), "needs the model: scripts/fetch-model.sh");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let tokens = tokenize(t);
    let config = t.join("tc.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let full = t.join("tcs");
    let err = ok(saekit().args(run_args(&tokens, &config, &full)).output().unwrap(), "train-transcoders");
    assert!(err.contains("layer") && err.contains("FVU"), "{err}");

    // (a) each layer, bit for bit, as trained alone on the rows of single-hook readers
    let model = Model::load(&saekit_model::default_model_path(), &LoadOptions::default()).unwrap();
    let data = TokenDataset::open(&tokens).unwrap();
    for l in 0..2 {
        let alone = t.join(format!("alone{l}"));
        train_one_layer_separately(&model, &data, l, &alone);
        let mine = tensors(&full.join(format!("layer_{l}/sae_weights.safetensors")));
        let theirs = tensors(&alone.join("sae_weights.safetensors"));
        assert_eq!(mine.iter().map(|t| &t.0).collect::<Vec<_>>(), theirs.iter().map(|t| &t.0).collect::<Vec<_>>());
        for (m, s) in mine.iter().zip(&theirs) {
            assert!(m.1 == s.1, "layer {l}: tensor {} differs from the separately trained one", m.0);
        }
    }
    drop(model);

    // `train --live --input-hook --target-hook` (one layer, the same source): layer 1's tensors
    let single = t.join("single");
    let mut args = run_args(&tokens, &config, &single);
    args.splice(
        0..3,
        ["train", "--live", "--input-hook", "blocks.1.ln2.hook_normalized", "--target-hook", "blocks.1.hook_mlp_out"]
            .map(String::from),
    );
    ok(saekit().args(&args).output().unwrap(), "train --live with a target hook");
    let (mine, theirs) =
        (tensors(&full.join("layer_1/sae_weights.safetensors")), tensors(&single.join("sae_weights.safetensors")));
    assert!(mine == theirs, "train --live --input-hook/--target-hook differs from train-transcoders' layer 1");

    // the summary has a row per layer
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    let rows = summary["layers"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{summary}");
    for r in rows {
        let fvu = r["fvu"].as_f64().unwrap();
        assert!(fvu > 0.0 && fvu < 1.0, "{summary}");
        assert!(r["l0"].as_f64().unwrap() > 0.0 && r["tokens_per_s"].as_f64().unwrap() > 0.0, "{summary}");
    }

    // (c) circuit-tracer's set: transcoders.yaml loads, and its weights are the SAELens folders'
    let yaml = std::fs::read_to_string(full.join("transcoders.yaml")).unwrap();
    assert!(yaml.contains("model_kind: transcoder_set") && yaml.contains("feature_input_hook: mlp.hook_in"), "{yaml}");
    let set = saekit_circuits::TranscoderSet::load(&full).unwrap();
    assert_eq!(set.layers.len(), 2);
    for (l, tc) in set.layers.iter().enumerate() {
        let folder = saekit_circuits::Transcoder::load_saelens(&full.join(format!("layer_{l}"))).unwrap();
        assert_eq!(tc.output_hook, HookPoint::MlpOut(l));
        assert!(tc.w_enc == folder.w_enc && tc.w_dec == folder.w_dec && tc.w_skip == folder.w_skip, "layer {l}");
        assert!(tc.w_skip.is_some(), "--skip saves W_skip");
    }
    let mut eval = saekit();
    eval.args(["eval-model", "--transcoders", full.to_str().unwrap(), "--contexts", tokens.to_str().unwrap()]);
    let out = eval.args(["--tokens", "1024", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["all"]["ce_loss_replaced"].as_f64().is_some(), "{r}");

    // (b) SIGINT, then --resume: the uninterrupted bytes
    let cut = t.join("cut");
    let metrics = cut.join("layer_1/metrics.jsonl");
    let ready = || std::fs::read_to_string(&metrics).map(|s| s.lines().count()).unwrap_or(0) > 0;
    let (code, err) = run_and_signal(&run_args(&tokens, &config, &cut), ready, "-INT");
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("resume with: saekit train-transcoders --resume"), "{err}");
    ok(saekit().args(["train-transcoders", "--resume", cut.to_str().unwrap(), "--quiet"]).output().unwrap(), "resume");
    for l in 0..2 {
        assert!(weights(&cut, l) == weights(&full, l), "layer {l}: resumed after SIGINT differs");
    }

    // SIGKILL after a checkpoint of every layer: --resume continues each from its own
    let killed = t.join("killed");
    let ckpt = |l: usize| saekit_sae::checkpoint::list(&killed.join(format!("layer_{l}"))).is_ok_and(|c| !c.is_empty());
    let (code, _) = run_and_signal(&run_args(&tokens, &config, &killed), || ckpt(0) && ckpt(1), "-KILL");
    assert_eq!(code, None, "SIGKILL leaves no exit code");
    ok(
        saekit().args(["train-transcoders", "--resume", killed.to_str().unwrap(), "--quiet"]).output().unwrap(),
        "resume",
    );
    for l in 0..2 {
        assert!(weights(&killed, l) == weights(&full, l), "layer {l}: resumed after SIGKILL differs");
    }

    // a finished layer is skipped; a deleted one is retrained alone, to the same bytes
    let layer0 = std::fs::metadata(killed.join("layer_0/sae_weights.safetensors")).unwrap().modified().unwrap();
    std::fs::remove_dir_all(killed.join("layer_1")).unwrap();
    let err =
        ok(saekit().args(["train-transcoders", "--resume", killed.to_str().unwrap()]).output().unwrap(), "resume");
    assert!(err.contains("training 1 transcoders (layers 1)") && err.contains("1 already done"), "{err}");
    let after = std::fs::metadata(killed.join("layer_0/sae_weights.safetensors")).unwrap().modified().unwrap();
    assert_eq!(layer0, after, "the finished layer 0 was rewritten");
    assert!(weights(&killed, 1) == weights(&full, 1), "layer 1 trained alone differs");
}

/// Layers the model lacks, hooks of another kind, and missing data are refused in one line.
#[test]
fn bad_layers_and_flags_are_refused_in_one_line() {
    let t = tempfile::tempdir().unwrap();
    let tokens = tokenize(t.path());
    let out = t.path().join("o");
    let (tok, out_s) = (tokens.to_str().unwrap(), out.to_str().unwrap());
    let fail = |args: &[&str], want: &str| {
        let o = saekit().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert!(!o.status.success() && errors.len() == 1 && err.contains(want), "{args:?}: {err}");
    };
    let base = ["train-transcoders", "--contexts", tok, "--out", out_s];
    fail(&[&base[..], &["--layers", "0-30"]].concat(), "layer 30 is out of range");
    fail(&[&base[..], &["--layers", "x"]].concat(), "not a layer number");
    fail(
        &[
            &base[..],
            &["--layers", "0", "--input-hook", "blocks.0.hook_resid_post", "--target-hook", "blocks.0.hook_mlp_out"],
        ]
        .concat(),
        "--input-hook",
    );
    fail(&["train-transcoders", "--layers", "0", "--out", out_s], "--contexts");
    fail(&["train-transcoders", "--resume", out_s], "not a train-transcoders output folder");
}
