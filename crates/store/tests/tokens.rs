//! Tokenized datasets: packing with separators, BOS only when asked, split by document, determinism.

use std::path::PathBuf;

use saekit_store::*;

/// A byte-level "tokenizer": id = byte + 10 (0 = separator, 1 = BOS).
fn encode(t: &str) -> anyhow::Result<Vec<u32>> {
    Ok(t.bytes().map(|b| b as u32 + 10).collect())
}

fn docs() -> Vec<Document> {
    (0..200)
        .map(|i| Document {
            text: format!("document number {i} {}", "x".repeat(i % 37)),
            source: format!("d{i}"),
            kind: Some(if i % 2 == 0 { "even" } else { "odd" }.into()),
            lang: None,
        })
        .collect()
}

fn run(opts: &TokenizeOptions, out: &std::path::Path) -> TokensManifest {
    try_run(opts, out).unwrap()
}

#[test]
fn packing_split_and_determinism() {
    let a = tempfile::tempdir().unwrap();
    let opts = TokenizeOptions {
        context: 32,
        seed: 5,
        validation_fraction: 0.1,
        contexts_per_shard: 50,
        ..Default::default()
    };
    let m = run(&opts, a.path());
    let train = &m.splits["train"];
    let val = &m.splits["validation"];
    assert_eq!(train.n_docs + val.n_docs, 200);
    assert!(val.n_docs > 5 && val.n_docs < 40, "{}", val.n_docs);
    assert!(train.shards.len() > 1);
    let total_doc_tokens: u64 = docs().iter().map(|d| d.text.len() as u64).sum();
    let kinds: u64 = m.splits.values().flat_map(|s| s.tokens_by_kind.values()).sum();
    assert_eq!(kinds, total_doc_tokens);
    // Stream = docs joined by the separator; contexts are consecutive windows.
    assert_eq!(train.stream_tokens, train.tokens_by_kind.values().sum::<u64>() + train.n_docs - 1);
    assert_eq!(train.n_contexts * 32 + train.dropped_tail, train.stream_tokens);
    let ds = TokenDataset::open(a.path()).unwrap();
    let sp = ds.split("train").unwrap();
    assert_eq!(sp.n_contexts(), train.n_contexts);
    let all: Vec<u32> = (0..sp.n_contexts()).flat_map(|i| sp.context(i).to_vec()).collect();
    assert!(all.contains(&0) && !all.contains(&1), "separators but no BOS");
    // Every document's text appears intact in the stream at the offset docs.jsonl records.
    let lines = std::fs::read_to_string(a.path().join("docs.jsonl")).unwrap();
    let mut checked = 0;
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["split"] != "train" {
            continue;
        }
        let (off, n) = (v["offset"].as_u64().unwrap() as usize, v["tokens"].as_u64().unwrap() as usize);
        if off + n <= all.len() {
            let i: usize = v["doc"].as_u64().unwrap() as usize;
            assert_eq!(&all[off..off + n], &encode(&docs()[i].text).unwrap()[..]);
            checked += 1;
        }
    }
    assert!(checked > 100);
    // Same seed: identical files; another seed: another order.
    let b = tempfile::tempdir().unwrap();
    run(&opts, b.path());
    assert_eq!(
        std::fs::read(a.path().join("train-00000.u32")).unwrap(),
        std::fs::read(b.path().join("train-00000.u32")).unwrap()
    );
    let c = tempfile::tempdir().unwrap();
    run(&TokenizeOptions { seed: 6, ..opts.clone() }, c.path());
    assert_ne!(
        std::fs::read(a.path().join("train-00000.u32")).unwrap(),
        std::fs::read(c.path().join("train-00000.u32")).unwrap()
    );
    // A flipped byte is caught on open.
    let p = a.path().join("train-00001.u32");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[7] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let e = ds.split("train").err().unwrap();
    assert!(format!("{e:#}").contains("train-00001.u32"));
}

#[test]
fn bos_starts_every_context_when_the_model_wants_it() {
    let a = tempfile::tempdir().unwrap();
    let opts = TokenizeOptions { context: 16, bos: Some(1), validation_fraction: 0.0, ..Default::default() };
    let m = run(&opts, a.path());
    assert!(!m.splits.contains_key("validation"));
    let sp = TokenDataset::open(a.path()).unwrap().split("train").unwrap();
    for i in 0..sp.n_contexts() {
        let c = sp.context(i);
        assert_eq!(c[0], 1);
        assert!(!c[1..].contains(&1));
    }
    assert_eq!(m.splits["train"].n_contexts * 15 + m.splits["train"].dropped_tail, m.splits["train"].stream_tokens);
}

#[test]
fn max_tokens_stops_reading_early() {
    let a = tempfile::tempdir().unwrap();
    let opts = TokenizeOptions { context: 16, max_tokens: Some(600), validation_fraction: 0.0, ..Default::default() };
    let m = run(&opts, a.path());
    let t = m.splits["train"].stream_tokens;
    assert!((600..2000).contains(&t), "{t}");
}

fn try_run(opts: &TokenizeOptions, out: &std::path::Path) -> anyhow::Result<TokensManifest> {
    let d = docs();
    Ok(tokenize_corpus(
        |sink| {
            for doc in d {
                if let Err(e) = sink(doc) {
                    if e.downcast_ref::<saekit_store::corpus::StopReading>().is_some() {
                        break;
                    }
                    return Err(e.into());
                }
            }
            Ok(ReadStats::default())
        },
        &encode,
        opts,
        out,
        "bytes",
        &[PathBuf::from("synthetic")],
        None,
    )?)
}

#[test]
fn tokenize_refuses_a_folder_that_holds_anything_but_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let opts = TokenizeOptions { context: 16, contexts_per_shard: 64, ..Default::default() };
    // other files, named like a dataset's: kept, and the run refused
    for (name, body) in [("manifest.json", "{\"name\": \"my project\"}"), ("docs.jsonl", "mine"), ("thesis.tex", "x")] {
        std::fs::write(dir.path().join(name), body).unwrap();
    }
    let e = format!("{:#}", try_run(&opts, dir.path()).unwrap_err());
    assert!(e.contains("refusing") && e.contains("thesis.tex"), "{e}");
    std::fs::remove_file(dir.path().join("thesis.tex")).unwrap();
    let e = format!("{:#}", try_run(&opts, dir.path()).unwrap_err());
    assert!(e.contains("not a tokenized-dataset manifest"), "{e}");
    assert_eq!(std::fs::read_to_string(dir.path().join("docs.jsonl")).unwrap(), "mine");
    // a dataset is replaced by a re-run
    let fresh = dir.path().join("tokens");
    let a = try_run(&opts, &fresh).unwrap();
    let b = try_run(&opts, &fresh).unwrap();
    assert_eq!(a, b);
    TokenDataset::open(&fresh).unwrap().split("train").unwrap();
}
