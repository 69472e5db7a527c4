//! `fetch-model --hub` and `fetch-sae` against a local server laid out as a Hugging Face hub: the listing
//! (`/api/models/{repo}/revision/{rev}?blobs=true`) and the files (`/{repo}/resolve/{rev}/{path}`, with
//! Range, `ETag` / `X-Linked-Etag` and `X-Repo-Commit` as the hub sends them). It cuts chosen downloads
//! halfway, lists a wrong SHA-256 where asked, and logs every request with its Range and token.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use sha2::Digest;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_test_token";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

struct Served {
    bytes: Vec<u8>,
    /// Listed and sent as an LFS file (SHA-256 in the listing and in `X-Linked-Etag`).
    lfs: bool,
    /// The SHA-256 the hub claims, when it is not that of `bytes`.
    claimed_sha256: Option<String>,
}

impl Served {
    fn new(bytes: Vec<u8>, lfs: bool) -> Self {
        Served { bytes, lfs, claimed_sha256: None }
    }
    fn sha256(&self) -> String {
        self.claimed_sha256.clone().unwrap_or_else(|| hex(sha2::Sha256::digest(&self.bytes)))
    }
    fn git_sha1(&self) -> String {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {}\0", self.bytes.len()));
        h.update(&self.bytes);
        hex(h.finalize())
    }
}

#[derive(Debug, Clone)]
struct Logged {
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct FakeHub {
    repos: BTreeMap<String, BTreeMap<String, Served>>,
    /// `repo/path` whose next full download is cut after half its bytes.
    cut_once: Mutex<HashSet<String>>,
    log: Mutex<Vec<Logged>>,
}

impl FakeHub {
    /// Serve on a free loopback port until the test ends; returns the endpoint URL.
    fn start(self: &Arc<Self>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hub = Arc::clone(self);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let hub = Arc::clone(&hub);
                std::thread::spawn(move || hub.answer(stream));
            }
        });
        url
    }

    fn requests(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    fn answer(&self, mut s: TcpStream) {
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let (mut range, mut auth) = (None, None);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((&h, ""));
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => auth = Some(v.trim().to_string()),
                _ => {}
            }
        }
        let path = target.split('?').next().unwrap_or("").to_string();
        self.log.lock().unwrap().push(Logged { path: path.clone(), range: range.clone(), auth });
        if let Some(rest) = path.strip_prefix("/api/models/") {
            return self.listing(&mut s, rest);
        }
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if let [org, name, "resolve", _rev, file] = parts[..] {
            return self.file(&mut s, &format!("{org}/{name}"), file, range.as_deref());
        }
        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }

    fn listing(&self, s: &mut TcpStream, rest: &str) {
        let repo = rest.split("/revision/").next().unwrap_or("");
        let Some(files) = self.repos.get(repo) else {
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
        };
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|(p, f)| {
                let mut v = serde_json::json!({"rfilename": p, "size": f.bytes.len(), "blobId": f.git_sha1()});
                if f.lfs {
                    v["lfs"] = serde_json::json!({"sha256": f.sha256(), "size": f.bytes.len(), "pointerSize": 134});
                }
                v
            })
            .collect();
        let body = serde_json::json!({"id": repo, "sha": COMMIT, "siblings": siblings}).to_string();
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }

    fn file(&self, s: &mut TcpStream, repo: &str, file: &str, range: Option<&str>) {
        let Some(f) = self.repos.get(repo).and_then(|r| r.get(file)) else {
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return;
        };
        let n = f.bytes.len();
        let (start, end) = match range.and_then(|r| r.strip_prefix("bytes=")) {
            Some(r) => {
                let (a, b) = r.split_once('-').unwrap();
                (a.parse::<usize>().unwrap(), if b.is_empty() { n - 1 } else { b.parse::<usize>().unwrap() })
            }
            None => (0, n - 1),
        };
        let etags = if f.lfs {
            format!("ETag: \"{}\"\r\nX-Linked-Etag: \"{}\"\r\n", f.git_sha1(), f.sha256())
        } else {
            format!("ETag: \"{}\"\r\n", f.git_sha1())
        };
        let body = &f.bytes[start..=end];
        let _ = write!(
            s,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{n}\r\nContent-Length: {}\r\n\
             X-Repo-Commit: {COMMIT}\r\n{etags}Connection: close\r\n\r\n",
            body.len()
        );
        let key = format!("{repo}/{file}");
        let cut = body.len() > 1 && self.cut_once.lock().unwrap().remove(&key);
        let _ = s.write_all(if cut { &body[..body.len() / 2] } else { body });
        let _ = s.flush();
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

fn saekit(endpoint: &str, hf_home: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_saekit"));
    for v in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        c.env_remove(v);
    }
    c.env("HF_ENDPOINT", endpoint).env("HF_HOME", hf_home).env("HF_TOKEN", TOKEN).args(args).output().unwrap()
}

fn stdout_path(out: &Output) -> PathBuf {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "saekit failed:\n{stderr}");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Requests for one file's bytes after its metadata probe (`Range: bytes=0-0`), with their first byte.
fn body_requests(log: &[Logged], url_end: &str) -> Vec<usize> {
    log.iter()
        .filter(|r| r.path.ends_with(url_end) && r.range.as_deref() != Some("bytes=0-0"))
        .map(|r| {
            r.range.as_deref().and_then(|r| r.strip_prefix("bytes=")?.split('-').next()?.parse().ok()).unwrap_or(0)
        })
        .collect()
}

#[test]
fn fetch_model_hub_downloads_the_model_files_resuming_a_cut_download() {
    let gemma2 = fixtures().join("gemma2");
    let wanted =
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"];
    let mut files: BTreeMap<String, Served> =
        wanted.iter().map(|f| (f.to_string(), Served::new(std::fs::read(gemma2.join(f)).unwrap(), false))).collect();
    files.insert(
        "model.safetensors".into(),
        Served::new(std::fs::read(gemma2.join("model.safetensors")).unwrap(), true),
    );
    files.insert("ref_logits.npy".into(), Served::new(std::fs::read(gemma2.join("ref_logits.npy")).unwrap(), true));
    let hub = Arc::new(FakeHub { repos: [("tiny/gemma2".to_string(), files)].into(), ..Default::default() });
    hub.cut_once.lock().unwrap().insert("tiny/gemma2/model.safetensors".into());
    let endpoint = hub.start();
    let t = tempfile::tempdir().unwrap();
    let (cache, hf_home) = (t.path().join("cache"), t.path().join("hf"));
    let args = ["fetch-model", "--hub", "tiny/gemma2", "--cache", cache.to_str().unwrap()];

    // HF_ENDPOINT with a trailing slash, as users write it
    let dest = stdout_path(&saekit(&format!("{endpoint}/"), &hf_home, &args));
    assert_eq!(dest, cache.join("hub/tiny--gemma2"));
    for f in wanted.iter().chain(&["model.safetensors"]) {
        assert!(std::fs::read(dest.join(f)).unwrap() == std::fs::read(gemma2.join(f)).unwrap(), "{f} differs");
    }
    assert!(!dest.join("ref_logits.npy").exists(), "a file the model does not need was fetched");
    let log = hub.requests();
    assert!(log.iter().all(|r| r.auth.as_deref() == Some(&format!("Bearer {TOKEN}"))), "HF_TOKEN not sent: {log:?}");
    // the cut download went on from where it broke, not from the start
    let size = std::fs::metadata(gemma2.join("model.safetensors")).unwrap().len() as usize;
    let starts = body_requests(&log, "/model.safetensors");
    assert!(starts.len() == 2 && starts[0] == 0 && starts[1] > 0 && starts[1] <= size / 2, "{starts:?}");

    // a second run finds every file in place with its checksum and downloads nothing
    let before = hub.requests().len();
    assert_eq!(stdout_path(&saekit(&endpoint, &hf_home, &args)), dest);
    let again: Vec<_> = hub.requests()[before..].iter().filter(|r| r.path.contains("/resolve/")).cloned().collect();
    assert!(again.is_empty(), "{again:?}");
}

fn gemma_scope_hub(npz: &[u8]) -> FakeHub {
    let mut scope = BTreeMap::new();
    scope.insert("layer_12/width_16k/average_l0_82/params.npz".to_string(), Served::new(npz.to_vec(), true));
    scope.insert("layer_12/width_16k/average_l0_41/params.npz".to_string(), Served::new(vec![7; 1000], true));
    let mut jb = BTreeMap::new();
    jb.insert("blocks.8.hook_resid_pre/cfg.json".to_string(), Served::new(br#"{"d_in": 768}"#.to_vec(), false));
    let weights = Served { claimed_sha256: Some("ab".repeat(32)), ..Served::new(vec![1; 4096], true) };
    jb.insert("blocks.8.hook_resid_pre/sae_weights.safetensors".to_string(), weights);
    FakeHub {
        repos: [
            ("google/gemma-scope-2b-pt-res".to_string(), scope),
            ("jbloom/GPT2-Small-SAEs-Reformatted".to_string(), jb),
        ]
        .into(),
        ..Default::default()
    }
}

#[test]
fn fetch_sae_resolves_saelens_names_resumes_across_runs_and_refuses_bad_checksums() {
    let npz_path = fixtures().join("gemma2/gemma-scope-res-L1/params.npz");
    let npz = std::fs::read(&npz_path).unwrap();
    let hub = Arc::new(gemma_scope_hub(&npz));
    hub.cut_once
        .lock()
        .unwrap()
        .insert("google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz".into());
    let endpoint = hub.start();
    let t = tempfile::tempdir().unwrap();
    let (cache, hf_home) = (t.path().join("cache"), t.path().join("hf"));
    let c = cache.to_str().unwrap();

    // the canonical id names the same folder; no retries: the cut download fails the command, naming the file
    let args = ["fetch-sae", "gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical", "--cache", c];
    let first = saekit(&endpoint, &hf_home, &[&args[..], &["--retries", "0"]].concat());
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(!first.status.success() && err.contains("average_l0_82/params.npz"), "{err}");
    // the next run continues the kept .part
    let dir = stdout_path(&saekit(&endpoint, &hf_home, &args));
    assert_eq!(dir, cache.join("sae/google--gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"));
    assert!(std::fs::read(dir.join("params.npz")).unwrap() == npz, "params.npz differs");
    let starts = body_requests(&hub.requests(), "average_l0_82/params.npz");
    assert!(starts.len() == 2 && starts[0] == 0 && starts[1] > 0 && starts[1] <= npz.len() / 2, "{starts:?}");
    assert!(!hub.requests().iter().any(|r| r.path.contains("average_l0_41/params")), "another SAE was fetched");
    // what was fetched is the SAE the fixture test runs
    let a = saekit_sae::load_sae(dir.join("params.npz")).unwrap();
    let b = saekit_sae::load_sae(&npz_path).unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());

    // a file whose content does not match the hub's SHA-256 is refused by name and not left behind
    let bad = saekit(&endpoint, &hf_home, &["fetch-sae", "gpt2-small-res-jb", "blocks.8.hook_resid_pre", "--cache", c]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "a corrupt download was accepted");
    assert!(err.contains("blocks.8.hook_resid_pre/sae_weights.safetensors") && err.contains("SHA-256"), "{err}");
    let jb = cache.join("sae/jbloom--GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre");
    assert!(!jb.join("sae_weights.safetensors").exists());
    let blob = hf_home.join("hub/models--jbloom--GPT2-Small-SAEs-Reformatted/blobs").join("ab".repeat(32));
    assert!(!blob.exists(), "the corrupt blob stayed in the HF cache");

    // unknown names are refused with the known ones
    let out = saekit(&endpoint, &hf_home, &["fetch-sae", "gemma-scope-2b-pt-rez", "x", "--cache", c]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("gemma-scope-2b-pt-res"), "{err}");
}
