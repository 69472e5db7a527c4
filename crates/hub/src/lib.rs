//! saekit-hub: downloads from a Hugging Face hub, in Rust.
//!
//! Owns: talking to a hub (huggingface.co, or the server `HF_ENDPOINT` names; `HF_TOKEN` for gated and
//! private repos) through the `hf-hub` crate's blocking client; listing a repo's files with the checksums
//! the hub publishes; resumable downloads (hf-hub keeps `<blob>.part` in the HF cache, `HF_HOME`, and
//! continues it with a Range request, within a run on retry and across runs); checking every file
//! against the listing (SHA-256 of LFS files, git blob SHA-1 of the rest) before it is used; SAELens'
//! `pretrained_saes.yaml` release names ([`Registry`]).
//!
//! Must not touch: model or SAE formats (the caller loads what was downloaded) or saekit's cache layout
//! (the caller says where the files go).

#![warn(missing_docs)]

mod error;
mod registry;

use std::io::{IsTerminal, Read};
use std::path::{Component, Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Repo, RepoType};

pub use error::{HubError, Result};
pub use registry::{Registry, Release, SaeEntry};

/// One file of a hub repo as the hub lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct HubFile {
    /// Path inside the repo (`/`-separated).
    pub path: String,
    /// Size in bytes, when listed.
    pub size: Option<u64>,
    /// SHA-256 of the content, listed for LFS files (the `X-Linked-Etag` of their download).
    pub sha256: Option<String>,
    /// Git blob SHA-1, listed for every file (the `ETag` of a non-LFS download).
    pub git_sha1: Option<String>,
}

/// A repo's files at one commit.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The repo (`owner/name`).
    pub repo: String,
    /// The commit the listing is of.
    pub commit: String,
    /// Every file of the repo at that commit.
    pub files: Vec<HubFile>,
}

/// A Hugging Face hub client (or any endpoint speaking its API) for listings and checked downloads.
pub struct Hub {
    api: Api,
    endpoint: String,
}

impl Hub {
    /// A client configured as huggingface_hub is: `HF_ENDPOINT`, `HF_HOME` (the cache), `HF_TOKEN` (else the
    /// token file in `HF_HOME`). `retries`: how often one file's download is resumed after a broken
    /// connection before the command gives up (the `.part` is kept for the next run).
    pub fn from_env(retries: usize) -> Result<Hub> {
        let mut builder = ApiBuilder::from_env().with_retries(retries).with_progress(std::io::stderr().is_terminal());
        if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
            builder = builder.with_token(Some(token.trim().to_string()));
        }
        // huggingface_hub strips a trailing slash; hf-hub would put `//` in every URL
        let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        let endpoint = endpoint.trim_end_matches('/').to_string();
        builder = builder.with_endpoint(endpoint.clone());
        let api = builder.build().map_err(|e| HubError::Other(anyhow::anyhow!("cannot set up the hub client: {e}")))?;
        Ok(Hub { api, endpoint })
    }

    fn repo(&self, repo: &str, revision: &str) -> ApiRepo {
        self.api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()))
    }

    /// The files of model repo `repo` at `revision` (a branch, tag or commit), with their checksums.
    pub fn list(&self, repo: &str, revision: &str) -> Result<Listing> {
        let answer = self.repo(repo, revision).info_request().query("blobs", "true").call().map_err(|e| {
            HubError::Remote(format!("{repo}: cannot list the repo at {}: {e}{}", self.endpoint, hint(&e.to_string())))
        })?;
        let info: serde_json::Value =
            answer.into_json().map_err(|e| HubError::Remote(format!("{repo}: the hub's listing is not JSON: {e}")))?;
        parse_listing(repo, &info)
    }

    /// Download `files` of a listing into `dest` (repo sub-folders kept) and return their paths there.
    /// A file already in `dest` with the listed checksum is kept; anything downloaded must match the
    /// listing, or it is deleted (cache blob included) and the command fails naming it.
    pub fn download(&self, listing: &Listing, files: &[HubFile], dest: &Path) -> Result<Vec<PathBuf>> {
        let repo = self.repo(&listing.repo, &listing.commit);
        files.iter().map(|f| self.fetch_one(&repo, &listing.repo, f, dest)).collect()
    }

    fn fetch_one(&self, api_repo: &ApiRepo, repo: &str, f: &HubFile, dest: &Path) -> Result<PathBuf> {
        let out = dest.join(&f.path);
        if out.is_file() && verify(&out, f, repo).is_ok() {
            tracing::info!("{repo}/{}: already downloaded", f.path);
            return Ok(out);
        }
        tracing::info!("{repo}/{}: downloading", f.path);
        let cached = api_repo.download(&f.path).map_err(|e| {
            let e = e.to_string();
            HubError::Remote(format!("{repo}/{}: download from {} failed: {e}{}", f.path, self.endpoint, hint(&e)))
        })?;
        if let Err(e) = verify(&cached, f, repo) {
            // a blob that fails its checksum must not be taken from the cache by a later run
            if let Ok(blob) = cached.canonicalize() {
                let _ = std::fs::remove_file(blob);
            }
            let _ = std::fs::remove_file(&cached);
            return Err(match e {
                HubError::Corrupt { file, message } => HubError::Corrupt {
                    file,
                    message: format!("{message}; the download was deleted, run the command again"),
                },
                e => e,
            });
        }
        place(&cached, &out).map_err(HubError::io(&out, "cannot write the downloaded file"))?;
        Ok(out)
    }
}

/// What to try when a hub answers with an error status.
fn hint(error: &str) -> &'static str {
    if error.contains("status code 401") || error.contains("status code 403") {
        " (a gated or private repo: set HF_TOKEN to a token with access)"
    } else if error.contains("status code 404") {
        " (no such repo, revision or file: check the name; gated repos answer 404 without HF_TOKEN too)"
    } else {
        ""
    }
}

/// The hub's `GET /api/models/{repo}/revision/{rev}?blobs=true` answer: `sha` and `siblings` with
/// `rfilename`, `size`, `blobId` and, for LFS files, `lfs.sha256`.
fn parse_listing(repo: &str, info: &serde_json::Value) -> Result<Listing> {
    let malformed = |what: &str| HubError::Remote(format!("{repo}: {what}"));
    let commit = info["sha"].as_str().ok_or_else(|| malformed("the hub's listing has no commit (sha)"))?;
    let siblings =
        info["siblings"].as_array().ok_or_else(|| malformed("the hub's listing has no file list (siblings)"))?;
    let mut files = Vec::with_capacity(siblings.len());
    for s in siblings {
        let path = s["rfilename"].as_str().ok_or_else(|| malformed("a listed file has no rfilename"))?;
        if path.is_empty() || !Path::new(path).components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(malformed(&format!("the hub lists a file outside the repo folder: {path:?}")));
        }
        let hex = |v: &serde_json::Value, len: usize| {
            v.as_str()
                .map(str::to_ascii_lowercase)
                .filter(|h| h.len() == len && h.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        files.push(HubFile {
            path: path.to_string(),
            size: s["size"].as_u64().or_else(|| s["lfs"]["size"].as_u64()),
            sha256: hex(&s["lfs"]["sha256"], 64),
            git_sha1: hex(&s["blobId"], 40),
        });
    }
    Ok(Listing { repo: repo.to_string(), commit: commit.to_string(), files })
}

/// Check a downloaded file against its listing: SHA-256 when listed, else the git blob SHA-1, and the size.
fn verify(path: &Path, f: &HubFile, repo: &str) -> Result<()> {
    let len = std::fs::metadata(path).map_err(HubError::io(path, "cannot read"))?.len();
    let corrupt = |message: String| HubError::Corrupt { file: format!("{repo}/{}", f.path), message };
    if let Some(size) = f.size.filter(|s| *s != len) {
        return Err(corrupt(format!("{len} bytes downloaded but the hub lists {size}")));
    }
    if let Some(want) = &f.sha256 {
        let got = hash_file::<sha2::Sha256>(path, &[])?;
        if &got != want {
            return Err(corrupt(format!("SHA-256 mismatch: the download has {got}, the hub lists {want}")));
        }
    } else if let Some(want) = &f.git_sha1 {
        let got = hash_file::<sha1::Sha1>(path, format!("blob {len}\0").as_bytes())?;
        if &got != want {
            return Err(corrupt(format!("git blob SHA-1 mismatch: the download has {got}, the hub lists {want}")));
        }
    }
    Ok(())
}

/// Lower-case hex digest of `prefix` followed by the file's bytes.
fn hash_file<D: sha2::Digest>(path: &Path, prefix: &[u8]) -> Result<String> {
    let file = std::fs::File::open(path).map_err(HubError::io(path, "cannot open"))?;
    hash_reader::<D>(file, path, prefix)
}

/// Lower-case hex SHA-256 of everything `r` yields; `path` names it in errors.
pub fn sha256_hex_of(r: impl Read, path: &Path) -> Result<String> {
    hash_reader::<sha2::Sha256>(r, path, &[])
}

fn hash_reader<D: sha2::Digest>(mut r: impl Read, path: &Path, prefix: &[u8]) -> Result<String> {
    let mut h = D::new();
    h.update(prefix);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(HubError::io(path, "read failed"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Put the cached file at `out`: a hard link to the cache blob (no second copy of a multi-GB file), or an
/// atomic copy where the two folders are on different file systems.
fn place(cached: &Path, out: &Path) -> std::io::Result<()> {
    let blob = cached.canonicalize()?;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if out.exists() {
        std::fs::remove_file(out)?;
    }
    if std::fs::hard_link(&blob, out).is_ok() {
        return Ok(());
    }
    // saekit-files reports through anyhow; what fails there is the disk
    saekit_files::write_atomic_with(out, |f| {
        std::io::copy(&mut std::fs::File::open(&blob)?, f)?;
        Ok(())
    })
    .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn listing_reads_checksums_and_refuses_escaping_paths() {
        let info = json!({"sha": "abc", "siblings": [
            {"rfilename": "config.json", "size": 10, "blobId": "0123456789abcdef0123456789abcdef01234567"},
            {"rfilename": "w/model.safetensors", "size": 99, "blobId": "ff".repeat(20),
             "lfs": {"sha256": "AB".repeat(32), "size": 99, "pointerSize": 134}}]});
        let l = parse_listing("o/r", &info).unwrap();
        assert_eq!(l.commit, "abc");
        assert_eq!(l.files[0].sha256, None);
        assert_eq!(l.files[0].git_sha1.as_deref(), Some("0123456789abcdef0123456789abcdef01234567"));
        assert_eq!(l.files[1].sha256, Some("ab".repeat(32)));
        assert_eq!(l.files[1].size, Some(99));
        for bad in ["../x", "/etc/passwd", "a/../../b", ""] {
            let info = json!({"sha": "abc", "siblings": [{"rfilename": bad}]});
            let e = parse_listing("o/r", &info).unwrap_err().to_string();
            assert!(e.contains("outside the repo folder"), "{bad}: {e}");
        }
    }

    #[test]
    fn verify_uses_the_git_blob_sha1_and_sha256() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        // `git hash-object` of "hello\n" and `sha256sum` of it
        let git = "ce013625030ba8dba906f756967f9e9ca394464a";
        let sha = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        let f = |sha256: Option<&str>, git_sha1: Option<&str>| HubFile {
            path: "f".into(),
            size: Some(6),
            sha256: sha256.map(Into::into),
            git_sha1: git_sha1.map(Into::into),
        };
        verify(&p, &f(None, Some(git)), "o/r").unwrap();
        verify(&p, &f(Some(sha), None), "o/r").unwrap();
        let e = verify(&p, &f(Some(&"0".repeat(64)), None), "o/r").unwrap_err().to_string();
        assert!(e.contains("o/r/f") && e.contains("SHA-256"), "{e}");
        let e = verify(&p, &f(None, Some(&"0".repeat(40))), "o/r").unwrap_err().to_string();
        assert!(e.contains("o/r/f") && e.contains("SHA-1"), "{e}");
    }
}
