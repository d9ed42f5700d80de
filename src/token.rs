//! The shared token every credential request must carry (`X-Sidecar-Token`).
//!
//! Read from a file so Kubernetes can hand it to both containers through an
//! in-memory volume; re-read when the file changes; compared in constant time.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use subtle::ConstantTimeEq;

/// How long a matching token is trusted before the file is looked at again.
const RECHECK: Duration = Duration::from_secs(1);

/// Every request reads the token without a lock (an `ArcSwap` load); only a
/// re-check of the file (at most once a second, or on a mismatch) locks.
pub struct TokenStore {
    path: Option<PathBuf>,
    token: ArcSwap<Vec<u8>>,
    /// When the file was last looked at, in ms since `epoch`.
    checked_ms: AtomicU64,
    epoch: Instant,
    file: Mutex<FileState>,
}

/// What the file looked like when it was last read.
struct FileState {
    modified: Option<SystemTime>,
    len: u64,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenStore({:?}, token: [redacted])", self.path)
    }
}

impl TokenStore {
    /// `None`: no token required (`--insecure-no-token`).
    pub fn new(path: Option<PathBuf>) -> std::io::Result<Self> {
        let (token, file) = match &path {
            Some(p) => read(p)?,
            None => (
                Vec::new(),
                FileState {
                    modified: None,
                    len: 0,
                },
            ),
        };
        Ok(TokenStore {
            path,
            token: ArcSwap::from_pointee(token),
            checked_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            file: Mutex::new(file),
        })
    }

    /// Write a fresh random token to `path` unless the file already exists.
    pub fn create_if_missing(path: &Path) -> std::io::Result<bool> {
        let mut random = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))?;
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(path)
        {
            Ok(mut f) => {
                f.write_all(hex.as_bytes())?;
                f.write_all(b"\n")?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Does `offered` match the current token?
    pub fn verify(&self, offered: Option<&[u8]>) -> bool {
        self.verify_at(offered, std::time::Instant::now())
    }

    /// [`verify`](Self::verify) with the request's clock reading.
    pub fn verify_at(&self, offered: Option<&[u8]>, now: std::time::Instant) -> bool {
        let Some(path) = &self.path else {
            return true;
        };
        let Some(offered) = offered else {
            return false;
        };
        if matches(&self.token.load(), offered) {
            // The file is looked at (one stat) at most every RECHECK on the
            // hot path: a replaced token stops working within that time.
            let now = now.saturating_duration_since(self.epoch).as_millis() as u64;
            if now.saturating_sub(self.checked_ms.load(Ordering::Relaxed))
                < RECHECK.as_millis() as u64
            {
                return true;
            }
            self.reload_if_changed(path);
            return matches(&self.token.load(), offered);
        }
        // A mismatch may be a token that just changed: look before refusing,
        // so a new token works at once.
        self.reload_if_changed(path);
        matches(&self.token.load(), offered)
    }

    fn reload_if_changed(&self, path: &Path) {
        // Never queue behind another re-check (a flood of wrong tokens must
        // not serialize requests): whoever holds the lock is looking already.
        let Ok(mut file) = self.file.try_lock() else {
            return;
        };
        self.checked_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let Ok(meta) = std::fs::metadata(path) else {
            tracing::warn!(path = %path.display(), "token file unreadable; keeping the last token");
            return;
        };
        if meta.modified().ok() == file.modified && meta.len() == file.len {
            return;
        }
        match read(path) {
            Ok((token, state)) if !token.is_empty() => {
                tracing::info!(path = %path.display(), "token file changed; reloaded");
                self.token.store(Arc::new(token));
                *file = state;
            }
            _ => {
                tracing::warn!(path = %path.display(), "token file empty or unreadable; keeping the last token")
            }
        }
    }
}

/// In constant time for the token's contents (not its length, which is
/// not secret), a word at a time: `subtle` per byte cost a tenth of a
/// cached lookup's own work.
fn matches(token: &[u8], offered: &[u8]) -> bool {
    if token.is_empty() || token.len() != offered.len() {
        return false;
    }
    let (words, tail) = token.as_chunks::<8>();
    let (offered_words, offered_tail) = offered.as_chunks::<8>();
    let mut equal = tail.ct_eq(offered_tail);
    for (a, b) in words.iter().zip(offered_words) {
        equal &= u64::from_ne_bytes(*a).ct_eq(&u64::from_ne_bytes(*b));
    }
    bool::from(equal)
}

fn read(path: &Path) -> std::io::Result<(Vec<u8>, FileState)> {
    let meta = std::fs::metadata(path)?;
    let text = std::fs::read(path)?;
    let token = text.trim_ascii().to_vec();
    Ok((
        token,
        FileState {
            modified: meta.modified().ok(),
            len: meta.len(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_and_follows_file_changes() {
        let dir = std::env::temp_dir().join(format!("sidecar-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let store = TokenStore::new(Some(path.clone())).unwrap();
        assert!(store.verify(Some(b"first-token")));
        assert!(!store.verify(Some(b"first-toke")));
        assert!(!store.verify(None));
        std::fs::write(&path, "second-token-longer\n").unwrap();
        assert!(
            store.verify(Some(b"second-token-longer")),
            "a new token is picked up at once"
        );
        assert!(
            !store.verify(Some(b"first-token")),
            "the old one is refused once the file was read"
        );
        assert!(!format!("{store:?}").contains("second"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn create_writes_once() {
        let dir = std::env::temp_dir().join(format!("sidecar-token-create-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        assert!(TokenStore::create_if_missing(&path).unwrap());
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(first.trim().len(), 64);
        assert!(!TokenStore::create_if_missing(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Compared a word at a time: a difference in any byte, the tail
    /// included, or in the length, is a mismatch.
    #[test]
    fn matches_sees_every_byte_and_the_length() {
        for len in [1, 7, 8, 9, 16, 43, 64] {
            let token: Vec<u8> = (0..len as u8).map(|i| b'a' + i % 26).collect();
            assert!(matches(&token, &token), "len {len}");
            for at in 0..len {
                let mut other = token.clone();
                other[at] ^= 1;
                assert!(!matches(&token, &other), "len {len}, byte {at}");
            }
            assert!(!matches(&token, &token[..len - 1]), "len {len}");
            assert!(!matches(&token, &[token.as_slice(), b"x"].concat()));
        }
        assert!(!matches(b"", b""), "an empty token matches nothing");
    }

    #[test]
    fn no_token_mode_accepts_everything() {
        let store = TokenStore::new(None).unwrap();
        assert!(store.verify(None));
    }
}
