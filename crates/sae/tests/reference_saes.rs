//! SAE folders written by SAELens and sparsify themselves (tests/fixtures/reference-saes, made by the
//! `make.py` beside them): saekit's codes and reconstructions must equal the ones those libraries
//! computed on the same inputs.

use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference-saes")
}

fn npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(std::io::BufReader::new(f)).unwrap();
    let shape = npy.shape().iter().map(|&s| s as usize).collect();
    (shape, npy.into_vec::<f32>().unwrap())
}

fn check(name: &str) {
    let dir = fixtures().join(name);
    let sae = saekit_sae::load_sae(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let (shape, x) = npy(&fixtures().join("inputs.npy"));
    assert_eq!(shape[1], sae.d_in, "{name}: d_in");
    let (cs, want_codes) = npy(&dir.join("codes.npy"));
    assert_eq!(cs, vec![shape[0], sae.d_sae], "{name}: codes shape");
    let codes = sae.encode_dense(&x);
    let mut active = 0;
    for (i, (a, b)) in codes.iter().zip(&want_codes).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "{name}: code {} of row {} is {a}, the library computed {b}",
            i % sae.d_sae,
            i / sae.d_sae
        );
        active += (*b != 0.0) as usize;
    }
    assert!(active > shape[0], "{name}: the reference codes are (nearly) all zero: a weak check");
    let (_, want_recon) = npy(&dir.join("recon.npy"));
    let recon = sae.decode(&sae.encode(&x));
    for (i, (a, b)) in recon.iter().zip(&want_recon).enumerate() {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{name}: reconstruction element {i}: {a} vs {b}");
    }
}

#[test]
fn saelens_standard_topk_and_jumprelu_codes_match_saelens() {
    for name in ["saelens-standard", "saelens-topk", "saelens-jumprelu"] {
        check(name);
    }
}

#[test]
fn sparsify_codes_match_sparsify() {
    check("sparsify-topk");
}
