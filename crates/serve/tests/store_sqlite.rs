//! The browser reads the SQLite database `saekit analyze` writes (through saekit-analysis' read API).

use saekit_analysis::feature_db::{FeatureRow, StoredContext, StoredDetail, StoredGroup};
use saekit_analysis::{DbInfo, FeatureDbWriter, SortBy};
use saekit_serve::open_store;

fn write_db(path: &std::path::Path) {
    let vocab: Vec<String> = (0..50).map(|i| format!(" w{i}")).collect();
    let info = DbInfo {
        model: "test".into(),
        hook: "blocks.3.hook_resid_post".into(),
        d_sae: 3,
        n_tokens: 100,
        ..Default::default()
    };
    let edges: Vec<f32> = (0..=8).map(|i| 0.1 * 2f32.powi(i)).collect();
    let mut w = FeatureDbWriter::create(path, &info, &edges, &vocab).unwrap();
    for id in 0..3u32 {
        let ctx = StoredContext {
            ctx: 0,
            start: 0,
            ids: vec![1, 2, 10 + id, 4],
            acts: vec![(2, 1.5 + id as f32)],
            peak: 2,
            max_act: 1.5 + id as f32,
        };
        let detail = StoredDetail {
            top: vec![ctx.clone()],
            quantiles: vec![StoredGroup { lo: 0.0, hi: 3.5, count: 7, contexts: vec![ctx] }],
            hist_first: 2,
            hist: vec![3, 4],
            promoted: vec![(5, 0.5), (6, 0.25)],
            suppressed: vec![(7, -0.5)],
            neighbours: vec![((id + 1) % 3, 0.3)],
        };
        w.insert(&FeatureRow {
            id,
            density: 0.01 * (id + 1) as f64,
            max_act: 1.5 + id as f32,
            mean_act: 1.0,
            n_fired: 7,
            top_tokens: vec![format!(" w{}", 10 + id)],
            explanation: None,
            explanation_auto: false,
            x: id as f32 / 3.0,
            y: 0.5,
            search_text: format!("w{}", 10 + id),
            detail,
        })
        .unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn sqlite_feature_database_reads_into_the_browser_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("features.sqlite");
    write_db(&path);
    let db = open_store(&path).unwrap();
    assert_eq!(db.n_features(), 3);
    assert_eq!(db.info().unwrap()["hook_name"], "blocks.3.hook_resid_post");
    let f = db.feature(2).unwrap().unwrap();
    assert_eq!(f.top_contexts[0].tokens, vec![" w1", " w2", " w12", " w4"]);
    assert_eq!(f.top_contexts[0].acts[2], 3.5);
    assert_eq!(f.quantiles[0].count, 7);
    assert_eq!(f.histogram.edges.len(), f.histogram.counts.len() + 1);
    assert_eq!(f.promoted[0].token, " w5");
    assert_eq!(f.neighbours[0].id, 0);
    assert!(db.feature(3).unwrap().is_none());
    let top = db.list(SortBy::MaxAct, true, 0, 10).unwrap();
    assert_eq!(top.iter().map(|s| s.id).collect::<Vec<_>>(), vec![2, 1, 0]);
    assert_eq!(db.search("w11", 5).unwrap()[0].id, 1);
    let map = db.map().unwrap();
    assert_eq!(map.len(), 3);
    assert_eq!((map[2].x, map[2].y), (f.x, f.y));
    assert_eq!((f.x, f.y), (2.0 / 3.0, 0.5));
}

#[test]
fn a_file_that_is_not_a_database_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.sqlite");
    std::fs::write(&p, b"not sqlite").unwrap();
    let e = open_store(&p).err().unwrap();
    assert!(format!("{e:#}").contains("x.sqlite"), "{e:#}");
    let j = dir.path().join("x.json");
    std::fs::write(&j, b"{}").unwrap();
    assert!(open_store(&j).is_ok(), "an empty JSON database opens (no features)");
    let e = open_store(&dir.path().join("missing.sqlite")).err().unwrap();
    assert!(format!("{e:#}").contains("missing.sqlite"));
}

/// Over HTTP: what the request got wrong is a 4xx, a database that breaks under the server a 500.
#[tokio::test]
async fn a_broken_database_is_the_server_s_failure_and_a_bad_id_the_client_s() {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("features.sqlite");
    write_db(&path);
    let state = std::sync::Arc::new(saekit_serve::AppState::new(
        open_store(&path).unwrap(),
        None,
        serde_json::Value::Null,
        saekit_serve::Limits::default(),
    ));
    let get = |uri: &'static str| {
        let app = saekit_serve::router(state.clone());
        async move {
            let resp = app.oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            (status, v)
        }
    };
    assert_eq!(get("/api/features/1").await.0, StatusCode::OK);
    for (uri, status) in [
        ("/api/features/one", StatusCode::BAD_REQUEST),
        ("/api/features/7", StatusCode::NOT_FOUND),
        ("/api/features?order=sideways", StatusCode::BAD_REQUEST),
        ("/api/nothing-here", StatusCode::NOT_FOUND),
    ] {
        let (s, v) = get(uri).await;
        assert_eq!(s, status, "{uri}: {v}");
        assert!(v["error"].is_string(), "{uri}: {v}");
    }
    // the file emptied while the server holds it open: its reads now fail, which no request caused
    std::fs::File::create(&path).unwrap();
    let (s, v) = get("/api/features/1").await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert!(v["error"].is_string(), "{v}");
}
