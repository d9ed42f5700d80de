//! The front of the pipeline: what the listeners and the CLI call.
//!
//! - **One state per key** ([`crate::service::keys::Keys`] of [`crate::service::state::State`]):
//!   what lookups are served, changed only by events through
//!   [`crate::service::state::next`]. Reading it is the hot path: one hash lookup.
//! - **Single-flight in a task of its own** ([`Inflight`]): concurrent
//!   misses of one key share one resolution, run in a spawned task, so a
//!   client that gives up never cancels it; at most `max_in_flight` run at
//!   once (more answer 429 `too_busy`).
//! - **Expensive requests** (`refresh=true`, rotation checks): coalesced per
//!   key, at most `max_concurrent_checks` at once, each bounded by `check_timeout`.
//! - **Stale-if-error**: while AWS has an outage (throttling, timeouts, 5xx,
//!   network: [`LookupError::transient`]), the last answer that logged in is
//!   served at once, re-proven against Postgres, up to `max_stale`. AWS is
//!   retried in the background with exponential backoff and jitter, never
//!   sooner than `secret_ttl`, one call per try: never more calls than
//!   healthy operation. A refusal (access denied, KMS, deleted, malformed,
//!   rejected) is a decision: serving stops.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::aws::calls::Attempts;
use crate::cache::{Answer, ConnKey, Served, STEPS};
use crate::config::{team_problem, Settings};
use crate::error::{ErrorCode, LookupError};
use crate::pipeline::{check_id, Pipeline, Policy, Use};
use crate::service::inflight::{Inflight, NotRun};
use crate::service::keys::Keys;
use crate::service::rotation::RotationReport;
use crate::service::state::{Entry, Event, Origin, Rules};
use crate::service::variables::{Value, ValueKind};
use crate::telemetry::metrics::Metrics;

/// Which kind of plain value a key names (variables and config options
/// share one state map).
pub type ValueKey = (ValueKind, ConnKey);

impl crate::service::state::Kept for Served {
    fn fetched_at(&self) -> Instant {
        self.fetched_at
    }
    fn expires_at(&self) -> Instant {
        self.expires_at
    }
}

pub struct Resolver {
    pub(crate) settings: Arc<Settings>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pipeline: Arc<Pipeline>,
    /// Every connection's state: what lookups are served.
    pub(crate) connections: Keys<ConnKey, Served>,
    /// Every variable's and config option's state.
    pub(crate) values: Keys<ValueKey, Value>,
    lookups: Inflight<ConnKey, Answer>,
    background: Inflight<ConnKey, Answer>,
    /// Refresh-ahead's runs, one per conn_id.
    refreshing: Inflight<ConnKey, ()>,
    refreshes: Inflight<ConnKey, Answer>,
    checks: Inflight<ConnKey, Result<Arc<RotationReport>, LookupError>>,
    /// Variables and config values (`bool`: `refresh=true`).
    pub(crate) value_runs: Inflight<(ValueKind, ConnKey, bool), Result<Arc<Value>, LookupError>>,
    /// `max_concurrent_checks`: rotation checks and `refresh=true`.
    pub(crate) expensive: Arc<Semaphore>,
    /// `max_in_flight`: every other resolution (cold lookups, values,
    /// background work), so that clients that send ids and hang up cannot
    /// start unbounded work against AWS and Postgres.
    pub(crate) in_flight: Arc<Semaphore>,
}

impl Resolver {
    pub fn new(
        settings: Arc<Settings>,
        aws: &aws_config::SdkConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let rules = Rules {
            secret_ttl: settings.secret_ttl,
            negative_ttl: settings.negative_ttl,
            error_ttl: settings.error_ttl,
            max_stale: settings.max_stale,
            jitter: 0.0,
        };
        Resolver {
            pipeline: Arc::new(Pipeline::new(settings.clone(), aws, metrics.clone())),
            connections: Keys::new(settings.cache_size, rules),
            values: Keys::new(settings.cache_size, rules),
            lookups: Inflight::default(),
            value_runs: Inflight::default(),
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

    /// A connection for Airflow: what its state serves while that lives,
    /// otherwise resolved once for all concurrent callers. `refresh`
    /// bypasses every cache.
    pub async fn connection(self: &Arc<Self>, key: &ConnKey, refresh: bool) -> Answer {
        if !refresh {
            if let Some(answer) = self.cached(key.as_str(), Instant::now()) {
                return answer;
            }
        }
        self.metrics.cache(false);
        let this = self.clone();
        let k = key.clone();
        if refresh {
            let work = move || async move { this.load(&k, Policy::FRESH, Origin::Fresh).await };
            return self
                .refreshes
                .run(key.clone(), Some(&self.expensive), work)
                .await
                .unwrap_or_else(|e| Err(not_run(e, key, "refresh", Bound::Checks)));
        }
        let work = move || async move { this.load(&k, Policy::CACHED, Origin::Lookup).await };
        self.lookups
            .run(key.clone(), Some(&self.in_flight), work)
            .await
            .unwrap_or_else(|e| Err(not_run(e, key, "lookup", Bound::InFlight)))
    }

    /// Free what nothing needs any more (passwords included) from every
    /// state and cache.
    pub fn sweep(&self) {
        self.pipeline.aws.sweep();
        self.pipeline.proofs.sweep();
        self.connections.sweep();
        self.values.sweep();
    }

    /// The hot path: what the state of `key` (a [`ConnKey`]'s text, or a
    /// teamless conn_id as it came) serves now, if anything; a hit is
    /// counted and marked read for refresh-ahead.
    pub fn cached(&self, key: &str, now: Instant) -> Option<Answer> {
        let entry = self.connections.get(key)?;
        let answer = entry.state.answer(now)?;
        self.metrics.cache(true);
        Some(match answer {
            Ok(served) => {
                served.mark_used();
                Ok(served.clone())
            }
            Err(e) => Err(e.clone()),
        })
    }

    /// Resolve, and apply what was found to the key's state. During an
    /// outage the last good answer is served at once, and AWS is left to
    /// the background retry when it is due.
    async fn load(self: &Arc<Self>, key: &ConnKey, policy: Policy, origin: Origin) -> Answer {
        let entry = self.connections.get(key);
        let now = Instant::now();
        let max_stale = self.settings.max_stale;
        let last_good = entry
            .as_ref()
            .and_then(|e| e.state.last_good(now, max_stale));
        // A run that ended between this lookup's miss and its start.
        if origin == Origin::Lookup {
            if let Some(answer) = entry.as_ref().and_then(|e| e.state.answer(now)) {
                return answer.cloned().map_err(Clone::clone);
            }
        }
        if policy.aws == Use::Cache {
            if let Some(answer) = self
                .during_outage(key, entry.as_ref(), policy, origin)
                .await
            {
                return answer;
            }
        }
        // A conn_id with a last good answer, or in an outage, has had its
        // tries: one AWS call, then stale-if-error or the outage's error.
        // SDK retries would only multiply calls during an outage.
        let quiet =
            last_good.is_some() || entry.as_ref().is_some_and(|e| e.state.outage().is_some());
        let policy = if policy.aws == Use::Cache && quiet {
            Policy {
                attempts: Attempts::Once,
                ..policy
            }
        } else {
            policy
        };
        let began = crate::service::keys::generation(entry.as_ref());
        self.resolve(key, policy, origin, began, last_good).await
    }

    /// The answer while `key` is in an outage and AWS is not to be asked
    /// now (its next try is not due, or it is due and the background
    /// retry asks): the last good answer re-proven, or the outage's
    /// error. `None`: go to AWS.
    async fn during_outage(
        self: &Arc<Self>,
        key: &ConnKey,
        entry: Option<&Arc<Entry<Served>>>,
        policy: Policy,
        origin: Origin,
    ) -> Option<Answer> {
        let entry = entry?;
        let outage = entry.state.outage()?;
        let now = Instant::now();
        let due = outage.next_try <= now;
        // A due background retry goes to AWS; everything else waits for it.
        if due && policy.attempts == Attempts::Once {
            return None;
        }
        let last_good = entry.state.last_good(now, self.settings.max_stale);
        let stale = self.restale(last_good).await;
        if stale.is_none() && due {
            return None; // nothing good to serve: this lookup asks AWS itself
        }
        let answer = stale.clone().ok_or_else(|| outage.error.clone());
        let restaled = Event::Restaled(stale);
        let answer =
            self.connections
                .apply_or_current(key, origin, entry.generation, restaled, answer);
        if due {
            self.retry_in_background(key);
        }
        Some(answer)
    }

    /// One background pass for `key` (refresh-ahead of a stale answer,
    /// outage retries), coalesced with any other under way.
    pub fn retry_in_background(self: &Arc<Self>, key: &ConnKey) {
        let this = self.clone();
        let k = key.clone();
        tokio::spawn(async move {
            let inner = this.clone();
            let key = k.clone();
            let work = move || async move {
                inner
                    .load(&key, Policy::background(Use::Cache), Origin::Background)
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

    /// The pipeline, timed, and its outcome applied to the key's state as
    /// work of `origin` that began at generation `began`. On an AWS outage,
    /// `last_good` re-proven is served.
    pub(crate) async fn resolve(
        &self,
        key: &ConnKey,
        policy: Policy,
        origin: Origin,
        began: u64,
        last_good: Option<Arc<Served>>,
    ) -> Answer {
        let started = Instant::now();
        let (result, mut steps) = STEPS
            .scope(Default::default(), async {
                let result = self.pipeline.resolve(key, policy).await;
                (result, STEPS.with(|s| *s.borrow()))
            })
            .await;
        steps.total = started.elapsed();
        let (event, answer) = match result {
            Ok(mut served) => {
                served.steps = steps;
                tracing::debug!(conn_id = %key, stage = %served.stage, timing = %steps.server_timing(), "resolved");
                let served = Arc::new(served);
                (Event::Resolved(served.clone()), Ok(served))
            }
            Err(e) => {
                let stale = match e.transient {
                    true => self.restale(last_good).await,
                    false => None,
                };
                let answer = match &stale {
                    Some(served) => {
                        tracing::warn!(conn_id = %key, cause = %e.message, age_s = served.fetched_at.elapsed().as_secs(),
                            "AWS failed; serving the last credential that logs in, retrying AWS in the background");
                        Ok(served.clone())
                    }
                    None => Err(e.clone()),
                };
                (Event::failed(e, stale), answer)
            }
        };
        self.connections
            .apply_or_current(key, origin, began, event, answer)
    }

    /// The last answer that logged in, if it is younger than `max_stale` and
    /// still logs in (Postgres is the source of truth), as a stale copy
    /// served until its proof or its `max_stale` ends (the state's outage
    /// may end it sooner).
    async fn restale(&self, last_good: Option<Arc<Served>>) -> Option<Arc<Served>> {
        let old = last_good?;
        life_left(&self.settings, old.fetched_at, None)?;
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
        let life = life_left(&self.settings, old.fetched_at, login.as_ref().map(|l| l.1))?;
        let now = Instant::now();
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
        let entry = self.connections.get(key);
        let began = crate::service::keys::generation(entry.as_ref());
        let previously = match entry.as_ref().and_then(|e| e.state.answer(Instant::now())) {
            Some(Ok(served)) => Some(served.version_id.clone()),
            _ => None,
        };
        let (report, served) =
            match crate::service::rotation::check(&self.pipeline, key, previously).await {
                Ok(checked) => checked,
                Err(e) => {
                    // A refusal met by the check (AWS denied, secret deleted) is
                    // a decision for lookups too: stop serving the old answer now.
                    if let decided @ Event::Decided(_) = Event::failed(e.clone(), None) {
                        self.connections.apply(key, Origin::Fresh, began, decided);
                    }
                    return Err(e);
                }
            };
        // What lookups get from now on; older work cannot undo it.
        let event = match served {
            Some(served) => Event::Resolved(Arc::new(served)),
            // No version logs in: a decision, unless the database did not
            // answer (then the last good answer stays for a later outage).
            None => Event::failed(
                LookupError::new(
                    report.verdict.error_code(),
                    format!("connection {key}: rotation check: {}", report.message),
                ),
                None,
            ),
        };
        self.connections.apply(key, Origin::Fresh, began, event);
        self.metrics.rotation_check(report.verdict.as_str());
        tracing::info!(conn_id = %key, verdict = report.verdict.as_str(), "rotation check");
        Ok(report)
    }

    /// Every connection this process has served (still cached) or has
    /// configured, checked one after another.
    pub async fn rotation_check_all(
        self: &Arc<Self>,
    ) -> Vec<(ConnKey, Result<Arc<RotationReport>, LookupError>)> {
        let now = Instant::now();
        let mut keys: Vec<ConnKey> = self
            .connections
            .iter()
            .filter(|(_, e)| matches!(e.state.answer(now), Some(Ok(s)) if s.validated()))
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

/// What is left of a stale copy's life: `max_stale` from when AWS last
/// confirmed it (`None`: nothing), cut to what is left of its proof's
/// `validation_ttl` when it was proven at `proven_at`.
pub(crate) fn life_left(
    s: &Settings,
    fetched_at: Instant,
    proven_at: Option<Instant>,
) -> Option<Duration> {
    let stale_left = s.max_stale.checked_sub(fetched_at.elapsed())?;
    let proof_left = proven_at.map_or(Duration::MAX, |at| {
        s.validation_ttl.saturating_sub(at.elapsed())
    });
    Some(stale_left.min(proof_left))
}

pub(crate) fn not_run(
    e: NotRun,
    key: &ConnKey,
    what: impl std::fmt::Display,
    bound: Bound,
) -> LookupError {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::state::State;

    /// A resolver at the default settings, with an AWS config that is never called.
    fn resolver() -> Resolver {
        let settings = Arc::new(Settings::from_args(Default::default()).unwrap());
        let aws = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        Resolver::new(settings, &aws, Arc::new(Metrics::new()))
    }

    #[test]
    fn a_stale_copy_lives_until_max_stale_or_its_proof_ends_whichever_is_first() {
        let mut s = Settings::from_args(Default::default()).unwrap();
        s.max_stale = Duration::from_secs(100);
        s.validation_ttl = Duration::from_secs(10);
        let now = Instant::now();
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64().round() as u64);
        // Fetched 40 s ago: 60 s of max_stale left; unproven, all of it.
        let fetched = now - Duration::from_secs(40);
        assert_eq!(secs(life_left(&s, fetched, None)), Some(60));
        // Proven 4 s ago: the proof's 6 s end first.
        let proven = now - Duration::from_secs(4);
        assert_eq!(secs(life_left(&s, fetched, Some(proven))), Some(6));
        // A proof older than validation_ttl leaves nothing, not a panic.
        let old_proof = now - Duration::from_secs(30);
        assert_eq!(secs(life_left(&s, fetched, Some(old_proof))), Some(0));
        // Past max_stale: no stale copy at all.
        assert_eq!(life_left(&s, now - Duration::from_secs(101), None), None);
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

    fn served(key: &ConnKey, version: &str) -> Arc<Served> {
        crate::cache::served_for_test(key, version, Duration::from_secs(60))
    }

    #[tokio::test]
    async fn older_work_never_overwrites_a_rotation_checks_verdict() {
        let r = resolver();
        let key = ConnKey::new(None, "c");
        let current = || r.cached(key.as_str(), Instant::now()).unwrap();
        let v1 = r
            .connections
            .apply(&key, Origin::Lookup, 0, Event::Resolved(served(&key, "v1")))
            .unwrap();
        // A refresh starts from v1; a rotation check revokes v1 meanwhile ...
        let revoked = LookupError::new(
            ErrorCode::CredentialsRejected,
            "rotation check: no version logs in",
        );
        let began = v1.generation;
        r.connections
            .apply(&key, Origin::Fresh, began, Event::Decided(revoked));
        // ... and the refresh finishes afterwards: it does not land.
        let late = Event::Resolved(served(&key, "v1"));
        assert!(r
            .connections
            .apply(&key, Origin::Background, began, late)
            .is_none());
        assert!(current().is_err(), "the revoked answer came back");
        // Nor does a lookup that began before it, or a refresh=true.
        let late = Event::Resolved(served(&key, "v1"));
        assert!(r
            .connections
            .apply(&key, Origin::Lookup, began, late)
            .is_none());
        let late = Event::Resolved(served(&key, "v1"));
        assert!(r
            .connections
            .apply(&key, Origin::Fresh, began, late)
            .is_none());
        assert!(current().is_err());
        // refresh=true that began after it is the newest word.
        let now = crate::service::keys::generation(r.connections.get(key.as_str()).as_ref());
        r.connections
            .apply(
                &key,
                Origin::Fresh,
                now,
                Event::Resolved(served(&key, "v2")),
            )
            .unwrap();
        assert_eq!(current().unwrap().version_id, "v2");
        // Background work from the entry in place swaps it.
        let now = crate::service::keys::generation(r.connections.get(key.as_str()).as_ref());
        r.connections
            .apply(
                &key,
                Origin::Background,
                now,
                Event::Resolved(served(&key, "v3")),
            )
            .unwrap();
        assert_eq!(current().unwrap().version_id, "v3");
        assert!(matches!(
            r.connections.get(key.as_str()).unwrap().state,
            State::Serving { .. }
        ));
    }
}
