//! saekit-files: how every saekit crate puts bytes on disk so that nothing is lost or mislabelled.
//!
//! Owns: the one atomic-write helper (a `tempfile` in the target's folder, fsync, rename, fsync of the
//! folder), folder sets (files written one by one, then a list of their sizes and CRC32s written
//! last, so a reader can tell a complete set from a half-written one), content fingerprints (what a
//! resume compares instead of a path), the cache folder ([`cache_dir`]), the check that refuses to write into a folder that holds
//! something else, and the [`Fault`] tags by which saekit-store and saekit-analysis carry whose fault an
//! error is (bad input, a damaged file, the disk) through an `anyhow` chain to their typed errors.
//! Must not touch: any saekit format (it moves bytes, it does not parse models, stores or SAEs).
//!
//! # Example
//!
//! Write a folder as a set: each file atomically, then the list of their sizes and CRC32s. A reader that
//! finds the list finds every file as it was written; a file changed afterwards is caught.
//!
//! ```
//! use saekit_files::{write_atomic, write_json_atomic, FileSet};
//!
//! # fn main() -> anyhow::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let dir = dir.path();
//! FileSet::begin(dir, "files.json")?; // a crash from here on leaves a folder without a list: incomplete
//! write_atomic(&dir.join("weights.bin"), &[1, 2, 3, 4])?;
//! write_json_atomic(&dir.join("cfg.json"), &serde_json::json!({ "d_sae": 16 }))?;
//! FileSet::commit(dir, "files.json", &["weights.bin", "cfg.json"])?;
//!
//! let set = FileSet::verify(dir, "files.json")?.expect("the list was written");
//! assert_eq!(set.files[0].bytes, 4);
//! std::fs::write(dir.join("weights.bin"), [9, 9])?; // altered behind saekit's back
//! assert!(FileSet::verify(dir, "files.json").is_err());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod fault;
pub use fault::Fault;

/// `anyhow`, for the error macros ([`bad_input!`] and the rest) to name from any crate.
#[doc(hidden)]
pub use anyhow as __anyhow;

/// Suffix of every temporary file this crate creates; a leftover after a crash ends with it.
pub const TMP_SUFFIX: &str = ".tmp";

/// True for names this crate (or an older saekit) may leave behind after a crash.
pub fn is_temp_name(name: &str) -> bool {
    name.ends_with(TMP_SUFFIX)
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync a folder so that a rename inside it survives power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).with_context(|| format!("opening folder {} to fsync it", dir.display()))?;
    d.sync_all().with_context(|| format!("fsync of folder {}", dir.display()))
}

/// Write `path` atomically: `fill` writes a temporary file beside it, which is fsynced, renamed over
/// `path`, and the folder fsynced. On any error the temporary file is removed and `path` is untouched.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let dir = parent_of(path);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let prefix = format!(".{name}.");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix).suffix(TMP_SUFFIX);
    #[cfg(unix)]
    {
        // NamedTempFile defaults to 0600; outputs get the same mode as File::create (umask applies)
        use std::os::unix::fs::PermissionsExt;
        b.permissions(fs::Permissions::from_mode(0o666));
    }
    remove_temps_in(dir, &prefix);
    let mut tmp = b.tempfile_in(dir).with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    fill(tmp.as_file_mut()).with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("fsync of the temporary file for {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| anyhow::Error::new(e.error))
        .with_context(|| format!("renaming into {}", path.display()))?;
    sync_dir(dir)
}

/// Remove `path` (if present) and the temporary files that killed writes of it left behind.
pub fn remove_with_temps(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => {}
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    remove_temps_in(parent_of(path), &format!(".{name}."));
    Ok(())
}

/// Remove the temporary files of earlier writes of one file (named `{prefix}*.tmp`) that a killed
/// process left behind: each write of a path replaces the previous one, so none of them is data.
fn remove_temps_in(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(prefix) && is_temp_name(&name) && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Move a finished temporary file or folder `tmp` to `dest` (replacing a file there): fsync it,
/// rename, fsync the folder. For writers that need a path of their own (SQLite, a folder of files).
pub fn persist_path(tmp: &Path, dest: &Path) -> Result<()> {
    File::open(tmp).and_then(|f| f.sync_all()).with_context(|| format!("fsync of {}", tmp.display()))?;
    fs::rename(tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    sync_dir(parent_of(dest))
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(anyhow::Error::from))
}

/// Serialize `value` as pretty JSON (with a final newline) and write it atomically.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).with_context(|| format!("serializing {}", path.display()))?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Read and parse a JSON file, naming it in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid: cannot parse it", path.display()))
}

/// Size and CRC32 of a file, read in 1 MiB pieces.
pub fn file_crc32(path: &Path) -> Result<(u64, u32)> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, h.finalize()))
}

// ------------------------------------------------------------------------------------------ folder sets

/// One file of a [`FileSet`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SetEntry {
    /// Its name inside the folder.
    pub file: String,
    /// Its size when the set was committed.
    pub bytes: u64,
    /// Its CRC32 when the set was committed.
    pub crc32: u32,
}

/// The list of files that make up one complete write of a folder, written after all of them.
/// A folder whose list is missing, or whose files differ from it, is a torn write.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileSet {
    /// Always [`FILE_SET_FORMAT`].
    pub format: String,
    /// The files of the set, in the order written.
    pub files: Vec<SetEntry>,
}

/// `format` of every file list.
pub const FILE_SET_FORMAT: &str = "saekit-file-set";

impl FileSet {
    /// Start a set write: remove the old list first, so that a crash while the files are replaced
    /// leaves a folder readers recognise as incomplete.
    pub fn begin(dir: &Path, list_name: &str) -> Result<()> {
        let p = dir.join(list_name);
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", p.display())),
        }
    }

    /// Finish a set write: record `files` (already written and synced in `dir`) in `dir/list_name`.
    pub fn commit(dir: &Path, list_name: &str, files: &[&str]) -> Result<FileSet> {
        let mut set = FileSet { format: FILE_SET_FORMAT.into(), files: Vec::with_capacity(files.len()) };
        for f in files {
            let (bytes, crc32) = file_crc32(&dir.join(f))?;
            set.files.push(SetEntry { file: f.to_string(), bytes, crc32 });
        }
        write_json_atomic(&dir.join(list_name), &set)?;
        Ok(set)
    }

    /// Read `dir/list_name` (None when absent) and check every listed file's size and CRC32.
    pub fn verify(dir: &Path, list_name: &str) -> Result<Option<FileSet>> {
        let p = dir.join(list_name);
        if !p.exists() {
            return Ok(None);
        }
        let set: FileSet = read_json(&p)?;
        if set.format != FILE_SET_FORMAT {
            bail!("{}: not a saekit file list (format {:?})", p.display(), set.format);
        }
        for e in &set.files {
            let fp = dir.join(&e.file);
            let (bytes, crc) = file_crc32(&fp).with_context(|| format!("{} lists {}", p.display(), e.file))?;
            if bytes != e.bytes || crc != e.crc32 {
                bail!(
                    "{}: {} bytes, crc32 {crc:08x}, but {} records {} bytes, crc32 {:08x} (a torn or altered write)",
                    fp.display(),
                    bytes,
                    p.display(),
                    e.bytes,
                    e.crc32
                );
            }
        }
        Ok(Some(set))
    }
}

// ------------------------------------------------------------------------------------------ fingerprints

/// A content fingerprint: SHA-256 over the files' names, sizes and bytes, as 32 hex digits.
/// Resumes compare fingerprints, so an input rebuilt at the same path is seen as a new input.
pub fn fingerprint_files(files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in files {
        let mut f = File::open(p).with_context(|| format!("cannot open {} to fingerprint it", p.display()))?;
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        let len = f.metadata().with_context(|| format!("cannot stat {}", p.display()))?.len();
        h.update(len.to_le_bytes());
        loop {
            let n = f.read(&mut buf).with_context(|| format!("reading {}", p.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(fingerprint_hex(&h.finalize()))
}

/// A streaming content fingerprint (SHA-256, 32 hex digits), for data already in memory.
#[derive(Default)]
pub struct Fingerprinter(Sha256);

impl Fingerprinter {
    /// Add one length-prefixed part.
    pub fn part(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }
    /// Add f32 values as little-endian bytes, length-prefixed.
    pub fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.0.update((v.len() as u64 * 4).to_le_bytes());
        let mut buf = Vec::with_capacity(4096 * 4);
        for c in v.chunks(4096) {
            buf.clear();
            c.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
            self.0.update(&buf);
        }
        self
    }
    /// The fingerprint as 32 hex digits.
    pub fn finish(self) -> String {
        fingerprint_hex(&self.0.finalize())
    }
}

/// Where saekit keeps what it fetches or measures once per machine (models, corpora, the `auto`
/// precision's ratio): `$SAEKIT_CACHE`, else `~/.cache/saekit`, else `./.cache/saekit` without a home.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SAEKIT_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("saekit")
}

/// SHA-256 of `parts` (each length-prefixed), as 32 hex digits.
pub fn fingerprint_bytes<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    fingerprint_hex(&h.finalize())
}

fn fingerprint_hex(digest: &[u8]) -> String {
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

// ------------------------------------------------------------------------------------------ ownership

/// Refuse to write into `dir` when it holds anything `owned` does not accept: the caller may then
/// replace what is there without destroying someone else's files. A missing folder is fine.
/// `what` names the output in the error ("tokenize output", "activation store").
pub fn ensure_only_owned(dir: &Path, what: &str, owned: impl Fn(&str) -> bool) -> Result<()> {
    // a missing folder has nothing to protect; creating it reports its own errors
    let mut foreign: Vec<String> = entry_names(dir)?.into_iter().filter(|n| !owned(n)).collect();
    if !foreign.is_empty() {
        foreign.sort();
        let shown: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
        bail!(
            "{}: refusing to write the {what} into a folder that holds other files ({}{}); choose an empty or new folder",
            dir.display(),
            shown.join(", "),
            if foreign.len() > 5 { format!(" and {} more", foreign.len() - 5) } else { String::new() }
        );
    }
    Ok(())
}

/// The names of the entries of `dir` (none when it does not exist).
pub fn entry_names(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let rd = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    rd.map(|e| {
        Ok(e.with_context(|| format!("cannot list {}", dir.display()))?.file_name().to_string_lossy().into_owned())
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
        // a failing writer leaves the old file and no temporary
        assert!(write_atomic_with(&p, |_| bail!("disk full")).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // not tempfile's 0600: readable like any File::create output
            assert_ne!(fs::metadata(&p).unwrap().permissions().mode() & 0o044, 0);
        }
    }

    #[test]
    fn a_killed_writers_temporary_is_removed_by_the_next_write() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stats.ckpt");
        // what SIGKILL leaves mid-write: tempfile's name for this path, never persisted
        fs::write(d.path().join(".stats.ckpt.Ab12Cd.tmp"), b"half").unwrap();
        fs::write(d.path().join(".other.ckpt.Ab12Cd.tmp"), b"someone else's").unwrap();
        write_atomic(&p, b"whole").unwrap();
        let mut names: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, [".other.ckpt.Ab12Cd.tmp", "stats.ckpt"].map(std::ffi::OsString::from));
    }

    #[test]
    fn file_set_detects_torn_and_altered_writes() {
        let d = tempfile::tempdir().unwrap();
        write_atomic(&d.path().join("w.bin"), &[1, 2, 3]).unwrap();
        write_atomic(&d.path().join("cfg.json"), b"{}").unwrap();
        assert!(FileSet::verify(d.path(), "files.json").unwrap().is_none());
        FileSet::commit(d.path(), "files.json", &["w.bin", "cfg.json"]).unwrap();
        assert_eq!(FileSet::verify(d.path(), "files.json").unwrap().unwrap().files.len(), 2);
        fs::write(d.path().join("w.bin"), [1, 2, 4]).unwrap();
        let e = FileSet::verify(d.path(), "files.json").unwrap_err().to_string();
        assert!(e.contains("w.bin") && e.contains("crc32"), "{e}");
        FileSet::begin(d.path(), "files.json").unwrap();
        assert!(!d.path().join("files.json").exists());
    }

    #[test]
    fn fingerprints_follow_content_not_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.json");
        fs::write(&p, b"abc").unwrap();
        let a = fingerprint_files(std::slice::from_ref(&p)).unwrap();
        fs::write(&p, b"abd").unwrap();
        let b = fingerprint_files(std::slice::from_ref(&p)).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert_ne!(fingerprint_bytes([b"ab".as_slice(), b"c"]), fingerprint_bytes([b"a".as_slice(), b"bc"]));
    }

    #[test]
    fn foreign_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        ensure_only_owned(&d.path().join("missing"), "x", |_| false).unwrap();
        fs::write(d.path().join("shard-000000.bin"), b"").unwrap();
        ensure_only_owned(d.path(), "store", |n| n.starts_with("shard-")).unwrap();
        fs::write(d.path().join("thesis.tex"), b"").unwrap();
        let e = ensure_only_owned(d.path(), "store", |n| n.starts_with("shard-")).unwrap_err().to_string();
        assert!(e.contains("thesis.tex") && e.contains("refusing"), "{e}");
    }
}
