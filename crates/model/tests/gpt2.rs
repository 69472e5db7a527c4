//! GPT-2 parity against transformers on a small randomly initialised GPT-2 (made by
//! scripts/make_gpt2_fixture.py; the fixture is committed so this test needs no Python).

use std::path::{Path, PathBuf};

use saekit_model::{HookPoint, Hooks, LoadOptions, Logits, Model};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny")
}

fn npy<T: npyz::Deserialize>(name: &str) -> Vec<T> {
    let f = std::fs::File::open(dir().join(name)).unwrap();
    npyz::NpyFile::new(f).unwrap().into_vec::<T>().unwrap()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn tiny_gpt2_matches_transformers() {
    let m = Model::load(&dir(), &LoadOptions::default()).unwrap();
    assert_eq!(m.config().arch, saekit_model::Arch::Gpt2);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("ref_meta.json")).unwrap()).unwrap();
    let ids = m.tokenizer().encode(meta["text"].as_str().unwrap(), false).unwrap();
    let want: Vec<u32> = npy::<i64>("ref_token_ids.npy").iter().map(|&x| x as u32).collect();
    assert_eq!(ids, want);

    let points = [
        (HookPoint::Embed, "ref_embed.npy"),
        (HookPoint::ResidPost(0), "ref_resid_post_L0.npy"),
        (HookPoint::ResidPost(1), "ref_resid_post_L1.npy"),
    ];
    let got = std::sync::Mutex::new(Vec::new());
    let mut hooks = Hooks::new();
    for (p, _) in points {
        let got = &got;
        hooks.add(p, move |ctx, x| {
            got.lock().unwrap().push((ctx.point, x.to_vec()));
            Ok(())
        });
    }
    let mut cache = m.new_cache(1);
    let logits = m.forward(&ids, 1, &mut cache, &mut hooks, Logits::All).unwrap();
    drop(hooks);
    let got = got.into_inner().unwrap();
    for (p, f) in points {
        let x = &got.iter().find(|(q, _)| *q == p).unwrap().1;
        let e = rel_l2(x, &npy::<f32>(f));
        assert!(e < 1e-5, "{p}: relative L2 error {e:.3e}");
    }
    let e = rel_l2(&logits, &npy::<f32>("ref_logits.npy"));
    assert!(e < 1e-5, "logits: relative L2 error {e:.3e}");

    // Incremental decoding with the KV cache gives the same last logits as one full pass.
    let mut cache = m.new_cache(1);
    let n = ids.len();
    m.forward(&ids[..n - 3], 1, &mut cache, &mut Hooks::new(), Logits::Last).unwrap();
    let mut last = Vec::new();
    for &t in &ids[n - 3..] {
        last = m.forward(&[t], 1, &mut cache, &mut Hooks::new(), Logits::Last).unwrap();
    }
    let v = m.config().vocab_size;
    assert!(rel_l2(&last, &logits[(n - 1) * v..]) < 1e-5);
}
