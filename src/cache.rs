//! The caches in front of the pipeline, and what they hold.
//!
//! Every cache is a [`TtlCache`] (`quick_cache` with a deadline per entry).
//! The pipeline's own layers live with their concern (`aws`: secret
//! versions, endpoints; `validate`: login proofs); here are the front's:
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

use crate::config::Settings;
use crate::error::{ErrorCode, LookupError};
use crate::hot::{HotCopies, HotHit};
use crate::sources::secrets_manager::AWSCURRENT;
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

    /// Note a read, for refresh-ahead. Read first: the flag's cache line
    /// stays shared between cores instead of being written on every hit.
    pub fn mark_used(&self) {
        if !self.used.load(std::sync::atomic::Ordering::Relaxed) {
            self.used.store(true, std::sync::atomic::Ordering::Relaxed);
        }
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

/// A bounded cache whose entries expire: `quick_cache` (sharded, CLOCK-style
/// eviction) with a deadline per entry.
///
/// Not `moka` (used until issue 13): a `moka` read also records the access
/// for its eviction policy and does housekeeping on the reading thread
/// (measured: a tenth of a cached lookup's cost), an entry costs ~600 bytes
/// of bookkeeping, and each instance type added ~200 KiB of resident code.
/// Expiry is lazy: an entry is gone to readers once its deadline passes,
/// and `sweep` (each refresh-ahead pass) frees it, so a cached password
/// does not outlive its TTL in memory by more than a tick. Single-flight
/// loads (`get_or_load`) use quick_cache's placeholders.
pub struct TtlCache<K, V, E = std::convert::Infallible> {
    /// A failed load is kept (until the instant it failed) only for the
    /// callers that were waiting on it; readers see values only.
    entries: quick_cache::sync::Cache<K, (Result<V, Arc<E>>, Instant)>,
    ttl: Duration,
}

impl<K: Eq + std::hash::Hash + Clone, V: Clone, E> TtlCache<K, V, E> {
    /// At most `capacity` entries, each for `ttl` unless inserted with its own deadline.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        TtlCache {
            // The estimate sets the shard count (shards start empty).
            entries: quick_cache::sync::Cache::with(
                capacity as usize,
                capacity,
                Default::default(),
                Default::default(),
                Default::default(),
            ),
            ttl,
        }
    }

    /// The value, unless expired at `now`.
    pub fn get_at<Q>(&self, key: &Q, now: Instant) -> Option<V>
    where
        Q: std::hash::Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        match self.entries.get(key)? {
            (Ok(v), until) if now < until => Some(v),
            _ => None,
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        Q: std::hash::Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        self.get_at(key, Instant::now())
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        Q: std::hash::Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        self.get(key).is_some()
    }

    pub fn insert(&self, key: K, value: V) {
        self.insert_until(key, value, Instant::now() + self.ttl);
    }

    pub fn insert_until(&self, key: K, value: V, until: Instant) {
        self.entries.insert(key, (Ok(value), until));
    }

    pub fn invalidate<Q>(&self, key: &Q)
    where
        Q: std::hash::Hash + quick_cache::Equivalent<K> + ?Sized,
    {
        self.entries.remove(key);
    }

    /// Put `value` (until `until`) only if `unchanged` holds for what is
    /// there now (an expired entry counts as none), atomically. Never
    /// waits: with a load of this key under way (its value is newer), it
    /// does not put. Whether it put.
    pub fn put_if(
        &self,
        key: &K,
        value: V,
        until: Instant,
        unchanged: impl FnOnce(Option<&V>) -> bool,
    ) -> bool {
        use quick_cache::sync::{EntryAction, EntryResult};
        let now = Instant::now();
        let mut pending = Some((value, unchanged));
        let result = self.entries.entry(key, Some(Duration::ZERO), |_, current| {
            let Some((value, unchanged)) = pending.take() else {
                return EntryAction::Retain(false);
            };
            let live = match &current.0 {
                Ok(v) if now < current.1 => Some(v),
                _ => None,
            };
            let put = unchanged(live);
            if put {
                *current = (Ok(value), until);
            }
            EntryAction::Retain(put)
        });
        match (result, pending) {
            (EntryResult::Retained(put), _) => put,
            // Nothing there: the entry closure did not run.
            (EntryResult::Vacant(guard), Some((value, unchanged))) => {
                unchanged(None) && guard.insert((Ok(value), until)).is_ok()
            }
            _ => false,
        }
    }

    /// The live value, or `load`'s, cached until `until(&value)`. Concurrent
    /// callers for one key share one load (quick_cache's placeholder: they
    /// wait for it), its failure included; a failure is not cached for
    /// later callers.
    pub async fn get_or_load(
        &self,
        key: K,
        until: impl FnOnce(&V) -> Instant,
        load: impl std::future::Future<Output = Result<V, E>>,
    ) -> Result<V, Arc<E>> {
        use quick_cache::sync::{EntryAction, EntryResult};
        // Read before waiting: a failure recorded (until the instant it
        // happened) while this caller waited is still "live" for it, and
        // expired for everyone who comes later.
        let now = Instant::now();
        let found = self
            .entries
            .entry_async(&key, |_, (v, expires)| {
                if now < *expires {
                    EntryAction::Retain(v.clone())
                } else {
                    EntryAction::ReplaceWithGuard
                }
            })
            .await;
        let guard = match found {
            EntryResult::Retained(shared) => return shared,
            EntryResult::Replaced(guard, expired) => {
                drop(expired); // an expired secret is not kept while loading
                Some(guard)
            }
            EntryResult::Vacant(guard) => Some(guard),
            EntryResult::Removed(..) | EntryResult::Timeout => None,
        };
        let (entry, result) = match load.await {
            Ok(value) => ((Ok(value.clone()), until(&value)), Ok(value)),
            Err(e) => {
                let e = Arc::new(e);
                ((Err(e.clone()), Instant::now()), Err(e))
            }
        };
        match guard {
            Some(guard) => {
                let _ = guard.insert(entry);
            }
            None if result.is_ok() => {
                self.entries.insert(key, entry);
            }
            None => {}
        }
        result
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Every live entry (a snapshot; the cache may change meanwhile).
    pub fn iter(&self) -> impl Iterator<Item = (K, V)> + '_ {
        let now = Instant::now();
        self.entries
            .iter()
            .filter_map(move |(k, (v, until))| match v {
                Ok(v) if now < until => Some((k, v)),
                _ => None,
            })
    }

    /// Free expired entries.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.entries.retain(|_, (_, until)| now < *until);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The answers cache: the hot path, read on every lookup. An answer lives
/// until the first of its secret or validation lifetimes ends (or its next
/// retry while AWS is down); "not found" for `negative_ttl`; other failures
/// for `error_ttl`.
pub struct AnswerCache {
    entries: TtlCache<ConnKey, Answer>,
    negative: Duration,
    /// What the request path reads first; follows `entries` (see [`crate::hot`]).
    hot: HotCopies,
}

impl AnswerCache {
    pub fn new(s: &Settings) -> Self {
        AnswerCache {
            entries: TtlCache::new(s.cache_size, s.error_ttl),
            negative: s.negative_ttl,
            hot: HotCopies::new(),
        }
    }

    fn deadline(&self, answer: &Answer, now: Instant) -> Instant {
        match answer {
            Ok(served) => served.expires_at,
            Err(e) if e.code == ErrorCode::NotFound => now + self.negative,
            Err(_) => now + self.entries.ttl,
        }
    }

    /// The answer for `key` (`<conn_id>` or `<team>/<conn_id>`), unless expired at `now`.
    pub fn get(&self, key: &str, now: Instant) -> Option<Answer> {
        self.entries.get_at(key, now)
    }

    /// A request's read: this thread's copy of a plain answer if it has
    /// one, else the shared entry (a plain one is then copied for next time).
    pub fn read(&self, key: &str, now: Instant) -> Option<Cached> {
        match self.hot.get(key, now) {
            Some(hit) => Some(Cached::Copy(hit)),
            None => self.read_shared(key, now),
        }
    }

    #[inline(never)] // off the hot path's code
    fn read_shared(&self, key: &str, now: Instant) -> Option<Cached> {
        let start = self.hot.read_start();
        let answer = self.entries.get_at(key, now)?;
        if let Ok(served) = &answer {
            // Computed before this read: a copy answers without the
            // Server-Timing a request's own miss carries.
            let plain = !served.stale && served.stage == AWSCURRENT && served.created < now;
            self.hot.offer(served, start, plain);
        }
        Some(Cached::Shared(answer))
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn insert(&self, key: ConnKey, answer: Answer) {
        let until = self.deadline(&answer, Instant::now());
        let _writing = self.hot.begin_write(key.as_str());
        self.entries.insert_until(key, answer, until);
    }

    /// See [`TtlCache::put_if`].
    pub fn put_if(
        &self,
        key: &ConnKey,
        answer: Answer,
        unchanged: impl FnOnce(Option<&Answer>) -> bool,
    ) {
        let until = self.deadline(&answer, Instant::now());
        let _writing = self.hot.begin_write(key.as_str());
        self.entries.put_if(key, answer, until, unchanged);
    }

    pub fn iter(&self) -> impl Iterator<Item = (ConnKey, Answer)> + '_ {
        self.entries.iter()
    }

    pub fn sweep(&self) {
        self.entries.sweep();
        let now = Instant::now();
        self.hot.retain(now, |copied| {
            matches!(self.entries.get_at(copied.key.as_str(), now), Some(Ok(s)) if Arc::ptr_eq(&s, copied))
        });
    }

    /// Per-thread copies held (see [`crate::hot`]).
    #[cfg(test)]
    pub fn copies(&self) -> usize {
        self.hot.len()
    }

    /// Whether `served` (the entry for its key) was read since the last
    /// call, from the shared cache or a copy; clears both marks.
    pub fn take_used(&self, served: &Served) -> bool {
        let shared = served
            .used
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        self.hot.take_read(served.key.as_str()) | shared
    }
}

/// What [`AnswerCache::read`] found.
#[derive(Debug)]
pub enum Cached {
    /// This thread's copy of a plain answer.
    Copy(HotHit),
    Shared(Answer),
}

pub struct Caches {
    pub answers: AnswerCache,
    pub last_good: TtlCache<ConnKey, Arc<Served>>,
}

impl Caches {
    pub fn new(s: &Settings) -> Self {
        Caches {
            answers: AnswerCache::new(s),
            last_good: TtlCache::new(s.cache_size, s.max_stale),
        }
    }
}

/// An answer with the given version, not proven, for unit tests.
#[cfg(test)]
pub(crate) fn served_for_test(key: &ConnKey, version: &str, expires_in: Duration) -> Arc<Served> {
    let now = Instant::now();
    Arc::new(Served {
        key: key.clone(),
        body: Bytes::from_static(b"{}"),
        stage: "AWSCURRENT",
        secret_id: "s".into(),
        secret_header: hyper::header::HeaderValue::from_static("s"),
        secret_arn: "arn".into(),
        version_id: version.into(),
        fetched_at: now,
        login: None,
        expires_at: now + expires_in,
        stale: false,
        retries: 0,
        used: AtomicBool::new(false),
        created: now,
        steps: StepTimes::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SslMode;

    fn answer(expires_in: Duration) -> Answer {
        Ok(served_for_test(&ConnKey::new(None, "c"), "v", expires_in))
    }

    /// Runs `test` on a one-worker runtime (as under a CPU limit of 1), and
    /// fails the whole test run if it does not end within 20 s (a parked
    /// worker cannot be timed out from inside the runtime).
    fn on_one_worker(test: impl std::future::Future<Output = ()>) {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(20));
            if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                eprintln!("hung for 20 s");
                std::process::exit(1);
            }
        });
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    #[test]
    fn concurrent_loads_share_one_attempt_and_its_failure() {
        on_one_worker(async {
            let cache: Arc<TtlCache<&str, u32, String>> =
                Arc::new(TtlCache::new(10, Duration::from_secs(60)));
            let loads = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let run = |ok: bool| {
                let (cache, loads) = (cache.clone(), loads.clone());
                tokio::spawn(async move {
                    let until = |_: &u32| Instant::now() + Duration::from_secs(60);
                    let load = async {
                        loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if ok {
                            Ok(7)
                        } else {
                            Err("AccessDenied".to_string())
                        }
                    };
                    cache.get_or_load("k", until, load).await
                })
            };
            // Ten callers while AWS refuses: one attempt, ten errors.
            let failing: Vec<_> = (0..10).map(|_| run(false)).collect();
            for f in failing {
                assert_eq!(*f.await.unwrap().unwrap_err(), "AccessDenied");
            }
            assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1);
            // The failure is not cached for later callers; a success is.
            let later: Vec<_> = (0..10).map(|_| run(true)).collect();
            for f in later {
                assert_eq!(f.await.unwrap().unwrap(), 7);
            }
            assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 2);
            assert_eq!(cache.get("k"), Some(7));
        });
    }

    #[test]
    fn a_put_never_waits_for_a_load_of_the_same_key() {
        // A put that parked the worker until the load finished would hang
        // a one-worker runtime for ever.
        on_one_worker(async {
            let cache: Arc<TtlCache<&str, u32, String>> =
                Arc::new(TtlCache::new(10, Duration::from_secs(60)));
            let loader = {
                let cache = cache.clone();
                tokio::spawn(async move {
                    let load = async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(1)
                    };
                    cache
                        .get_or_load("k", |_| Instant::now() + Duration::from_secs(60), load)
                        .await
                })
            };
            tokio::time::sleep(Duration::from_millis(20)).await;
            let until = Instant::now() + Duration::from_secs(60);
            assert!(
                !cache.put_if(&"k", 2, until, |was| was.is_none()),
                "the load in flight wins"
            );
            assert_eq!(loader.await.unwrap().unwrap(), 1);
            assert_eq!(cache.get("k"), Some(1));
            assert!(!cache.put_if(&"k", 3, until, |was| was.is_none()));
            assert!(cache.put_if(&"k", 3, until, |was| was == Some(&1)));
            assert_eq!(cache.get("k"), Some(3));
        });
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
                    refuse_passwords: false,
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

    fn answers() -> AnswerCache {
        AnswerCache::new(&Settings::from_args(Default::default()).unwrap())
    }

    fn with_body(key: &ConnKey, body: &'static str, stale: bool) -> Arc<Served> {
        let mut s = Arc::try_unwrap(served_for_test(key, "v", Duration::from_secs(60)))
            .ok()
            .unwrap();
        s.body = Bytes::from_static(body.as_bytes());
        s.stale = stale;
        Arc::new(s)
    }

    /// What a request's read found: from a copy or shared, and the body.
    fn read(cache: &AnswerCache, key: &str) -> Option<(&'static str, Bytes)> {
        // Later than `created`, as every request after the one that loaded it.
        let now = Instant::now() + Duration::from_millis(1);
        cache.read(key, now).map(|read| match read {
            Cached::Copy(hit) => ("copy", hit.body),
            Cached::Shared(Ok(served)) => ("shared", served.body.clone()),
            Cached::Shared(Err(e)) => panic!("{e}"),
        })
    }

    #[test]
    fn hits_after_the_first_are_answered_from_this_threads_copy() {
        let cache = answers();
        let key = ConnKey::new(None, "c");
        cache.insert(key.clone(), Ok(with_body(&key, "one", false)));
        assert_eq!(read(&cache, "c"), Some(("shared", Bytes::from("one"))));
        assert_eq!(read(&cache, "c"), Some(("copy", Bytes::from("one"))));
        assert_eq!(cache.copies(), 1);
        assert_eq!(read(&cache, "other"), None);
    }

    /// A new answer (a refresh, a revocation) is what every thread reads
    /// next: the write drops the copies of every thread.
    #[test]
    fn a_new_answer_replaces_the_copies_of_every_thread() {
        let cache = answers();
        let key = ConnKey::new(None, "c");
        cache.insert(key.clone(), Ok(with_body(&key, "old", false)));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    read(&cache, "c");
                    assert_eq!(read(&cache, "c"), Some(("copy", Bytes::from("old"))));
                });
            }
        });
        assert!(cache.copies() >= 1);
        cache.insert(key.clone(), Ok(with_body(&key, "new", false)));
        assert_eq!(cache.copies(), 0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| assert_eq!(read(&cache, "c").unwrap().1, Bytes::from("new")));
            }
        });
        let revoked = LookupError::new(ErrorCode::CredentialsRejected, "revoked");
        cache.insert(key.clone(), Err(revoked));
        let now = Instant::now() + Duration::from_millis(1);
        assert!(matches!(cache.read("c", now), Some(Cached::Shared(Err(_)))));
        assert!(matches!(cache.read("c", now), Some(Cached::Shared(Err(_)))));
        // put_if writes too.
        let fresh = with_body(&key, "after", false);
        cache.put_if(&key, Ok(fresh), |_| true);
        assert_eq!(read(&cache, "c").unwrap().1, Bytes::from("after"));
    }

    /// A read that began before a write may hold the answer the write
    /// replaced; its copy is not kept (the write's drop may have run first).
    #[test]
    fn a_read_that_raced_a_write_leaves_no_copy() {
        let hot = crate::hot::HotCopies::new();
        let key = ConnKey::new(None, "c");
        let old = with_body(&key, "old", false);
        let start = hot.read_start();
        let writing = hot.begin_write("c"); // a write of "c" (or any key) began
        hot.offer(&old, start, true);
        assert_eq!(hot.len(), 0);
        hot.offer(&old, hot.read_start(), true);
        assert_eq!(hot.len(), 0, "no copy while a write is under way");
        drop(writing);
        hot.offer(&old, start, true);
        assert_eq!(hot.len(), 0, "nor from a read that began before it ended");
        hot.offer(&old, hot.read_start(), true);
        assert_eq!(hot.len(), 1);
        // A write drops copies before it changes the shared cache.
        let _writing = hot.begin_write("c");
        assert_eq!(hot.len(), 0);
    }

    #[test]
    fn large_answers_are_not_copied_and_copies_never_show_the_body() {
        let cache = answers();
        let key = ConnKey::new(None, "big");
        let big: &'static str = "x".repeat(crate::hot::MAX_COPIED_BODY + 1).leak();
        cache.insert(key.clone(), Ok(with_body(&key, big, false)));
        read(&cache, "big");
        assert_eq!(read(&cache, "big").unwrap().0, "shared");
        let key = ConnKey::new(None, "c");
        cache.insert(key.clone(), Ok(with_body(&key, "hunter2", false)));
        let now = Instant::now() + Duration::from_millis(1);
        cache.read("c", now);
        let copy = cache.read("c", now).unwrap();
        assert!(matches!(copy, Cached::Copy(_)));
        let shown = format!("{copy:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("[redacted]"),
            "{shown}"
        );
    }

    #[test]
    fn stale_answers_and_other_stages_are_not_copied() {
        let cache = answers();
        let key = ConnKey::new(None, "c");
        cache.insert(key.clone(), Ok(with_body(&key, "stale", true)));
        read(&cache, "c");
        assert_eq!(read(&cache, "c").unwrap().0, "shared");
        let mut pending = Arc::try_unwrap(with_body(&key, "p", false)).ok().unwrap();
        pending.stage = "AWSPENDING";
        cache.insert(key.clone(), Ok(Arc::new(pending)));
        read(&cache, "c");
        assert_eq!(read(&cache, "c").unwrap().0, "shared");
        assert_eq!(cache.copies(), 0);
    }

    /// A copied password does not outlive its cached answer by more than a
    /// sweep: expired, or gone from the shared cache (evicted), its copy goes.
    #[test]
    fn the_sweep_drops_copies_of_expired_or_evicted_answers() {
        let cache = answers();
        let key = ConnKey::new(None, "c");
        let short = Arc::try_unwrap(served_for_test(&key, "v", Duration::from_millis(30)));
        cache.insert(key.clone(), Ok(Arc::new(short.ok().unwrap())));
        let soon = Instant::now() + Duration::from_millis(1);
        cache.read("c", soon);
        assert!(matches!(cache.read("c", soon), Some(Cached::Copy(_))));
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            cache.read("c", Instant::now()).is_none(),
            "expired: not served"
        );
        assert_eq!(cache.copies(), 0, "nor kept once found expired");

        let other = ConnKey::new(None, "d");
        cache.insert(other.clone(), Ok(with_body(&other, "d", false)));
        read(&cache, "d");
        assert_eq!(cache.copies(), 1);
        cache.entries.invalidate("d"); // as an eviction: no write through AnswerCache
        cache.sweep();
        assert_eq!(cache.copies(), 0);
    }

    #[test]
    fn reads_of_copies_count_as_use_for_refresh_ahead() {
        let cache = answers();
        let key = ConnKey::new(None, "c");
        let served = with_body(&key, "x", false);
        cache.insert(key.clone(), Ok(served.clone()));
        read(&cache, "c"); // shared: Resolver::cached marks `used` for these
        assert!(!cache.take_used(&served));
        assert_eq!(read(&cache, "c").unwrap().0, "copy");
        assert!(cache.take_used(&served));
        assert!(!cache.take_used(&served), "taking clears the mark");
        served.mark_used();
        assert!(cache.take_used(&served));
    }

    #[test]
    fn a_slot_keeps_a_bounded_number_of_copies() {
        let cache = answers();
        let n = crate::hot::COPIES_PER_SLOT + 10;
        for i in 0..n {
            let key = ConnKey::new(None, &format!("c{i}"));
            cache.insert(key.clone(), Ok(with_body(&key, "x", false)));
        }
        std::thread::spawn(move || {
            for i in 0..n {
                read(&cache, &format!("c{i}"));
                read(&cache, &format!("c{i}"));
            }
            assert_eq!(cache.copies(), crate::hot::COPIES_PER_SLOT);
            // The rest are still answered, from the shared cache.
            assert_eq!(read(&cache, &format!("c{}", n - 1)).unwrap().0, "shared");
        })
        .join()
        .unwrap();
    }
}
