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
//! - on a blocking thread, inside the login's deadline, at most
//!   [`MAX_READS`] at once (a read that hangs, on NFS say, holds its thread
//!   past the deadline: the bound keeps such reads from taking every thread).
//!
//! The error names the option and where it came from, never the path or
//! whether another path exists. Paths the operator configured are trusted
//! for where they are, not for what they are: the same type and size rules.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// A CA bundle is well under this (the RDS global bundle: ~160 KiB).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// File reads under way at once; more are refused at once.
pub const MAX_READS: usize = 8;

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
#[derive(Debug, Clone)]
pub struct FileReader {
    /// `secret_file_dirs`, resolved once at start (a directory that does not
    /// exist allows nothing).
    allowed: Arc<[PathBuf]>,
    reads: Arc<tokio::sync::Semaphore>,
}

impl FileReader {
    pub fn new(dirs: &[PathBuf]) -> Self {
        FileReader {
            allowed: dirs
                .iter()
                .filter_map(|d| std::fs::canonicalize(d).ok())
                .collect(),
            reads: Arc::new(tokio::sync::Semaphore::new(MAX_READS)),
        }
    }

    /// The file's bytes, or why not (a message safe to send anyone).
    pub async fn read(&self, file: &NamedFile) -> Result<Vec<u8>, String> {
        // Held by the blocking read itself, until it really ends.
        let Ok(slot) = self.reads.clone().try_acquire_owned() else {
            return Err(format!(
                "{}: too many file reads under way (a file system that does not answer?)",
                file.describe()
            ));
        };
        let (file, allowed) = (file.clone(), self.allowed.clone());
        tokio::task::spawn_blocking(move || {
            let read = read_bounded(&file, &allowed);
            drop(slot);
            read
        })
        .await
        .unwrap_or_else(|_| Err("reading a file failed".into()))
    }
}

fn read_bounded(file: &NamedFile, allowed: &[PathBuf]) -> Result<Vec<u8>, String> {
    let named = file.describe();
    let path = match file.origin {
        Origin::Operator => file.path.clone(),
        Origin::Secret => {
            // Decided on the text first, so that nothing about a path
            // outside the directories is looked at (or told).
            if !lexically_under(&file.path, allowed) {
                return Err(outside(&named));
            }
            let real = std::fs::canonicalize(&file.path)
                .map_err(|_| format!("{named} cannot be opened"))?;
            if !allowed.iter().any(|dir| real.starts_with(dir)) {
                return Err(outside(&named));
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
    // Where the opened file really is: a directory swapped for a link
    // between the check above and the open must not lead out.
    if file.origin == Origin::Secret {
        use std::os::fd::AsRawFd;
        let at = std::fs::read_link(format!("/proc/self/fd/{}", opened.as_raw_fd()));
        if let Ok(at) = at {
            if !allowed.iter().any(|dir| at.starts_with(dir)) {
                return Err(outside(&named));
            }
        }
    }
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

fn outside(named: &str) -> String {
    format!(
        "{named} names a file outside secret_file_dirs (the directories a secret may name files in); put the file there or set secret_file_dirs"
    )
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
    async fn reads_past_the_bound_are_refused_at_once() {
        let d = dir("bound");
        std::fs::write(d.join("ca.pem"), b"pem").unwrap();
        let r = FileReader::new(std::slice::from_ref(&d));
        let held: Vec<_> = (0..MAX_READS)
            .map(|_| r.reads.clone().try_acquire_owned().unwrap())
            .collect();
        let e = r.read(&secret(d.join("ca.pem"))).await.unwrap_err();
        assert!(e.contains("too many file reads"), "{e}");
        drop(held);
        assert_eq!(r.read(&secret(d.join("ca.pem"))).await.unwrap(), b"pem");
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
