//! SAE folder formats: SAELens v6 round trip, SAELens legacy, sparsify, Gemma Scope npz, refusals.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saekit_sae::format::{safetensors_bytes, save_saelens};
use saekit_sae::{load_sae, Activation, Sae};
use serde_json::json;
use std::path::Path;

fn random_sae(act: Activation, d: usize, n: usize, seed: u64) -> Sae {
    let mut s = Sae::init(d, n, act, 1.0, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for v in s.params.w_enc.iter_mut().chain(s.params.b_enc.iter_mut()).chain(s.params.b_dec.iter_mut()) {
        *v += rng.gen::<f32>() - 0.5;
    }
    if act == Activation::JumpRelu {
        for t in s.params.threshold.iter_mut() {
            *t = rng.gen::<f32>() * 0.5;
        }
    }
    s
}

fn rows(d: usize, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    (0..n * d).map(|_| rng.gen::<f32>() * 4.0 - 2.0).collect()
}

fn transpose(src: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut o = vec![0.0; src.len()];
    for i in 0..r {
        for j in 0..c {
            o[j * r + i] = src[i * c + j];
        }
    }
    o
}

/// Reference encoder written from the published definitions, independent of the kernels.
fn reference_codes(s: &Sae, x: &[f32]) -> Vec<f32> {
    let (d, n) = (s.d_in, s.d_sae);
    let mut out = vec![0.0f32; x.len() / d * n];
    for r in 0..x.len() / d {
        let mut pre: Vec<(usize, f32)> = (0..n)
            .map(|j| {
                let v: f32 = (0..d)
                    .map(|i| {
                        (x[r * d + i] - if s.apply_b_dec_to_input { s.params.b_dec[i] } else { 0.0 })
                            * s.params.w_enc[j * d + i]
                    })
                    .sum::<f32>()
                    + s.params.b_enc[j];
                (j, v)
            })
            .collect();
        match s.activation {
            Activation::TopK { k } => {
                pre.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
                for &(j, v) in pre.iter().take(k) {
                    out[r * n + j] = v.max(0.0);
                }
            }
            Activation::JumpRelu => {
                for (j, v) in pre {
                    out[r * n + j] = if v > s.params.threshold[j] { v.max(0.0) } else { 0.0 };
                }
            }
            Activation::Relu => {
                for (j, v) in pre {
                    out[r * n + j] = v.max(0.0);
                }
            }
        }
    }
    out
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn saelens_v6_round_trip_every_activation() {
    let t = tempfile::tempdir().unwrap();
    for (i, act) in [Activation::TopK { k: 3 }, Activation::JumpRelu, Activation::Relu].into_iter().enumerate() {
        let s = random_sae(act, 12, 40, i as u64);
        let dir = t.path().join(format!("s{i}"));
        save_saelens(&dir, &s, None, None).unwrap();
        let l = load_sae(&dir).unwrap();
        assert_eq!(l.params.w_enc, s.params.w_enc);
        assert_eq!(l.params.w_dec, s.params.w_dec);
        assert_eq!(l.params.threshold, s.params.threshold);
        assert_eq!(l.activation, s.activation);
        let x = rows(12, 7);
        assert_close(&l.encode_dense(&x), &reference_codes(&s, &x), "codes");
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn saelens_legacy_topk_folder() {
    let t = tempfile::tempdir().unwrap();
    let s = random_sae(Activation::TopK { k: 4 }, 10, 30, 3);
    let w_enc_t = transpose(&s.params.w_enc, 30, 10);
    write(
        &t.path().join("sae_weights.safetensors"),
        &safetensors_bytes(
            &[
                ("W_enc", vec![10, 30], &w_enc_t),
                ("W_dec", vec![30, 10], &s.params.w_dec),
                ("b_enc", vec![30], &s.params.b_enc),
                ("b_dec", vec![10], &s.params.b_dec),
            ],
            None,
        )
        .unwrap(),
    );
    let cfg = json!({"architecture": "standard", "d_in": 10, "d_sae": 30, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": true, "finetuning_scaling_factor": false,
        "context_size": 128, "model_name": "gpt2", "hook_point": "blocks.8.hook_resid_pre", "hook_point_layer": 8,
        "prepend_bos": true, "normalize_activations": "none", "dtype": "float32", "device": "cpu"});
    write(&t.path().join("cfg.json"), cfg.to_string().as_bytes());
    let l = load_sae(t.path()).unwrap();
    assert_eq!(l.activation, Activation::TopK { k: 4 });
    assert_eq!(l.metadata.hook_name, "blocks.8.hook_resid_pre");
    let x = rows(10, 5);
    assert_close(&l.encode_dense(&x), &reference_codes(&s, &x), "legacy codes");
}

#[test]
fn sparsify_folder_is_not_transposed_wrongly() {
    let t = tempfile::tempdir().unwrap();
    let s = random_sae(Activation::TopK { k: 5 }, 8, 24, 4);
    // sparsify: encoder.weight is nn.Linear [num_latents, d_in]; W_dec [num_latents, d_in]
    write(
        &t.path().join("sae.safetensors"),
        &safetensors_bytes(
            &[
                ("encoder.weight", vec![24, 8], &s.params.w_enc),
                ("encoder.bias", vec![24], &s.params.b_enc),
                ("W_dec", vec![24, 8], &s.params.w_dec),
                ("b_dec", vec![8], &s.params.b_dec),
            ],
            None,
        )
        .unwrap(),
    );
    let cfg = json!({"activation": "topk", "expansion_factor": 3, "normalize_decoder": true, "num_latents": 24,
        "k": 5, "multi_topk": false, "skip_connection": false, "transcode": false, "d_in": 8});
    write(&t.path().join("cfg.json"), cfg.to_string().as_bytes());
    let l = load_sae(t.path()).unwrap();
    let x = rows(8, 6);
    assert_close(&l.encode_dense(&x), &reference_codes(&s, &x), "sparsify codes");
    assert_close(&l.decode(&l.encode(&x)), &s.decode(&s.encode(&x)), "sparsify recon");
    // a skip-connection sparsify SAE is refused
    write(
        &t.path().join("cfg.json"),
        json!({"activation": "topk", "k": 5, "skip_connection": true}).to_string().as_bytes(),
    );
    assert!(load_sae(t.path()).unwrap_err().to_string().contains("skip"));
}

#[test]
fn gemma_scope_npz() {
    gemma_scope_npz_in(npyz::Order::C);
}

/// numpy saves `W.T` (how a Gemma-Scope-shaped W_enc is often made) column-major: same codes expected.
#[test]
fn gemma_scope_npz_with_fortran_ordered_w_enc() {
    gemma_scope_npz_in(npyz::Order::Fortran);
}

fn gemma_scope_npz_in(w_enc_order: npyz::Order) {
    use npyz::WriterBuilder;
    let t = tempfile::tempdir().unwrap();
    let mut s = random_sae(Activation::JumpRelu, 6, 20, 5);
    s.apply_b_dec_to_input = false;
    let p = t.path().join("params.npz");
    {
        let mut w = npyz::npz::NpzWriter::create(&p).unwrap();
        // W_enc is [d_in, d_sae]; in Fortran order its bytes are those of the row-major [d_sae, d_in] matrix
        let w_enc_bytes = match w_enc_order {
            npyz::Order::C => transpose(&s.params.w_enc, 20, 6),
            npyz::Order::Fortran => s.params.w_enc.clone(),
        };
        for (name, shape, data, order) in [
            ("W_enc", vec![6u64, 20], &w_enc_bytes, w_enc_order),
            ("W_dec", vec![20, 6], &s.params.w_dec, npyz::Order::C),
            ("b_enc", vec![20], &s.params.b_enc, npyz::Order::C),
            ("b_dec", vec![6], &s.params.b_dec, npyz::Order::C),
            ("threshold", vec![20], &s.params.threshold, npyz::Order::C),
        ] {
            let mut a = w
                .array::<f32>(name, Default::default())
                .unwrap()
                .default_dtype()
                .order(order)
                .shape(&shape)
                .begin_nd()
                .unwrap();
            a.extend(data.iter().copied()).unwrap();
            a.finish().unwrap();
        }
    }
    let l = load_sae(&p).unwrap();
    assert!(!l.apply_b_dec_to_input);
    assert_eq!(l.activation, Activation::JumpRelu);
    let x = rows(6, 5);
    assert_close(&l.encode_dense(&x), &reference_codes(&s, &x), "gemma scope codes");
}

#[test]
fn refuses_what_it_cannot_reproduce() {
    let t = tempfile::tempdir().unwrap();
    let s = random_sae(Activation::JumpRelu, 6, 10, 6);
    save_saelens(t.path(), &s, None, None).unwrap();
    let cfg_path = t.path().join("cfg.json");
    let mut orig: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    // edited by hand below, as a folder from another tool: without saekit's file list
    std::fs::remove_file(t.path().join(saekit_sae::format::FILE_LIST)).unwrap();
    orig["metadata"].as_object_mut().unwrap().remove("saekit_file_list");
    let mut c = orig.clone();
    c["normalize_activations"] = json!("layer_norm");
    write(&cfg_path, c.to_string().as_bytes());
    assert!(load_sae(t.path()).unwrap_err().to_string().contains("normalize_activations"));
    let mut c = orig.clone();
    c["architecture"] = json!("gated");
    write(&cfg_path, c.to_string().as_bytes());
    assert!(load_sae(t.path()).unwrap_err().to_string().contains("gated"));
    // jumprelu weights without a threshold tensor
    write(&cfg_path, orig.to_string().as_bytes());
    let w_enc_t = transpose(&s.params.w_enc, 10, 6);
    write(
        &t.path().join("sae_weights.safetensors"),
        &safetensors_bytes(
            &[
                ("W_enc", vec![6, 10], &w_enc_t),
                ("W_dec", vec![10, 6], &s.params.w_dec),
                ("b_enc", vec![10], &s.params.b_enc),
                ("b_dec", vec![6], &s.params.b_dec),
            ],
            None,
        )
        .unwrap(),
    );
    assert!(load_sae(t.path()).unwrap_err().to_string().contains("threshold"));
    // wrong orientation of W_enc
    write(
        &t.path().join("sae_weights.safetensors"),
        &safetensors_bytes(
            &[
                ("W_enc", vec![10, 6], &s.params.w_enc),
                ("W_dec", vec![10, 6], &s.params.w_dec),
                ("b_enc", vec![10], &s.params.b_enc),
                ("b_dec", vec![6], &s.params.b_dec),
                ("threshold", vec![10], &s.params.threshold),
            ],
            None,
        )
        .unwrap(),
    );
    assert!(load_sae(t.path()).unwrap_err().to_string().contains("W_enc"));
}
