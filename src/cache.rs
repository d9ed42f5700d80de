//! What the front serves ([`Served`], keyed by [`ConnKey`]) and the
//! bounded TTL cache the pipeline's own layers use ([`TtlCache`]: `aws`'s
//! secret versions and endpoints, `validate`'s login proofs).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::aws::secrets_manager::Stage;

use crate::error::LookupError;
use crate::postgres::validate::LoginTarget;

/// Whether a step may answer from its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Cache,
    Fresh,
}

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
    pub stage: Stage,
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
    /// When it stops being served (the first of its secret's and its
    /// proof's lifetimes to end; for a stale copy, its outage's).
    pub expires_at: Instant,
    /// A copy of the last good answer, re-proven, served because AWS failed.
    pub stale: bool,
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

    /// Whether it was read since the last call (refresh-ahead's claim).
    pub fn take_used(&self) -> bool {
        self.used.swap(false, std::sync::atomic::Ordering::Relaxed)
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

/// What a lookup of one conn_id produced, success or failure.
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

/// A `quick_cache` of at most `capacity` entries (each weighs one), the
/// one shape every cache and state map here uses. The estimate sets the
/// shard count; shards start empty.
pub fn bounded<K, V>(capacity: u64) -> quick_cache::sync::Cache<K, V>
where
    K: Eq + std::hash::Hash,
    V: Clone,
{
    quick_cache::sync::Cache::with(
        capacity as usize,
        capacity,
        Default::default(),
        Default::default(),
        Default::default(),
    )
}

impl<K: Eq + std::hash::Hash + Clone, V: Clone, E> TtlCache<K, V, E> {
    /// At most `capacity` entries, each for `ttl` unless inserted with its own deadline.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        TtlCache {
            entries: bounded(capacity),
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

    /// Free expired entries.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.entries.retain(|_, (_, until)| now < *until);
    }
}

/// An answer with the given version, not proven, for unit tests.
#[cfg(test)]
pub(crate) fn served_for_test(key: &ConnKey, version: &str, expires_in: Duration) -> Arc<Served> {
    let now = Instant::now();
    Arc::new(Served {
        key: key.clone(),
        body: Bytes::from_static(b"{}"),
        stage: Stage::Current,
        secret_id: "s".into(),
        secret_header: hyper::header::HeaderValue::from_static("s"),
        secret_arn: "arn".into(),
        version_id: version.into(),
        fetched_at: now,
        login: None,
        expires_at: now + expires_in,
        stale: false,
        used: AtomicBool::new(false),
        created: now,
        steps: StepTimes::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SslMode;

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
    fn debug_of_an_answer_never_shows_the_body() {
        let now = Instant::now();
        let served = Served {
            key: ConnKey::new(None, "c"),
            body: Bytes::from_static(br#"{"password":"hunter2-xyz"}"#),
            stage: Stage::Current,
            secret_id: "airflow/connections/c".into(),
            secret_header: hyper::header::HeaderValue::from_static("airflow/connections/c"),
            secret_arn: "arn".into(),
            version_id: "v1".into(),
            fetched_at: now,
            expires_at: now,
            stale: false,
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
}
