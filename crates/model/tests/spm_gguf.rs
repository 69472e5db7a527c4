//! SentencePiece vocabularies read from GGUF metadata, against sentencepiece itself:
//! tests/fixtures/spm-gguf/make.py trains two tiny SentencePiece BPE models with byte fallback (Gemma-style:
//! no space prefix, digits split, chat markers; Llama-style: a space prefix), writes their vocabularies into
//! GGUF files as llama.cpp's convert_hf_to_gguf.py does, and records sentencepiece's ids and decodings for
//! strings with leading and repeated spaces, newlines, tabs, digits, emoji and other characters the
//! vocabulary lacks, and special tokens.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use saekit_model::{ChatMessage, Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/spm-gguf")
}

fn read_gguf(path: &Path) -> gguf_file::Content {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    gguf_file::Content::read(&mut f).unwrap()
}

/// The tokenizer of fixture `name` and what sentencepiece says about it.
fn load(name: &str) -> (Tokenizer, Value) {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let spec = expected[name].clone();
    let path = fixtures().join(spec["gguf"].as_str().unwrap());
    let tok = Tokenizer::from_gguf(&read_gguf(&path), &path).unwrap();
    (tok, spec)
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
}

/// Every case encodes to sentencepiece's ids and decodes back to sentencepiece's text.
fn check_cases(name: &str) {
    let (tok, spec) = load(name);
    assert_eq!(tok.vocab_size() as u64, spec["vocab_size"].as_u64().unwrap());
    let cases = spec["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        let got = tok.encode(text, false).unwrap();
        let pieces: Vec<String> = got.iter().map(|&i| tok.token_text(i)).collect();
        assert_eq!(got, want, "{name}: {text:?} gave {pieces:?}, sentencepiece {}", case["pieces"]);
        if let Some(decoded) = case["decoded"].as_str() {
            assert_eq!(tok.decode(&got).unwrap(), decoded, "{name}: decoding {text:?}");
        }
    }
}

#[test]
fn gemma_style_vocabulary_encodes_like_sentencepiece() {
    check_cases("gemma");
}

#[test]
fn llama_style_vocabulary_encodes_like_sentencepiece() {
    check_cases("llama");
}

#[test]
fn special_tokens_bos_and_chat_template() {
    let (tok, spec) = load("gemma");
    let bos = spec["bos_id"].as_u64().unwrap() as u32;
    assert_eq!(tok.bos_token_id(), Some(bos));
    assert_eq!(tok.eos_token_id(), spec["eos_id"].as_u64().unwrap() as u32);
    assert!(tok.add_bos());
    let plain = tok.encode("Hello world", false).unwrap();
    assert_eq!(tok.encode("Hello world", true).unwrap(), [vec![bos], plain.clone()].concat());
    assert!(tok.is_special(bos));
    // saekit's decode keeps special tokens (sentencepiece drops control tokens)
    assert_eq!(tok.decode(&[vec![bos], plain].concat()).unwrap(), "<bos>Hello world");
    let start = tok.token_to_id("<start_of_turn>").unwrap();
    assert!(tok.is_special(start));
    // a user-defined token is matched whole but is ordinary text
    let h1 = tok.token_to_id("<h1>").unwrap();
    assert!(!tok.is_special(h1));
    let rendered = tok.apply_chat_template(&[ChatMessage::user("Hi")]).unwrap();
    assert_eq!(rendered, "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
    let ids = tok.encode(&rendered, true).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == start).count(), 2, "{ids:?}");
}

#[test]
fn token_text_of_sentencepiece_pieces() {
    let (tok, _) = load("llama");
    let id = |piece: &str| tok.token_to_id(piece).unwrap_or_else(|| panic!("no piece {piece:?}"));
    assert_eq!(tok.token_text(id("▁The")), " The");
    assert_eq!(tok.token_text(id("<0x0A>")), "\n");
    // one byte of a four-byte emoji: shown escaped, not as U+FFFD
    assert_eq!(tok.token_text(id("<0xF0>")), "\\xf0");
    assert_eq!(tok.token_text(id("<s>")), "<s>");
    let ids = tok.encode("emoji \u{1f980}", false).unwrap();
    let shown: String = ids.iter().map(|&i| tok.token_text(i)).collect();
    assert_eq!(shown, " emoji \\xf0\\x9f\\xa6\\x80");
}

/// Metadata of a minimal GGUF tokenizer with the given model name.
fn write_tokenizer_gguf(path: &Path, model: &str, with_scores: bool) {
    use gguf_file::Value as V;
    let toks = ["<unk>", "<s>", "</s>", "\u{2581}a", "a", "\u{2581}"];
    let mut meta = vec![
        ("tokenizer.ggml.model", V::String(model.into())),
        ("tokenizer.ggml.tokens", V::Array(toks.iter().map(|t| V::String(t.to_string())).collect())),
        ("tokenizer.ggml.token_type", V::Array([2, 3, 3, 1, 1, 1].iter().map(|&t| V::I32(t)).collect())),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
    ];
    if with_scores {
        meta.push(("tokenizer.ggml.scores", V::Array([0.0, 0.0, 0.0, -1.0, -2.0, -3.0].map(V::F32).to_vec())));
    }
    let refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &refs, &[]).unwrap();
}

fn from_gguf_err(path: &Path) -> String {
    let msg = match Tokenizer::from_gguf(&read_gguf(path), path) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => format!("{e:#}"),
    };
    assert!(!msg.contains('\n') && msg.contains(&path.display().to_string()), "{msg}");
    msg
}

#[test]
fn unsupported_or_incomplete_vocabularies_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t5.gguf");
    write_tokenizer_gguf(&p, "t5", true);
    assert!(from_gguf_err(&p).contains("tokenizer model 't5' is not supported"));
    let p = dir.path().join("noscores.gguf");
    write_tokenizer_gguf(&p, "llama", false);
    assert!(from_gguf_err(&p).contains("missing tokenizer.ggml.scores"));
    // the same metadata with scores is a working (if tiny) SentencePiece tokenizer
    let p = dir.path().join("tiny.gguf");
    write_tokenizer_gguf(&p, "llama", true);
    let tok = Tokenizer::from_gguf(&read_gguf(&p), &p).unwrap();
    assert_eq!(tok.encode("a a", false).unwrap(), [3, 3]);
    assert_eq!(tok.decode(&[3, 3]).unwrap(), "a a");
}
