//! A Gemma-Scope-shaped `params.npz` (JumpReLU with thresholds, made by scripts/make_model_fixtures.py)
//! spliced into the Gemma 2 parity fixture through `eval-model`, `search`, `analyze`, `generate --steer`
//! and `serve`. The codes are checked against JumpReLU computed here, with npyz and plain loops, on the
//! hook activations transformers recorded (ref_hooks.npz): the reference shares no code with saekit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const HOOK: &str = "blocks.1.hook_resid_post";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn saekit_output(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_saekit")).args(args).output().expect("run saekit")
}

fn saekit(args: &[&str]) -> serde_json::Value {
    let out = saekit_output(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "saekit {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("saekit {args:?}: not JSON ({e}):\n{stdout}"))
}

/// One array of a .npz as row-major f32 with its shape (numpy writes `W.T` column-major).
fn npz_array(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let mut ar = npyz::npz::NpzArchive::open(path).unwrap();
    let a = ar.by_name(name).unwrap().unwrap_or_else(|| panic!("{}: no {name}", path.display()));
    let shape: Vec<usize> = a.shape().iter().map(|&d| d as usize).collect();
    let fortran = a.order() == npyz::Order::Fortran;
    let v: Vec<f32> = a.into_vec().unwrap();
    if !fortran || shape.len() < 2 {
        return (shape, v);
    }
    let (r, c) = (shape[0], shape[1]);
    let mut out = vec![0.0; v.len()];
    for i in 0..r {
        for j in 0..c {
            out[i * c + j] = v[j * r + i];
        }
    }
    (shape, out)
}

/// Per token, the JumpReLU pre-activations `x W_enc + b_enc` and the thresholds, from the files.
struct Reference {
    pre: Vec<Vec<f32>>,
    threshold: Vec<f32>,
}

impl Reference {
    fn load(npz: &Path, hooks: &Path) -> Self {
        let (s, w_enc) = npz_array(npz, "W_enc");
        let (d_in, d_sae) = (s[0], s[1]);
        let (_, b_enc) = npz_array(npz, "b_enc");
        let (_, threshold) = npz_array(npz, "threshold");
        let (s, x) = npz_array(hooks, HOOK);
        assert_eq!(s[1], d_in, "{HOOK} width");
        let pre = x
            .chunks(d_in)
            .map(|row| {
                (0..d_sae)
                    .map(|f| {
                        b_enc[f] + (0..d_in).map(|i| (row[i] as f64 * w_enc[i * d_sae + f] as f64) as f32).sum::<f32>()
                    })
                    .collect()
            })
            .collect();
        Reference { pre, threshold }
    }

    /// JumpReLU: the pre-activation where it exceeds the feature's threshold, else nothing.
    fn active(&self, token: usize) -> Vec<(u32, f32)> {
        let p = &self.pre[token];
        (0..p.len()).filter(|&f| p[f] > self.threshold[f]).map(|f| (f as u32, p[f])).collect()
    }

    /// Features within `eps` of their threshold: either side is right within f32 noise.
    fn borderline(&self, token: usize, f: u32, eps: f32) -> bool {
        (self.pre[token][f as usize] - self.threshold[f as usize]).abs() <= eps
    }
}

/// `got` (feature, activation) pairs against the reference's active set for one token.
fn check_token(r: &Reference, t: usize, got: &[(u32, f32)], what: &str) {
    let want = r.active(t);
    let tol = 1e-3;
    for &(f, v) in &want {
        match got.iter().find(|g| g.0 == f) {
            Some(&(_, g)) => {
                assert!((g - v).abs() <= tol * (1.0 + v.abs()), "{what} token {t} feature {f}: {g} vs {v}")
            }
            None => assert!(r.borderline(t, f, tol), "{what} token {t}: feature {f} ({v}) missing"),
        }
    }
    for &(f, g) in got {
        assert!(
            want.iter().any(|w| w.0 == f) || r.borderline(t, f, tol),
            "{what} token {t}: feature {f} fires ({g}) below its threshold {}",
            r.threshold[f as usize]
        );
    }
}

/// A started `saekit serve`, stopped when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_saekit"))
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start saekit serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("saekit serve: listening on http://")
            .map(|s| s.trim_end_matches('/').to_string())
            .unwrap_or_else(|| panic!("serve did not start: {line:?}"));
        Server { child, addr }
    }

    /// One HTTP/1.1 request; the JSON body of a 200 answer.
    fn request(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> serde_json::Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = TcpStream::connect(&self.addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let (head, payload) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{path}: bad reply {reply:?}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{method} {path}: {head}\n{payload}");
        serde_json::from_str(payload).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {payload}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn gemma_scope_npz_runs_on_the_gemma2_fixture() {
    let model = fixtures().join("gemma2");
    let npz = model.join("gemma-scope-res-L1/params.npz");
    assert!(npz.exists(), "{}: fixture missing; run scripts/make_model_fixtures.sh", npz.display());
    let (m, sae) = (model.to_str().unwrap(), npz.to_str().unwrap());
    let reference = Reference::load(&npz, &model.join("ref_hooks.npz"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("ref_meta.json")).unwrap()).unwrap();
    let text = meta["text"].as_str().unwrap();
    let ref_ids: Vec<i64> =
        npyz::NpyFile::new(&std::fs::read(model.join("ref_token_ids.npy")).unwrap()[..]).unwrap().into_vec().unwrap();

    // the fixture must exercise the threshold: features with 0 < pre <= threshold, which ReLU would keep
    let relu_only = (0..reference.pre.len())
        .map(|t| reference.pre[t].iter().zip(&reference.threshold).filter(|(p, th)| **p > 0.0 && *p <= th).count())
        .sum::<usize>();
    assert!(relu_only > 100, "the thresholds cut only {relu_only} positive pre-activations");

    // a params.npz carries no hook: saekit must ask for one, naming the file
    let out = saekit_output(&["search", sae, "--text", text, "-m", m, "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("params.npz") && err.contains("--hook"), "{err}");

    // search: every active feature of every token, against the reference
    let hits = saekit(&["search", sae, "--text", text, "-m", m, "--hook", HOOK, "--per-token", "100000", "--json"]);
    let tokens = hits["tokens"].as_array().unwrap();
    let ids: Vec<i64> = tokens.iter().map(|t| t["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, ref_ids, "search tokenised the prompt differently from transformers");
    // search leaves attention sinks out (position 0, special tokens, rows of 10x the median norm)
    let mut compared = 0;
    for (t, tok) in tokens.iter().enumerate() {
        if t == 0 {
            assert_eq!(tok["features"], serde_json::json!([]), "position 0 is a sink");
            continue;
        }
        compared += 1;
        let got: Vec<(u32, f32)> = tok["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
            .collect();
        check_token(&reference, t, &got, "search");
    }
    assert_eq!(compared, ref_ids.len() - 1);

    let tmp = tempfile::tempdir().unwrap();
    let contexts = tmp.path().join("contexts");
    let corpus = fixtures().join("mini-corpus/mini.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_saekit"))
        .args(["tokenize", "-m", m, corpus.to_str().unwrap(), "-o", contexts.to_str().unwrap()])
        .args(["--context", "32", "--max-tokens", "4k", "--validation-fraction", "0.5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tokenize: {}", String::from_utf8_lossy(&out.stderr));
    let ctx = contexts.to_str().unwrap();

    // eval-model: the splice runs and its L0 is that of the reference's JumpReLU on similar text
    let eval = saekit(&["eval-model", sae, "--contexts", ctx, "--tokens", "1k", "-m", m, "--hook", HOOK, "--json"]);
    assert_eq!(eval["hook"], HOOK);
    for (k, v) in eval.as_object().unwrap() {
        assert!(!v.is_number() || v.as_f64().is_some_and(f64::is_finite), "eval-model {k} = {v}");
    }
    let ref_l0 =
        (0..reference.pre.len()).map(|t| reference.active(t).len()).sum::<usize>() as f64 / reference.pre.len() as f64;
    let l0 = eval["l0"].as_f64().unwrap();
    assert!((0.5 * ref_l0..2.0 * ref_l0).contains(&l0), "eval-model L0 {l0}, reference prompt {ref_l0}");

    // generate --steer: clamping a feature changes the greedy continuation
    let prompt = "The quick brown fox";
    let plain = saekit(&["generate", "-m", m, "-p", prompt, "-n", "8", "--json"]);
    let steer = ["-m", m, "-p", prompt, "-n", "8", "--sae", sae, "--hook", HOOK, "--steer", "3=40", "--json"];
    let steered = saekit(&[&["generate"][..], &steer].concat());
    assert_ne!(plain["generated_ids"], steered["steered"]["generated_ids"], "steering changed nothing");

    // serve: the database from analyze, the live page's codes and the steering API
    let db = tmp.path().join("features.sqlite");
    let dbs = db.to_str().unwrap();
    saekit(&["analyze", sae, "--contexts", ctx, "--tokens", "1k", "-m", m, "--hook", HOOK, "--out", dbs, "--json"]);
    // no --hook: the database says which hook it was analysed on
    let server = Server::start(&["--db", dbs, "--sae", sae, "-m", m]);
    let info = server.request("GET", "/api/info", None);
    assert!(info.to_string().contains(HOOK), "{info}");
    let feature = server.request("GET", "/api/features/3", None);
    assert_eq!(feature["id"], 3, "{feature}");

    let live =
        server.request("POST", "/api/live", Some(&serde_json::json!({"text": text, "top_k": 20, "lens": false})));
    let live_ids: Vec<i64> = live["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(live_ids, ref_ids);
    for (t, row) in live["top_features"].as_array().unwrap().iter().enumerate() {
        let got: Vec<(u32, f32)> = row
            .as_array()
            .unwrap()
            .iter()
            .map(|fa| (fa["id"].as_u64().unwrap() as u32, fa["act"].as_f64().unwrap() as f32))
            .collect();
        // the page shows the 20 strongest: they must be the reference's 20 strongest
        let mut want = reference.active(t);
        want.sort_by(|a, b| b.1.total_cmp(&a.1));
        want.truncate(got.len());
        assert_eq!(got.len(), 20.min(reference.active(t).len()), "live token {t}");
        for (g, w) in got.iter().zip(&want) {
            assert!(g.0 == w.0 && (g.1 - w.1).abs() <= 1e-3 * (1.0 + w.1.abs()), "live token {t}: {g:?} vs {w:?}");
        }
    }

    let body = serde_json::json!({"prompt": prompt, "edits": [{"feature": 3, "mode": "clamp", "value": 40.0}],
                                  "max_new_tokens": 8});
    let r = server.request("POST", "/api/steer", Some(&body));
    assert_eq!(r["baseline"], plain["text"], "{r}");
    assert_eq!(r["steered"], steered["steered"]["text"], "{r}");
}
