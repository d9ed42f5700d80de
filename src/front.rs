//! The front of the pipeline: what the listeners and the CLI call.
//!
//! - **The answers cache** (the hot path: one hash lookup).
//! - **Single-flight in a task of its own**: concurrent misses of one
//!   (team, conn_id) share one resolution, run in a spawned task, so a client
//!   that gives up never cancels it: it runs to its own deadline once and its
//!   result is cached for everyone.
//! - **Expensive requests** (`refresh=true`, rotation checks): coalesced per
//!   conn_id, at most `max_concurrent_checks` conn_ids at once (more answer
//!   429 `too_busy`), each bounded by `check_timeout`.
//! - **Stale-if-error**: while AWS has an outage (throttling, timeouts, 5xx,
//!   network: [`LookupError::transient`]), the last answer that logged in is
//!   served at once, re-proven against Postgres, up to `max_stale`. AWS is
//!   retried in the background with exponential backoff and jitter, never
//!   sooner than `secret_ttl`, one call per try: never more calls than
//!   healthy operation. A refusal (access denied, KMS, deleted, malformed,
//!   rejected) is a decision: serving stops.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};

use crate::cache::{Answer, Cached, Caches, ConnKey, Served, TtlCache, STEPS};
use crate::config::{team_problem, Settings};
use crate::error::{ErrorCode, LookupError};
use crate::metrics::Metrics;
use crate::resolve::{check_id, Pipeline, Policy, Use};
use crate::rotation::RotationReport;
use crate::sources::Attempts;
use crate::variables::Value;

/// When a finished piece of work may put its answer in the cache.
#[derive(Clone)]
pub enum Put {
    /// A request's miss: only where there is still no answer.
    IfAbsent,
    /// Background work: only over the answer it started from.
    IfStill(Arc<Served>),
    /// `refresh=true`: the newest word wins.
    Always,
}

/// An AWS outage one conn_id is in: how many tries failed, and when the
/// next one is due.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outage {
    failures: u32,
    next_try: Instant,
}

/// An outage's answer for a conn_id with nothing good to serve: the last
/// error, until the next try (so a cold or missing id costs one call per
/// backoff period, not one per `error_ttl`).
#[derive(Debug, Clone)]
struct OutageError(LookupError);

pub struct Resolver {
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    pub pipeline: Arc<Pipeline>,
    pub caches: Caches,
    outages: TtlCache<ConnKey, Outage>,
    outage_errors: TtlCache<ConnKey, OutageError>,
    /// When a decision (refusal, rejection) last revoked a conn_id: work that
    /// began before it must not put its answer back as "last good".
    revoked: TtlCache<ConnKey, Instant>,
    lookups: Inflight<ConnKey, Answer>,
    background: Inflight<ConnKey, Answer>,
    /// Refresh-ahead's runs, one per conn_id.
    refreshing: Inflight<ConnKey, ()>,
    refreshes: Inflight<ConnKey, Answer>,
    checks: Inflight<ConnKey, Result<Arc<RotationReport>, LookupError>>,
    /// Variables and config values: single-flight, last good value, outage.
    pub(crate) values: Inflight<(&'static str, ConnKey, bool), Result<Arc<Value>, LookupError>>,
    pub(crate) last_values: TtlCache<(&'static str, ConnKey), Arc<Value>>,
    pub(crate) value_outages: TtlCache<(&'static str, ConnKey), (Instant, u32, LookupError)>,
    /// `max_concurrent_checks`: rotation checks and `refresh=true`.
    pub(crate) expensive: Arc<Semaphore>,
    /// `max_in_flight`: every other resolution (cold lookups, values,
    /// background work), so that clients that send ids and hang up cannot
    /// start unbounded work against AWS and Postgres.
    pub(crate) in_flight: Arc<Semaphore>,
}

/// Why an [`Inflight`] run gave no value.
#[derive(Debug)]
pub enum NotRun {
    /// A new run was needed and every slot was taken.
    Busy,
    /// The run's task ended without a value (it panicked).
    Lost,
}

/// Single-flight whose work runs in a task of its own: callers that give up
/// never cancel it. (A cache's own single-flight runs the loader in the
/// first caller's task, so a caller that leaves cancels it and the next
/// caller starts over: 20 impatient clients made 77 login attempts that way.)
pub struct Inflight<K, V> {
    running: Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>,
}

impl<K, V> Default for Inflight<K, V> {
    fn default() -> Self {
        Inflight {
            running: Arc::default(),
        }
    }
}

impl<K, V> Inflight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn is_running(&self, key: &K) -> bool {
        self.running
            .lock()
            .expect("inflight lock")
            .contains_key(key)
    }

    /// The value of the run under way for `key`, or of a new run of `work`.
    /// With `slots`, a new run needs a free slot (held until it ends).
    pub async fn run<F>(
        &self,
        key: K,
        slots: Option<&Arc<Semaphore>>,
        work: impl FnOnce() -> F,
    ) -> Result<V, NotRun>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let mut rx = {
            let mut running = self.running.lock().expect("inflight lock");
            match running.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let permit = match slots {
                        Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| NotRun::Busy)?),
                        None => None,
                    };
                    let (tx, rx) = watch::channel(None);
                    running.insert(key.clone(), rx.clone());
                    let guard = RemoveOnDrop {
                        running: self.running.clone(),
                        key,
                    };
                    let work = work();
                    tokio::spawn(async move {
                        let value = work.await;
                        // Out of the map before anyone sees the value: a
                        // caller who got it and asks again (refresh=true)
                        // must start a new run, not join this finished one.
                        drop(guard);
                        let _ = tx.send(Some(value));
                        drop(permit);
                    });
                    rx
                }
            }
        };
        let value = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| NotRun::Lost)?
            .clone();
        value.ok_or(NotRun::Lost)
    }
}

/// Removes a finished (or panicked) run from the map.
struct RemoveOnDrop<K: Hash + Eq, V> {
    running: Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>,
    key: K,
}

impl<K: Hash + Eq, V> Drop for RemoveOnDrop<K, V> {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&self.key);
        }
    }
}

impl Resolver {
    pub fn new(
        settings: Arc<Settings>,
        aws: &aws_config::SdkConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Resolver {
            pipeline: Arc::new(Pipeline::new(settings.clone(), aws, metrics.clone())),
            caches: Caches::new(&settings),
            outages: TtlCache::new(settings.cache_size, settings.max_stale),
            outage_errors: TtlCache::new(settings.cache_size, settings.max_stale),
            revoked: TtlCache::new(settings.cache_size, settings.max_stale),
            lookups: Inflight::default(),
            values: Inflight::default(),
            last_values: TtlCache::new(settings.cache_size, settings.max_stale),
            value_outages: TtlCache::new(settings.cache_size, settings.max_stale),
            background: Inflight::default(),
            refreshing: Inflight::default(),
            refreshes: Inflight::default(),
            checks: Inflight::default(),
            expensive: Arc::new(Semaphore::new(settings.max_concurrent_checks)),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings,
            metrics,
        }
    }

    /// The cache key of a request: the id and team rules, and a pinned
    /// sidecar's team (a request naming no team is the pinned team's).
    pub fn key(&self, team: Option<&str>, id: &str) -> Result<ConnKey, LookupError> {
        check_id(id)?;
        let team = match (team, &self.settings.team) {
            (Some(asked), Some(pinned)) if asked != pinned => {
                return Err(LookupError::new(
                    ErrorCode::TeamForbidden,
                    format!("{id}: this sidecar serves team {pinned} only, not team {asked}"),
                ))
            }
            (asked, pinned) => asked.or(pinned.as_deref()),
        };
        if let Some(team) = team {
            if let Some(why) = team_problem(team) {
                let shown: String = team.chars().take(64).collect();
                return Err(LookupError::new(
                    ErrorCode::BadRequest,
                    format!("{shown:?} is not a valid team name: {why} (use A-Z a-z 0-9 _ -, at most {}, no \"--\", not starting or ending with \"-\")", crate::config::MAX_TEAM_LEN),
                ));
            }
            // `--` separates the team from the id in a secret name.
            if id.contains("--") {
                return Err(LookupError::new(
                    ErrorCode::InvalidConnId,
                    format!("{id:?} holds \"--\", the team separator: refused in team lookups (as Airflow's backend does)"),
                ));
            }
            // <team>---<rest> would split as team + "-<rest>" or team- + <rest>.
            if let Some(rest) = id.strip_prefix('-') {
                return Err(LookupError::new(
                    ErrorCode::InvalidConnId,
                    format!("{id:?} starts with \"-\": in a team lookup the secret name {team}--{id} would be ambiguous (team {team:?} + id {id:?}, or team \"{team}-\" + id {rest:?})"),
                ));
            }
        }
        Ok(ConnKey::new(team, id))
    }

    /// A connection for Airflow: from the cache while it lives, otherwise
    /// resolved once for all concurrent callers. `refresh` bypasses every cache.
    pub async fn connection(self: &Arc<Self>, key: &ConnKey, refresh: bool) -> Answer {
        if !refresh {
            if let Some(answer) = self.caches.answers.get(key.as_str(), Instant::now()) {
                self.hit(&answer);
                return answer;
            }
        }
        self.metrics.cache(false);
        let this = self.clone();
        let k = key.clone();
        if refresh {
            let work = move || async move { this.load(&k, Policy::FRESH, Put::Always).await };
            return self
                .refreshes
                .run(key.clone(), Some(&self.expensive), work)
                .await
                .unwrap_or_else(|e| Err(not_run(e, key, "refresh", Bound::Checks)));
        }
        let work = move || async move { this.load(&k, Policy::CACHED, Put::IfAbsent).await };
        self.lookups
            .run(key.clone(), Some(&self.in_flight), work)
            .await
            .unwrap_or_else(|e| Err(not_run(e, key, "lookup", Bound::InFlight)))
    }

    /// Free expired entries (passwords included) from every cache.
    pub fn sweep(&self) {
        self.pipeline.aws.sweep();
        self.pipeline.proofs.sweep();
        self.caches.answers.sweep();
        self.caches.last_good.sweep();
        self.outages.sweep();
        self.outage_errors.sweep();
        self.revoked.sweep();
        self.last_values.sweep();
        self.value_outages.sweep();
    }

    /// The hot path: the cached answer, if there is one (`key`: a
    /// [`ConnKey`]'s text, or a teamless conn_id as it came), read from
    /// this thread's copy when it has one.
    pub fn cached(&self, key: &str, now: Instant) -> Option<Cached> {
        let read = self.caches.answers.read(key, now)?;
        match &read {
            Cached::Shared(answer) => self.hit(answer),
            // A copy's reads are its own mark (see `AnswerCache::take_used`).
            Cached::Copy(_) => self.metrics.cache(true),
        }
        Some(read)
    }

    /// A hit on the shared cache: counted, and marked read for refresh-ahead.
    fn hit(&self, answer: &Answer) {
        self.metrics.cache(true);
        if let Ok(served) = answer {
            served.mark_used();
        }
    }

    /// Resolve and cache. During an outage the last good answer is served
    /// at once, and AWS is left to the background retry when it is due.
    async fn load(self: &Arc<Self>, key: &ConnKey, policy: Policy, put: Put) -> Answer {
        if policy.aws == Use::Cache {
            if let Some(outage) = self.outages.get(key) {
                let due = outage.next_try <= Instant::now();
                // A due background retry goes to AWS; everything else waits for it.
                if !(due && policy.attempts == Attempts::Once) {
                    if let Some(stale) = self.stale(key, outage).await {
                        self.put(key, &put, Ok(stale.clone()));
                        if due {
                            self.retry_in_background(key, stale.clone());
                        }
                        return Ok(stale);
                    }
                    // Nothing good to serve: the outage's error until its next try.
                    if !due {
                        if let Some(OutageError(e)) = self.outage_errors.get(key) {
                            let answer: Answer = Err(e);
                            self.put(key, &put, answer.clone());
                            return answer;
                        }
                    }
                }
            }
        }
        // A conn_id with a last good answer, or in an outage, has had its
        // tries: one AWS call, then stale-if-error or the outage's error.
        // SDK retries would only multiply calls during an outage.
        let quiet = self.caches.last_good.contains_key(key) || self.outages.contains_key(key);
        let policy = if policy.aws == Use::Cache && quiet {
            Policy {
                attempts: Attempts::Once,
                ..policy
            }
        } else {
            policy
        };
        let answer = self.resolve_or_stale(key, policy).await;
        self.put(key, &put, answer.clone());
        answer
    }

    /// One background pass for `key` (refresh-ahead, outage retries),
    /// coalesced with any other under way.
    pub fn retry_in_background(self: &Arc<Self>, key: &ConnKey, current: Arc<Served>) {
        let this = self.clone();
        let k = key.clone();
        tokio::spawn(async move {
            let inner = this.clone();
            let key = k.clone();
            let work = move || async move {
                inner
                    .load(&key, Policy::background(Use::Cache), Put::IfStill(current))
                    .await
            };
            // No slot free: skipped; the next lookup or pass tries again.
            let _ = this.background.run(k, Some(&this.in_flight), work).await;
        });
    }

    /// Whether refresh-ahead's work for `key` is under way.
    pub(crate) fn refreshing(&self, key: &ConnKey) -> bool {
        self.refreshing.is_running(key)
    }

    /// Run refresh-ahead's `work` for `key` in the background (the pass
    /// skips a key whose refresh is under way: see [`Resolver::refreshing`]).
    pub(crate) fn refresh_once(
        self: &Arc<Self>,
        key: ConnKey,
        work: impl Future<Output = ()> + Send + 'static,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this
                .refreshing
                .run(key, Some(&this.in_flight), || work)
                .await;
        });
    }

    /// Put an answer in the cache, unless the entry changed since the work
    /// began: a rotation check's verdict is never overwritten by older work.
    pub(crate) fn put(&self, key: &ConnKey, put: &Put, answer: Answer) {
        self.caches
            .answers
            .put_if(key, answer, |now| match (now, put) {
                (_, Put::Always) | (None, Put::IfAbsent) => true,
                (Some(Ok(now)), Put::IfStill(was)) => Arc::ptr_eq(now, was),
                _ => false,
            });
    }

    /// The pipeline, timed; on an AWS outage, the last good answer.
    pub(crate) async fn resolve_or_stale(&self, key: &ConnKey, policy: Policy) -> Answer {
        let started = Instant::now();
        let revoked_since = |at: Option<Instant>| at.is_some_and(|at| at >= started);
        let (result, mut steps) = STEPS
            .scope(Default::default(), async {
                let result = self.pipeline.resolve(key, policy).await;
                (result, STEPS.with(|s| *s.borrow()))
            })
            .await;
        steps.total = started.elapsed();
        match result {
            Ok(mut served) => {
                served.steps = steps;
                tracing::debug!(conn_id = %key, stage = served.stage, timing = %steps.server_timing(), "resolved");
                let served = Arc::new(served);
                self.outages.invalidate(key);
                self.outage_errors.invalidate(key);
                // Work that began before a revocation keeps its answer to
                // itself: it is not the last good one.
                if !revoked_since(self.revoked.get(key)) {
                    self.caches.last_good.insert(key.clone(), served.clone());
                }
                Ok(served)
            }
            Err(e) if e.transient => {
                let outage = self.aws_failed(key);
                self.outage_errors
                    .insert(key.clone(), OutageError(e.clone()));
                match self.stale(key, outage).await {
                    Some(served) => {
                        tracing::warn!(conn_id = %key, cause = %e.message, age_s = served.fetched_at.elapsed().as_secs(),
                            next_try_s = outage.next_try.saturating_duration_since(Instant::now()).as_secs(),
                            "AWS failed; serving the last credential that logs in, retrying AWS in the background");
                        Ok(served)
                    }
                    None => Err(e),
                }
            }
            // The database is down or slow: not a decision about the
            // credential, so the last good answer stays for when it is back.
            Err(e) if e.code == ErrorCode::DatabaseUnreachable || e.code == ErrorCode::Timeout => {
                Err(e)
            }
            Err(e) => {
                // A decision (refused, deleted, rejected, malformed): nothing old is served.
                self.revoke(key);
                Err(e)
            }
        }
    }

    /// When to try AWS again after `failures` failed tries: backing off from
    /// `secret_ttl` for something that was served (healthy operation asks
    /// once per `secret_ttl`), from `negative_ttl` for something never served
    /// (healthy operation asks once per `negative_ttl` for a missing id).
    /// Shared by connections and plain values.
    pub(crate) fn next_try(&self, failures: u32, was_served: bool) -> Instant {
        let s = &self.settings;
        let base = if was_served {
            s.secret_ttl
        } else {
            s.negative_ttl.max(s.error_ttl)
        };
        Instant::now() + backoff(base, failures)
    }

    /// A decision against `key` (AWS refused, secret gone, login rejected):
    /// forget its last good answer, and keep older work from restoring it.
    pub(crate) fn revoke(&self, key: &ConnKey) {
        self.revoked.insert(key.clone(), Instant::now());
        self.outages.invalidate(key);
        self.outage_errors.invalidate(key);
        self.caches.last_good.invalidate(key);
    }

    /// Record a failed AWS try for `key` and schedule the next one.
    pub(crate) fn aws_failed(&self, key: &ConnKey) -> Outage {
        let failures = self.outages.get(key).map_or(0, |o| o.failures) + 1;
        let outage = Outage {
            failures,
            next_try: self.next_try(failures, self.caches.last_good.contains_key(key)),
        };
        self.outages.insert(key.clone(), outage);
        outage
    }

    /// The last answer that logged in, if it is younger than `max_stale` and
    /// still logs in (Postgres is the source of truth), to serve until the
    /// next AWS try or until its proof expires.
    async fn stale(&self, key: &ConnKey, outage: Outage) -> Option<Arc<Served>> {
        let old = self.caches.last_good.get(key)?;
        let s = &self.settings;
        let stale_left = s.max_stale.checked_sub(old.fetched_at.elapsed())?;
        let login = match &old.login {
            Some((target, _)) => {
                let at = self
                    .pipeline
                    .proofs
                    .prove(target, &old.version_id, &old.secret_arn, false)
                    .await
                    .ok()?;
                Some((target.clone(), at))
            }
            None => None,
        };
        let now = Instant::now();
        let proof_left = login.as_ref().map_or(Duration::MAX, |(_, at)| {
            s.validation_ttl.saturating_sub(at.elapsed())
        });
        let life = outage
            .next_try
            .saturating_duration_since(now)
            .max(Duration::from_secs(1))
            .min(proof_left)
            .min(stale_left);
        self.metrics.stale_serve();
        Some(Arc::new(Served {
            key: old.key.clone(),
            body: old.body.clone(),
            stage: old.stage,
            secret_id: old.secret_id.clone(),
            secret_header: old.secret_header.clone(),
            secret_arn: old.secret_arn.clone(),
            version_id: old.version_id.clone(),
            fetched_at: old.fetched_at,
            login,
            expires_at: now + life,
            stale: true,
            retries: outage.failures,
            used: std::sync::atomic::AtomicBool::new(false),
            created: now,
            steps: Default::default(),
        }))
    }

    /// A rotation check, coalesced per conn_id and bounded in number and time.
    pub async fn rotation_check(
        self: &Arc<Self>,
        key: &ConnKey,
    ) -> Result<Arc<RotationReport>, LookupError> {
        let this = self.clone();
        let k = key.clone();
        let limit = self.settings.check_timeout;
        let work = move || async move {
            match tokio::time::timeout(limit, this.rotation_check_now(&k)).await {
                Ok(report) => report.map(Arc::new),
                Err(_) => Err(LookupError::new(
                    ErrorCode::Timeout,
                    format!("rotation check of connection {k}: did not finish within {limit:?} (check_timeout)"),
                )),
            }
        };
        self.checks
            .run(key.clone(), Some(&self.expensive), work)
            .await
            .unwrap_or_else(|e| Err(not_run(e, key, "rotation check", Bound::Checks)))
    }

    async fn rotation_check_now(&self, key: &ConnKey) -> Result<RotationReport, LookupError> {
        let previously = match self.caches.answers.get(key.as_str(), Instant::now()) {
            Some(Ok(served)) => Some(served.version_id.clone()),
            _ => None,
        };
        let (report, served) = match crate::rotation::check(&self.pipeline, key, previously).await {
            Ok(checked) => checked,
            // A refusal met by the check (AWS denied, secret deleted) is a
            // decision for lookups too: stop serving the old answer now.
            Err(e) if !e.transient && e.code != ErrorCode::DatabaseUnreachable => {
                self.revoke(key);
                self.caches.answers.insert(key.clone(), Err(e.clone()));
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        // What lookups get from now on; older refresh work cannot undo it.
        match served {
            Some(served) => {
                let served = Arc::new(served);
                self.outages.invalidate(key);
                self.caches.last_good.insert(key.clone(), served.clone());
                self.caches.answers.insert(key.clone(), Ok(served));
            }
            None => {
                self.revoke(key);
                let failed = LookupError::new(
                    report.verdict.error_code(),
                    format!("connection {key}: rotation check: {}", report.message),
                );
                self.caches.answers.insert(key.clone(), Err(failed));
            }
        }
        self.metrics.rotation_check(report.verdict.as_str());
        tracing::info!(conn_id = %key, verdict = report.verdict.as_str(), "rotation check");
        Ok(report)
    }

    /// Every connection this process has served (still cached) or has
    /// configured, checked one after another.
    pub async fn rotation_check_all(
        self: &Arc<Self>,
    ) -> Vec<(ConnKey, Result<Arc<RotationReport>, LookupError>)> {
        let mut keys: Vec<ConnKey> = self
            .caches
            .answers
            .iter()
            .filter(|(_, a)| a.as_ref().is_ok_and(|s| s.validated()))
            .map(|(k, _)| k)
            .collect();
        for id in self.settings.connections.keys() {
            keys.push(ConnKey::new(self.settings.team.as_deref(), id));
        }
        keys.sort_by(|a, b| (a.conn_id(), a.team()).cmp(&(b.conn_id(), b.team())));
        keys.dedup();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let report = self.rotation_check(&key).await;
            out.push((key, report));
        }
        out
    }
}

/// Which bound a run found full.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bound {
    /// `max_concurrent_checks`.
    Checks,
    /// `max_in_flight`.
    InFlight,
}

pub(crate) fn not_run(e: NotRun, key: &ConnKey, what: &str, bound: Bound) -> LookupError {
    let why = match bound {
        Bound::Checks => "too many rotation checks and refreshes under way (max_concurrent_checks)",
        Bound::InFlight => "too many lookups under way in this sidecar (max_in_flight)",
    };
    match e {
        NotRun::Busy => LookupError::new(
            ErrorCode::TooBusy,
            format!("{what} of {key}: {why}; try again shortly"),
        ),
        NotRun::Lost => LookupError::new(
            ErrorCode::Timeout,
            format!("{what} of connection {key}: ended without an answer"),
        ),
    }
}

/// The wait before the next AWS try after `failures` failed ones: doubling
/// from `secret_ttl`, at most 15 minutes (or `secret_ttl` if longer), plus up
/// to a quarter of jitter. Never below `secret_ttl`, so an outage never costs
/// more calls than healthy operation (one per `secret_ttl`).
pub fn backoff(secret_ttl: Duration, failures: u32) -> Duration {
    let cap = secret_ttl.max(Duration::from_secs(15 * 60));
    let doublings = failures.saturating_sub(1).min(16);
    let wait = secret_ttl.saturating_mul(1 << doublings).min(cap);
    wait + wait.mul_f64(fastrand::f64() * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_ttl_and_never_goes_below_it() {
        let ttl = Duration::from_secs(2);
        for failures in 1..30 {
            let b = backoff(ttl, failures);
            let floor = ttl
                .saturating_mul(1 << (failures - 1).min(16))
                .min(Duration::from_secs(900));
            assert!(b >= floor && b <= floor.mul_f64(1.25), "{failures}: {b:?}");
        }
        assert!(backoff(Duration::from_secs(3600), 5) >= Duration::from_secs(3600));
    }

    /// A resolver at the default settings, with an AWS config that is never called.
    fn resolver() -> Resolver {
        let settings = Arc::new(Settings::from_args(Default::default()).unwrap());
        let aws = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        Resolver::new(settings, &aws, Arc::new(Metrics::new()))
    }

    #[test]
    fn a_team_lookup_whose_secret_name_would_be_ambiguous_is_400() {
        let r = resolver();
        assert_eq!(
            r.key(Some("a"), "b").unwrap().as_str(),
            ConnKey::new(Some("a"), "b").as_str()
        );
        for (team, id, code, why) in [
            ("a-", "b", ErrorCode::BadRequest, "ends with \"-\""),
            (
                "-a",
                "b",
                ErrorCode::BadRequest,
                "starts or ends with \"-\"",
            ),
            ("a", "-b", ErrorCode::InvalidConnId, "starts with \"-\""),
            ("a", "b--c", ErrorCode::InvalidConnId, "\"--\""),
        ] {
            let e = r.key(Some(team), id).unwrap_err();
            assert_eq!(e.code, code, "{team} {id}: {e}");
            assert!(e.message.contains(why), "{team} {id}: {e}");
        }
        // Without a team the name is <prefix>/<id>: nothing to split.
        assert!(r.key(None, "-b").is_ok());
    }

    fn served(key: &ConnKey, version: &str) -> Arc<Served> {
        crate::cache::served_for_test(key, version, Duration::from_secs(60))
    }

    #[tokio::test]
    async fn a_refresh_under_way_is_seen_until_it_ends() {
        let r = Arc::new(resolver());
        let (key, other) = (ConnKey::new(None, "c"), ConnKey::new(None, "d"));
        let (done, wait) = tokio::sync::oneshot::channel::<()>();
        r.refresh_once(key.clone(), async move {
            let _ = wait.await;
        });
        tokio::task::yield_now().await;
        assert!(r.refreshing(&key) && !r.refreshing(&other));
        done.send(()).unwrap();
        for _ in 0..100 {
            if !r.refreshing(&key) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("still refreshing after the work ended");
    }

    #[tokio::test]
    async fn older_work_never_overwrites_a_rotation_checks_verdict() {
        let r = resolver();
        let key = ConnKey::new(None, "c");
        let current = || r.caches.answers.get(key.as_str(), Instant::now()).unwrap();
        let old = served(&key, "v1");
        r.caches.answers.insert(key.clone(), Ok(old.clone()));
        // A rotation check revokes v1 (its verdict replaces the entry) ...
        let revoked = LookupError::new(
            ErrorCode::CredentialsRejected,
            "rotation check: no version logs in",
        );
        r.caches.answers.insert(key.clone(), Err(revoked));
        // ... and a refresh that started from v1 finishes afterwards.
        r.put(&key, &Put::IfStill(old.clone()), Ok(served(&key, "v1")));
        assert!(current().is_err(), "the revoked answer came back");
        // A cold lookup's answer does not replace it either; refresh=true does.
        r.put(&key, &Put::IfAbsent, Ok(served(&key, "v1")));
        assert!(current().is_err());
        r.put(&key, &Put::Always, Ok(served(&key, "v2")));
        let now = current().unwrap();
        assert_eq!(now.version_id, "v2");
        // Work that started from the entry in place swaps it.
        r.put(&key, &Put::IfStill(now.clone()), Ok(served(&key, "v3")));
        assert_eq!(current().unwrap().version_id, "v3");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn asking_again_after_a_run_finished_starts_a_new_run() {
        let inflight: Inflight<&str, u32> = Inflight::default();
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        for i in 0..2000 {
            let runs2 = runs.clone();
            let work =
                move || async move { runs2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 };
            let got = inflight.run("k", None, work).await.unwrap();
            // The waiter may run on the other worker the moment the value
            // is sent: the finished run must already be out of the map.
            assert_eq!(got, i + 1, "iteration {i} joined a finished run");
        }
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_does_not_cancel_the_shared_run() {
        let inflight: Inflight<&str, u32> = Inflight::default();
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let work = |runs: Arc<std::sync::atomic::AtomicU32>| {
            move || async move {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                7
            }
        };
        // The first caller leaves early; the run goes on and later callers join it.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(20),
            inflight.run("k", None, work(runs.clone())),
        )
        .await;
        assert!(gave_up.is_err());
        let joined = inflight.run("k", None, work(runs.clone())).await.unwrap();
        assert_eq!(joined, 7);
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_new_run_needs_a_slot_a_joining_caller_does_not() {
        let inflight: Inflight<&str, u32> = Inflight::default();
        let slots = Arc::new(Semaphore::new(1));
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            1
        };
        let a = inflight.run("a", Some(&slots), slow);
        let a2 = inflight.run("a", Some(&slots), slow);
        let b = inflight.run("b", Some(&slots), slow);
        let (a, a2, b) = tokio::join!(a, a2, b);
        assert_eq!(a.unwrap(), 1);
        assert_eq!(a2.unwrap(), 1);
        assert!(matches!(b, Err(NotRun::Busy)));
    }
}
