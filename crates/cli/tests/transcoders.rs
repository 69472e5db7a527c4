//! Transcoder training on real rows: the mini corpus is tokenized and layer 0's MLP input and output
//! (`blocks.0.ln2.hook_normalized`, `blocks.0.hook_mlp_out`) are harvested from the real model in one pass;
//! `saekit train --input-hook --target-hook --skip` trains a skip transcoder on them. The saved folder loads
//! with saekit-circuits' loader, whose forward (its own code, not the trainer's) reproduces the FVU the
//! trainer reports on the same rows read independently from the store; `eval-model --transcoders`
//! replaces MLP 0 by it and must beat zero-ablation; a run stopped by SIGINT and resumed ends with the
//! bytes of an uninterrupted one.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use saekit_circuits::{TranscoderActivation, TranscoderSet};
use saekit_store::{ActivationReader, ActivationStore, ReaderOptions};

const IN: &str = "blocks.0.ln2.hook_normalized";
const OUT: &str = "blocks.0.hook_mlp_out";

/// In f32, not `auto`: runs are compared byte for byte, and each process would measure its own pick.
fn saekit() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_saekit"));
    c.env("SAEKIT_PRECISION", "f32");
    c
}

fn ok(o: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{what} failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    stdout
}

/// The first `n` rows of `hook` as the trainer's reader serves them (seed 0, shuffled, `batch` rows a read).
fn first_rows(store: &Path, hook: &str, batch: usize, n: usize) -> (Vec<f32>, usize) {
    let store = ActivationStore::open(store).unwrap();
    let opts = ReaderOptions { hook: hook.into(), batch_tokens: batch, seed: 0, shuffle: true, ..Default::default() };
    let mut reader = ActivationReader::new(&store, opts, None).unwrap();
    let d = reader.d_model();
    let mut rows = Vec::new();
    let mut buf = vec![0f32; batch * d];
    while rows.len() < n * d {
        reader.next_batch(&mut buf).unwrap();
        rows.extend_from_slice(&buf);
    }
    rows.truncate(n * d);
    (rows, d)
}

fn fvu(y: &[f32], yhat: &[f32], d: usize) -> f64 {
    let rows = y.len() / d;
    let mut mean = vec![0f64; d];
    for (q, &v) in y.iter().enumerate() {
        mean[q % d] += v as f64 / rows as f64;
    }
    let err: f64 = y.iter().zip(yhat).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let var: f64 = y.iter().enumerate().map(|(q, &a)| (a as f64 - mean[q % d]).powi(2)).sum();
    err / var
}

/// Start `saekit train`, wait until it has logged a step, send SIGINT; returns its stderr.
fn train_and_interrupt(args: &[&str], metrics: &Path) -> String {
    let mut child = saekit().args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(metrics).map(|s| s.lines().count()).unwrap_or(0) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(300), "training logged no step in 300 s");
        assert!(child.try_wait().unwrap().is_none(), "training ended before the signal");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130), "{err}");
    err
}

#[test]
fn a_skip_transcoder_trained_on_real_rows_loads_reproduces_its_fvu_beats_ablation_and_resumes() {
    assert!(saekit_model::default_model_path().exists(), "needs the model: scripts/fetch-model.sh");
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mini-corpus");
    let tokens = t.join("tokens");
    let mut tok = saekit();
    tok.arg("tokenize").arg(&corpus).arg("-o").arg(&tokens);
    tok.args(["--context", "64", "--validation-fraction", "0.25", "--max-tokens", "40k"]);
    ok(tok.output().unwrap(), "tokenize");
    let store = t.join("acts");
    let mut harvest = saekit();
    harvest.args(["harvest", "--hooks", &format!("{IN},{OUT}"), "--tokens", "12k", "--batch", "4", "--contexts"]);
    ok(harvest.arg(&tokens).arg(&store).output().unwrap(), "harvest");

    // 2,048 read-ahead rows: the trainer's final FVU is on the first 2,048 rows of its data
    let config = t.join("tc.toml");
    std::fs::write(&config, "norm_estimate_rows = 2048\nlog_every = 2\ncheckpoint_every = 1000000\n").unwrap();
    let (cfg, store_s) = (config.to_str().unwrap(), store.to_str().unwrap());
    let train = |out: &Path, tokens: &str| -> Vec<String> {
        let args = ["train", "--config", cfg, "--acts", store_s, "--input-hook", IN, "--target-hook", OUT, "--skip"];
        let rest = ["--d-sae", "2048", "--k", "16", "--batch-size", "256", "--tokens", tokens, "--quiet", "--out"];
        args.iter().chain(&rest).map(|s| s.to_string()).chain([out.to_str().unwrap().to_string()]).collect()
    };
    let tc = t.join("tc");
    let args = train(&tc, "64k");
    ok(saekit().args(&args).output().unwrap(), "train");

    // the SAELens transcoder folder, loaded by saekit-circuits
    let set = TranscoderSet::load(&tc).unwrap();
    assert_eq!(set.layers.len(), 1);
    let l0 = &set.layers[0];
    assert_eq!((l0.input_hook.to_string(), l0.output_hook.to_string()), (IN.to_string(), OUT.to_string()));
    assert_eq!((l0.d_in, l0.d_out, l0.d_sae), (576, 576, 2048));
    assert_eq!(l0.activation, TranscoderActivation::TopK(16));
    let skip = l0.w_skip.as_ref().expect("--skip saves W_skip");
    assert!(skip.iter().any(|v| *v != 0.0), "W_skip starts at zero and must have learned");
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tc.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["architecture"], "topk_transcoder");
    assert_eq!((cfg_json["hook_name"].as_str(), cfg_json["hook_name_out"].as_str()), (Some(IN), Some(OUT)));
    assert_eq!(cfg_json["apply_b_dec_to_input"], false);

    // the trainer's FVU of its saved weights on its first rows = the circuits forward on those rows
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tc.join("training_summary.json")).unwrap()).unwrap();
    let first = &summary["final_on_first_rows"];
    let (n, reported) = (first["rows"].as_u64().unwrap() as usize, first["fvu"].as_f64().unwrap());
    assert_eq!(n, 2048, "{summary}");
    let (x, d) = first_rows(&store, IN, 256, n);
    let (y, o) = first_rows(&store, OUT, 256, n);
    assert_eq!((d, o), (576, 576));
    let mine = fvu(&y, &l0.forward(&x), o);
    assert!((reported - mine).abs() < 1e-3 * mine, "trainer FVU {reported} vs recomputed {mine}");
    assert!(mine < 0.5, "250 steps on layer 0's MLP should explain most of its output: FVU {mine}");
    let last_fvu = summary["last"]["fvu"].as_f64().unwrap();
    assert!((last_fvu - mine).abs() < 0.15, "last training batch FVU {last_fvu} vs {mine} on the first rows");

    // MLP 0 replaced by the transcoder costs less loss than ablating it
    let mut eval = saekit();
    eval.args(["eval-model", "--transcoders", tc.to_str().unwrap(), "--contexts", tokens.to_str().unwrap()]);
    let out = ok(eval.args(["--tokens", "2048", "--json"]).output().unwrap(), "eval-model");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let all = &r["all"];
    let (replaced, ablated) = (all["ce_loss_replaced"].as_f64().unwrap(), all["ce_loss_ablated"].as_f64().unwrap());
    assert!(replaced < ablated && all["ce_loss_score"].as_f64().unwrap() > 0.0, "{r}");
    println!("FVU trainer {reported:.4} / circuits {mine:.4} on {n} rows; last batch {last_fvu:.4}; eval-model: {all}");

    // SIGINT, then --resume: the bytes of the uninterrupted run above
    let cut = t.join("cut");
    let cut_args = train(&cut, "64k");
    let cut_refs: Vec<&str> = cut_args.iter().map(String::as_str).collect();
    let err = train_and_interrupt(&cut_refs, &cut.join("metrics.jsonl"));
    assert!(err.contains("resume with: saekit train --resume"), "{err}");
    ok(saekit().args(["train", "--resume", cut.to_str().unwrap(), "--quiet"]).output().unwrap(), "resume");
    for f in ["sae_weights.safetensors", "sparsity.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join(f)).unwrap();
        assert!(read(&cut) == read(&tc), "{f}: the resumed transcoder differs from the uninterrupted one");
    }
}

/// A transcoder needs two hooks of one store (or of the model, `--live`): a `.npy`, a `.npy` given as
/// live contexts, one hook twice or a hook the store lacks are refused in one line naming the problem,
/// before any training.
#[test]
fn transcoder_flags_on_data_that_cannot_hold_pairs_are_refused_in_one_line() {
    let t = tempfile::tempdir().unwrap();
    let npy = t.path().join("x.npy");
    saekit_sae::source::write_npy_f32(&npy, &vec![0.5f32; 64 * 8], 64, 8).unwrap();
    let out = t.path().join("o");
    let hooks = ["--input-hook", IN, "--target-hook", OUT];
    let fail = |args: &[&str], want: &str| {
        let o = saekit().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert!(!o.status.success() && errors.len() == 1 && err.contains(want), "{args:?}: {err}");
    };
    let (npy_s, out_s) = (npy.to_str().unwrap(), out.to_str().unwrap());
    fail(&[&["train", "--acts", npy_s, "--out", out_s][..], &hooks].concat(), "activation store");
    // --live reads the pairs from the model: a .npy is no tokenized dataset
    fail(&[&["train", "--live", "--contexts", npy_s, "--out", out_s][..], &hooks].concat(), npy_s);
    fail(&["train", "--acts", npy_s, "--target-hook", OUT, "--out", out_s], "--input-hook");
    fail(&["train", "--acts", npy_s, "--skip", "--out", out_s, "--force"], "skip");
}
