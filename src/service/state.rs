//! One state per key: everything the sidecar knows about a connection (or a
//! variable, or a config option), and the one pure function that changes it.
//!
//! Before this module the truth about one conn_id lived in seven caches
//! (answer, last good, outage, outage error, revocation, ...) kept
//! consistent by hand, with compare-and-set rules and revocation timestamps
//! patching the ordering races between them. Now a key has one [`Entry`]:
//! a [`State`] and the generation it was written at. [`next`] is the whole
//! transition table; [`crate::service::keys::Keys::apply`] runs it atomically per key.
//!
//! Work records the generation it began from, and its [`Origin`] decides
//! whether its result still lands when it ends: so older work can never put
//! back what a newer decision took away, by construction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{ErrorCode, LookupError};

/// What a state holds: an answer with the two instants the rules need.
pub trait Kept {
    /// When AWS last confirmed the secret behind it (bounds `max_stale`).
    fn fetched_at(&self) -> Instant;
    /// When it stops being served as fresh.
    fn expires_at(&self) -> Instant;
}

/// An AWS outage one key is in.
#[derive(Debug, Clone)]
pub struct Outage {
    /// Failed tries in a row (the backoff exponent).
    pub failures: u32,
    /// When AWS may be asked again: until then nobody calls it for this key.
    pub next_try: Instant,
    /// The last failure, for a key with nothing good to serve.
    pub error: LookupError,
}

/// What one key is.
#[derive(Debug, Clone)]
pub enum State<V> {
    /// A good answer, served until its `expires_at`; it is also the last
    /// good one, kept past that for stale-if-error (up to `max_stale`).
    Serving { answer: Arc<V> },
    /// AWS is out: `served` (the last good answer, re-proven) until `until`
    /// (the next try, or the end of its proof).
    Stale {
        served: Arc<V>,
        last_good: Arc<V>,
        outage: Outage,
        until: Instant,
    },
    /// An error is served until `until`: an outage with nothing good to
    /// serve, or a database that did not answer (not a decision about the
    /// credential: the last good answer stays for a later outage).
    Failing {
        error: LookupError,
        until: Instant,
        outage: Option<Outage>,
        last_good: Option<Arc<V>>,
    },
    /// A decision (AWS refused, secret deleted or malformed, login
    /// rejected, not found): nothing old is served again. `error` until `until`.
    Revoked {
        error: LookupError,
        until: Instant,
        at: Instant,
    },
}

/// A state and the generation it was written at (unique per process).
#[derive(Debug, Clone)]
pub struct Entry<V> {
    pub state: State<V>,
    /// Changes with every event but a re-proven stale copy (the same state).
    pub generation: u64,
    /// The generation of the last decision on this key, carried forward
    /// through later states (0: none): fresh work older than it never lands.
    pub decided: u64,
}

/// How long a decision's entry is kept past its error's lifetime, for cold
/// work that began from no entry before it (work that began from an entry
/// never lands on a missing one).
pub const DECISION_KEPT: Duration = Duration::from_secs(120);

/// What work found, as the state machine sees it.
#[derive(Debug)]
pub enum Event<V> {
    /// A good answer: proven, or of a type that cannot be.
    Resolved(Arc<V>),
    /// AWS failed with an outage (see [`crate::aws::calls::Failure::is_outage`]).
    /// `stale`: the last good answer, re-proven, to serve meanwhile.
    AwsOutage {
        error: LookupError,
        stale: Option<Arc<V>>,
    },
    /// During an outage whose next try is not due: the last good answer
    /// re-proven again (`Some`), or it no longer logs in or is too old.
    Restaled(Option<Arc<V>>),
    /// The database did not answer, or the work ran out of time: no
    /// decision about the credential.
    Unreachable(LookupError),
    /// A decision: stop serving anything old.
    Decided(LookupError),
}

impl<V> Event<V> {
    /// The event a failed resolution is: AWS outage, no answer, or decision.
    pub fn failed(error: LookupError, stale: Option<Arc<V>>) -> Self {
        if error.transient {
            Event::AwsOutage { error, stale }
        } else if matches!(
            error.code,
            ErrorCode::DatabaseUnreachable | ErrorCode::Timeout | ErrorCode::TooBusy
        ) {
            Event::Unreachable(error)
        } else {
            Event::Decided(error)
        }
    }
}

/// Who did the work, which decides whether its result lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A request's miss: lands unless another result landed since it began.
    Lookup,
    /// Refresh-ahead, an outage retry: lands only over the state it began from.
    Background,
    /// `refresh=true`, a rotation check: the newest word, unless a decision
    /// landed since it began.
    Fresh,
}

/// The settings the transitions read, and the jitter of this one.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub secret_ttl: Duration,
    pub negative_ttl: Duration,
    pub error_ttl: Duration,
    pub max_stale: Duration,
    /// In [0, 1): spreads the next tries of many keys (fastrand in service).
    pub jitter: f64,
}

/// Whether `event`, from work of `origin` that began at generation `began`
/// (0: no entry), may land on `current`.
pub fn lands<V>(origin: Origin, began: u64, current: Option<&Entry<V>>, event: &Event<V>) -> bool {
    let Some(current) = current else {
        // Nothing there: it never was, or it was swept or evicted. Only work
        // that began from nothing may start the key: work that began from
        // an entry cannot tell what replaced it meanwhile.
        return began == 0 && origin != Origin::Background;
    };
    if current.generation == began {
        return true;
    }
    match origin {
        Origin::Lookup | Origin::Background => false,
        // refresh=true and rotation checks: their answer and their decision
        // are the newest word, unless a decision landed since they began;
        // their other failures never overrule a newer state.
        Origin::Fresh => {
            current.decided <= began && matches!(event, Event::Resolved(_) | Event::Decided(_))
        }
    }
}

/// The transition table: the state after `event` (`None`: unchanged).
/// Pure: `now` and `rules.jitter` are given.
pub fn next<V: Kept>(
    current: Option<&State<V>>,
    event: Event<V>,
    now: Instant,
    rules: &Rules,
) -> Option<State<V>> {
    let last_good = current.and_then(|s| s.last_good(now, rules.max_stale));
    let outage = current.and_then(State::outage);
    Some(match event {
        Event::Resolved(answer) => State::Serving { answer },
        Event::AwsOutage { error, stale } => {
            let failures = outage.map_or(0, |o| o.failures) + 1;
            let base = if last_good.is_some() {
                rules.secret_ttl
            } else {
                // Never served: healthy operation asks once per negative_ttl.
                rules.negative_ttl.max(rules.error_ttl)
            };
            let outage = Outage {
                failures,
                next_try: now + backoff(base, failures, rules.jitter),
                error,
            };
            match (stale, last_good) {
                // Only a key with a last good answer serves one: nothing
                // revoked, evicted or never served comes back this way.
                (Some(served), Some(last_good)) => stale_state(served, last_good, outage, now),
                (_, last_good) => failing_in(outage, last_good, now, rules),
            }
        }
        Event::Restaled(stale) => {
            let outage = outage?.clone();
            match (stale, last_good) {
                (Some(served), Some(last_good)) => stale_state(served, last_good, outage, now),
                (_, last_good) => failing_in(outage, last_good, now, rules),
            }
        }
        Event::Unreachable(error) => State::Failing {
            error,
            until: now + rules.error_ttl,
            outage: outage.cloned(),
            last_good,
        },
        Event::Decided(error) => {
            let ttl = if error.code == ErrorCode::NotFound {
                rules.negative_ttl
            } else {
                rules.error_ttl
            };
            State::Revoked {
                error,
                until: now + ttl,
                at: now,
            }
        }
    })
}

/// An outage with nothing served: its error until the next try; but with
/// a last good answer whose re-proof failed (the database blipped, the
/// proof ended), only for `error_ttl`, then the re-proof is tried again.
fn failing_in<V>(
    outage: Outage,
    last_good: Option<Arc<V>>,
    now: Instant,
    rules: &Rules,
) -> State<V> {
    let until = match last_good {
        Some(_) => outage.next_try.min(now + rules.error_ttl),
        None => outage.next_try,
    }
    .max(now);
    State::Failing {
        error: outage.error.clone(),
        until,
        outage: Some(outage),
        last_good,
    }
}

/// Serving `served` in an outage: until the next try (a second at least,
/// so that a burst of lookups is answered), or its proof's end if sooner.
fn stale_state<V: Kept>(
    served: Arc<V>,
    last_good: Arc<V>,
    outage: Outage,
    now: Instant,
) -> State<V> {
    let until = outage
        .next_try
        .max(now + Duration::from_secs(1))
        .min(served.expires_at());
    State::Stale {
        served,
        last_good,
        outage,
        until,
    }
}

impl<V: Kept> State<V> {
    /// What a reader gets at `now`, if anything.
    pub fn answer(&self, now: Instant) -> Option<Result<&Arc<V>, &LookupError>> {
        match self {
            State::Serving { answer } if now < answer.expires_at() => Some(Ok(answer)),
            State::Stale { served, until, .. } if now < *until => Some(Ok(served)),
            State::Failing { error, until, .. } | State::Revoked { error, until, .. }
                if now < *until =>
            {
                Some(Err(error))
            }
            _ => None,
        }
    }

    /// The last good answer, if younger than `max_stale`.
    pub fn last_good(&self, now: Instant, max_stale: Duration) -> Option<Arc<V>> {
        let good = match self {
            State::Serving { answer } => Some(answer),
            State::Stale { last_good, .. } => Some(last_good),
            State::Failing { last_good, .. } => last_good.as_ref(),
            State::Revoked { .. } => None,
        }?;
        (now.saturating_duration_since(good.fetched_at()) <= max_stale).then(|| good.clone())
    }

    pub fn outage(&self) -> Option<&Outage> {
        match self {
            State::Stale { outage, .. } => Some(outage),
            State::Failing { outage, .. } => outage.as_ref(),
            _ => None,
        }
    }

    /// Until when the entry is worth keeping (then it is swept): its
    /// answer, its last good answer for `max_stale`, its outage's next try
    /// (and `max_stale` past it without a last good answer), a decision for
    /// [`DECISION_KEPT`] (cold work checks it; see [`lands`]).
    pub fn keep_until(&self, max_stale: Duration) -> Instant {
        let good = |v: &Arc<V>| v.fetched_at() + max_stale;
        match self {
            State::Serving { answer } => answer.expires_at().max(good(answer)),
            State::Stale {
                last_good,
                outage,
                until,
                ..
            } => (*until).max(good(last_good)).max(outage.next_try),
            State::Failing {
                until,
                outage,
                last_good,
                ..
            } => {
                // An outage's record outlives its next try (it holds no
                // password when there is no last good answer): a key swept
                // at its next try would start over with the SDK's retries
                // and a first backoff.
                let outage_kept = |o: &Outage| match last_good {
                    Some(_) => o.next_try,
                    None => o.next_try + max_stale,
                };
                (*until)
                    .max(last_good.as_ref().map_or(*until, good))
                    .max(outage.as_ref().map_or(*until, outage_kept))
            }
            State::Revoked { until, at, .. } => (*until).max(*at + DECISION_KEPT),
        }
    }
}

/// The wait before the next AWS try after `failures` failed ones: doubling
/// from `base`, at most 15 minutes (or `base` if longer), plus up to a
/// quarter of `jitter`. Never below `base`, so an outage never costs more
/// calls than healthy operation (one per `secret_ttl`).
pub fn backoff(base: Duration, failures: u32, jitter: f64) -> Duration {
    let cap = base.max(Duration::from_secs(15 * 60));
    let doublings = failures.saturating_sub(1).min(16);
    let wait = base.saturating_mul(1 << doublings).min(cap);
    wait + wait.mul_f64(jitter.clamp(0.0, 1.0) * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer: a name, when it was fetched, when it expires.
    #[derive(Debug, PartialEq)]
    struct A(&'static str, Instant, Instant);

    impl Kept for A {
        fn fetched_at(&self) -> Instant {
            self.1
        }
        fn expires_at(&self) -> Instant {
            self.2
        }
    }

    const S: Duration = Duration::from_secs(1);

    fn rules() -> Rules {
        Rules {
            secret_ttl: 300 * S,
            negative_ttl: 30 * S,
            error_ttl: 5 * S,
            max_stale: 3600 * S,
            jitter: 0.0,
        }
    }

    fn a(name: &'static str, now: Instant, life: Duration) -> Arc<A> {
        Arc::new(A(name, now, now + life))
    }

    fn outage_err() -> LookupError {
        LookupError::transient(
            ErrorCode::UpstreamError,
            "GetSecretValue: ThrottlingException",
        )
    }

    fn decided() -> LookupError {
        LookupError::new(ErrorCode::CredentialsRejected, "rejected")
    }

    fn unreachable() -> LookupError {
        LookupError::new(ErrorCode::DatabaseUnreachable, "refused")
    }

    /// What a reader gets: the answer's name, or the error's code.
    fn served_name(s: &State<A>, now: Instant) -> Option<&'static str> {
        s.answer(now).map(|r| match r {
            Ok(v) => v.0,
            Err(e) => e.code.as_str(),
        })
    }

    /// Every state the table can be in, each with a last good answer where
    /// the state can hold one: the rows of the exhaustive tests.
    fn every_state(now: Instant) -> Vec<(&'static str, Option<State<A>>)> {
        let good = a("good", now, 60 * S);
        let outage = Outage {
            failures: 2,
            next_try: now + 600 * S,
            error: outage_err(),
        };
        vec![
            ("empty", None),
            (
                "serving",
                Some(State::Serving {
                    answer: good.clone(),
                }),
            ),
            (
                "stale",
                Some(State::Stale {
                    served: a("stale-copy", now, 60 * S),
                    last_good: good.clone(),
                    outage: outage.clone(),
                    until: now + 60 * S,
                }),
            ),
            (
                "failing-outage",
                Some(State::Failing {
                    error: outage_err(),
                    until: outage.next_try,
                    outage: Some(outage.clone()),
                    last_good: None,
                }),
            ),
            (
                "failing-unreachable",
                Some(State::Failing {
                    error: unreachable(),
                    until: now + 5 * S,
                    outage: None,
                    last_good: Some(good.clone()),
                }),
            ),
            (
                "revoked",
                Some(State::Revoked {
                    error: decided(),
                    until: now + 5 * S,
                    at: now,
                }),
            ),
        ]
    }

    /// An event, built for a given instant.
    type MakeEvent = fn(Instant) -> Event<A>;

    fn every_event(now: Instant) -> Vec<(&'static str, MakeEvent)> {
        let _ = now;
        vec![
            ("resolved", |n| Event::Resolved(a("new", n, 60 * S))),
            ("outage+stale", |n| Event::AwsOutage {
                error: outage_err(),
                stale: Some(a("reproven", n, 60 * S)),
            }),
            ("outage", |_| Event::AwsOutage {
                error: outage_err(),
                stale: None,
            }),
            ("restaled", |n| {
                Event::Restaled(Some(a("reproven", n, 60 * S)))
            }),
            ("restale-failed", |_| Event::Restaled(None)),
            ("unreachable", |_| Event::Unreachable(unreachable())),
            ("decided", |_| Event::Decided(decided())),
        ]
    }

    /// The whole table, state by event: what is served right after, whether
    /// a last good answer survives, whether an outage is on.
    #[test]
    fn the_transition_table() {
        let now = Instant::now();
        let expected: &[(&str, &str, Option<&str>, bool, bool)] = &[
            // (state, event, served right after, last good kept, outage)
            ("empty", "resolved", Some("new"), true, false),
            ("empty", "outage+stale", Some("upstream_error"), false, true),
            ("empty", "outage", Some("upstream_error"), false, true),
            ("empty", "restaled", None, false, false),
            ("empty", "restale-failed", None, false, false),
            (
                "empty",
                "unreachable",
                Some("database_unreachable"),
                false,
                false,
            ),
            (
                "empty",
                "decided",
                Some("credentials_rejected"),
                false,
                false,
            ),
            ("serving", "resolved", Some("new"), true, false),
            ("serving", "outage+stale", Some("reproven"), true, true),
            ("serving", "outage", Some("upstream_error"), true, true),
            ("serving", "restaled", Some("good"), true, false),
            ("serving", "restale-failed", Some("good"), true, false),
            (
                "serving",
                "unreachable",
                Some("database_unreachable"),
                true,
                false,
            ),
            (
                "serving",
                "decided",
                Some("credentials_rejected"),
                false,
                false,
            ),
            ("stale", "resolved", Some("new"), true, false),
            ("stale", "outage+stale", Some("reproven"), true, true),
            ("stale", "outage", Some("upstream_error"), true, true),
            ("stale", "restaled", Some("reproven"), true, true),
            (
                "stale",
                "restale-failed",
                Some("upstream_error"),
                true,
                true,
            ),
            (
                "stale",
                "unreachable",
                Some("database_unreachable"),
                true,
                true,
            ),
            (
                "stale",
                "decided",
                Some("credentials_rejected"),
                false,
                false,
            ),
            ("failing-outage", "resolved", Some("new"), true, false),
            (
                "failing-outage",
                "outage+stale",
                Some("upstream_error"),
                false,
                true,
            ),
            (
                "failing-outage",
                "outage",
                Some("upstream_error"),
                false,
                true,
            ),
            (
                "failing-outage",
                "restaled",
                Some("upstream_error"),
                false,
                true,
            ),
            (
                "failing-outage",
                "restale-failed",
                Some("upstream_error"),
                false,
                true,
            ),
            (
                "failing-outage",
                "unreachable",
                Some("database_unreachable"),
                false,
                true,
            ),
            (
                "failing-outage",
                "decided",
                Some("credentials_rejected"),
                false,
                false,
            ),
            ("failing-unreachable", "resolved", Some("new"), true, false),
            (
                "failing-unreachable",
                "outage+stale",
                Some("reproven"),
                true,
                true,
            ),
            (
                "failing-unreachable",
                "outage",
                Some("upstream_error"),
                true,
                true,
            ),
            (
                "failing-unreachable",
                "restaled",
                Some("database_unreachable"),
                true,
                false,
            ),
            (
                "failing-unreachable",
                "restale-failed",
                Some("database_unreachable"),
                true,
                false,
            ),
            (
                "failing-unreachable",
                "unreachable",
                Some("database_unreachable"),
                true,
                false,
            ),
            (
                "failing-unreachable",
                "decided",
                Some("credentials_rejected"),
                false,
                false,
            ),
            ("revoked", "resolved", Some("new"), true, false),
            (
                "revoked",
                "outage+stale",
                Some("upstream_error"),
                false,
                true,
            ),
            ("revoked", "outage", Some("upstream_error"), false, true),
            (
                "revoked",
                "restaled",
                Some("credentials_rejected"),
                false,
                false,
            ),
            (
                "revoked",
                "restale-failed",
                Some("credentials_rejected"),
                false,
                false,
            ),
            (
                "revoked",
                "unreachable",
                Some("database_unreachable"),
                false,
                false,
            ),
            (
                "revoked",
                "decided",
                Some("credentials_rejected"),
                false,
                false,
            ),
        ];
        let states = every_state(now);
        let events = every_event(now);
        assert_eq!(
            expected.len(),
            states.len() * events.len(),
            "every pair is listed"
        );
        for (state_name, state) in &states {
            for (event_name, event) in &events {
                let row = expected
                    .iter()
                    .find(|r| r.0 == *state_name && r.1 == *event_name)
                    .unwrap_or_else(|| panic!("{state_name} × {event_name} not listed"));
                let after = next(state.as_ref(), event(now), now, &rules());
                let after = after.as_ref().or(state.as_ref());
                let what = format!("{state_name} × {event_name}");
                assert_eq!(
                    after.and_then(|s| served_name(s, now)),
                    row.2,
                    "{what}: served"
                );
                assert_eq!(
                    after
                        .and_then(|s| s.last_good(now, rules().max_stale))
                        .is_some(),
                    row.3,
                    "{what}: last good"
                );
                assert_eq!(
                    after.and_then(|s| s.outage()).is_some(),
                    row.4,
                    "{what}: outage"
                );
            }
        }
    }

    #[test]
    fn an_outage_backs_off_from_the_ttl_or_the_negative_ttl() {
        let now = Instant::now();
        let r = rules();
        // Served before: the next try is a secret_ttl away, then doubles.
        let serving = State::Serving {
            answer: a("good", now, 60 * S),
        };
        let first = next(
            Some(&serving),
            Event::AwsOutage {
                error: outage_err(),
                stale: None,
            },
            now,
            &r,
        )
        .unwrap();
        let o = first.outage().unwrap();
        assert_eq!((o.failures, o.next_try), (1, now + 300 * S));
        let second = next(
            Some(&first),
            Event::AwsOutage {
                error: outage_err(),
                stale: None,
            },
            now,
            &r,
        )
        .unwrap();
        assert_eq!(second.outage().unwrap().next_try, now + 600 * S);
        // Never served: from negative_ttl; the error is served until then.
        let cold = next(
            None,
            Event::AwsOutage::<A> {
                error: outage_err(),
                stale: None,
            },
            now,
            &r,
        )
        .unwrap();
        assert_eq!(cold.outage().unwrap().next_try, now + 30 * S);
        assert!(cold.answer(now + 29 * S).is_some_and(|a| a.is_err()));
        assert!(
            cold.answer(now + 30 * S).is_none(),
            "due: the next lookup asks AWS"
        );
        // A resolution ends the outage.
        let back = next(
            Some(&second),
            Event::Resolved(a("new", now, 60 * S)),
            now,
            &r,
        )
        .unwrap();
        assert!(back.outage().is_none());
    }

    #[test]
    fn a_stale_answer_lives_until_the_next_try_or_its_proof_ends() {
        let now = Instant::now();
        let r = rules();
        let serving = State::Serving {
            answer: a("good", now, 60 * S),
        };
        // Proof good for 30 s, next try in 300 s: 30 s.
        let s = next(
            Some(&serving),
            Event::AwsOutage {
                error: outage_err(),
                stale: Some(a("copy", now, 30 * S)),
            },
            now,
            &r,
        )
        .unwrap();
        assert!(s.answer(now + 29 * S).is_some() && s.answer(now + 30 * S).is_none());
        // A proof good for an hour: until the next try.
        let s = next(
            Some(&serving),
            Event::AwsOutage {
                error: outage_err(),
                stale: Some(a("copy", now, 3600 * S)),
            },
            now,
            &r,
        )
        .unwrap();
        assert!(s.answer(now + 299 * S).is_some() && s.answer(now + 300 * S).is_none());
    }

    #[test]
    fn the_last_good_answer_is_forgotten_after_max_stale() {
        let now = Instant::now();
        let old = State::Serving {
            answer: Arc::new(A("old", now, now + 60 * S)),
        };
        assert!(old.last_good(now + 3600 * S, 3600 * S).is_some());
        assert!(old.last_good(now + 3601 * S, 3600 * S).is_none());
        let after = next(
            Some(&old),
            Event::AwsOutage {
                error: outage_err(),
                stale: None,
            },
            now + 3601 * S,
            &rules(),
        )
        .unwrap();
        assert!(after.last_good(now + 3601 * S, 3600 * S).is_none());
        // Not-found decisions are answered for negative_ttl, others for error_ttl.
        let nf = LookupError::new(ErrorCode::NotFound, "no secret");
        let gone = next::<A>(None, Event::Decided(nf), now, &rules()).unwrap();
        assert!(gone.answer(now + 29 * S).is_some() && gone.answer(now + 30 * S).is_none());
        // A decision is kept a while for cold work to see, not max_stale.
        assert_eq!(gone.keep_until(3600 * S), now + DECISION_KEPT);
    }

    /// Who lands where: the ordering races of the old compare-and-set rules.
    #[test]
    fn older_work_never_lands_over_a_newer_word() {
        let now = Instant::now();
        let at = |state: State<A>, generation: u64, decided: u64| Entry {
            state,
            generation,
            decided,
        };
        let serving = || State::Serving {
            answer: a("v1", now, 60 * S),
        };
        let revoked = || State::Revoked {
            error: decided(),
            until: now + 5 * S,
            at: now,
        };
        let resolved = || Event::Resolved(a("v2", now, 60 * S));
        let unreachable_ev = || Event::<A>::Unreachable(unreachable());
        use Origin::*;
        // Nothing there: a lookup or a fresh check that began from nothing
        // starts the key; background work, or work that began from an
        // entry since swept or evicted, does not.
        assert!(
            lands::<A>(Lookup, 0, None, &resolved()) && lands::<A>(Fresh, 0, None, &resolved())
        );
        assert!(!lands::<A>(Background, 0, None, &resolved()));
        for o in [Lookup, Background, Fresh] {
            assert!(!lands::<A>(o, 7, None, &resolved()), "{o:?}");
        }
        // Unchanged since the work began: everyone lands.
        for o in [Lookup, Background, Fresh] {
            assert!(
                lands(o, 7, Some(&at(serving(), 7, 0)), &resolved()),
                "{o:?}"
            );
        }
        // A rotation check's verdict (a decision) since: nobody older lands,
        // even once a later state replaced the decision.
        for o in [Lookup, Background, Fresh] {
            assert!(
                !lands(o, 7, Some(&at(revoked(), 8, 8)), &resolved()),
                "{o:?}"
            );
            assert!(
                !lands(o, 7, Some(&at(serving(), 9, 8)), &resolved()),
                "{o:?}"
            );
        }
        // A newer answer since: a lookup or refresh-ahead keeps its result
        // to itself; refresh=true's answer (the newest word) lands, its
        // failure that is not a decision does not.
        assert!(!lands(Lookup, 7, Some(&at(serving(), 8, 0)), &resolved()));
        assert!(!lands(
            Background,
            7,
            Some(&at(serving(), 8, 0)),
            &resolved()
        ));
        assert!(lands(Fresh, 7, Some(&at(serving(), 8, 0)), &resolved()));
        assert!(!lands(
            Fresh,
            7,
            Some(&at(serving(), 8, 0)),
            &unreachable_ev()
        ));
        let decision = Event::<A>::Decided(decided());
        assert!(lands(Fresh, 7, Some(&at(serving(), 8, 0)), &decision));
        // A decision that was already there when fresh work began is overruled by it.
        assert!(lands(Fresh, 8, Some(&at(revoked(), 8, 8)), &resolved()));
    }

    /// A last good answer whose re-proof failed during an outage (a
    /// database blip) is tried again after `error_ttl`, not after the next
    /// AWS try; with nothing good, the outage's error lasts to the next try.
    #[test]
    fn a_failed_re_proof_is_retried_after_the_error_ttl() {
        let now = Instant::now();
        let r = rules();
        let outage = || Event::AwsOutage {
            error: outage_err(),
            stale: None,
        };
        for (name, state) in every_state(now) {
            let Some(after) = next(state.as_ref(), outage(), now, &r) else {
                continue;
            };
            let had_good = state
                .as_ref()
                .and_then(|s| s.last_good(now, r.max_stale))
                .is_some();
            let next_try = after.outage().unwrap().next_try;
            let until = if had_good {
                now + r.error_ttl
            } else {
                next_try
            };
            assert!(
                after.answer(until - Duration::from_millis(1)).is_some(),
                "{name}"
            );
            assert!(
                after.answer(until).is_none(),
                "{name}: served past {until:?}"
            );
            // Its outage stays: the next AWS try is still the backoff's.
            let again = next(Some(&after), Event::Restaled(None), until, &r).unwrap();
            assert_eq!(again.outage().unwrap().next_try, next_try, "{name}");
        }
    }

    /// A key in an outage with nothing good to serve keeps its outage past
    /// the next try: swept, it would start over (SDK retries, first backoff).
    #[test]
    fn an_outage_record_outlives_its_next_try() {
        let now = Instant::now();
        let r = rules();
        let failing = next::<A>(
            None,
            Event::AwsOutage {
                error: outage_err(),
                stale: None,
            },
            now,
            &r,
        )
        .unwrap();
        let next_try = failing.outage().unwrap().next_try;
        assert_eq!(failing.keep_until(r.max_stale), next_try + r.max_stale);
    }

    #[test]
    fn backoff_doubles_from_the_base_and_never_goes_below_it() {
        let ttl = 2 * S;
        for failures in 1..30 {
            for jitter in [0.0, 0.5, 0.999] {
                let b = backoff(ttl, failures, jitter);
                let floor = ttl.saturating_mul(1 << (failures - 1).min(16)).min(900 * S);
                assert!(b >= floor && b <= floor.mul_f64(1.25), "{failures}: {b:?}");
            }
        }
        assert!(backoff(3600 * S, 5, 0.3) >= 3600 * S);
    }
}
