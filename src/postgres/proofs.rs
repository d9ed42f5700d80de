//! Login proofs behind their cache: a proven login is trusted for
//! `validation_ttl`, keyed by a fingerprint of everything that decides
//! whether it logs in; concurrent checks of one login share one attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::TtlCache;
use crate::postgres::validate::{Checked, LoginTarget, Outcome, Validator};

/// A login proof is trusted for `validation_ttl` per (secret version, how it
/// logs in). The key is a 128-bit fingerprint of all of that, from two
/// SipHash keys drawn at start: 16 bytes per proof instead of a copy of every
/// field (memory per cached conn_id), and no way to aim for a collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProofKey(u64, u64);

struct Fingerprint(
    std::collections::hash_map::RandomState,
    std::collections::hash_map::RandomState,
);

impl Fingerprint {
    fn of(&self, target: &LoginTarget, version_id: &str, secret_arn: &str) -> ProofKey {
        use std::hash::BuildHasher;
        let one = |state: &std::collections::hash_map::RandomState| {
            state.hash_one((
                version_id,
                secret_arn,
                &target.host,
                target.port,
                &target.database,
                &target.user,
                target.sslmode,
                &target.sslrootcert,
                target.refuse_passwords,
                &target.options,
            ))
        };
        ProofKey(one(&self.0), one(&self.1))
    }
}

/// Login checks behind their cache: a proven login is trusted for
/// `validation_ttl`; concurrent checks of one login share one attempt.
pub struct Proofs {
    validator: Validator,
    fingerprint: Fingerprint,
    cache: TtlCache<ProofKey, Instant, Checked>,
    metrics: Arc<crate::telemetry::metrics::Metrics>,
}

impl Proofs {
    pub fn new(
        validator: Validator,
        cache_size: u64,
        ttl: Duration,
        metrics: Arc<crate::telemetry::metrics::Metrics>,
    ) -> Self {
        Proofs {
            validator,
            fingerprint: Fingerprint(Default::default(), Default::default()),
            cache: TtlCache::new(cache_size * 3, ttl),
            metrics,
        }
    }

    /// Free expired proofs.
    pub fn sweep(&self) {
        self.cache.sweep();
    }

    /// When `target` was proven to log in (now, or from the cache unless
    /// `fresh`), or the failed check. A fresh failure revokes an older proof.
    pub async fn prove(
        &self,
        target: &LoginTarget,
        version_id: &str,
        secret_arn: &str,
        fresh: bool,
    ) -> Result<Instant, Checked> {
        let key = self.fingerprint.of(target, version_id, secret_arn);
        let check = async {
            let checked = self.validator.check(target).await;
            crate::cache::record_step(|s| s.login += checked.elapsed);
            let outcome = checked.outcome.word();
            self.metrics
                .validation(checked.elapsed.as_secs_f64(), outcome);
            tracing::debug!(host = %target.host, port = target.port, user = %target.user,
                outcome, elapsed_ms = checked.elapsed.as_millis() as u64, "login check");
            match checked.outcome {
                Outcome::Ok => Ok(Instant::now()),
                _ => Err(checked),
            }
        };
        let ttl = self.cache.ttl();
        if !fresh {
            return self
                .cache
                .get_or_load(key, |at| *at + ttl, check)
                .await
                .map_err(|e| (*e).clone());
        }
        match check.await {
            Ok(at) => {
                self.cache.insert(key, at);
                Ok(at)
            }
            Err(failed) => {
                self.cache.invalidate(&key);
                Err(failed)
            }
        }
    }
}
