//! Refresh ahead: answers in use are re-checked before they expire, so that
//! steady-state lookups never wait on AWS or Postgres.
//!
//! In an answer's last fifth (two ticks) of life, if it was read since the
//! last pass: a version check as the AWS agent does it (DescribeSecret, and
//! GetSecretValue only when AWSCURRENT moved), a fresh login when the proof
//! is due, and the new answer swapped in before the old one expires. Stale
//! answers (AWS outage) are left to the outage backoff in `front`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::{ConnKey, Served};
use crate::error::{ErrorCode, LookupError};
use crate::front::{Put, Resolver};
use crate::resolve::{Policy, Use};
use crate::sources::secrets_manager::AWSCURRENT;
use crate::sources::Attempts;

/// Runs until dropped.
pub async fn refresh_ahead(resolver: Arc<Resolver>) {
    let s = &resolver.settings;
    // Early enough to finish before expiry, late enough to cost ~1.25 checks per TTL.
    let tick = (s.secret_ttl.min(s.validation_ttl) / 10)
        .clamp(Duration::from_millis(100), Duration::from_secs(15));
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
        for (key, answer) in resolver.caches.answers.iter() {
            let Ok(served) = answer else { continue };
            // Due within the next two ticks, and read since the last pass
            // (claiming it clears the mark, so one refresh runs).
            if served.expires_at.saturating_duration_since(now) > tick * 2
                || !resolver.caches.answers.take_used(&served)
            {
                continue;
            }
            if served.stale {
                resolver.retry_in_background(&key, served);
                continue;
            }
            let r = resolver.clone();
            tokio::spawn(async move { refresh_one(&r, &key, &served, tick).await });
        }
    }
}

async fn refresh_one(r: &Arc<Resolver>, key: &ConnKey, served: &Arc<Served>, tick: Duration) {
    let s = &r.settings;
    let aws = &r.pipeline.aws;
    let due = |left: Duration| left <= tick * 2;
    if due(s.secret_ttl.saturating_sub(served.fetched_at.elapsed())) && served.stage == AWSCURRENT {
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
            Ok(Some(meta)) if meta.version_with(AWSCURRENT) == Some(served.version_id.as_str()) => {
                aws.confirm(&served.secret_id, AWSCURRENT, &served.version_id);
            }
            Ok(_) => aws.forget(&served.secret_id, AWSCURRENT),
            // An outage: the answer lives out its time, then the last good
            // one is served while AWS is retried with backoff.
            Err(e) if e.transient => {
                tracing::debug!(conn_id = %key, error = %e, "refresh-ahead version check failed");
                r.aws_failed(key);
                return;
            }
            // A decision (access revoked, secret deleted): stop serving now.
            Err(e) => {
                tracing::warn!(conn_id = %key, error = %e, "AWS refused the version check; no longer serving this connection");
                r.revoke(key);
                r.put(
                    key,
                    &Put::IfStill(served.clone()),
                    Err(e.context(&format!("connection {key}"))),
                );
                return;
            }
        }
    }
    let proof_due = served
        .validated_at()
        .is_some_and(|at| due(s.validation_ttl.saturating_sub(at.elapsed())));
    let login = if proof_due { Use::Fresh } else { Use::Cache };
    let answer = r.resolve_or_stale(key, Policy::background(login)).await;
    // Swap in unless a rotation check replaced the entry meanwhile.
    r.put(key, &Put::IfStill(served.clone()), answer);
}
