//! floto-files: the local files the server and the clients keep, written atomically (a crash
//! leaves the old file or the new one, never a torn one), secrets with mode 0600 from their
//! first byte, private directories with mode 0700, and reads that warn when a secret is
//! readable by others. Unix only. It knows no file formats and takes no locks: what goes
//! into a file, and who else may write it, is the caller's business.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// An I/O failure, with what was being done and to which path.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    fn new(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self {
            action,
            path: path.to_owned(),
            source,
        }
    }

    /// The file does not exist.
    pub fn is_not_found(&self) -> bool {
        self.source.kind() == std::io::ErrorKind::NotFound
    }
}

pub fn read_to_string(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(|e| FileError::new("reading", path, e))
}

/// Reads a secret, warning when group or others can read it.
pub fn read_secret(path: &Path) -> Result<String, FileError> {
    let meta = fs::metadata(path).map_err(|e| FileError::new("reading", path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "secret file is readable by group or others; chmod 600 it"
        );
    }
    read_to_string(path)
}

/// Writes a secret atomically with mode 0600.
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_atomic(path, contents, 0o600)
}

/// Writes a public file atomically with mode 0644.
pub fn write_public(path: &Path, contents: &[u8]) -> Result<(), FileError> {
    write_atomic(path, contents, 0o644)
}

/// Creates a directory (and its parents) with mode 0700 if it does not exist.
pub fn create_private_dir(path: &Path) -> Result<(), FileError> {
    create_dir_with_mode(path, 0o700)
}

/// Creates a directory (and its parents) with mode 0755 if it does not exist.
pub fn create_public_dir(path: &Path) -> Result<(), FileError> {
    create_dir_with_mode(path, 0o755)
}

fn create_dir_with_mode(path: &Path, mode: u32) -> Result<(), FileError> {
    if !path.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
            .map_err(|e| FileError::new("creating directory", path, e))?;
    }
    if !path.is_dir() {
        return Err(FileError::new(
            "using",
            path,
            std::io::Error::other("not a directory"),
        ));
    }
    Ok(())
}

/// Writes to a temporary file in the same directory, fsyncs it, renames it over `path`
/// and fsyncs the directory.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| FileError::new("writing", path, std::io::Error::other("no file name")))?;
    // Unique per write, so that concurrent writers (threads of one process too) never share
    // a temporary file; the last rename wins whole.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is masked by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| FileError::new("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_0600_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_secret(&p, b"one").unwrap();
        write_secret(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
    }

    /// Threads writing one file at once each write whole: the file ends as one of them wrote
    /// it, never mixed or missing, and no temporary file is left.
    #[test]
    fn concurrent_writes_of_one_file_never_mix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("known_hosts");
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..50 {
                        write_public(p, &[b'a' + t; 4096]).unwrap();
                    }
                });
            }
        });
        let got = fs::read(&p).unwrap();
        assert_eq!(got.len(), 4096);
        assert!(got.iter().all(|b| *b == got[0]), "mixed writes");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary files left behind");
    }

    #[test]
    fn errors_name_the_path() {
        let err = read_to_string(Path::new("/nonexistent/floto/x")).unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains("/nonexistent/floto/x"), "{err}");
    }

    #[test]
    fn private_dirs_are_0700() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b");
        create_private_dir(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let file = dir.path().join("f");
        fs::write(&file, b"").unwrap();
        assert!(create_private_dir(&file).is_err());
    }
}
