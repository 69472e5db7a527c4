//! Seeded mutations of a folder of files: truncations, bit flips, huge integers written over binary
//! headers, and structural edits of JSON / TOML / `.npy` / safetensors headers.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// How a file is laid out, which decides the structural mutations it gets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Fixed binary layout (shards, checkpoints, GGUF, SQLite, compressed streams).
    Binary,
    Json,
    Toml,
    /// `.npy` (a text header, then data)
    Npy,
    /// safetensors (an 8-byte length, a JSON header, then data)
    Safetensors,
    /// Text or JSON lines (corpus input)
    Text,
}

/// Which files of a seed a format mutates, how, and whether a checksum protects them (then a
/// changed file must never be accepted).
#[derive(Clone, Debug)]
pub struct Target {
    /// The file name ends with this.
    pub suffix: &'static str,
    pub kind: Kind,
    pub protected: bool,
}

pub const fn target(suffix: &'static str, kind: Kind) -> Target {
    Target { suffix, kind, protected: false }
}

pub const fn protected(suffix: &'static str, kind: Kind) -> Target {
    Target { suffix, kind, protected: true }
}

pub struct Mutation {
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// One line: which file, which mutation.
    pub what: String,
    /// Name of the mutated file (the error must name it, or the case folder).
    pub file: String,
    pub protected: bool,
}

pub fn rng_for(format: &str, case: u64) -> ChaCha8Rng {
    let h = format.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    ChaCha8Rng::seed_from_u64(h ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Every file under `dir` with its path relative to `dir`, sorted.
pub fn load_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        let mut ents: Vec<_> = std::fs::read_dir(d).expect("read seed dir").flatten().map(|e| e.path()).collect();
        ents.sort();
        for p in ents {
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("inside root").to_path_buf();
                out.push((rel, std::fs::read(&p).expect("read seed file")));
            }
        }
    }
    let mut out = vec![];
    walk(dir, dir, &mut out);
    out
}

pub fn write_tree(dir: &Path, files: &[(PathBuf, Vec<u8>)]) {
    for (rel, bytes) in files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, bytes).expect("write case file");
    }
}

/// Integers that break arithmetic and allocation sizes.
const HUGE: [u64; 9] = [u64::MAX, i64::MAX as u64, 1 << 62, 1 << 40, 1 << 32, u32::MAX as u64, (1 << 31) + 1, 0, 1];

pub fn mutate(seed: &[(PathBuf, Vec<u8>)], targets: &[Target], rng: &mut ChaCha8Rng) -> Mutation {
    let candidates: Vec<(usize, &Target)> = seed
        .iter()
        .enumerate()
        .filter_map(|(i, (p, _))| {
            let name = p.to_string_lossy();
            targets.iter().find(|t| name.ends_with(t.suffix)).map(|t| (i, t))
        })
        .collect();
    assert!(!candidates.is_empty(), "no seed file matches the targets");
    let &(i, t) = candidates.choose(rng).expect("a candidate");
    let mut files = seed.to_vec();
    let name = files[i].0.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let bytes = &mut files[i].1;
    let structural = match t.kind {
        Kind::Json => json_edit(bytes, rng),
        Kind::Toml => toml_edit(bytes, rng),
        Kind::Npy => npy_edit(bytes, rng),
        Kind::Safetensors => safetensors_edit(bytes, rng),
        Kind::Binary => Some(huge_int(bytes, rng)),
        Kind::Text => None,
    };
    let what = match (structural, rng.gen_range(0..3)) {
        (Some(w), 0 | 1) => w,
        (_, 0) | (None, 1) => truncate(bytes, rng),
        _ => flip_bits(bytes, rng),
    };
    Mutation { what: format!("{} {what}", files[i].0.display()), file: name, files, protected: t.protected }
}

fn truncate(b: &mut Vec<u8>, rng: &mut ChaCha8Rng) -> String {
    let old = b.len();
    // half the cuts near the start, where headers are
    let n = if old == 0 {
        0
    } else if rng.gen_bool(0.5) {
        rng.gen_range(0..old.min(256))
    } else {
        rng.gen_range(0..old)
    };
    b.truncate(n);
    format!("truncated {old} -> {n} bytes")
}

fn flip_bits(b: &mut [u8], rng: &mut ChaCha8Rng) -> String {
    if b.is_empty() {
        return "empty file".into();
    }
    let k = rng.gen_range(1..=8);
    let mut at = vec![];
    for _ in 0..k {
        let i = if rng.gen_bool(0.5) { rng.gen_range(0..b.len().min(512)) } else { rng.gen_range(0..b.len()) };
        b[i] ^= 1 << rng.gen_range(0..8);
        at.push(i);
    }
    format!("flipped bits at {at:?}")
}

fn huge_int(b: &mut [u8], rng: &mut ChaCha8Rng) -> String {
    if b.len() < 8 {
        return flip_bits(b, rng);
    }
    let width = if rng.gen_bool(0.5) { 4 } else { 8 };
    let span = b.len() - width;
    let at = if rng.gen_bool(0.7) { rng.gen_range(0..=span.min(256)) } else { rng.gen_range(0..=span) };
    let v = *HUGE.choose(rng).expect("value");
    let new = &v.to_le_bytes()[..width];
    if &b[at..at + width] == new {
        return flip_bits(b, rng);
    }
    b[at..at + width].copy_from_slice(new);
    format!("wrote {v:#x} as u{} at {at}", width * 8)
}

/// A JSON value that breaks readers expecting something else.
fn hostile_value(rng: &mut ChaCha8Rng) -> Value {
    match rng.gen_range(0..12) {
        0 => Value::from(u64::MAX),
        1 => Value::from(*HUGE.choose(rng).expect("value")),
        2 => Value::from(-1),
        3 => Value::from(1e308),
        4 => Value::from(-0.5),
        5 => Value::from("x"),
        6 => Value::Array(vec![]),
        7 => serde_json::json!({}),
        8 => Value::Null,
        9 => Value::from(true),
        10 => serde_json::json!([u64::MAX, u64::MAX]),
        _ => Value::from("../../../../etc/passwd"),
    }
}

/// Paths (as pointer strings) of every node under `v`.
fn nodes(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                nodes(c, p, out);
            }
        }
        Value::Array(a) => {
            // long arrays (token lists, statistics) would drown the rest: sample a few entries
            for (i, c) in a.iter().enumerate().take(4) {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                nodes(c, p, out);
            }
        }
        _ => {}
    }
}

fn edit_value(v: &mut Value, rng: &mut ChaCha8Rng) -> String {
    let mut all = vec![];
    nodes(v, String::new(), &mut all);
    let Some(path) = all.choose(rng).cloned() else { return "empty document".into() };
    if rng.gen_bool(0.2) {
        // delete the key (or array element)
        let (parent, last) = path.rsplit_once('/').expect("a path");
        let key = last.replace("~1", "/").replace("~0", "~");
        match v.pointer_mut(parent) {
            Some(Value::Object(m)) => {
                m.remove(&key);
            }
            Some(Value::Array(a)) => {
                if let Ok(i) = key.parse::<usize>() {
                    if i < a.len() {
                        a.remove(i);
                    }
                }
            }
            _ => {}
        }
        return format!("removed {path}");
    }
    let new = hostile_value(rng);
    let text = new.to_string();
    if let Some(slot) = v.pointer_mut(&path) {
        *slot = new;
    }
    format!("set {path} = {text}")
}

fn json_edit(b: &mut Vec<u8>, rng: &mut ChaCha8Rng) -> Option<String> {
    let mut v: Value = serde_json::from_slice(b).ok()?;
    let what = edit_value(&mut v, rng);
    *b = serde_json::to_vec_pretty(&v).ok()?;
    Some(what)
}

fn toml_edit(b: &mut Vec<u8>, rng: &mut ChaCha8Rng) -> Option<String> {
    let text = std::str::from_utf8(b).ok()?;
    let t: toml::Value = toml::from_str(text).ok()?;
    let mut v: Value = serde_json::to_value(t).ok()?;
    let what = edit_value(&mut v, rng);
    // TOML has no null: a removed value stands in
    fn strip_nulls(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.retain(|_, c| !c.is_null());
                m.values_mut().for_each(strip_nulls);
            }
            Value::Array(a) => {
                a.retain(|c| !c.is_null());
                a.iter_mut().for_each(strip_nulls);
            }
            _ => {}
        }
    }
    strip_nulls(&mut v);
    let t: toml::Value = serde_json::from_value(v).ok()?;
    *b = toml::to_string(&t).ok()?.into_bytes();
    Some(what)
}

fn npy_edit(b: &mut Vec<u8>, rng: &mut ChaCha8Rng) -> Option<String> {
    if b.len() < 10 {
        return None;
    }
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(b.get(10..10 + hlen)?).ok()?.to_string();
    let data = b[10 + hlen..].to_vec();
    let shapes = [
        "(18446744073709551615, 8)",
        "(4611686018427387905, 1)",
        "(4294967296, 4294967296)",
        "(0, 8)",
        "(8, 0)",
        "(64,)",
        "(64, 8, 2)",
        "()",
        "(-1, 8)",
        "(1000000, 1000000)",
    ];
    let descrs = ["<f8", "|u1", ">f4", "<f2", "<i4", "|O", "<c8"];
    let (new, what) = match rng.gen_range(0..4) {
        0 => {
            let s = *shapes.choose(rng).expect("shape");
            let start = header.find("'shape': (")? + "'shape': ".len();
            let end = start + header[start..].find(')')? + 1;
            (format!("{}{s}{}", &header[..start], &header[end..]), format!("shape -> {s}"))
        }
        1 => {
            let d = *descrs.choose(rng).expect("dtype");
            (header.replacen("'<f4'", &format!("'{d}'"), 1), format!("dtype -> {d}"))
        }
        2 => (header.replace("False", "True"), "fortran_order -> True".into()),
        _ => {
            // a header length past the end of the file, or absurdly large (format 2: u32 length)
            let v = *HUGE.choose(rng).expect("value") as u32;
            b[6] = 2;
            b.splice(8..10, v.to_le_bytes()).for_each(drop);
            return Some(format!("format 2, header length {v}"));
        }
    };
    let mut out = b[..8].to_vec();
    out.extend((new.len() as u16).to_le_bytes());
    out.extend(new.as_bytes());
    out.extend(data);
    *b = out;
    Some(what)
}

fn safetensors_edit(b: &mut Vec<u8>, rng: &mut ChaCha8Rng) -> Option<String> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let mut v: Value = serde_json::from_slice(b.get(8..8 + n)?).ok()?;
    let data = b[8 + n..].to_vec();
    let names: Vec<String> = v.as_object()?.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let name = names.choose(rng)?.clone();
    let t = v.get_mut(&name)?;
    let what = match rng.gen_range(0..4) {
        0 => {
            let d = *["F64", "I8", "U64", "BF16", "F16", "BOOL", "F8_E4M3", "Q4"].choose(rng).expect("dtype");
            t["dtype"] = Value::from(d);
            format!("{name}.dtype -> {d}")
        }
        1 => {
            let s = hostile_value(rng);
            let shape = serde_json::json!([s, 2]);
            t["shape"] = shape.clone();
            format!("{name}.shape -> {shape}")
        }
        2 => {
            let shape: Vec<u64> = (0..rng.gen_range(0..4)).map(|_| rng.gen_range(0..64)).collect();
            t["shape"] = Value::from(shape.clone());
            format!("{name}.shape -> {shape:?}")
        }
        _ => {
            let a = *HUGE.choose(rng).expect("value");
            t["data_offsets"] = serde_json::json!([a, a.wrapping_add(16)]);
            format!("{name}.data_offsets -> [{a}, ..]")
        }
    };
    let h = serde_json::to_vec(&v).ok()?;
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    *b = out;
    Some(what)
}
