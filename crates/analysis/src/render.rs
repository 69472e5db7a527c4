//! Contexts as text a reader (or an explainer model) can read. Byte-level BPE cuts CJK, Arabic, emoji and
//! many accented characters across tokens, and each such token on its own is stored with its dangling
//! bytes escaped (`\xe3\x81`, see `saekit_model::Tokenizer::token_text`). [`merge_tokens`] joins
//! consecutive tokens whose bytes complete a character into one piece carrying the highest activation
//! among them; only bytes that never complete a character stay escaped.

use saekit_model::tokenizer::escape_invalid_utf8;

/// One piece of a rendered context: a whole character sequence and the tokens it came from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Piece {
    /// The piece as text: whole characters, with bytes that complete none escaped as `\xNN`.
    pub text: String,
    /// The highest activation among the piece's tokens.
    pub act: f32,
    /// The index of the piece's first token.
    pub first: usize,
    /// How many tokens the piece spans (1 unless a character was split across tokens; at most 4).
    pub len: usize,
}

/// The bytes a token text stands for: `\xNN` escapes become the byte NN, when they are escapes. Text typed
/// with a backslash (`"\x41"`, or `"\xc3\xa9"` in a string literal) is read as written: the tokenizer's
/// escaping ([`escape_invalid_utf8`]) only ever escapes bytes that are not UTF-8 where they stand, so a
/// token whose decoded bytes would not escape back to its text was never escaped.
fn token_bytes(t: &str) -> Vec<u8> {
    let b = t.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'x' {
            if let Some(v) = b
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    if out.len() < b.len() && escape_invalid_utf8(&out) != t {
        return b.to_vec();
    }
    out
}

/// Join tokens whose bytes complete a character (at most 4 tokens, the longest UTF-8 sequence).
pub fn merge_tokens(tokens: &[String], acts: &[f32]) -> Vec<Piece> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut pending: Vec<u8> = Vec::new();
    let mut first = 0;
    let mut act = 0f32;
    for (i, t) in tokens.iter().enumerate() {
        let bytes = token_bytes(t);
        // only continuation bytes (10xxxxxx) can finish a pending character
        if !pending.is_empty() && bytes.first().is_none_or(|b| b & 0xc0 != 0x80) {
            out.push(Piece { text: escape_invalid_utf8(&pending), act, first, len: i - first });
            pending.clear();
        }
        if pending.is_empty() {
            first = i;
            act = f32::NEG_INFINITY;
        }
        pending.extend(bytes);
        act = act.max(acts.get(i).copied().unwrap_or(0.0));
        let unfinished = matches!(std::str::from_utf8(&pending), Err(e) if e.error_len().is_none());
        if unfinished && i + 1 - first < 4 && i + 1 < tokens.len() {
            continue;
        }
        out.push(Piece { text: escape_invalid_utf8(&pending), act, first, len: i + 1 - first });
        pending.clear();
    }
    out
}

/// The pieces joined into one string.
pub fn context_text(tokens: &[String]) -> String {
    merge_tokens(tokens, &[]).into_iter().map(|p| p.text).collect()
}

/// The text of the piece that holds token `i`: the whole character when `i` is one of its tokens.
pub fn piece_at(tokens: &[String], i: usize) -> Option<String> {
    merge_tokens(tokens, &[]).into_iter().find(|p| (p.first..p.first + p.len).contains(&i)).map(|p| p.text)
}

/// A short view of a context: up to `before` pieces, the piece holding token `peak` in [brackets], up to
/// `after` pieces, with newlines shown as `\n` (one line for a terminal).
pub fn peak_snippet(tokens: &[String], peak: usize, before: usize, after: usize) -> String {
    let pieces = merge_tokens(tokens, &[]);
    let Some(at) = pieces.iter().position(|p| (p.first..p.first + p.len).contains(&peak)) else {
        return String::new();
    };
    let text = |ps: &[Piece]| ps.iter().map(|p| p.text.as_str()).collect::<String>();
    let end = (at + 1 + after).min(pieces.len());
    let s =
        format!("{}[{}]{}", text(&pieces[at.saturating_sub(before)..at]), pieces[at].text, text(&pieces[at + 1..end]));
    s.replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn split_characters_are_joined_with_their_max_activation() {
        // く is e3 81 8f; the tokenizer's per-token text escapes the dangling bytes
        let toks = s(&["今日", "\\xe3\\x81", "\\x8f", " ok"]);
        let p = merge_tokens(&toks, &[0.5, 1.0, 3.0, 0.0]);
        let texts: Vec<&str> = p.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(texts, ["今日", "く", " ok"]);
        assert_eq!((p[1].act, p[1].first, p[1].len), (3.0, 1, 2));
        assert_eq!(p[2].act, 0.0);
    }

    #[test]
    fn bytes_that_never_complete_stay_escaped() {
        let toks = s(&["a", "\\xe3\\x81", "b", "\\xff"]);
        let texts: Vec<String> = merge_tokens(&toks, &[0.0; 4]).into_iter().map(|p| p.text).collect();
        assert_eq!(texts, ["a", "\\xe3\\x81", "b", "\\xff"]);
        assert_eq!(context_text(&s(&["caf", "\\xc3", "\\xa9", "!"])), "café!");
        assert_eq!(piece_at(&s(&["caf", "\\xc3", "\\xa9", "!"]), 2).as_deref(), Some("é"));
        assert_eq!(piece_at(&s(&["a"]), 1), None);
    }

    #[test]
    fn a_backslash_typed_in_the_text_is_text() {
        // "\x41" and "\xc3\xa9" typed (in code, say) are not the byte 0x41 or the character é
        let typed = s(&["print", "(\"", "\\x41", "\\xc3\\xa9", "\")"]);
        assert_eq!(context_text(&typed), "print(\"\\x41\\xc3\\xa9\")");
        let texts: Vec<String> = merge_tokens(&typed, &[0.0; 5]).into_iter().map(|p| p.text).collect();
        assert_eq!(texts, typed, "each typed token is its own piece, as written");
        // a real escape beside a typed one in the same token: the token is read as written, and both show
        assert_eq!(context_text(&s(&["a\\x41\\xe3", "b"])), "a\\x41\\xe3b");
        // real escapes still join, also after a typed backslash earlier in the context
        assert_eq!(context_text(&s(&["\\x41", "caf", "\\xc3", "\\xa9"])), "\\x41café");
    }

    #[test]
    fn peak_snippet_brackets_the_whole_character() {
        // 東京 split as e6 9d b1 | e4 ba ac over four tokens; the peak on the third token
        let toks = s(&["a", "\\xe6\\x9d", "\\xb1", "\\xe4\\xba", "\\xac", "\n", "b", "c"]);
        assert_eq!(peak_snippet(&toks, 3, 1, 2), "東[京]\\nb");
        assert_eq!(peak_snippet(&toks, 0, 3, 0), "[a]");
        assert_eq!(peak_snippet(&toks, 9, 1, 1), "");
    }
}
