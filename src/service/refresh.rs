//! Refresh ahead: answers in use are re-checked before they expire, so that
//! steady-state lookups never wait on AWS or Postgres.
//!
//! In an answer's last fifth (two ticks) of life, or its last second when
//! that is longer (see [`schedule`]), if it was read since the last pass: a
//! version check as the AWS agent does it (DescribeSecret, and
//! GetSecretValue only when AWSCURRENT moved), a fresh login when the proof
//! is due, and the new answer swapped in before the old one expires. One
//! refresh per conn_id at a time. Stale answers (AWS outage) are left to the
//! outage backoff in `front`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aws::calls::Attempts;
use crate::aws::secrets_manager::Stage;
use crate::cache::{ConnKey, Served};
use crate::config::Settings;
use crate::error::{ErrorCode, LookupError};
use crate::pipeline::{Policy, Use};
use crate::service::resolver::Resolver;
use crate::service::state::{Event, Origin, State};

/// The least time a refresh is given before the answer expires: a version
/// check and a TLS login can take that long on a busy node (or a CPU-limited
/// pod) whatever the TTL.
const MIN_LEAD: Duration = Duration::from_secs(1);

/// How often refresh-ahead looks, and how long before expiry it starts:
/// early enough to finish, late enough to cost ~1.25 checks per TTL at the
/// defaults. `life` is the shorter TTL; the lead is two ticks (the last
/// fifth of `life`, at most 30 s), but at least [`MIN_LEAD`], and never more
/// than half of `life` (short TTLs cost up to two checks per TTL instead).
pub fn schedule(s: &Settings) -> (Duration, Duration) {
    let life = s.secret_ttl.min(s.validation_ttl);
    let tick = (life / 10).clamp(Duration::from_millis(100), Duration::from_secs(15));
    (tick, (tick * 2).max(MIN_LEAD).min(life / 2))
}

/// Runs until dropped.
pub async fn refresh_ahead(resolver: Arc<Resolver>) {
    let (tick, lead) = schedule(&resolver.settings);
    let mut misses_at_trim = 0;
    let mut trimmed = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        // Cold lookups (TLS handshakes, SDK responses) free much more than
        // they keep; hand the freed pages back to the kernel now and then,
        // so resident memory tracks what is cached (see BENCHMARKS.md).
        let misses = resolver.metrics.misses();
        if misses != misses_at_trim && trimmed.elapsed() >= Duration::from_secs(1) {
            misses_at_trim = misses;
            trimmed = now;
            crate::alloc::trim();
        }
        resolver.sweep();
        for (key, entry) in resolver.connections.iter() {
            // Only what is being served is refreshed: a failure's state
            // ends by itself, and the next lookup resolves again.
            let (served, until, stale) = match &entry.state {
                State::Serving { answer } => (answer, answer.expires_at, false),
                State::Stale { served, until, .. } => (served, *until, true),
                _ => continue,
            };
            // A stale answer lives until AWS's next try, which is due when
            // it ends: no lead for it.
            let window = if stale { tick * 2 } else { lead };
            // Due, not being refreshed (a slow refresh outlives the next
            // passes; its entry may even have been replaced meanwhile: the
            // new one's mark stays for the pass after it), and read since
            // the last pass (claiming it clears the mark).
            if until.saturating_duration_since(now) > window
                || resolver.refreshing(&key)
                || !served.take_used()
            {
                continue;
            }
            if stale {
                resolver.retry_in_background(&key);
                continue;
            }
            let (r, served, began) = (resolver.clone(), served.clone(), entry.generation);
            resolver.refresh_once(key.clone(), async move {
                refresh_one(&r, &key, &served, began, lead).await
            });
        }
    }
}

/// Renew `served` (the state at generation `began`) before it expires.
async fn refresh_one(
    r: &Arc<Resolver>,
    key: &ConnKey,
    served: &Arc<Served>,
    began: u64,
    lead: Duration,
) {
    let s = &r.settings;
    let aws = &r.pipeline.aws;
    let due = |left: Duration| left <= lead;
    let secret_due = due(s.secret_ttl.saturating_sub(served.fetched_at.elapsed()));
    if secret_due && served.stage != Stage::Current {
        // Mid-rotation (AWSPENDING or AWSPREVIOUS served): only a new fetch
        // tells whether the rotation finished, and the lookup at expiry
        // does it; a login now would not move the expiry.
        return;
    }
    if secret_due {
        let checked = match aws.describe(&served.secret_id, Attempts::Once).await {
            // Scheduled for deletion: a decision, like AWS's own refusal of GetSecretValue.
            Ok(Some(meta)) if meta.deleted.is_some() => Err(LookupError::new(
                ErrorCode::UpstreamError,
                format!(
                    "secret {} is scheduled for deletion (DescribeSecret DeletedDate is set)",
                    served.secret_id
                ),
            )),
            other => other,
        };
        match checked {
            Ok(Some(meta))
                if meta.version_with(Stage::Current) == Some(served.version_id.as_str()) =>
            {
                aws.confirm(&served.secret_id, Stage::Current, &served.version_id);
            }
            Ok(_) => aws.forget(&served.secret_id, Stage::Current),
            // An outage: the answer lives out its time, then the last good
            // one is served while AWS is retried with backoff.
            Err(e) if e.transient => {
                tracing::debug!(conn_id = %key, error = %e, "refresh-ahead version check failed");
                let outage = Event::AwsOutage {
                    error: e.context(&format!("connection {key}")),
                    stale: Some(served.clone()),
                };
                r.connections.apply(key, Origin::Background, began, outage);
                return;
            }
            // A decision (access revoked, secret deleted): stop serving now.
            Err(e) => {
                tracing::warn!(conn_id = %key, error = %e, "AWS refused the version check; no longer serving this connection");
                let decided = Event::Decided(e.context(&format!("connection {key}")));
                r.connections.apply(key, Origin::Background, began, decided);
                return;
            }
        }
    }
    let proof_due = served
        .validated_at()
        .is_some_and(|at| due(s.validation_ttl.saturating_sub(at.elapsed())));
    if !secret_due && !proof_due {
        return; // nothing to renew: the answer would expire as it does now
    }
    let login = if proof_due { Use::Fresh } else { Use::Cache };
    // Lands only over the state it began from: a rotation check's verdict
    // meanwhile stays.
    let policy = Policy::background(login);
    let _ = r
        .resolve(key, policy, Origin::Background, began, Some(served.clone()))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(secret_ttl: u64, validation_ttl: u64) -> Settings {
        let mut s = Settings::from_args(Default::default()).unwrap();
        s.secret_ttl = Duration::from_millis(secret_ttl);
        s.validation_ttl = Duration::from_millis(validation_ttl);
        s
    }

    #[test]
    fn a_refresh_gets_two_ticks_at_least_a_second_at_most_half_the_life() {
        let ms = Duration::from_millis;
        // Defaults (300 s, 60 s): the last fifth of the proof's life.
        assert_eq!(schedule(&settings(300_000, 60_000)), (ms(6000), ms(12_000)));
        assert_eq!(
            schedule(&settings(3_600_000, 3_600_000)),
            (ms(15_000), ms(30_000))
        );
        // The tick is at most 15 s: the lead is at most 30 s.
        assert_eq!(
            schedule(&settings(300_000, 300_000)),
            (ms(15_000), ms(30_000))
        );
        // Short TTLs: two ticks would leave 400 ms for AWS and a login. The
        // shorter TTL decides.
        assert_eq!(schedule(&settings(2000, 2000)), (ms(200), ms(1000)));
        assert_eq!(schedule(&settings(600_000, 2000)), (ms(200), ms(1000)));
        // Never more than half the life, however short.
        assert_eq!(schedule(&settings(1000, 1000)), (ms(100), ms(500)));
        assert_eq!(schedule(&settings(300, 60_000)), (ms(100), ms(150)));
        for life in [1, 50, 200, 399, 1999, 4999, 5001, 149_999, 400_000] {
            let (tick, lead) = schedule(&settings(life, life));
            assert!(
                lead <= ms(life) / 2 && tick > Duration::ZERO,
                "{life} ms: {lead:?}"
            );
        }
    }
}
