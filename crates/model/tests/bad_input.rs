//! Broken model files must give one clear error naming the file and the problem, never a panic.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use saekit_model::{HookPoint, Hooks, LoadOptions, Logits, Model, ModelError};

/// Loading `path` fails with one line, and it is the file's fault (not the disk's, not saekit's).
fn load_err(path: &Path) -> String {
    match Model::load(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(!msg.contains('\n'), "error should be one line: {msg}");
            assert!(matches!(e, ModelError::BadFile(_)), "{msg}: sorted as {e:?}, not as a bad file");
            msg
        }
    }
}

/// What a forward pass refuses is the caller's input; what fails inside a hook is not.
#[test]
fn forward_errors_say_whose_fault_they_are() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny");
    let m = Model::load(&dir, &LoadOptions::default()).unwrap();
    let (vocab, context) = (m.config().vocab_size as u32, m.config().max_positions);
    let forward = |tokens: &[u32], hooks: &mut Hooks| {
        m.forward(tokens, 1, &mut m.new_cache(1), hooks, Logits::Last).map(|_| ()).unwrap_err()
    };
    let e = forward(&[1, vocab], &mut Hooks::new());
    assert!(matches!(&e, ModelError::BadInput(msg) if msg.contains(&vocab.to_string())), "{e:?}");
    // the context check runs inside the block loop and comes back through anyhow with its kind
    let e = forward(&vec![1; context + 1], &mut Hooks::new());
    assert!(matches!(&e, ModelError::BadInput(msg) if msg.contains("context length")), "{e:?}");
    let mut deep = Hooks::new();
    deep.add(HookPoint::ResidPost(99), |_, _| Ok(()));
    assert!(matches!(forward(&[1, 2], &mut deep), ModelError::BadInput(_)));
    let mut failing = Hooks::new();
    failing.add(HookPoint::ResidPost(0), |_, _| anyhow::bail!("the hook's own failure"));
    let e = forward(&[1, 2], &mut failing);
    assert!(matches!(&e, ModelError::Internal(_)) && format!("{e:#}").contains("own failure"), "{e:?}");
}

/// Metadata of a 1-block llama with d_model 32, with `arch` as its architecture name.
fn tiny_meta(arch: &str) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let toks = ["a", "b", "c", "ab", "<|endoftext|>"];
    vec![
        ("general.architecture".into(), V::String(arch.into())),
        (format!("{arch}.block_count"), V::U32(1)),
        (format!("{arch}.embedding_length"), V::U32(32)),
        (format!("{arch}.attention.head_count"), V::U32(2)),
        (format!("{arch}.attention.head_count_kv"), V::U32(1)),
        (format!("{arch}.feed_forward_length"), V::U32(64)),
        (format!("{arch}.context_length"), V::U32(64)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), V::F32(1e-5)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), V::Array(toks.iter().map(|t| V::String(t.to_string())).collect())),
        ("tokenizer.ggml.merges".into(), V::Array(vec![V::String("a b".into())])),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(4)),
    ]
}

fn write_gguf(path: &Path, meta: &[(String, gguf_file::Value)], tensors: &[(&str, Vec<usize>)]) {
    let qts: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, shape)| {
            let t = Tensor::ones(shape.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap();
            (n.to_string(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
}

fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn truncated_gguf_names_the_file() {
    let real = saekit_model::default_model_path();
    assert!(real.exists(), "needs {} (scripts/fetch-model.sh)", real.display());
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "truncated.gguf");
    let bytes = std::fs::read(&real).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("truncated.gguf") && e.contains("remaining in file"), "{e}");
    // Cut inside the header: the metadata itself is incomplete.
    std::fs::write(&p, &bytes[..4096]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("truncated.gguf") && e.contains("not a valid GGUF"), "{e}");
}

#[test]
fn garbage_is_not_a_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "garbage.gguf");
    std::fs::write(&p, b"this is not a model at all, just text".repeat(10)).unwrap();
    let e = load_err(&p);
    assert!(e.contains("garbage.gguf") && e.contains("not a valid GGUF"), "{e}");
}

#[test]
fn unknown_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "mamba.gguf");
    write_gguf(&p, &tiny_meta("mamba"), &[]);
    let e = load_err(&p);
    assert!(e.contains("unsupported architecture 'mamba'"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "empty.gguf");
    write_gguf(&p, &tiny_meta("llama"), &[("output_norm.weight", vec![32])]);
    let e = load_err(&p);
    assert!(e.contains("missing tensor 'blk.0.attn_q.weight'"), "{e}");
}

#[test]
fn shape_mismatch_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "shape.gguf");
    write_gguf(&p, &tiny_meta("llama"), &[("blk.0.attn_q.weight", vec![31])]);
    let e = load_err(&p);
    assert!(e.contains("'blk.0.attn_q.weight' has shape [31]") && e.contains("[32, 32]"), "{e}");
}

#[test]
fn unknown_quantization_is_refused() {
    // A hand-written GGUF v3 header with one tensor of ggml type 99.
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "quant99.gguf");
    let mut b: Vec<u8> = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    let s = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "token_embd.weight");
    b.extend(1u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(99u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().div_ceil(32) * 32 + 256, 0);
    std::fs::File::create(&p).unwrap().write_all(&b).unwrap();
    let e = load_err(&p);
    assert!(e.contains("quant99.gguf") && e.contains("99"), "{e}");
}

#[test]
fn broken_hf_folders_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("config.json"), r#"{"model_type": "bert", "hidden_size": 8}"#).unwrap();
    let e = load_err(d);
    assert!(e.contains("config.json") && e.contains("unsupported model_type 'bert'"), "{e}");

    let cfg = r#"{"model_type": "llama", "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 5, "max_position_embeddings": 64}"#;
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = load_err(d);
    assert!(e.contains("no *.safetensors"), "{e}");

    std::fs::write(d.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let e = load_err(d);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn missing_default_model_says_how_to_fetch_it() {
    let e = load_err(Path::new("/nonexistent/model.gguf"));
    assert!(e.contains("no such file"), "{e}");
}

/// Every tensor of the 1-block llama of [`tiny_meta`] (all ones).
fn tiny_llama_tensors() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("token_embd.weight", vec![5, 32]),
        ("output_norm.weight", vec![32]),
        ("blk.0.attn_norm.weight", vec![32]),
        ("blk.0.attn_q.weight", vec![32, 32]),
        ("blk.0.attn_k.weight", vec![16, 32]),
        ("blk.0.attn_v.weight", vec![16, 32]),
        ("blk.0.attn_output.weight", vec![32, 32]),
        ("blk.0.ffn_norm.weight", vec![32]),
        ("blk.0.ffn_gate.weight", vec![64, 32]),
        ("blk.0.ffn_up.weight", vec![64, 32]),
        ("blk.0.ffn_down.weight", vec![32, 64]),
    ]
}

fn set_meta(meta: &mut Vec<(String, gguf_file::Value)>, key: &str, v: gguf_file::Value) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.to_string(), v));
}

#[test]
fn zero_alignment_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "align0.gguf");
    let mut meta = tiny_meta("llama");
    write_gguf(&p, &meta, &tiny_llama_tensors());
    Model::load(&p, &LoadOptions::default()).expect("the tiny llama itself loads");
    for v in [gguf_file::Value::U32(0), gguf_file::Value::U8(0), gguf_file::Value::I32(0), gguf_file::Value::U16(12)] {
        set_meta(&mut meta, "general.alignment", v);
        write_gguf(&p, &meta, &tiny_llama_tensors());
        let e = load_err(&p);
        assert!(e.contains("align0.gguf") && e.contains("general.alignment"), "{e}");
    }
}

#[test]
fn huge_context_length_does_not_size_the_rotary_table() {
    let dir = tempfile::tempdir().unwrap();
    let p = tmp(&dir, "longctx.gguf");
    let mut meta = tiny_meta("llama");
    // 4G positions x 8 rotary pairs x 2 tables of f32 would be 256 GiB
    set_meta(&mut meta, "llama.context_length", gguf_file::Value::U32(u32::MAX));
    write_gguf(&p, &meta, &tiny_llama_tensors());
    let m = Model::load(&p, &LoadOptions::default()).unwrap();
    assert_eq!(m.config().max_positions, u32::MAX as usize);
    set_meta(&mut meta, "llama.context_length", gguf_file::Value::U32(0));
    write_gguf(&p, &meta, &tiny_llama_tensors());
    let e = load_err(&p);
    assert!(e.contains("longctx.gguf") && e.contains("context length 0"), "{e}");
    set_meta(&mut meta, "llama.embedding_length", gguf_file::Value::I32(-1));
    write_gguf(&p, &meta, &tiny_llama_tensors());
    let e = load_err(&p);
    assert!(e.contains("longctx.gguf") && e.contains("larger than"), "{e}");
}

/// A copy of the tiny GPT-2 HF folder with `edit` applied to the text of `file`.
fn edited_gpt2(dir: &Path, file: &str, edit: impl Fn(&str) -> String) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    let edited = edit(&text);
    assert_ne!(edited, text, "the edit of {file} changed nothing");
    std::fs::write(dir.join(file), edited).unwrap();
}

/// Found by the mutation soak: each of these panicked inside the loader before.
#[test]
fn tokenizer_and_config_edits_that_panicked_are_errors() {
    // invalid JSON inside the decoder: the tokenizers crate unwraps it
    let dir = tempfile::tempdir().unwrap();
    edited_gpt2(dir.path(), "tokenizer.json", |t| {
        let at = t.find(r#""decoder""#).unwrap();
        let (head, tail) = t.split_at(at);
        format!("{head}{}", tail.replacen(r#""ByteLevel""#, "ByteLevel\"", 1))
    });
    let e = load_err(dir.path());
    assert!(e.contains("tokenizer.json") && e.contains("not a valid tokenizer.json"), "{e}");

    // a prefix longer than the tokens it is cut from: the crate's BPE subtracts with overflow
    let dir = tempfile::tempdir().unwrap();
    edited_gpt2(dir.path(), "tokenizer.json", |t| {
        let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
        v["model"]["continuing_subword_prefix"] = "../../../../etc/passwd".into();
        v.to_string()
    });
    let e = load_err(dir.path());
    assert!(e.contains("tokenizer.json") && e.contains("tokenizers crate failed"), "{e}");

    // a width whose default feed-forward size (4 × width) overflows
    let dir = tempfile::tempdir().unwrap();
    edited_gpt2(dir.path(), "config.json", |t| {
        let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
        v["n_embd"] = u64::MAX.into();
        v.as_object_mut().unwrap().remove("n_inner");
        v.to_string()
    });
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("larger than"), "{e}");
}
