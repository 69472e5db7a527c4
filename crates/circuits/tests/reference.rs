//! Attribution edges against PyTorch autograd: tests/fixtures/attribution/make.py runs transformers' own Llama
//! modules (the Llama fixture) with attention patterns and norm denominators detached, MLPs replaced by
//! random skip transcoders (saved there in circuit-tracer's layout) plus frozen error terms, and takes every
//! target's gradient with respect to every source. saekit must find the same nodes and the same edges.
//! A missing fixture fails the test.

use std::path::{Path, PathBuf};

use saekit_circuits::{attribute, AttributeOptions, TranscoderSet};
use saekit_model::{LoadOptions, Model};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn array<T: npyz::Deserialize>(
    ar: &mut npyz::npz::NpzArchive<std::io::BufReader<std::fs::File>>,
    name: &str,
) -> Vec<T> {
    ar.by_name(name).unwrap().unwrap_or_else(|| panic!("ref_attribution.npz: no {name}")).into_vec::<T>().unwrap()
}

#[test]
fn edges_match_pytorch_autograd() {
    let dir = fixtures().join("attribution");
    let npz = dir.join("ref_attribution.npz");
    assert!(npz.exists(), "{}: fixture missing; run tests/fixtures/attribution/make.py", npz.display());
    let mut ar = npyz::npz::NpzArchive::open(&npz).unwrap();
    let tokens: Vec<u32> = array::<i64>(&mut ar, "tokens").iter().map(|&t| t as u32).collect();
    let features = array::<i64>(&mut ar, "features");
    let activations = array::<f32>(&mut ar, "activations");
    let logit_tokens = array::<i64>(&mut ar, "logit_tokens");
    let want = array::<f32>(&mut ar, "adjacency");

    let m = Model::load(&fixtures().join("llama"), &LoadOptions::default()).unwrap();
    let set = TranscoderSet::load(&dir).unwrap();
    let opts = AttributeOptions { target_logits: logit_tokens.len(), max_feature_nodes: usize::MAX, batch_targets: 50 };
    let g = attribute(&m, &set, &tokens, &opts).unwrap();

    let got: Vec<i64> = g.features.iter().flat_map(|f| [f.layer as i64, f.pos as i64, f.feature as i64]).collect();
    assert_eq!(got, features, "active features differ from PyTorch's");
    for (f, a) in g.features.iter().zip(&activations) {
        assert!((f.activation - a).abs() < 1e-4 * a.abs().max(1.0), "{f:?}: PyTorch has {a}");
    }
    let got: Vec<i64> = g.logits.iter().map(|l| l.token as i64).collect();
    assert_eq!(got, logit_tokens);
    let n = g.n_nodes();
    assert_eq!(want.len(), n * n);
    let mut worst = 0f32;
    for t in 0..n {
        let (ours, theirs) = (&g.adjacency[t * n..][..n], &want[t * n..][..n]);
        let scale = theirs.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-3);
        for (s, (a, b)) in ours.iter().zip(theirs).enumerate() {
            let e = (a - b).abs() / scale;
            assert!(e < 1e-4, "edge {s} -> {t}: saekit {a}, PyTorch {b}");
            worst = worst.max(e);
        }
    }
    assert!(want.iter().filter(|&&w| w != 0.0).count() > 10_000, "the reference has too few edges to test");
    eprintln!("largest edge difference, relative to its target's largest edge: {worst:.2e}");
}
