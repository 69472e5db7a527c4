//! The whole pipeline end to end on the real model with tiny budgets, as `saekit demo` runs it: the
//! bundled mini corpus -> tokenize -> harvest -> train -> in-model eval -> analyze -> concept search ->
//! steering. Then a rerun must reuse every stage.

use std::path::Path;
use std::process::Command;

fn demo(dir: &Path) -> std::process::Output {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mini-corpus");
    Command::new(env!("CARGO_BIN_EXE_saekit"))
        .args(["demo", "--no-serve", "--corpus"])
        .arg(&corpus)
        .arg("--dir")
        .arg(dir)
        .args(["--harvest-tokens", "12k", "--train-tokens", "40k", "--d-sae", "512", "--k", "16"])
        .args([
            "--eval-tokens",
            "1024",
            "--analyze-tokens",
            "2048",
            "--concept-docs",
            "4",
            "--validation-fraction",
            "0.25",
        ])
        .output()
        .expect("run saekit demo")
}

#[test]
fn reduced_demo_runs_end_to_end() {
    assert!(saekit_model::default_model_path().exists(), "needs the model: scripts/fetch-model.sh");
    let tmp = tempfile::tempdir().unwrap();
    let out = demo(tmp.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for want in ["== harvest", "== train", "== evaluate", "== analyze", "== concepts", "CE loss", "steered ("] {
        assert!(stdout.contains(want), "missing '{want}' in:\n{stdout}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("summary.json")).unwrap()).unwrap();
    assert_quality_floors(&summary);
    assert!(summary["concepts"].as_array().unwrap().len() >= 4);
    // each concept's feature to steer with, measured: a lift per pick, the picks best first by it
    let picks = summary["steering_features"].as_array().unwrap();
    assert!(!picks.is_empty(), "{summary}");
    for p in picks {
        assert!(
            p["pick"]["lift"].as_f64().is_some_and(f64::is_finite) && p["pick"]["max_act"].as_f64() > Some(0.0),
            "{p}"
        );
    }
    assert!(tmp.path().join("features.sqlite").exists() && tmp.path().join("sae/cfg.json").exists());

    // A rerun reuses every stage instead of recomputing it.
    let again = demo(tmp.path());
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "rerun failed:\n{stdout}\n{}", String::from_utf8_lossy(&again.stderr));
    assert!(stdout.contains("reusing"), "{stdout}");

    search_for_steering(tmp.path());
    explain_with_the_local_model(tmp.path());
}

/// `saekit search --pos/--neg --steer N`: the N best features by AUROC, each measured, listed by lift.
fn search_for_steering(dir: &Path) {
    let pos = dir.join("pos.txt");
    let neg = dir.join("neg.txt");
    std::fs::write(
        &pos,
        "def main():\n    return 0\nimport os\nfor i in range(10):\n    print(i)\nclass A:\n    pass\n",
    )
    .unwrap();
    std::fs::write(&neg, "The cat sleeps.\nWe walked home.\nIt rained all day.\nShe read a book.\nThe sea was calm.\n")
        .unwrap();
    let search = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_saekit"))
            .arg("search")
            .arg(dir.join("sae"))
            .arg("--pos")
            .arg(&pos)
            .arg("--neg")
            .arg(&neg)
            .args(extra)
            .output()
            .expect("run saekit search")
    };
    let db = dir.join("features.sqlite");
    let out = search(&["--db", db.to_str().unwrap(), "--steer", "4", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "search --steer failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    let (contrast, picks) = (v["contrast"].as_array().unwrap(), v["steering"].as_array().unwrap());
    assert_eq!(picks.len(), 4, "{v}");
    let lifts: Vec<f64> = picks.iter().map(|p| p["lift"].as_f64().unwrap()).collect();
    assert!(lifts.windows(2).all(|w| w[0] >= w[1]), "best first: {lifts:?}");
    // the candidates are the best by AUROC (skipping features that never fired in the analysis)
    let first_ids: Vec<u64> = contrast.iter().take(16).map(|h| h["id"].as_u64().unwrap()).collect();
    for p in picks {
        assert!(first_ids.contains(&p["hit"]["id"].as_u64().unwrap()) && p["max_act"].as_f64() > Some(0.0), "{p}");
    }
    let out = search(&["--steer", "4"]);
    assert!(!out.status.success(), "--steer needs --db for the clamp (a multiple of the max activation)");
}

/// `saekit explain` with no endpoint: it starts `saekit serve` on the demo's database and SAE and talks to
/// it over real HTTP (the OpenAI chat API on loopback) with the real model. Two features that fired are
/// explained and scored, the results are stored beside them, `saekit feature` prints them, a rerun resumes.
fn explain_with_the_local_model(dir: &Path) {
    let db_path = dir.join("features.sqlite");
    let db = saekit_analysis::FeatureDb::open(&db_path).unwrap();
    let live: Vec<u32> = db.list(saekit_analysis::SortBy::Density, true, 0, 2).unwrap().iter().map(|f| f.id).collect();
    assert!(!db.heldout().unwrap().is_empty(), "analyze keeps held-out windows for the detection scorer");
    drop(db);
    let spec = live.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let explain = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_saekit"))
            .arg("explain")
            .arg("--db")
            .arg(&db_path)
            .arg("--sae")
            .arg(dir.join("sae"))
            .args(["--features", &spec, "--concurrency", "2", "--n-test", "4", "--batch", "4", "--json"])
            .args(extra)
            .output()
            .expect("run saekit explain");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "explain failed:\n{stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
        v
    };
    let s = explain(&[]);
    assert_eq!(s["explained"], 2, "{s}");
    assert!(s["prompt_tokens"].as_u64().unwrap() > 500 && s["completion_tokens"].as_u64().unwrap() > 0, "{s}");

    let db = saekit_analysis::FeatureDb::open(&db_path).unwrap();
    for &id in &live {
        let f = db.feature(id).unwrap().unwrap();
        assert_eq!(f.explanations.len(), 1, "feature {id}");
        let e = &f.explanations[0];
        assert!(!e.text.trim().is_empty() && e.model.to_lowercase().contains("smollm2"), "{e:?}");
        assert!(e.prompt_tokens > 0 && e.created > 0, "{e:?}");
        // detection: up to 4 activating test contexts and as many held-out ones, each counted once
        let d = e.detection.unwrap_or_else(|| panic!("feature {id}: detection not scored: {e:?}"));
        let n = d.tp + d.fn_ + d.tn + d.fp + d.unparsed;
        assert!(n > 0 && n <= 8, "{d:?}");
        assert!((0.0..=1.0).contains(&d.balanced_accuracy), "{d:?}");
        let fz = e.fuzzing.unwrap_or_else(|| panic!("feature {id}: fuzzing not scored: {e:?}"));
        assert!(fz.tp + fz.fn_ + fz.unparsed > 0, "{fz:?}");
    }
    drop(db);

    let out = Command::new(env!("CARGO_BIN_EXE_saekit"))
        .arg("feature")
        .arg("--db")
        .arg(&db_path)
        .arg(live[0].to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("LLM explanation:") && text.contains("detection"), "{text}");

    let again = explain(&[]);
    assert_eq!((again["explained"].as_u64(), again["already_done"].as_u64()), (Some(0), Some(2)), "{again}");

    // the floor: each feature rescored with the other's explanation, nothing stored
    let stored = |id| saekit_analysis::FeatureDb::open(&db_path).unwrap().feature(id).unwrap().unwrap().explanations;
    let before = stored(live[0]);
    let c = explain(&["--shuffled-control"]);
    let rows = c["features"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{c}");
    for r in rows {
        let (f, of) = (r["feature"].as_u64().unwrap(), r["explanation_of"].as_u64().unwrap());
        assert!(f != of && live.contains(&(f as u32)) && live.contains(&(of as u32)), "{r}");
        let shuffled = r["shuffled"]["fuzzing"].as_f64();
        assert!(shuffled.is_none_or(|x| (0.0..=1.0).contains(&x)), "{r}");
    }
    assert_eq!(stored(live[0]), before, "the control stores nothing");
}

/// The reduced demo's quality floors, sized to its budget (9 steps of 4096 rows, 512 features). Measured
/// on 2026-11-30: FVU 0.833, CE loss score 0.724, dead 0%. An untrained or diverging SAE explains
/// nothing (FVU >= 1) and costs the model more loss than it restores; the full demo's floors (FVU < 0.25,
/// dead < 5%, CE score > 0.8) are scripts/check-demo-quality.sh's.
fn assert_quality_floors(summary: &serde_json::Value) {
    let eval = &summary["eval"];
    let num = |v: &serde_json::Value, name: &str| v.as_f64().unwrap_or_else(|| panic!("summary: no {name}: {eval}"));
    let fvu = num(&eval["fvu"], "fvu");
    let ce_score = num(&eval["ce_loss_score"], "ce_loss_score");
    let l0 = num(&eval["l0"], "l0");
    let dead = summary["dead_frac_training"].as_f64().unwrap_or(num(&eval["dead_frac"], "dead_frac"));
    assert!(fvu > 0.0 && fvu < 0.92, "FVU {fvu}: floor 0.92");
    assert!(ce_score > 0.6, "CE loss score {ce_score}: floor 0.6");
    assert!(dead < 0.05, "dead fraction {dead}: floor 5%");
    assert!((l0 - 16.0).abs() < 1e-6, "TopK k=16 must give L0 16, got {l0}");
}
