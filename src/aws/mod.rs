//! The AWS side of the pipeline, cached: secret versions per (secret, stage),
//! RDS endpoints, and the RDS resource a secret's tags name.
//!
//! Every call is counted (metrics) and timed (the `Server-Timing` of a
//! miss); every failure becomes a [`LookupError`] naming the resource and
//! AWS's error code, marked transient or not (see
//! [`AwsFailure::is_transient`]).

pub mod calls;
pub mod rds;
pub mod secrets_manager;

use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aws::calls::{Attempts, AwsFailure};
use crate::aws::rds::{DescribeError, Endpoint, Rds, RdsTarget};
use crate::aws::secrets_manager::{Batch, SecretMeta, SecretVersion, SecretsManager, Stage};
use crate::cache::Use;
use crate::cache::{record_step, TtlCache};
use crate::config::Settings;
use crate::error::{ErrorCode, LookupError};
use crate::telemetry::metrics::Metrics;

/// A fetched stage: `None` when the secret or that stage does not exist.
pub type Fetched = Option<SecretVersion>;

pub struct Aws {
    sm: SecretsManager,
    rds: Rds,
    metrics: Arc<Metrics>,
    /// (secret id, stage) → version, `secret_ttl` ("absent": `negative_ttl`).
    secrets: TtlCache<(String, Stage), Arc<Fetched>, AwsFailure>,
    /// RDS resource → endpoint, `endpoint_ttl`.
    endpoints: TtlCache<RdsTarget, Arc<Endpoint>, DescribeError>,
    /// secret id → the RDS resource its tags name (None: no such tags).
    secret_targets: TtlCache<String, Option<RdsTarget>, LookupError>,
    /// How long a found secret version is kept; a missing one: `negative_ttl`.
    found_ttl: Duration,
}

/// A cached value unless `fresh` is asked for; a fresh value replaces the
/// cached one. Concurrent misses of one key share one load (the cache's
/// single-flight; callers run in tasks nobody cancels, see `front`).
/// `until`: how long a loaded value is kept.
async fn cached_or_fresh<K, V, E>(
    cache: &TtlCache<K, V, E>,
    key: K,
    use_: Use,
    until: impl FnOnce(&V) -> Instant,
    load: impl std::future::Future<Output = Result<V, E>>,
) -> Result<V, Arc<E>>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    match use_ {
        Use::Cache => cache.get_or_load(key, until, load).await,
        Use::Fresh => {
            let value = load.await.map_err(Arc::new)?;
            cache.insert_until(key, value.clone(), until(&value));
            Ok(value)
        }
    }
}

impl Aws {
    pub fn new(settings: &Settings, aws: &aws_config::SdkConfig, metrics: Arc<Metrics>) -> Self {
        let n = settings.cache_size;
        let (found, missing) = (settings.secret_ttl, settings.negative_ttl);
        Aws {
            sm: SecretsManager::new(aws),
            rds: Rds::new(aws),
            metrics,
            // A conn_id holds at most three stages and one endpoint.
            secrets: TtlCache::new(n * 3, missing),
            endpoints: TtlCache::new(n, settings.endpoint_ttl),
            secret_targets: TtlCache::new(n, settings.endpoint_ttl),
            found_ttl: found,
        }
    }

    /// Free expired entries (secret values included).
    pub fn sweep(&self) {
        self.secrets.sweep();
        self.endpoints.sweep();
        self.secret_targets.sweep();
    }

    /// A found version is kept `secret_ttl`, a missing one `negative_ttl`.
    fn secret_deadline(&self, fetched: &Arc<Fetched>) -> Instant {
        let ttl = match fetched.as_ref() {
            Some(_) => self.found_ttl,
            None => self.secrets.ttl(),
        };
        Instant::now() + ttl
    }

    /// `GetSecretValue` for one stage.
    pub async fn fetch(
        &self,
        secret_id: &str,
        stage: Stage,
        use_: Use,
        attempts: Attempts,
    ) -> Result<Fetched, LookupError> {
        let load = async {
            let started = Instant::now();
            let result = self.sm.get(secret_id, stage, attempts).await;
            record_step(|s| s.secrets_manager += started.elapsed());
            self.metrics.aws_call(
                "GetSecretValue",
                outcome(result.as_ref().map(Option::is_some)),
            );
            result.map(Arc::new)
        };
        let key = (secret_id.to_string(), stage);
        cached_or_fresh(&self.secrets, key, use_, |v| self.secret_deadline(v), load)
            .await
            .map(|v| (*v).clone())
            .map_err(|f| {
                (*f).clone()
                    .into_lookup_error(&format!("secret {secret_id} ({stage})"))
            })
    }

    /// AWS confirmed (by a version check) that the cached version is still
    /// the one holding `stage`: keep it another `secret_ttl`.
    pub fn confirm(&self, secret_id: &str, stage: Stage, version_id: &str) -> bool {
        let key = (secret_id.to_string(), stage);
        let Some(cached) = self.secrets.get(&key) else {
            return false;
        };
        match cached.as_ref() {
            Some(v) if v.version_id == version_id => {
                let mut confirmed = v.clone();
                confirmed.fetched_at = Instant::now();
                let confirmed = Arc::new(Some(confirmed));
                let until = self.secret_deadline(&confirmed);
                self.secrets.insert_until(key, confirmed, until);
                true
            }
            _ => false,
        }
    }

    /// Drop a cached version (it moved, or must be asked for again).
    pub fn forget(&self, secret_id: &str, stage: Stage) {
        self.secrets.invalidate(&(secret_id.to_string(), stage));
    }

    /// `DescribeSecret`, never cached (rotation checks and version checks).
    pub async fn describe(
        &self,
        secret_id: &str,
        attempts: Attempts,
    ) -> Result<Option<SecretMeta>, LookupError> {
        let started = Instant::now();
        let result = self.sm.describe(secret_id, attempts).await;
        record_step(|s| s.secrets_manager += started.elapsed());
        self.metrics.aws_call(
            "DescribeSecret",
            outcome(result.as_ref().map(Option::is_some)),
        );
        result.map_err(|f| f.into_lookup_error(&format!("secret {secret_id}")))
    }

    /// RDS endpoint metadata (long-lived cache).
    pub async fn endpoint(
        &self,
        target: &RdsTarget,
        use_: Use,
    ) -> Result<Arc<Endpoint>, LookupError> {
        let load = async {
            let started = Instant::now();
            let result = self.rds.describe(target).await;
            record_step(|s| s.rds += started.elapsed());
            let api = match target {
                RdsTarget::Instance(_) => "DescribeDBInstances",
                RdsTarget::Cluster(..) => "DescribeDBClusters",
            };
            let word = match &result {
                Ok(_) => "ok",
                Err(DescribeError::NotFound) => "not_found",
                Err(DescribeError::NoEndpoint) => "no_endpoint",
                Err(DescribeError::Aws(f)) => f.code.as_str(),
            };
            self.metrics.aws_call(api, word);
            result.map(Arc::new)
        };
        let ttl = self.endpoints.ttl();
        cached_or_fresh(
            &self.endpoints,
            target.clone(),
            use_,
            |_| Instant::now() + ttl,
            load,
        )
        .await
        .map_err(|e| match &*e {
            DescribeError::NotFound => {
                LookupError::new(ErrorCode::UpstreamError, format!("{target} does not exist"))
            }
            DescribeError::NoEndpoint => LookupError::transient(
                ErrorCode::UpstreamError,
                format!("{target} has no endpoint yet (still creating?)"),
            ),
            DescribeError::Aws(f) => f.clone().into_lookup_error(&target.to_string()),
        })
    }

    /// The RDS resource named by the tags RDS puts on the secrets it manages.
    pub async fn tagged_target(
        &self,
        secret_id: &str,
        use_: Use,
        attempts: Attempts,
    ) -> Result<Option<RdsTarget>, LookupError> {
        let load = async {
            let meta = self.describe(secret_id, attempts).await?;
            Ok::<_, LookupError>(meta.and_then(|m| {
                m.tags
                    .get("aws:rds:primarydbclusterarn")
                    .or_else(|| m.tags.get("aws:rds:primarydbinstancearn"))
                    .and_then(|arn| RdsTarget::from_arn(arn))
            }))
        };
        let ttl = self.secret_targets.ttl();
        let until = |_: &Option<RdsTarget>| Instant::now() + ttl;
        cached_or_fresh(
            &self.secret_targets,
            secret_id.to_string(),
            use_,
            until,
            load,
        )
        .await
        .map_err(|e| (*e).clone())
    }
}

/// Start-up prefetch (see `prefetch`): listing and batch fetching, counted
/// like every other call, and a way to put batch-fetched versions where
/// `GetSecretValue`'s go.
impl Aws {
    /// `BatchGetSecretValue` for up to `BATCH_MAX` ids.
    pub async fn batch_get(&self, ids: &[String]) -> Result<Batch, LookupError> {
        let result = self.sm.batch_get(ids, Attempts::Retried).await;
        self.metrics.aws_call(
            "BatchGetSecretValue",
            outcome(result.as_ref().map(|_| true)),
        );
        result.map_err(|f| f.into_lookup_error(&format!("{} secrets", ids.len())))
    }

    /// Names of the secrets under `prefix` (`ListSecrets`, a page of 100 per
    /// call), at most `limit`; with the number of calls made.
    pub async fn list_names(
        &self,
        prefix: &str,
        limit: usize,
    ) -> (Vec<String>, u32, Option<LookupError>) {
        let (mut names, mut calls, mut token) = (Vec::new(), 0, None);
        loop {
            let result = self.sm.list_names(prefix, token, Attempts::Retried).await;
            calls += 1;
            self.metrics
                .aws_call("ListSecrets", outcome(result.as_ref().map(|_| true)));
            match result {
                Ok((page, next)) => {
                    names.extend(page.into_iter().filter(|n| n.starts_with(prefix)));
                    token = next;
                }
                Err(f) => {
                    let e = f.into_lookup_error(&format!("secrets under {prefix}"));
                    return (names, calls, Some(e));
                }
            }
            if token.is_none() || names.len() >= limit {
                names.truncate(limit);
                return (names, calls, None);
            }
        }
    }

    /// Cache a version fetched by other means than `GetSecretValue` (or a
    /// secret known not to exist) for `stage`, exactly as `fetch` would
    /// have, unless the cache already holds that stage (never overwrite a
    /// newer fetch). Whether it was put.
    pub fn seed(&self, secret_id: &str, stage: Stage, fetched: Fetched) -> bool {
        let fetched = Arc::new(fetched);
        let until = self.secret_deadline(&fetched);
        self.secrets
            .put_if(&(secret_id.to_string(), stage), fetched, until, |was| {
                was.is_none()
            })
    }
}

fn outcome(result: Result<bool, &AwsFailure>) -> &str {
    match result {
        Ok(true) => "ok",
        Ok(false) => "not_found",
        Err(f) => f.code.as_str(),
    }
}
