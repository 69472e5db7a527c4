//! Parity with Hugging Face transformers on SmolLM2-135M-Instruct (f32, dequantized GGUF).
//! The reference files in `tests/fixtures/smollm2/` were produced by transformers 5.24 (see its README).

use std::path::{Path, PathBuf};

use saekit_model::{ChatMessage, GenerateOptions, HookPoint, Hooks, LoadOptions, Logits, Model};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2")
}

fn model() -> Model {
    let path = saekit_model::default_model_path();
    assert!(
        path.exists(),
        "the real-model tests need {} (run scripts/fetch-model.sh or set SAEKIT_MODEL)",
        path.display()
    );
    Model::load(&path, &LoadOptions::default()).expect("load SmolLM2")
}

fn npy_f32(name: &str) -> Vec<f32> {
    let f = std::fs::File::open(fixtures().join(name)).unwrap();
    npyz::NpyFile::new(f).unwrap().into_vec::<f32>().unwrap()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx.truncate(k);
    idx
}

#[test]
fn smollm2_matches_transformers() {
    let m = model();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("ref_meta.json")).unwrap()).unwrap();
    let prompt = meta["prompt"].as_str().unwrap();

    let f = std::fs::File::open(fixtures().join("ref_token_ids.npy")).unwrap();
    let want_ids: Vec<u32> =
        npyz::NpyFile::new(f).unwrap().into_vec::<i64>().unwrap().iter().map(|&x| x as u32).collect();
    let ids = m.tokenizer().encode(prompt, true).unwrap();
    assert_eq!(ids, want_ids, "token ids differ from transformers");

    let points = [
        (HookPoint::Embed, "ref_embed.npy"),
        (HookPoint::ResidPost(0), "ref_resid_post_L0.npy"),
        (HookPoint::ResidPost(15), "ref_resid_post_L15.npy"),
        (HookPoint::ResidPost(29), "ref_resid_post_L29.npy"),
        (HookPoint::FinalNorm, "ref_final_norm.npy"),
    ];
    let captured = std::sync::Mutex::new(Vec::new());
    let mut hooks = Hooks::new();
    for (p, _) in points {
        let captured = &captured;
        hooks.add(p, move |ctx, x| {
            captured.lock().unwrap().push((ctx.point, x.to_vec()));
            Ok(())
        });
    }
    let mut cache = m.new_cache(1);
    let logits = m.forward(&ids, 1, &mut cache, &mut hooks, Logits::Last).unwrap();
    drop(hooks);
    let captured = captured.into_inner().unwrap();
    for (p, file) in points {
        let got = &captured.iter().find(|(q, _)| *q == p).unwrap().1;
        let err = rel_l2(got, &npy_f32(file));
        println!("{p}: relative L2 error {err:.3e}");
        assert!(err < 1e-4, "{p}: relative L2 error {err:.3e} exceeds 1e-4");
    }
    let want_logits = npy_f32("ref_logits_last.npy");
    let err = rel_l2(&logits, &want_logits);
    println!("last-position logits: relative L2 error {err:.3e}");
    assert!(err < 1e-4);
    assert_eq!(top_k(&logits, 5), top_k(&want_logits, 5), "top-5 next tokens differ");

    // Stopping early gives the same layer-15 activations as the full pass.
    let mut c2 = m.run_with_cache(&ids, 1, &[HookPoint::ResidPost(15)]).unwrap();
    let early = c2.take(&HookPoint::ResidPost(15)).unwrap();
    assert!(rel_l2(&early, &npy_f32("ref_resid_post_L15.npy")) < 1e-4);
}

#[test]
fn smollm2_greedy_generations_match_transformers() {
    let m = model();
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("ref_generate.json")).unwrap()).unwrap();
    for case in refs.as_array().unwrap() {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|mm| ChatMessage {
                role: mm["role"].as_str().unwrap().into(),
                content: mm["content"].as_str().unwrap().into(),
            })
            .collect();
        let text = m.tokenizer().apply_chat_template(&messages).unwrap();
        assert_eq!(text, case["prompt_text"].as_str().unwrap(), "chat template rendering differs");
        let ids = m.tokenizer().encode(&text, false).unwrap();
        let want_prompt: Vec<u32> =
            case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, want_prompt, "chat prompt ids differ");
        let want: Vec<u32> =
            case["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let opts = GenerateOptions { max_new_tokens: want.len(), ..Default::default() };
        let g = m.generate(&ids, &opts, &mut Hooks::new()).unwrap();
        assert_eq!(g.generated_ids, want, "greedy generation differs: got {:?}", g.text);
        assert_eq!(g.text, case["generated_text"].as_str().unwrap());
    }
}

#[test]
fn token_text_shows_split_characters() {
    let m = model();
    let tok = m.tokenizer();
    let ids = tok.encode("信 Hello 🙂 鱻 ۡ", false).unwrap();
    let shown: String = ids.iter().map(|&i| tok.token_text(i)).collect();
    assert!(!shown.contains('\u{fffd}'), "{shown}");
    assert!(shown.contains("\\xe9"), "a character split across tokens shows its bytes: {shown}");
    // Joining the pieces back where characters were split gives the text.
    assert!(shown.contains(" Hello"), "{shown}");
    assert_eq!(tok.token_text(tok.encode(" Hello", false).unwrap()[0]), " Hello");
    assert_eq!(tok.token_text(2), "<|im_end|>");
    for &i in &ids {
        let d = tok.token_text(i);
        assert!(!d.is_empty());
    }
    println!("{:?}", ids.iter().map(|&i| tok.token_text(i)).collect::<Vec<_>>());
}
