//! The shared token every credential request must carry (`X-Sidecar-Token`).
//!
//! Read from a file so Kubernetes can hand it to both containers through an
//! in-memory volume; re-read when the file changes; compared in constant time.
//! A deleted, emptied or unreadable file means no token is accepted (never
//! "keep the last one") until a new non-empty token is written.

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

/// What the file looked like when it was last read, and what was wrong
/// with it then (logged once per change, not per request).
struct FileState {
    /// `None`: nothing usable was read (missing or unreadable): read again
    /// on the next re-check whatever the file looks like.
    seen: Option<Seen>,
    problem: Option<&'static str>,
}

/// The file's identity and contents' metadata: a file replaced (a new inode,
/// a Kubernetes symlink swap), rewritten or truncated compares unequal.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    ino: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    len: u64,
}

impl Seen {
    fn of(meta: &std::fs::Metadata) -> Seen {
        use std::os::unix::fs::MetadataExt;
        Seen {
            ino: meta.ino(),
            modified: meta.modified().ok(),
            changed: (meta.ctime(), meta.ctime_nsec()),
            len: meta.len(),
        }
    }
}

/// Why no token is accepted (for the log; never the token).
const EMPTY: &str = "token file is empty: no token is accepted until a new one is written";
const UNREADABLE: &str =
    "token file is missing or unreadable: no token is accepted until a new one is written";

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenStore({:?}, token: [redacted])", self.path)
    }
}

impl TokenStore {
    /// `None`: no token required (`--insecure-no-token`).
    pub fn new(path: Option<PathBuf>) -> std::io::Result<Self> {
        let (token, file) = match &path {
            Some(p) => {
                let (token, seen) = read(p)?;
                let problem = token.is_empty().then_some(EMPTY);
                if let Some(problem) = problem {
                    tracing::warn!(path = %p.display(), "{problem}");
                }
                let seen = Some(seen);
                (token, FileState { seen, problem })
            }
            None => (
                Vec::new(),
                FileState {
                    seen: None,
                    problem: None,
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
            // hot path: a replaced or deleted token stops working within
            // that time.
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

    /// Whether requests must carry a token (not `--insecure-no-token`).
    pub fn required(&self) -> bool {
        self.path.is_some()
    }

    /// Look at the file and follow it: a new non-empty token replaces the
    /// old one; a deleted, emptied or unreadable file leaves no token at
    /// all (an empty token matches nothing) until a new one is written.
    fn reload_if_changed(&self, path: &Path) {
        // Never queue behind another re-check (a flood of wrong tokens must
        // not serialize requests): whoever holds the lock is looking already.
        let Ok(mut file) = self.file.try_lock() else {
            return;
        };
        self.checked_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let seen = std::fs::metadata(path).ok().map(|m| Seen::of(&m));
        if seen.is_some() && seen == file.seen {
            return;
        }
        let (token, seen, problem) = match seen.and_then(|_| read(path).ok()) {
            Some((token, seen)) if token.is_empty() => (token, Some(seen), Some(EMPTY)),
            Some((token, seen)) => (token, Some(seen), None),
            None => (Vec::new(), None, Some(UNREADABLE)),
        };
        // An empty token matches nothing: stored before anything is logged.
        let usable_before = file.problem.is_none();
        self.token.store(Arc::new(token));
        file.seen = seen;
        match problem {
            None => tracing::info!(path = %path.display(), "token file changed; reloaded"),
            // Said once per change of state, not on every request it refuses.
            Some(problem) if usable_before || file.problem != Some(problem) => {
                tracing::warn!(path = %path.display(), "{problem}")
            }
            Some(_) => {}
        }
        file.problem = problem;
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

/// The token (trimmed; empty if the file holds none) and what the file
/// looked like when it was read.
fn read(path: &Path) -> std::io::Result<(Vec<u8>, Seen)> {
    let meta = std::fs::metadata(path)?;
    let text = std::fs::read(path)?;
    let token = text.trim_ascii().to_vec();
    Ok((token, Seen::of(&meta)))
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

    /// A deleted, emptied or unreadable file accepts no token (the old one
    /// included) from the next re-check on, at most RECHECK later on the
    /// hot path; a new token works at once.
    #[test]
    fn a_deleted_emptied_or_unreadable_file_accepts_no_token() {
        let dir = std::env::temp_dir().join(format!("sidecar-token-gone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let store = TokenStore::new(Some(path.clone())).unwrap();
        let later = || Instant::now() + RECHECK + Duration::from_millis(10);
        assert!(store.verify(Some(b"first-token")));

        std::fs::remove_file(&path).unwrap();
        assert!(
            store.verify(Some(b"first-token")),
            "within RECHECK the hot path does not look at the file"
        );
        assert!(
            !store.verify_at(Some(b"first-token"), later()),
            "a deleted file: the last token is not kept"
        );
        assert!(!store.verify(Some(b"first-token")));
        assert!(!store.verify(Some(b"")) && !store.verify(None));

        std::fs::write(&path, "second-token\n").unwrap();
        assert!(
            store.verify(Some(b"second-token")),
            "a new token works at once"
        );
        assert!(!store.verify(Some(b"first-token")));

        std::fs::write(&path, " \n").unwrap();
        assert!(
            !store.verify_at(Some(b"second-token"), later()),
            "an emptied file accepts nothing"
        );
        assert!(!store.verify(Some(b"")) && !store.verify(Some(b" ")));

        std::fs::write(&path, "third-token\n").unwrap();
        assert!(store.verify(Some(b"third-token")));
        // Unreadable: a directory where the file was (root reads any file).
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(!store.verify_at(Some(b"third-token"), later()));
        std::fs::remove_dir(&path).unwrap();
        std::fs::write(&path, "third-token\n").unwrap();
        assert!(
            store.verify(Some(b"third-token")),
            "the same token written again works again"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_empty_file_at_start_accepts_no_token() {
        let dir = std::env::temp_dir().join(format!("sidecar-token-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "").unwrap();
        let store = TokenStore::new(Some(path.clone())).unwrap();
        assert!(store.required());
        assert!(!store.verify(Some(b"")) && !store.verify(None));
        std::fs::write(&path, "now-a-token").unwrap();
        assert!(store.verify(Some(b"now-a-token")));
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
        assert!(!store.required());
        assert!(store.verify(None));
    }
}
