//! `saekit export neuronpedia`: every row written is checked against the JSON schema written from
//! Neuronpedia's database models (tests/fixtures/neuronpedia-export.schema.json), and its values against
//! the feature database they came from.

use std::io::Read;
use std::path::Path;

use saekit_analysis::feature_db::{FeatureRow, StoredContext, StoredDetail, StoredGroup};
use saekit_analysis::neuronpedia::{export, NeuronpediaIds};
use saekit_analysis::{AutointerpWriter, DbInfo, Explanation, FeatureDb, FeatureDbWriter, Score};
use serde_json::Value;

const N: u32 = 1030; // two batches: 1024 + 6
const D: usize = 4;

fn schema() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/neuronpedia-export.schema.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The part of JSON Schema the fixture uses: type (one or several), required, properties,
/// additionalProperties: false, items, and its two patterns.
fn validate(v: &Value, s: &Value, at: &str) -> Result<(), String> {
    let types: Vec<&str> = match &s["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let is = |t: &str| match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    };
    if !types.is_empty() && !types.iter().any(|t| is(t)) {
        return Err(format!("{at}: {v} is not {types:?}"));
    }
    if let (Some(o), Some(props)) = (v.as_object(), s["properties"].as_object()) {
        for r in s["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !o.contains_key(r) {
                return Err(format!("{at}: missing {r}"));
            }
        }
        for (k, x) in o {
            match props.get(k) {
                Some(ps) => validate(x, ps, &format!("{at}.{k}"))?,
                None if s["additionalProperties"] == false => return Err(format!("{at}: unexpected field {k}")),
                None => {}
            }
        }
    }
    if let (Some(a), Some(items)) = (v.as_array(), s.get("items")) {
        for (i, x) in a.iter().enumerate() {
            validate(x, items, &format!("{at}[{i}]"))?;
        }
    }
    if let (Some(text), Some(p)) = (v.as_str(), s["pattern"].as_str()) {
        let ok = match p {
            "^[0-9]+$" => !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()),
            "^c[^\\s-]{8,}$" => {
                text.starts_with('c') && text.len() >= 9 && !text.contains(|c: char| c.is_whitespace() || c == '-')
            }
            _ => return Err(format!("{at}: the test does not know pattern {p}")),
        };
        if !ok {
            return Err(format!("{at}: {text:?} does not match {p}"));
        }
    }
    Ok(())
}

fn ctx(k: u32) -> StoredContext {
    StoredContext {
        ctx: k as u64,
        start: 0,
        ids: vec![1, 2, 3],
        acts: vec![(1, 2.0 + k as f32)],
        peak: 1,
        max_act: 2.0 + k as f32,
    }
}

fn build(path: &Path) {
    let info =
        DbInfo { model: "SmolLM2".into(), hook: "blocks.6.hook_resid_post".into(), d_sae: N, ..Default::default() };
    let vocab: Vec<String> = ["a", " b", "く", " d"].iter().map(|s| s.to_string()).collect();
    let mut w = FeatureDbWriter::create(path, &info, &[0.1, 1.0, 10.0], &vocab).unwrap();
    for id in 0..N {
        let fired = id % 3 != 2;
        let detail = if fired {
            StoredDetail {
                top: vec![ctx(0), ctx(1)],
                quantiles: vec![StoredGroup { lo: 0.0, hi: 1.5, count: 7, contexts: vec![ctx(2)] }],
                hist_first: 0,
                hist: vec![3, 4],
                promoted: vec![(3, 0.5)],
                suppressed: vec![(0, -0.25)],
                neighbours: vec![((id + 1) % N, 0.3)],
            }
        } else {
            StoredDetail::default()
        };
        let row = FeatureRow {
            id,
            density: if fired { 0.01 } else { 0.0 },
            max_act: if fired { 3.0 } else { 0.0 },
            detail,
            ..Default::default()
        };
        w.insert(&row).unwrap();
    }
    w.finish().unwrap();
    let mut a = AutointerpWriter::open(path).unwrap();
    let s = Score::from_counts(5, 1, 4, 2, 0);
    for id in [0u32, 1025] {
        let e = Explanation {
            model: "gpt-x".into(),
            text: format!("feature {id} text"),
            detection: Some(s),
            fuzzing: None,
            prompt_tokens: 10,
            completion_tokens: 2,
            created: 0,
        };
        a.put(id, &e).unwrap();
    }
}

fn rows(p: &Path) -> Vec<Value> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap()).read_to_string(&mut text).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn export_matches_neuronpedias_models_and_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("features.sqlite");
    build(&db_path);
    let db = FeatureDb::open(&db_path).unwrap();
    let w_dec: Vec<f32> = (0..N as usize * D).map(|i| i as f32 * 0.001).collect();
    let ids = NeuronpediaIds {
        model_id: "smollm2-135m".into(),
        source_id: "6-saekit-res".into(),
        set_name: "saekit-res".into(),
    };
    let out = dir.path().join("export");
    let r = export(&db, &w_dec, D, &ids, &out).unwrap();
    assert_eq!((r.features, r.explanations, r.batches), (N as u64, 2, 2));
    let base = out.join("smollm2-135m/6-saekit-res");
    for f in ["model.jsonl", "source.jsonl", "sourceset.jsonl"] {
        assert!(base.join(f).exists(), "{f}");
    }
    let s = schema();
    let mut seen = 0;
    for b in 0..2 {
        let feats = rows(&base.join(format!("features/batch-{b}.jsonl.gz")));
        assert_eq!(feats.len(), if b == 0 { 1024 } else { 6 });
        for f in &feats {
            validate(f, &s["$defs"]["neuron"], "neuron").unwrap();
            let id: u32 = f["index"].as_str().unwrap().parse().unwrap();
            assert_eq!(id, seen, "features in index order");
            seen += 1;
            let rec = db.feature(id).unwrap().unwrap();
            assert_eq!(f["maxActApprox"].as_f64().unwrap() as f32, rec.max_act);
            let v: Vec<f32> = f["vector"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            assert_eq!(v, w_dec[id as usize * D..][..D]);
            assert_eq!(f["layer"], "6-saekit-res");
            if rec.n_fired > 0 || rec.max_act > 0.0 {
                assert_eq!(f["pos_str"][0], " d");
                assert_eq!(f["neg_values"][0], -0.25);
                assert_eq!(f["freq_hist_data_bar_heights"], serde_json::json!([3.0, 4.0]));
            }
        }
        for e in rows(&base.join(format!("explanations/batch-{b}.jsonl.gz"))) {
            validate(&e, &s["$defs"]["explanation"], "explanation").unwrap();
            let id: u32 = e["index"].as_str().unwrap().parse().unwrap();
            assert_eq!(id / 1024, b, "explanations batched with their features");
            assert_eq!(e["description"], format!("feature {id} text"));
            assert_eq!(e["explanationModelName"], "gpt-x");
        }
        let acts = rows(&base.join(format!("activations/batch-{b}.jsonl.gz")));
        for a in &acts {
            validate(a, &s["$defs"]["activation"], "activation").unwrap();
            assert_eq!(a["tokens"], serde_json::json!([" b", "く", " d"]), "ids 1, 2, 3 of the vocabulary");
            assert_eq!(a["maxValueTokenIndex"], 1);
        }
        // two top contexts and one quantile sample per firing feature; the quantile one carries its bin
        assert_eq!(acts.iter().filter(|a| a["binMax"] == 1.5).count() * 3, acts.len());
    }
    assert_eq!(seen, N);
    // the schema itself rejects what Neuronpedia would: a numeric index, an extra field
    let mut bad = rows(&base.join("features/batch-1.jsonl.gz"))[0].clone();
    bad["index"] = serde_json::json!(3);
    assert!(validate(&bad, &s["$defs"]["neuron"], "neuron").is_err());
    let mut bad = rows(&base.join("features/batch-1.jsonl.gz"))[0].clone();
    bad["density"] = serde_json::json!(0.1);
    assert!(validate(&bad, &s["$defs"]["neuron"], "neuron").is_err());
}
