//! Files a login names (`sslrootcert`, `sslcert`, `sslkey`), read so that
//! whoever writes a secret cannot turn them against the sidecar.
//!
//! A secret's writer chooses these paths. Read as they come, `/dev/zero`
//! grows the process until the kernel kills it, a FIFO blocks a runtime
//! thread forever, and the error text tells the writer which paths exist
//! on the sidecar's filesystem. So a path a secret names is read only:
//! - under one of `secret_file_dirs` (after resolving links and `..`);
//! - if it is a regular file (checked on the opened file, so a link swapped
//!   in later changes nothing), opened without blocking (a FIFO);
//! - up to [`MAX_FILE_BYTES`];
//! - on a blocking thread, inside the login's deadline.
//!
//! The error names the option and where it came from, never the path or
//! whether another path exists. Paths the operator configured are trusted
//! for where they are, not for what they are: the same type and size rules.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// A CA bundle is well under this (the RDS global bundle: ~160 KiB).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Who chose a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The settings or a `[connections.<id>]` entry.
    Operator,
    /// The secret's value (`extra`, or a URI's query).
    Secret,
}

/// A file one login option names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedFile {
    /// `sslrootcert`, `sslcert` or `sslkey`.
    pub option: &'static str,
    pub path: PathBuf,
    pub origin: Origin,
}

impl NamedFile {
    pub fn new(option: &'static str, path: impl Into<PathBuf>, origin: Origin) -> Self {
        NamedFile {
            option,
            path: path.into(),
            origin,
        }
    }

    /// How an error names this file: the operator's path is configuration
    /// and helps; a secret's path is the writer's text and is never echoed.
    pub fn describe(&self) -> String {
        match self.origin {
            Origin::Operator => format!("{} {}", self.option, self.path.display()),
            Origin::Secret => format!("the secret's extra.{}", self.option),
        }
    }
}

/// Reads [`NamedFile`]s by the rules above.
#[derive(Debug, Clone, Default)]
pub struct FileReader {
    /// `secret_file_dirs`, resolved once at start (a directory that does not
    /// exist allows nothing).
    allowed: Vec<PathBuf>,
}

impl FileReader {
    pub fn new(dirs: &[PathBuf]) -> Self {
        FileReader {
            allowed: dirs
                .iter()
                .filter_map(|d| std::fs::canonicalize(d).ok())
                .collect(),
        }
    }

    /// The file's bytes, or why not (a message safe to send anyone).
    pub async fn read(&self, file: &NamedFile) -> Result<Vec<u8>, String> {
        let (file, allowed) = (file.clone(), self.allowed.clone());
        tokio::task::spawn_blocking(move || read_bounded(&file, &allowed))
            .await
            .unwrap_or_else(|_| Err("reading a file failed".into()))
    }
}

fn read_bounded(file: &NamedFile, allowed: &[PathBuf]) -> Result<Vec<u8>, String> {
    let named = file.describe();
    let path = match file.origin {
        Origin::Operator => file.path.clone(),
        Origin::Secret => {
            let outside = || {
                format!(
                    "{named} names a file outside secret_file_dirs (the directories a secret may name files in); put the file there or set secret_file_dirs"
                )
            };
            // Decided on the text first, so that nothing about a path
            // outside the directories is looked at (or told).
            if !lexically_under(&file.path, allowed) {
                return Err(outside());
            }
            let real = std::fs::canonicalize(&file.path)
                .map_err(|_| format!("{named} cannot be opened"))?;
            if !allowed.iter().any(|dir| real.starts_with(dir)) {
                return Err(outside());
            }
            real
        }
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|_| format!("{named} cannot be opened"))?;
    let meta = opened
        .metadata()
        .map_err(|_| format!("{named} cannot be opened"))?;
    if !meta.is_file() {
        return Err(format!("{named} is not a regular file"));
    }
    let too_large = || format!("{named} is larger than {} KiB", MAX_FILE_BYTES / 1024);
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The size may change after the check: never read past the cap.
    opened
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|_| format!("{named} cannot be read"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// An absolute path without `..`, below one of `dirs` as written.
fn lexically_under(path: &Path, dirs: &[PathBuf]) -> bool {
    path.is_absolute()
        && !path.components().any(|c| matches!(c, Component::ParentDir))
        && dirs.iter().any(|dir| path.starts_with(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sidecar-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::canonicalize(d).unwrap()
    }

    fn secret(path: impl Into<PathBuf>) -> NamedFile {
        NamedFile::new("sslrootcert", path, Origin::Secret)
    }

    #[tokio::test]
    async fn a_secret_reads_regular_files_under_the_directories_only() {
        let d = dir("under");
        std::fs::write(d.join("ca.pem"), b"pem").unwrap();
        let r = FileReader::new(std::slice::from_ref(&d));
        assert_eq!(r.read(&secret(d.join("ca.pem"))).await.unwrap(), b"pem");
        for outside in [
            PathBuf::from("/etc/passwd"),
            PathBuf::from("/nonexistent/x"),
            d.join("../x"),
            PathBuf::from("relative.pem"),
        ] {
            let e = r.read(&secret(&outside)).await.unwrap_err();
            assert!(e.contains("outside secret_file_dirs"), "{outside:?}: {e}");
            assert!(!e.contains(&*outside.to_string_lossy()), "{e}");
        }
        // A link out of the directory is outside too.
        std::os::unix::fs::symlink("/dev/zero", d.join("zero")).unwrap();
        let e = r.read(&secret(d.join("zero"))).await.unwrap_err();
        assert!(e.contains("outside"), "{e}");
        // Nothing is allowed when no directory is.
        let none = FileReader::new(&[]);
        assert!(none.read(&secret(d.join("ca.pem"))).await.is_err());
    }

    #[tokio::test]
    async fn devices_fifos_directories_and_large_files_are_refused() {
        let d = dir("kinds");
        let r = FileReader::new(&[d.clone(), PathBuf::from("/dev")]);
        for p in ["/dev/zero", "/dev/urandom"] {
            let e = r.read(&secret(p)).await.unwrap_err();
            assert!(e.contains("not a regular file"), "{p}: {e}");
        }
        let fifo = d.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        let e = r.read(&secret(&fifo)).await.unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = r.read(&secret(&d)).await.unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let big = d.join("big");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        let e = r.read(&secret(&big)).await.unwrap_err();
        assert!(e.contains("larger than"), "{e}");
        // The operator's own paths follow the same type and size rules.
        let op = NamedFile::new("sslrootcert", "/dev/zero", Origin::Operator);
        let e = FileReader::new(&[]).read(&op).await.unwrap_err();
        assert!(
            e.contains("not a regular file") && e.contains("/dev/zero"),
            "{e}"
        );
    }
}
