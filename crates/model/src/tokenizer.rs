//! Text <-> token ids, special tokens, and the chat template.
//!
//! A Hugging Face `tokenizer.json` is used as is. A GGUF file carries its vocabulary in the metadata, and we
//! build the tokenizer from it ourselves, for the two kinds llama.cpp writes:
//! - byte-level BPE (`tokenizer.ggml.model = "gpt2"`: SmolLM, Llama 3, Qwen), from the merges. Not through
//!   candle's GGUF tokenizer: it falls back to `add_prefix_space = true` for unknown pre-tokenizer names, which
//!   turns `<|im_start|>user` into `<|im_start|> user` for SmolLM2 and silently corrupts every chat prompt.
//! - SentencePiece BPE (`"llama"`: Llama 2, Mistral, Gemma), from the pieces' scores, encoding as llama.cpp's
//!   `llm_tokenizer_spm` and sentencepiece do (checked against sentencepiece by tests/spm_gguf.rs).
//!
//! Other `tokenizer.ggml.model` values (T5's unigram `t5`, BERT's `bert`, RWKV) are refused with an error
//! naming the file; their `tokenizer.json` can be passed instead.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::Serialize;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::NormalizerWrapper;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// One message of a chat, as chat templates expect it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user` or `assistant`.
    pub role: String,
    /// What they say.
    pub content: String,
}

impl ChatMessage {
    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user".into(), content: content.into() }
    }
    /// A system prompt.
    pub fn system(content: impl Into<String>) -> Self {
        Self { role: "system".into(), content: content.into() }
    }
}

/// The model's tokenizer plus the special-token facts every stage needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_id: u32,
    end_of_text_id: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    special_ids: HashSet<u32>,
    pieces: PieceStyle,
}

impl Tokenizer {
    /// Encode text. With `add_special_tokens`, the BOS token is prepended when the model expects one.
    /// Special tokens written in the text (`<|im_start|>`) are always recognised as such.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| anyhow!("tokenizer failed to encode text: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special_tokens && self.add_bos {
            if let Some(bos) = self.bos_token_id {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow!("tokenizer failed to decode ids: {e}"))
    }

    /// The token as a reader should see it on its own: its text when its bytes are valid UTF-8, else the
    /// valid part with the dangling bytes of a split character written as `\xNN` (byte-level BPE cuts
    /// CJK, Arabic and emoji characters across tokens, and decoding one token alone would print U+FFFD).
    pub fn token_text(&self, id: u32) -> String {
        if self.special_ids.contains(&id) {
            return self.inner.id_to_token(id).unwrap_or_default();
        }
        escape_invalid_utf8(&self.token_bytes(id))
    }

    /// The bytes the token adds to decoded text (a special token: its vocabulary entry), which may be part
    /// of a character (the `bytes` of OpenAI's log-probabilities).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else { return format!("<{id}>").into_bytes() };
        if self.special_ids.contains(&id) {
            return piece.into_bytes();
        }
        let bytes = match self.pieces {
            PieceStyle::ByteLevel => byte_level_bytes(&piece),
            PieceStyle::SentencePiece => Some(sentencepiece_bytes(&piece)),
        };
        bytes.unwrap_or_else(|| self.decode(&[id]).unwrap_or_else(|_| format!("<{id}>")).into_bytes())
    }

    /// `messages` rendered with the chat template and tokenised as they stand (the template writes its own
    /// BOS-like markers): the prompt `saekit generate --chat` and the steering probes give the model.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode(&self.apply_chat_template(messages)?, false)
    }

    /// The id of a token given by its vocabulary entry (`<|im_end|>`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The beginning-of-sequence token, if the tokenizer has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The token that ends a generated turn (`<|im_end|>` for SmolLM2-Instruct).
    pub fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }

    /// The document separator used in pre-training (`<|endoftext|>`), if the vocabulary has one.
    pub fn end_of_text_id(&self) -> Option<u32> {
        self.end_of_text_id
    }

    /// Whether the model expects a BOS token at the start of every sequence.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether attention sinks form on `id` wherever it stands: EOS, end of text, and BOS when the
    /// model adds one. (A chat model's nominal BOS that opens every turn is not: most of its rows are
    /// ordinary.)
    pub fn is_sink_token(&self, id: u32) -> bool {
        id == self.eos_token_id || Some(id) == self.end_of_text_id || (self.add_bos && Some(id) == self.bos_token_id)
    }

    /// Whether `id` is a special or control token (a chat marker, BOS, end of text).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The chat template the model file ships (Jinja), if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Render messages with the model's chat template, ending with the assistant's turn opened.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| anyhow!("this model has no chat template; use a plain prompt"))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).context("the chat template does not parse")?;
        let tmpl = env.get_template("chat").context("chat template")?;
        let msgs: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| minijinja::context! { role => m.role.clone(), content => m.content.clone() })
            .collect();
        let token = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i)).unwrap_or_default();
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from(msgs),
            add_generation_prompt => true,
            bos_token => token(self.bos_token_id),
            eos_token => token(Some(self.eos_token_id)),
        })
        .context("rendering the chat template failed")
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template) into `dir`, the
    /// layout [`Tokenizer::from_hf_file`] and transformers read.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let tok_path = dir.join("tokenizer.json");
        self.inner.save(&tok_path, false).map_err(|e| anyhow!("{}: cannot write: {e}", tok_path.display()))?;
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let cfg = serde_json::json!({
            "bos_token": name(self.bos_token_id),
            "eos_token": name(Some(self.eos_token_id)),
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
        });
        let cfg_path = dir.join("tokenizer_config.json");
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg)?)
            .with_context(|| format!("{}: cannot write", cfg_path.display()))
    }

    /// Build from a Hugging Face `tokenizer.json`, reading special ids and the chat template from the
    /// `tokenizer_config.json` beside it when present.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let inner = load_hf_tokenizer(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let cfg: serde_json::Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(s) => serde_json::from_str(&s)
                .with_context(|| format!("{}: invalid JSON", dir.join("tokenizer_config.json").display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let token_field = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let s = v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(s)
        };
        let special_ids: HashSet<u32> =
            inner.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
        let end_of_text_id = inner.token_to_id("<|endoftext|>");
        let eos_token_id = token_field("eos_token")
            .or(end_of_text_id)
            .ok_or_else(|| anyhow!("{}: cannot tell the EOS token", path.display()))?;
        let add_bos = cfg.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let pieces = piece_style(&inner);
        Ok(Self {
            bos_token_id: token_field("bos_token"),
            eos_token_id,
            end_of_text_id,
            add_bos,
            chat_template,
            special_ids,
            inner,
            pieces,
        })
    }

    /// Build the tokenizer stored in a GGUF file's metadata: byte-level BPE (`tokenizer.ggml.model` =
    /// `gpt2`) or SentencePiece BPE (`llama`, Llama 2 and Gemma).
    pub fn from_gguf(ct: &gguf_file::Content, file: &Path) -> Result<Self> {
        let meta = |key: &str| ct.metadata.get(key);
        let err = |what: &str| anyhow!("{}: GGUF tokenizer metadata: {what}", file.display());
        let model = meta("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| err("missing tokenizer.ggml.model"))?;
        let tokens = gguf_strings(ct, "tokenizer.ggml.tokens", &err)?;
        let types = gguf_token_types(ct, tokens.len());
        let id_of = |key: &str| meta(key).and_then(|v| v.to_u32().ok());
        let (inner, special_ids, pieces) = match model.as_str() {
            "gpt2" => {
                let (inner, special_ids) = byte_level_bpe(ct, &tokens, &types, &err)?;
                (inner, special_ids, PieceStyle::ByteLevel)
            }
            "llama" => {
                let (inner, special_ids) = sentencepiece_bpe(ct, &tokens, &types, &err)?;
                (inner, special_ids, PieceStyle::SentencePiece)
            }
            _ => bail!(
                "{}: GGUF tokenizer model '{model}' is not supported (only 'gpt2' byte-level BPE and 'llama' \
                 SentencePiece); pass the model's tokenizer.json with --tokenizer",
                file.display()
            ),
        };
        let eos_token_id = id_of("tokenizer.ggml.eos_token_id").ok_or_else(|| err("missing eos_token_id"))?;
        let end_of_text_id = tokens.iter().position(|t| t == "<|endoftext|>").map(|i| i as u32);
        Ok(Self {
            inner,
            bos_token_id: id_of("tokenizer.ggml.bos_token_id"),
            eos_token_id,
            end_of_text_id,
            add_bos: meta("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
            chat_template: meta("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
            special_ids,
            pieces,
        })
    }
}

/// How vocabulary entries spell text, for [`Tokenizer::token_text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceStyle {
    /// GPT-2's byte-to-unicode mapping (`Ġ` for a space).
    ByteLevel,
    /// SentencePiece: `▁` for a space, `<0xNN>` for a byte of a character the vocabulary lacks.
    SentencePiece,
}

/// llama.cpp token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
}

/// The string array under `key`.
fn gguf_strings(ct: &gguf_file::Content, key: &str, err: &dyn Fn(&str) -> anyhow::Error) -> Result<Vec<String>> {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| err(&format!("missing {key}")))?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<_>>()
        .map_err(|_| err(&format!("{key} is not a string array")))
}

/// Each token's llama.cpp type; normal where the file gives none.
fn gguf_token_types(ct: &gguf_file::Content, n: usize) -> Vec<i32> {
    let mut types = vec![token_type::NORMAL; n];
    if let Some(stored) = ct.metadata.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        for (slot, ty) in types.iter_mut().zip(stored) {
            *slot = ty.to_i32().or_else(|_| ty.to_u32().map(|t| t as i32)).unwrap_or(token_type::NORMAL);
        }
    }
    types
}

/// Register the tokens of the given types as added tokens, matched in raw text before the model runs (as
/// llama.cpp's special-token partition does); those `special` says are special are returned.
fn add_tokens(
    inner: &mut tokenizers::Tokenizer,
    tokens: &[String],
    types: &[i32],
    special: impl Fn(i32) -> Option<bool>,
    err: &dyn Fn(&str) -> anyhow::Error,
) -> Result<HashSet<u32>> {
    let mut special_ids = HashSet::new();
    let (mut specials, mut plain) = (Vec::new(), Vec::new());
    for (id, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        match special(ty) {
            Some(true) => {
                specials.push(AddedToken::from(t.clone(), true).normalized(false));
                special_ids.insert(id as u32);
            }
            Some(false) => plain.push(AddedToken::from(t.clone(), false).normalized(false)),
            None => {}
        }
    }
    let fail = |e: tokenizers::Error| err(&format!("cannot register added tokens: {e}"));
    inner.add_special_tokens(specials).map_err(fail)?;
    inner.add_tokens(plain).map_err(fail)?;
    Ok(special_ids)
}

/// GPT-2-style byte-level BPE from the vocabulary and `tokenizer.ggml.merges`.
fn byte_level_bpe(
    ct: &gguf_file::Content,
    tokens: &[String],
    types: &[i32],
    err: &dyn Fn(&str) -> anyhow::Error,
) -> Result<(tokenizers::Tokenizer, HashSet<u32>)> {
    let merges: Vec<(String, String)> = gguf_strings(ct, "tokenizer.ggml.merges", err)?
        .into_iter()
        .map(|s| {
            s.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| err(&format!("invalid merge entry '{s}'")))
        })
        .collect::<Result<_>>()?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe =
        BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| err(&format!("cannot build BPE: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "gpt2".into());
    inner.with_pre_tokenizer(Some(pre_tokenizer_for(&pre)?));
    inner.with_decoder(Some(ByteLevel::default()));
    // unknown, control, user-defined and unused tokens are all special here
    let special_ids = add_tokens(&mut inner, tokens, types, |ty| (2..=5).contains(&ty).then_some(true), err)?;
    Ok((inner, special_ids))
}

/// SentencePiece BPE as llama.cpp's `llm_tokenizer_spm` runs it, built the way transformers converts a
/// SentencePiece model (`SpmConverter`, `LlamaConverter`, `GemmaConverter`): merges ranked by the score of
/// the piece they make, byte fallback to `<0xNN>`, spaces written as `▁`, and a `▁` before every run of text
/// between special tokens when `tokenizer.ggml.add_space_prefix` holds (llama.cpp's default; Gemma's GGUFs
/// write false). Control and unknown tokens are special, user-defined ones plain text matched whole.
fn sentencepiece_bpe(
    ct: &gguf_file::Content,
    tokens: &[String],
    types: &[i32],
    err: &dyn Fn(&str) -> anyhow::Error,
) -> Result<(tokenizers::Tokenizer, HashSet<u32>)> {
    let scores: Vec<f32> = ct
        .metadata
        .get("tokenizer.ggml.scores")
        .and_then(|v| v.to_vec().ok())
        .ok_or_else(|| err("missing tokenizer.ggml.scores"))?
        .iter()
        .map(|v| v.to_f32())
        .collect::<candle_core::Result<_>>()
        .map_err(|_| err("tokenizer.ggml.scores is not an f32 array"))?;
    if scores.len() != tokens.len() {
        return Err(err(&format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut builder =
        BPE::builder().vocab_and_merges(vocab, spm_merges(tokens, types, &scores)).byte_fallback(true).fuse_unk(true);
    let unk = ct.metadata.get("tokenizer.ggml.unknown_token_id").and_then(|v| v.to_u32().ok());
    if let Some(unk) = unk.and_then(|i| tokens.get(i as usize)) {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder.build().map_err(|e| err(&format!("cannot build BPE: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let add_space_prefix =
        ct.metadata.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
    inner.with_normalizer(Some(spm_normalizer(add_space_prefix)?)).map_err(|e| err(&e.to_string()))?;
    inner.with_decoder(Some(spm_decoder(add_space_prefix)?));
    let special_ids = add_tokens(
        &mut inner,
        tokens,
        types,
        |ty| match ty {
            token_type::UNKNOWN | token_type::CONTROL => Some(true),
            token_type::USER_DEFINED => Some(false),
            _ => None,
        },
        err,
    )?;
    let unused = types.iter().enumerate().filter(|(_, &ty)| ty == token_type::UNUSED).map(|(i, _)| i as u32);
    Ok((inner, special_ids.into_iter().chain(unused).collect()))
}

/// BPE merges of a SentencePiece vocabulary: every split of a normal piece into two normal pieces, ranked
/// by the merged piece's score (highest first), then by its id, as transformers' `SpmConverter` ranks them.
/// SentencePiece and llama.cpp merge the adjacent pair whose union scores best, which is this order.
fn spm_merges(tokens: &[String], types: &[i32], scores: &[f32]) -> Vec<(String, String)> {
    let normal: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == token_type::NORMAL)
        .map(|(i, (t, _))| (t.as_str(), i))
        .collect();
    let mut ranked: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (&piece, &id) in &normal {
        for (cut, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(cut);
            if normal.contains_key(left) && normal.contains_key(right) {
                ranked.push((scores[id], id, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(b.2)).then(a.3.cmp(b.3)));
    ranked.into_iter().map(|(_, _, l, r)| (l.to_string(), r.to_string())).collect()
}

/// Spaces become `▁`, with one more in front of the text when the model adds a space prefix. `Prepend`
/// runs on each run of text between added tokens, which is where llama.cpp adds the prefix; unlike
/// `Metaspace` it also adds it to text that already starts with a space, as SentencePiece does.
fn spm_normalizer(add_space_prefix: bool) -> Result<NormalizerWrapper> {
    let replace = Replace::new(" ", "\u{2581}").map_err(|e| anyhow!("SentencePiece normalizer: {e}"))?;
    let mut steps: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        steps.push(Prepend::new("\u{2581}".into()).into());
    }
    steps.push(replace.into());
    Ok(NormalizerSequence::new(steps).into())
}

/// `▁` back to a space, `<0xNN>` tokens back to their bytes, and the space prefix off the front.
fn spm_decoder(add_space_prefix: bool) -> Result<DecoderWrapper> {
    let replace = Replace::new("\u{2581}", " ").map_err(|e| anyhow!("SentencePiece decoder: {e}"))?;
    let mut steps: Vec<DecoderWrapper> = vec![replace.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        // after Fuse, so only the start of the whole text loses a space
        steps.push(Strip::new(' ', 1, 0).into());
    }
    Ok(DecoderSequence::new(steps).into())
}

/// How a `tokenizer.json`'s pieces spell text, told by its decoder: byte-level BPE decodes with
/// `ByteLevel`, SentencePiece conversions with `ByteFallback` or `Metaspace`.
fn piece_style(inner: &tokenizers::Tokenizer) -> PieceStyle {
    let decoder = inner.get_decoder().and_then(|d| serde_json::to_string(d).ok()).unwrap_or_default();
    let spm = !decoder.contains("\"ByteLevel\"")
        && (decoder.contains("\"ByteFallback\"") || decoder.contains("\"Metaspace\""));
    if spm {
        PieceStyle::SentencePiece
    } else {
        PieceStyle::ByteLevel
    }
}

/// The bytes a SentencePiece piece stands for: `<0xNN>` is one byte, `▁` a space.
fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    let byte = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).filter(|h| h.len() == 2);
    match byte.and_then(|h| u8::from_str_radix(h, 16).ok()) {
        Some(b) => vec![b],
        None => piece.replace('\u{2581}', " ").into_bytes(),
    }
}

/// Undo GPT-2's byte-to-unicode mapping of a byte-level BPE vocabulary entry; `None` when the piece uses
/// characters outside that mapping (a SentencePiece vocabulary).
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    piece
        .chars()
        .map(|c| {
            let c = c as u32;
            match c {
                0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff => Some(c as u8),
                // Bytes outside the printable ranges were shifted to 256 + n, in byte order.
                0x100..=0x143 => {
                    let n = (c - 0x100) as usize;
                    (0u16..256)
                        .map(|b| b as u8)
                        .filter(|b| !matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff))
                        .nth(n)
                }
                _ => None,
            }
        })
        .collect()
}

/// llama.cpp's named pre-tokenizers, mapped to the equivalent `tokenizers` pipeline.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| anyhow!("bad pre-tokenizer regex: {e}"))?;
        Ok(Sequence::new(vec![s.into(), ByteLevel::new(false, false, false).into()]).into())
    };
    Ok(match pre {
        // SmolLM / StarCoder: every digit on its own, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
        }
        "llama3" | "llama-bpe" | "smaug-bpe" => split(LLAMA3)?,
        "qwen2" => split(QWEN2)?,
        _ => ByteLevel::new(false, true, true).into(),
    })
}

/// Valid UTF-8 as text, every byte of an invalid or unfinished sequence as `\xNN` (how [`Tokenizer::token_text`]
/// writes the dangling bytes of a split character; `saekit_analysis::render` joins them back).
pub fn escape_invalid_utf8(mut rest: &[u8]) -> String {
    let mut out = String::new();
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                break;
            }
            Err(e) => {
                let (ok, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(ok).unwrap_or_default());
                let n = e.error_len().unwrap_or(bad.len()).max(1);
                for b in &bad[..n] {
                    out.push_str(&format!("\\x{b:02x}"));
                }
                rest = &bad[n..];
            }
        }
    }
    out
}

/// Load a `tokenizer.json` with the `tokenizers` crate, containing its failures: the crate panics on
/// some malformed files (an `unwrap` while deserializing a decoder, arithmetic on a model's prefix
/// lengths), so the JSON is checked first and a panic inside the load becomes this file's error.
fn load_hf_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text)
        .map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", path.display()))?;
    let loaded = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>());
    match loaded {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => bail!("{}: not a valid tokenizer.json: {e}", path.display()),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            bail!("{}: not a valid tokenizer.json (the tokenizers crate failed on it: {why})", path.display())
        }
    }
}
