//! The JSON feature database (test fixtures, small exports): saekit-analysis' records in one file, each
//! carrying its map coordinates.

use saekit_analysis::{Context, FeatureRecord, Histogram, Neighbour, QuantileGroup, SortBy, TokenLogit};
use saekit_serve::{open_store, MemoryDb};

fn record(id: u32, peak_token: &str, max_act: f32) -> FeatureRecord {
    let ctx = Context {
        tokens: vec![" the".into(), peak_token.into(), " end".into()],
        acts: vec![0.0, max_act, 0.5],
        peak: 1,
        max_act,
    };
    FeatureRecord {
        id,
        density: 0.01 * (id + 1) as f64,
        max_act,
        mean_act: max_act / 2.0,
        n_fired: 4,
        explanation: None,
        explanation_auto: true,
        top_contexts: vec![ctx.clone()],
        quantiles: vec![QuantileGroup { lo: 0.0, hi: max_act, count: 4, contexts: vec![ctx] }],
        histogram: Histogram { edges: vec![0.1, 1.0, 10.0], counts: vec![1, 3] },
        promoted: vec![TokenLogit { token: " up".into(), id: 5, logit: 0.5 }],
        suppressed: vec![TokenLogit { token: " down".into(), id: 6, logit: -0.5 }],
        neighbours: vec![Neighbour { id: (id + 1) % 3, cosine: 0.2 }],
        x: id as f32 / 2.0 - 0.5,
        y: 0.25,
        explanations: vec![],
    }
}

#[test]
fn a_saved_database_reads_back_with_lists_search_and_map() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("features.json");
    let features = vec![record(0, " bridge", 2.0), record(1, " Bridges", 5.0), record(2, " ocean", 1.0)];
    let mem = MemoryDb { info: serde_json::json!({"hook_name": "blocks.6.hook_resid_post"}), features };
    mem.save(&path).unwrap();

    let db = open_store(&path).unwrap();
    assert_eq!(db.n_features(), 3);
    assert_eq!(db.info().unwrap()["hook_name"], "blocks.6.hook_resid_post");
    assert_eq!(db.feature(1).unwrap().as_ref(), Some(&mem.features[1]));
    assert!(db.feature(3).unwrap().is_none());

    let by_max = db.list(SortBy::MaxAct, true, 0, 10).unwrap();
    assert_eq!(by_max.iter().map(|s| s.id).collect::<Vec<_>>(), vec![1, 0, 2]);
    assert_eq!(by_max[0].top_tokens, vec![" Bridges"]);
    assert_eq!(db.list(SortBy::Id, false, 1, 1).unwrap()[0].id, 1);

    // case-insensitive substring of a token where the feature fired, strongest first
    let hits = db.search("BRIDGE", 10).unwrap();
    assert_eq!(hits.iter().map(|s| s.id).collect::<Vec<_>>(), vec![1, 0]);
    assert!(db.search("  ", 10).unwrap().is_empty());

    let map = db.map().unwrap();
    assert_eq!(
        map.iter().map(|p| (p.id, p.x, p.y)).collect::<Vec<_>>(),
        vec![(0, -0.5, 0.25), (1, 0.0, 0.25), (2, 0.5, 0.25)]
    );
    assert_eq!(map[1].max_act, 5.0);
}

#[test]
fn bad_json_databases_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    // ids out of order
    let p = dir.path().join("shuffled.json");
    MemoryDb { info: serde_json::Value::Null, features: vec![record(1, " a", 1.0), record(0, " b", 1.0)] }
        .save(&p)
        .unwrap();
    let e = format!("{:#}", open_store(&p).err().unwrap());
    assert!(e.contains("shuffled.json") && e.contains("index 0 has id 1"), "{e}");

    // the old fixture layout: a separate `map`, records without coordinates
    let mut old = serde_json::to_value(record(0, " a", 1.0)).unwrap();
    old.as_object_mut().unwrap().retain(|k, _| k != "x" && k != "y");
    let p = dir.path().join("old.json");
    let body = serde_json::json!({"info": {}, "features": [old], "map": [{"id": 0, "x": 0.0, "y": 0.0}]});
    std::fs::write(&p, body.to_string()).unwrap();
    let e = format!("{:#}", open_store(&p).err().unwrap());
    assert!(e.contains("old.json") && e.contains("--example fixture") && e.contains("`x`"), "{e}");
}
