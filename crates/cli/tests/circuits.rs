//! `saekit eval-model --transcoders` and `saekit attribute` on the Llama parity fixture (tests/fixtures/llama)
//! with random transcoders saved in circuit-tracer's layout: the commands load them, the replacement
//! evaluation covers every layer, and the graph files parse with circuit-tracer's fields. The numerics are
//! checked in crates/circuits/tests/circuits.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saekit_circuits::{Transcoder, TranscoderActivation, TranscoderSet};
use saekit_model::HookPoint;

fn fixture() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    assert!(p.join("config.json").exists(), "{}: fixture missing; run scripts/make_model_fixtures.sh", p.display());
    p
}

fn saekit(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_saekit")).args(args).output().expect("run saekit");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "saekit {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn write_random_set(dir: &Path, n_layers: usize, d: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut v = |n: usize, s: f32| (0..n).map(|_| s * (rng.gen::<f32>() * 2.0 - 1.0)).collect::<Vec<f32>>();
    let d_sae = 64;
    let layers = (0..n_layers)
        .map(|l| Transcoder {
            d_in: d,
            d_sae,
            d_out: d,
            activation: TranscoderActivation::Relu,
            w_enc: v(d * d_sae, 0.3),
            b_enc: v(d_sae, 0.3),
            w_dec: v(d_sae * d, 0.1),
            b_dec: v(d, 0.1),
            w_skip: None,
            input_hook: HookPoint::Ln2Normalized(l),
            output_hook: HookPoint::MlpOut(l),
        })
        .collect();
    TranscoderSet { layers, scan: "random".into() }.save_circuit_tracer(dir).unwrap();
}

#[test]
fn eval_model_and_attribute_run_on_a_transcoder_set() {
    let m = fixture();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let tc = tmp.path().join("tc");
    let (n_layers, d) =
        (cfg["num_hidden_layers"].as_u64().unwrap() as usize, cfg["hidden_size"].as_u64().unwrap() as usize);
    write_random_set(&tc, n_layers, d);
    let (ms, tcs) = (m.to_str().unwrap(), tc.to_str().unwrap());

    let corpus = m.join("../mini-corpus/mini.jsonl");
    let ctx = tmp.path().join("ctx");
    saekit(&["tokenize", "-m", ms, corpus.to_str().unwrap(), "-o", ctx.to_str().unwrap(), "--context", "32"]);
    let ctx_s = ctx.to_str().unwrap();
    let out = saekit(&[
        "eval-model",
        "--transcoders",
        tcs,
        "--contexts",
        ctx_s,
        "--split",
        "train",
        "--tokens",
        "128",
        "-m",
        ms,
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["per_layer"].as_array().unwrap().len(), n_layers);
    assert!(r["all"]["kl_div_replaced"].as_f64().unwrap() > 0.0, "{r}");

    let graph = tmp.path().join("graph.json");
    let out = saekit(&[
        "attribute",
        "--transcoders",
        tcs,
        "--prompt",
        "The quick brown fox jumps over",
        "-m",
        ms,
        "--out",
        graph.to_str().unwrap(),
        "--ablate",
        "3@1:2",
        "--clamp",
        "5@0:1=4",
    ]);
    assert!(out.contains("influence through error nodes") && out.contains("top logits after"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&graph).unwrap()).unwrap();
    assert_eq!(v["metadata"]["slug"], "graph");
    assert!(v["nodes"].as_array().unwrap().iter().any(|n| n["feature_type"] == "logit"));
    assert!(!v["links"].as_array().unwrap().is_empty());
    let full = std::fs::read(tmp.path().join("graph.full.safetensors")).unwrap();
    let full = safetensors::SafeTensors::deserialize(&full).unwrap();
    let n = full.tensor("adjacency_matrix").unwrap().shape()[0];
    assert!(n >= v["nodes"].as_array().unwrap().len(), "the full graph has fewer nodes than the pruned one");

    let bad = Command::new(env!("CARGO_BIN_EXE_saekit"))
        .args(["attribute", "--transcoders", ctx_s, "--prompt", "x", "-m", ms, "--out", graph.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.trim().lines().count() == 1 && err.contains("transcoders"), "{err}");
}

/// The MLP's hidden points are d_mlp wide: `activations` writes them so, `harvest` refuses them in one line.
#[test]
fn mlp_hidden_points_have_their_own_width() {
    let m = fixture();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    let d_mlp = cfg["intermediate_size"].as_u64().unwrap() as usize;
    let tmp = tempfile::tempdir().unwrap();
    let (ms, npy) = (m.to_str().unwrap(), tmp.path().join("a.npy"));
    saekit(&[
        "activations",
        "-m",
        ms,
        "--text",
        "one two three",
        "--hook",
        "blocks.1.mlp.hook_post",
        "-o",
        npy.to_str().unwrap(),
    ]);
    let f = std::fs::File::open(&npy).unwrap();
    let shape = npyz::NpyFile::new(f).unwrap().shape().to_vec();
    assert_eq!(shape[1] as usize, d_mlp);

    let corpus = m.join("../mini-corpus/mini.jsonl");
    let ctx = tmp.path().join("ctx");
    saekit(&["tokenize", "-m", ms, corpus.to_str().unwrap(), "-o", ctx.to_str().unwrap(), "--context", "32"]);
    let out = Command::new(env!("CARGO_BIN_EXE_saekit"))
        .args(["harvest", "-m", ms, "--contexts", ctx.to_str().unwrap(), "--hooks", "blocks.0.mlp.hook_pre"])
        .arg(tmp.path().join("store"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert!(!out.status.success() && errors.len() == 1 && errors[0].contains("d_mlp"), "{err}");
}
