//! The caches in front of the pipeline, and what they hold.
//!
//! All `moka` caches. The pipeline's own layers live with their concern
//! (`aws`: secret versions, endpoints; `validate`: login proofs); here are
//! the front's:
//!
//! - `answers`: (team, conn_id) → the finished answer (the hot path: one hash
//!   lookup, pre-serialized JSON). Lives until the first of its secret or
//!   validation lifetimes ends, or until its next retry while AWS is down;
//!   "not found" for `negative_ttl`; other failures for `error_ttl`.
//! - `last_good`: (team, conn_id) → the last answer that logged in, kept
//!   `max_stale` for stale-if-error.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache;
use moka::Expiry;

use crate::config::Settings;
use crate::error::{ErrorCode, LookupError};
use crate::validate::LoginTarget;

/// What a lookup is for: a conn_id, as seen by one Airflow team (or none).
///
/// Stored as one string, `<conn_id>` or `<team>/<conn_id>` (`/` is in
/// neither rule), so the hot path looks a teamless id up by `&str` without
/// building a key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnKey(Box<str>);

impl ConnKey {
    pub fn new(team: Option<&str>, conn_id: &str) -> Self {
        ConnKey(match team {
            None => conn_id.into(),
            Some(team) => format!("{team}/{conn_id}").into(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn team(&self) -> Option<&str> {
        self.0.split_once('/').map(|(team, _)| team)
    }

    pub fn conn_id(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(_, id)| id)
    }
}

impl std::borrow::Borrow<str> for ConnKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ConnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.team() {
            None => f.write_str(self.conn_id()),
            Some(team) => write!(f, "{} (team {team})", self.conn_id()),
        }
    }
}

/// A connection ready to send (proven to log in, or of a type that cannot be).
pub struct Served {
    pub key: ConnKey,
    /// The Airflow JSON, serialized once. Holds the password: never logged.
    pub body: Bytes,
    /// The staging label whose version this is.
    pub stage: &'static str,
    /// The secret that served it (the `secrets` cache key).
    pub secret_id: String,
    /// `secret_id` as the `X-Sidecar-Secret` header, built once.
    pub secret_header: hyper::header::HeaderValue,
    pub secret_arn: String,
    pub version_id: String,
    /// When AWS last confirmed this version (fetch or version check).
    pub fetched_at: Instant,
    /// How this answer logs in, and when that was last proven; `None` for
    /// connection types the sidecar cannot log in with.
    pub login: Option<(LoginTarget, Instant)>,
    /// When the answers cache lets go of it.
    pub expires_at: Instant,
    /// Served from `last_good` because AWS failed; `retries` counts the
    /// failed background attempts since (the backoff exponent).
    pub stale: bool,
    pub retries: u32,
    /// Read since the last refresh-ahead pass (only hot entries are refreshed).
    pub used: AtomicBool,
    /// When this answer was computed, and what each step cost.
    pub created: Instant,
    pub steps: StepTimes,
}

impl Served {
    /// Whether this credential was proven against its database.
    pub fn validated(&self) -> bool {
        self.login.is_some()
    }

    pub fn validated_at(&self) -> Option<Instant> {
        self.login.as_ref().map(|(_, at)| *at)
    }
}

/// Time spent per pipeline step while computing one answer (the
/// `Server-Timing` header of a lookup that missed the cache).
#[derive(Debug, Default, Clone, Copy)]
pub struct StepTimes {
    pub secrets_manager: Duration,
    pub rds: Duration,
    pub login: Duration,
    pub total: Duration,
}

impl StepTimes {
    pub fn server_timing(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "secretsmanager;dur={:.2}, rds;dur={:.2}, login;dur={:.2}, total;dur={:.2}",
            ms(self.secrets_manager),
            ms(self.rds),
            ms(self.login),
            ms(self.total)
        )
    }
}

tokio::task_local! {
    /// Per-step timings of the resolution running in this task.
    pub static STEPS: std::cell::RefCell<StepTimes>;
}

/// Add to the current resolution's step timings (no-op outside one).
pub fn record_step(add: impl FnOnce(&mut StepTimes)) {
    let _ = STEPS.try_with(|s| add(&mut s.borrow_mut()));
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("key", &self.key)
            .field("body", &"[redacted]")
            .field("stage", &self.stage)
            .field("secret_id", &self.secret_id)
            .field("version_id", &self.version_id)
            .field("validated", &self.validated())
            .field("stale", &self.stale)
            .finish()
    }
}

/// What a lookup of one conn_id produced, success or failure, as cached.
pub type Answer = Result<Arc<Served>, LookupError>;

/// The answers cache: the hot path, read on every lookup.
///
/// A `quick_cache` (sharded, CLOCK-style eviction) rather than `moka`:
/// a `moka` read also records the access for its eviction policy and does
/// its housekeeping on the reading thread, which measured as a tenth of a
/// cached lookup's cost. Expiry is lazy: an entry carries its deadline and
/// is gone to readers once it passes; `sweep` (each refresh-ahead pass)
/// drops expired entries, so a cached password does not outlive its TTL in
/// memory by more than a tick.
pub struct AnswerCache {
    entries: quick_cache::sync::Cache<ConnKey, Cached>,
    negative: Duration,
    error: Duration,
}

#[derive(Clone)]
struct Cached {
    answer: Answer,
    expires: Instant,
}

impl AnswerCache {
    pub fn new(s: &Settings) -> Self {
        AnswerCache {
            entries: quick_cache::sync::Cache::new(s.cache_size as usize),
            negative: s.negative_ttl,
            error: s.error_ttl,
        }
    }

    fn deadline(&self, answer: &Answer, now: Instant) -> Instant {
        match answer {
            Ok(served) => served.expires_at,
            Err(e) if e.code == ErrorCode::NotFound => now + self.negative,
            Err(_) => now + self.error,
        }
    }

    /// The answer for `key` (`<conn_id>` or `<team>/<conn_id>`), unless expired at `now`.
    pub fn get(&self, key: &str, now: Instant) -> Option<Answer> {
        self.entries
            .get(key)
            .filter(|c| now < c.expires)
            .map(|c| c.answer)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key, Instant::now()).is_some()
    }

    pub fn insert(&self, key: ConnKey, answer: Answer) {
        let expires = self.deadline(&answer, Instant::now());
        self.entries.insert(key, Cached { answer, expires });
    }

    /// Put `answer` only if `unchanged` holds for what is there now (an
    /// expired entry counts as none), atomically.
    pub fn put_if(
        &self,
        key: &ConnKey,
        answer: Answer,
        unchanged: impl FnOnce(Option<&Answer>) -> bool,
    ) {
        use quick_cache::sync::{EntryAction, EntryResult};
        let now = Instant::now();
        let new = Cached {
            expires: self.deadline(&answer, now),
            answer,
        };
        let mut pending = Some((new, unchanged));
        let result = self.entries.entry(key, None, |_, current| {
            if let Some((new, unchanged)) = pending.take() {
                if unchanged((now < current.expires).then_some(&current.answer)) {
                    *current = new;
                }
            }
            EntryAction::Retain(())
        });
        // Nothing there: the entry closure did not run.
        if let (EntryResult::Vacant(guard), Some((new, unchanged))) = (result, pending) {
            if unchanged(None) {
                let _ = guard.insert(new);
            }
        }
    }

    /// Every live entry (a snapshot; the cache may change meanwhile).
    pub fn iter(&self) -> impl Iterator<Item = (ConnKey, Answer)> + '_ {
        let now = Instant::now();
        self.entries
            .iter()
            .filter(move |(_, c)| now < c.expires)
            .map(|(k, c)| (k, c.answer))
    }

    /// Drop expired entries.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.entries.retain(|_, c| now < c.expires);
    }
}

/// Expiry by whether a thing was found: `found` or `missing` (negative cache).
pub struct ByPresence {
    pub found: Duration,
    pub missing: Duration,
}

impl<K, V> Expiry<K, Arc<Option<V>>> for ByPresence {
    fn expire_after_create(&self, _: &K, v: &Arc<Option<V>>, _: Instant) -> Option<Duration> {
        Some(if v.is_some() {
            self.found
        } else {
            self.missing
        })
    }
    fn expire_after_update(
        &self,
        k: &K,
        v: &Arc<Option<V>>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(k, v, now)
    }
}

pub struct Caches {
    pub answers: AnswerCache,
    pub last_good: Cache<ConnKey, Arc<Served>>,
}

impl Caches {
    pub fn new(s: &Settings) -> Self {
        Caches {
            answers: AnswerCache::new(s),
            last_good: Cache::builder()
                .max_capacity(s.cache_size)
                .time_to_live(s.max_stale)
                .build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SslMode;

    fn answer(expires_in: Duration) -> Answer {
        let now = Instant::now();
        Ok(Arc::new(Served {
            key: ConnKey::new(None, "c"),
            body: Bytes::from_static(b"{}"),
            stage: "AWSCURRENT",
            secret_id: "s".into(),
            secret_header: hyper::header::HeaderValue::from_static("s"),
            secret_arn: "arn".into(),
            version_id: "v".into(),
            fetched_at: now,
            login: None,
            expires_at: now + expires_in,
            stale: false,
            retries: 0,
            used: AtomicBool::new(false),
            created: now,
            steps: StepTimes::default(),
        }))
    }

    #[test]
    fn an_answer_is_gone_once_its_deadline_passes_and_swept_from_memory() {
        let args = crate::config::SettingArgs {
            error_ttl: Some(crate::config::Dur(Duration::from_millis(50))),
            ..Default::default()
        };
        let cache = AnswerCache::new(&Settings::from_args(args).unwrap());
        let now = Instant::now();
        cache.insert(
            ConnKey::new(None, "short"),
            answer(Duration::from_millis(50)),
        );
        cache.insert(ConnKey::new(None, "long"), answer(Duration::from_secs(60)));
        let failed = LookupError::new(ErrorCode::UpstreamError, "x");
        cache.insert(ConnKey::new(Some("t"), "err"), Err(failed));
        assert!(cache.get("short", now).is_some());
        assert!(cache.get("t/err", now).is_some_and(|a| a.is_err()));
        let later = now + Duration::from_millis(60);
        assert!(cache.get("short", later).is_none(), "expired");
        assert!(cache.get("t/err", later).is_none(), "error_ttl passed");
        assert!(cache.get("long", later).is_some());

        std::thread::sleep(Duration::from_millis(60));
        // An expired entry counts as none for a put-if-absent ...
        cache.put_if(
            &ConnKey::new(None, "short"),
            answer(Duration::from_secs(60)),
            |was| was.is_none(),
        );
        assert!(cache.contains_key("short"));
        // ... and the sweep drops what expired: no password outlives its TTL.
        cache.sweep();
        assert_eq!(cache.entries.len(), 2, "the expired error is gone");
        assert_eq!(cache.iter().count(), 2);
    }

    #[test]
    fn debug_of_an_answer_never_shows_the_body() {
        let now = Instant::now();
        let served = Served {
            key: ConnKey::new(None, "c"),
            body: Bytes::from_static(br#"{"password":"hunter2-xyz"}"#),
            stage: "AWSCURRENT",
            secret_id: "airflow/connections/c".into(),
            secret_header: hyper::header::HeaderValue::from_static("airflow/connections/c"),
            secret_arn: "arn".into(),
            version_id: "v1".into(),
            fetched_at: now,
            expires_at: now,
            stale: false,
            retries: 0,
            login: Some((
                LoginTarget {
                    host: "h".into(),
                    port: 5432,
                    database: "d".into(),
                    user: "u".into(),
                    password: "hunter2-xyz".to_string().into(),
                    sslmode: SslMode::VerifyFull,
                    sslrootcert: None,
                    options: Default::default(),
                },
                now,
            )),
            used: AtomicBool::new(false),
            created: now,
            steps: StepTimes::default(),
        };
        let answer: Answer = Ok(Arc::new(served));
        let shown = format!("{answer:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }
}
