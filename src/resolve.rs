//! The resolution pipeline: conn_id → secret → endpoint → proven login → answer.
//!
//! [`Resolver::resolve`] is the whole pipeline, top to bottom, in the order of
//! DESIGN.md. [`Resolver::connection`] puts the caches in front of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::airflow::AirflowConnection;
use crate::cache::{Answer, Caches, Fetched, Served, StepTimes, ValidationKey};

tokio::task_local! {
    /// Per-step timings of the resolution running in this task.
    static STEPS: std::cell::RefCell<StepTimes>;
}

/// Add to the current resolution's step timings (no-op outside one).
fn record_step(add: impl FnOnce(&mut StepTimes)) {
    let _ = STEPS.try_with(|s| add(&mut s.borrow_mut()));
}
use crate::config::{ConnectionEntry, EndpointRole, Settings, SslMode};
use crate::credential::{self, Credential};
use crate::error::{ErrorCode, LookupError};
use crate::metrics::Metrics;
use crate::sources::rds::{DescribeError, Endpoint, Rds, RdsTarget};
use crate::sources::secrets_manager::{
    SecretMeta, SecretVersion, SecretsManager, AWSCURRENT, AWSPENDING, AWSPREVIOUS,
};
use crate::sources::AwsFailure;
use crate::validate::{Checked, LoginTarget, Outcome, Validator};

/// Whether a step may use its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Use cached values while they live.
    Cached,
    /// Cached AWS answers, but prove the login again (refresh-ahead).
    Revalidate,
    /// Ask AWS and Postgres again (results still go into the caches).
    Fresh,
}

/// A version tried during resolution and why it was not served.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub stage: &'static str,
    pub version_id: String,
    pub reason: String,
}

/// Where a conn_id's credentials and endpoint come from (step 1 and 3).
pub(crate) struct Source<'a> {
    pub entry: Option<&'a ConnectionEntry>,
    pub secret_id: String,
    pub rds_target: Option<RdsTarget>,
    pub endpoint: Option<Arc<Endpoint>>,
}

/// Why one version could not be served.
pub(crate) enum Attempt {
    Rejected(String),
    Unreachable(String),
    Malformed(String),
}

pub struct Resolver {
    pub settings: Arc<Settings>,
    pub sm: SecretsManager,
    pub rds: Rds,
    pub validator: Validator,
    pub caches: Caches,
    pub metrics: Arc<Metrics>,
    /// When the current run of failed AWS calls began (readiness).
    aws_failing_since: std::sync::Mutex<Option<Instant>>,
}

impl Resolver {
    pub fn new(
        settings: Arc<Settings>,
        aws: &aws_config::SdkConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Resolver {
            sm: SecretsManager::new(aws),
            rds: Rds::new(aws),
            validator: Validator::new(settings.connect_timeout, settings.resolve.clone()),
            caches: Caches::new(&settings),
            settings,
            metrics,
            aws_failing_since: std::sync::Mutex::new(None),
        }
    }

    /// A connection for Airflow: from the cache while it lives, otherwise
    /// resolved once for all concurrent callers. `refresh` bypasses every cache.
    pub async fn connection(&self, conn_id: &str, refresh: bool) -> Answer {
        check_id(conn_id)?;
        if !refresh {
            if let Some(answer) = self.cached(conn_id).await {
                return answer;
            }
        }
        self.metrics.cache(false);
        // Boxed: the miss path's future is large (the whole pipeline), and
        // the hit path above should not carry and copy it on every request.
        Box::pin(self.load(conn_id, refresh)).await
    }

    /// The hot path: the cached answer, if there is one.
    pub async fn cached(&self, conn_id: &str) -> Option<Answer> {
        let answer = self.caches.answers.get(conn_id).await?;
        self.metrics.cache(true);
        if let Ok(served) = &answer {
            served.used.store(true, Ordering::Relaxed);
        }
        Some(answer)
    }

    /// A cache miss (or `refresh`): resolve, once for all concurrent callers.
    async fn load(&self, conn_id: &str, refresh: bool) -> Answer {
        if refresh {
            let answer = self.resolve_or_stale(conn_id, Freshness::Fresh).await;
            self.caches
                .answers
                .insert(conn_id.to_string(), answer.clone())
                .await;
            return answer;
        }
        // Single-flight: the loader never fails (failures are answers too).
        let result = self
            .caches
            .answers
            .try_get_with(conn_id.to_string(), async {
                Ok::<_, std::convert::Infallible>(
                    self.resolve_or_stale(conn_id, Freshness::Cached).await,
                )
            })
            .await;
        match result {
            Ok(answer) => answer,
            Err(never) => match *never {},
        }
    }

    /// `resolve`, falling back to the last credential that logged in while
    /// AWS fails (stale-if-error, bounded by `max_stale`).
    async fn resolve_or_stale(&self, conn_id: &str, freshness: Freshness) -> Answer {
        let started = Instant::now();
        let (result, mut steps) = STEPS
            .scope(Default::default(), async {
                let result = self.resolve(conn_id, freshness).await;
                (result, STEPS.with(|s| *s.borrow()))
            })
            .await;
        steps.total = started.elapsed();
        match result {
            Ok(mut served) => {
                served.steps = steps;
                tracing::debug!(conn_id, stage = served.stage, timing = %steps.server_timing(), "resolved");
                let served = Arc::new(served);
                self.caches
                    .last_good
                    .insert(conn_id.to_string(), served.clone())
                    .await;
                Ok(served)
            }
            Err(e) if matches!(e.code, ErrorCode::UpstreamError | ErrorCode::Timeout) => {
                match self.stale(conn_id).await {
                    Some(served) => {
                        tracing::warn!(conn_id, cause = %e.message, age_s = served.fetched_at.elapsed().as_secs(),
                            "AWS failed; serving a cached credential that still logs in");
                        self.metrics.stale_serve();
                        Ok(served)
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn stale(&self, conn_id: &str) -> Option<Arc<Served>> {
        let old = self.caches.last_good.get(conn_id).await?;
        if old.fetched_at.elapsed() > self.settings.max_stale {
            return None;
        }
        // Postgres is the source of truth: the old login is re-proven once
        // its proof has expired (through the same validation cache).
        let validated_at = self
            .validate(
                &old.login,
                &old.version_id,
                &old.secret_arn,
                Freshness::Cached,
            )
            .await
            .ok()?;
        let now = Instant::now();
        Some(Arc::new(Served {
            conn_id: old.conn_id.clone(),
            body: old.body.clone(),
            stage: old.stage,
            secret_id: old.secret_id.clone(),
            secret_arn: old.secret_arn.clone(),
            version_id: old.version_id.clone(),
            fetched_at: old.fetched_at,
            validated_at,
            // Try AWS again soon, but not on every request.
            expires_at: now + self.settings.error_ttl.max(Duration::from_secs(1)),
            stale: true,
            login: old.login.clone(),
            used: AtomicBool::new(false),
            created: now,
            steps: StepTimes::default(),
        }))
    }

    /// The pipeline, in DESIGN.md's order.
    pub async fn resolve(
        &self,
        conn_id: &str,
        freshness: Freshness,
    ) -> Result<Served, LookupError> {
        // 1. Map: a config entry wins; otherwise <prefix>/<conn_id>.
        let mut source = self.map(conn_id, freshness).await?;
        let secret_id = source.secret_id.clone();

        // 2. Fetch AWSCURRENT.
        let current = self
            .fetch_current(&format!("connection {conn_id}"), &secret_id, freshness)
            .await?;
        let cred = parse_version(conn_id, &current)
            .map_err(|m| LookupError::new(ErrorCode::SecretMalformed, m))?;

        // 3. Resolve the endpoint: the secret's RDS identifiers or RDS tags.
        self.locate(conn_id, &mut source, &cred, freshness).await?;
        let (rds_target, endpoint) = (source.rds_target.clone(), source.endpoint.clone());

        // 4. Validate; a rejected AWSCURRENT walks the rotation stages.
        let mut refusals = Vec::new();
        match self
            .try_version(
                conn_id,
                &source,
                endpoint.as_deref(),
                &current,
                &cred,
                AWSCURRENT,
                freshness,
            )
            .await
        {
            Ok(served) => return Ok(served),
            Err(Attempt::Unreachable(why)) => {
                // A failover or blue/green switchover may have moved the endpoint.
                if let Some(t) = &rds_target {
                    let again = self.endpoint(conn_id, t, Freshness::Fresh).await?;
                    if Some(&again) != endpoint.as_ref() {
                        tracing::info!(conn_id, target = %t, "endpoint changed; retrying login");
                        return self
                            .try_version(
                                conn_id,
                                &source,
                                Some(&again),
                                &current,
                                &cred,
                                AWSCURRENT,
                                Freshness::Fresh,
                            )
                            .await
                            .map_err(|a| attempt_error(conn_id, a, Vec::new()));
                    }
                }
                return Err(attempt_error(
                    conn_id,
                    Attempt::Unreachable(why),
                    Vec::new(),
                ));
            }
            Err(Attempt::Malformed(why)) => {
                return Err(LookupError::new(ErrorCode::SecretMalformed, why))
            }
            Err(Attempt::Rejected(why)) => refusals.push(Refusal {
                stage: AWSCURRENT,
                version_id: current.version_id.clone(),
                reason: why,
            }),
        }
        // Between a rotation's setSecret and finishSecret the database already
        // has the AWSPENDING password; with alternating users AWSPREVIOUS
        // still works. Re-fetch AWSCURRENT first: our copy may be old.
        for stage in [AWSCURRENT, AWSPENDING, AWSPREVIOUS] {
            let Some(version) = self.fetch(&secret_id, stage, Freshness::Fresh).await? else {
                continue;
            };
            if refusals.iter().any(|r| r.version_id == version.version_id) {
                continue;
            }
            let attempt = match parse_version(conn_id, &version) {
                Ok(cred) => {
                    self.try_version(
                        conn_id,
                        &source,
                        endpoint.as_deref(),
                        &version,
                        &cred,
                        stage,
                        Freshness::Fresh,
                    )
                    .await
                }
                Err(why) => Err(Attempt::Malformed(why)),
            };
            match attempt {
                Ok(served) => {
                    tracing::warn!(conn_id, stage, rejected = ?refusals.iter().map(|r| r.stage).collect::<Vec<_>>(),
                        "serving a fallback version: the first one was rejected by Postgres");
                    return Ok(served);
                }
                Err(Attempt::Unreachable(why)) => {
                    return Err(attempt_error(conn_id, Attempt::Unreachable(why), refusals))
                }
                Err(Attempt::Rejected(why) | Attempt::Malformed(why)) => refusals.push(Refusal {
                    stage,
                    version_id: version.version_id.clone(),
                    reason: why,
                }),
            }
        }
        Err(rejected_error(conn_id, &refusals))
    }

    /// Step 1: which secret holds a conn_id, and which RDS resource (if a
    /// config entry names one) says where the database is.
    pub(crate) async fn map<'a>(
        &'a self,
        conn_id: &str,
        freshness: Freshness,
    ) -> Result<Source<'a>, LookupError> {
        let entry = self.settings.connections.get(conn_id);
        if entry.is_none() {
            if let Some(pattern) = &self.settings.lookup_pattern {
                if !pattern.is_match(conn_id) {
                    return Err(LookupError::new(
                        ErrorCode::NotFound,
                        format!(
                            "connection {conn_id} does not match lookup_pattern; not looked up"
                        ),
                    ));
                }
            }
        }
        let rds_target = entry.and_then(entry_rds_target);
        let endpoint = match &rds_target {
            Some(t) => Some(self.endpoint(conn_id, t, freshness).await?),
            None => None,
        };
        let secret_id = match entry.and_then(|e| e.secret_id.clone()) {
            Some(id) => id,
            // An entry naming only an RDS resource uses the secret RDS manages for it.
            None => match endpoint.as_ref().and_then(|e| e.master_secret_arn.clone()) {
                Some(arn) => arn,
                None => self.settings.connection_secret_id(conn_id),
            },
        };
        Ok(Source {
            entry,
            secret_id,
            rds_target,
            endpoint,
        })
    }

    /// Step 3: with no RDS resource from the config, the secret may name one
    /// (rotation-template fields, or the tags RDS puts on its secrets).
    pub(crate) async fn locate(
        &self,
        conn_id: &str,
        source: &mut Source<'_>,
        cred: &Credential,
        freshness: Freshness,
    ) -> Result<(), LookupError> {
        if source.rds_target.is_some() {
            return Ok(());
        }
        let entry_host = source.entry.and_then(|e| e.host.as_ref());
        source.rds_target = match secret_rds_target(cred, source.entry) {
            Some(t) => Some(t),
            None if cred.host.is_none() && entry_host.is_none() => {
                self.tagged_target(conn_id, &source.secret_id, freshness)
                    .await?
            }
            None => None,
        };
        if let Some(t) = &source.rds_target {
            source.endpoint = Some(self.endpoint(conn_id, t, freshness).await?);
        }
        Ok(())
    }

    /// Validate one version and, if it logs in, build the answer (step 4 + 5).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn try_version(
        &self,
        conn_id: &str,
        source: &Source<'_>,
        endpoint: Option<&Endpoint>,
        version: &SecretVersion,
        cred: &Credential,
        stage: &'static str,
        freshness: Freshness,
    ) -> Result<Served, Attempt> {
        let (target, answer) = self
            .login_for(conn_id, source.entry, endpoint, cred, version)
            .map_err(Attempt::Malformed)?;
        let validated_at = self
            .validate(&target, &version.version_id, &version.arn, freshness)
            .await
            .map_err(|checked| match checked.outcome {
                Outcome::Rejected { message, .. } => Attempt::Rejected(format!(
                    "{}:{} rejected {} ({stage}, version {}): {message}",
                    target.host, target.port, target.user, version.version_id
                )),
                Outcome::Unreachable { message } => {
                    Attempt::Unreachable(format!("{}:{}: {message}", target.host, target.port))
                }
                Outcome::Ok => unreachable!("validate returns Ok for Outcome::Ok"),
            })?;
        let now = Instant::now();
        let secret_left = self
            .settings
            .secret_ttl
            .saturating_sub(version.fetched_at.elapsed());
        let proof_left = self
            .settings
            .validation_ttl
            .saturating_sub(validated_at.elapsed());
        Ok(Served {
            conn_id: conn_id.to_string(),
            body: Bytes::from(answer.to_json()),
            stage,
            secret_id: source.secret_id.clone(),
            secret_arn: version.arn.clone(),
            version_id: version.version_id.clone(),
            fetched_at: version.fetched_at,
            validated_at,
            expires_at: now + secret_left.min(proof_left),
            stale: false,
            login: target,
            used: AtomicBool::new(false),
            created: now,
            steps: StepTimes::default(),
        })
    }

    /// Where and how Airflow will log in, and the answer that says so.
    /// Precedence: config entry, then RDS metadata, then the secret.
    fn login_for(
        &self,
        conn_id: &str,
        entry: Option<&ConnectionEntry>,
        endpoint: Option<&Endpoint>,
        cred: &Credential,
        version: &SecretVersion,
    ) -> Result<(LoginTarget, AirflowConnection), String> {
        let host = entry
            .and_then(|e| e.host.clone())
            .or_else(|| endpoint.map(|e| e.host.clone()))
            .or_else(|| cred.host.clone())
            .ok_or_else(|| {
                format!(
                    "connection {conn_id}: secret {} has no host, and no RDS instance or cluster names one",
                    version.arn
                )
            })?;
        let port = entry
            .and_then(|e| e.port)
            .or_else(|| endpoint.map(|e| e.port))
            .or(cred.port)
            .unwrap_or(5432);
        let database = entry
            .and_then(|e| e.database.clone())
            .or_else(|| cred.database.clone())
            .or_else(|| endpoint.and_then(|e| e.database.clone()))
            // libpq's default database is the user's name; say it explicitly.
            .unwrap_or_else(|| cred.login.clone());
        let mut extra: Map<String, Value> = cred.extra.clone();
        if let Some(e) = entry.and_then(|e| e.extra.as_ref()) {
            extra.extend(e.clone());
        }
        let sslmode = match entry.and_then(|e| e.sslmode) {
            Some(m) => m,
            None => match extra.get("sslmode").and_then(Value::as_str) {
                Some(s) => s
                    .parse::<SslMode>()
                    .map_err(|e| format!("connection {conn_id}: secret {}: {e}", version.arn))?,
                None => self.settings.sslmode,
            },
        };
        let sslrootcert = entry
            .and_then(|e| e.sslrootcert.clone())
            .or_else(|| {
                extra
                    .get("sslrootcert")
                    .and_then(Value::as_str)
                    .map(Into::into)
            })
            .or_else(|| self.settings.sslrootcert.clone())
            .filter(|_| sslmode != SslMode::Disable);
        extra.insert("sslmode".into(), Value::String(sslmode.as_str().into()));
        match &sslrootcert {
            Some(p) => {
                extra.insert("sslrootcert".into(), Value::String(p.display().to_string()));
            }
            None => {
                extra.remove("sslrootcert");
            }
        }
        let target = LoginTarget {
            host: host.clone(),
            port,
            database: database.clone(),
            user: cred.login.clone(),
            password: cred.password.clone(),
            sslmode,
            sslrootcert,
        };
        let answer = AirflowConnection {
            host,
            port,
            login: cred.login.clone(),
            password: cred.password.clone(),
            database,
            extra,
            description: entry
                .and_then(|e| e.description.clone())
                .or_else(|| cred.description.clone()),
        };
        Ok((target, answer))
    }

    /// A login check, trusted for `validation_ttl` per (version, endpoint).
    /// Returns when the login was proven, or the failed check.
    async fn validate(
        &self,
        target: &LoginTarget,
        version_id: &str,
        secret_arn: &str,
        freshness: Freshness,
    ) -> Result<Instant, Checked> {
        let key = ValidationKey {
            version_id: version_id.to_string(),
            secret_arn: secret_arn.to_string(),
            host: target.host.clone(),
            port: target.port,
            database: target.database.clone(),
            user: target.user.clone(),
            sslmode: target.sslmode,
            sslrootcert: target.sslrootcert.clone(),
        };
        let check = async {
            let checked = self.validator.check(target).await;
            record_step(|s| s.login += checked.elapsed);
            let outcome = match &checked.outcome {
                Outcome::Ok => "ok",
                Outcome::Rejected { .. } => "rejected",
                Outcome::Unreachable { .. } => "unreachable",
            };
            self.metrics
                .validation(checked.elapsed.as_secs_f64(), outcome);
            tracing::debug!(host = %target.host, port = target.port, user = %target.user,
                outcome, elapsed_ms = checked.elapsed.as_millis() as u64, "login check");
            match checked.outcome {
                Outcome::Ok => Ok(Instant::now()),
                _ => Err(checked),
            }
        };
        if freshness != Freshness::Cached {
            // A fresh failure revokes an older proof of the same login.
            return match check.await {
                Ok(at) => {
                    self.caches.validations.insert(key, at).await;
                    Ok(at)
                }
                Err(failed) => {
                    self.caches.validations.invalidate(&key).await;
                    Err(failed)
                }
            };
        }
        self.caches
            .validations
            .try_get_with(key, check)
            .await
            .map_err(|e| (*e).clone())
    }

    /// `GetSecretValue` for one stage, through the cache.
    pub async fn fetch(
        &self,
        secret_id: &str,
        stage: &'static str,
        freshness: Freshness,
    ) -> Result<Fetched, LookupError> {
        let key = (secret_id.to_string(), stage);
        let load = async {
            let started = Instant::now();
            let result = self.sm.get(secret_id, stage).await;
            record_step(|s| s.secrets_manager += started.elapsed());
            self.aws_called("GetSecretValue", aws_outcome(&result), result.is_err());
            result.map(Arc::new)
        };
        let fetched = if freshness == Freshness::Fresh {
            let v = load.await;
            if let Ok(v) = &v {
                self.caches.secrets.insert(key, v.clone()).await;
            }
            v.map_err(Arc::new)
        } else {
            self.caches.secrets.try_get_with(key, load).await
        };
        fetched.map(|v| (*v).clone()).map_err(|f| {
            (*f).clone()
                .into_lookup_error(&format!("secret {secret_id}"))
        })
    }

    /// AWSCURRENT of a secret that must exist (404 `not_found` otherwise);
    /// `asker` ("connection x", "variable y") starts the error message.
    async fn fetch_current(
        &self,
        asker: &str,
        secret_id: &str,
        freshness: Freshness,
    ) -> Result<SecretVersion, LookupError> {
        self.fetch(secret_id, AWSCURRENT, freshness)
            .await?
            .ok_or_else(|| {
                LookupError::new(
                    ErrorCode::NotFound,
                    format!("{asker}: secret {secret_id} does not exist"),
                )
            })
    }

    /// `DescribeSecret`, uncached (rotation checks and version checks).
    pub async fn describe(&self, secret_id: &str) -> Result<Option<SecretMeta>, LookupError> {
        let started = Instant::now();
        let result = self.sm.describe(secret_id).await;
        record_step(|s| s.secrets_manager += started.elapsed());
        self.aws_called("DescribeSecret", aws_outcome(&result), result.is_err());
        result.map_err(|f| f.into_lookup_error(&format!("secret {secret_id}")))
    }

    /// RDS endpoint metadata, through its long-lived cache.
    pub async fn endpoint(
        &self,
        conn_id: &str,
        target: &RdsTarget,
        freshness: Freshness,
    ) -> Result<Arc<Endpoint>, LookupError> {
        let load = async {
            let started = Instant::now();
            let result = self.rds.describe(target).await;
            record_step(|s| s.rds += started.elapsed());
            let api = match target {
                RdsTarget::Instance(_) => "DescribeDBInstances",
                RdsTarget::Cluster(..) => "DescribeDBClusters",
            };
            let outcome = match &result {
                Ok(_) => "ok",
                Err(DescribeError::NotFound) => "not_found",
                Err(DescribeError::NoEndpoint) => "no_endpoint",
                Err(DescribeError::Aws(f)) => error_outcome(f),
            };
            let failed = matches!(result, Err(DescribeError::Aws(_)));
            self.aws_called(api, outcome, failed);
            result.map(Arc::new)
        };
        let result = if freshness == Freshness::Fresh {
            let r = load.await;
            if let Ok(e) = &r {
                self.caches
                    .endpoints
                    .insert(target.clone(), e.clone())
                    .await;
            }
            r.map_err(Arc::new)
        } else {
            self.caches
                .endpoints
                .try_get_with(target.clone(), load)
                .await
        };
        result.map_err(|e| match &*e {
            DescribeError::NotFound => LookupError::new(
                ErrorCode::UpstreamError,
                format!("connection {conn_id}: {target} does not exist"),
            ),
            DescribeError::NoEndpoint => LookupError::new(
                ErrorCode::UpstreamError,
                format!("connection {conn_id}: {target} has no endpoint yet (still creating?)"),
            ),
            DescribeError::Aws(f) => f
                .clone()
                .into_lookup_error(&format!("connection {conn_id}: {target}")),
        })
    }

    /// The RDS resource named by the tags RDS puts on the secrets it manages.
    async fn tagged_target(
        &self,
        conn_id: &str,
        secret_id: &str,
        freshness: Freshness,
    ) -> Result<Option<RdsTarget>, LookupError> {
        if freshness == Freshness::Cached {
            if let Some(t) = self.caches.secret_targets.get(secret_id).await {
                return Ok(t);
            }
        }
        let meta = self.describe(secret_id).await.map_err(|e| {
            LookupError::new(e.code, format!("connection {conn_id}: {}", e.message))
        })?;
        let target = meta.and_then(|m| {
            m.tags
                .get("aws:rds:primarydbclusterarn")
                .or_else(|| m.tags.get("aws:rds:primarydbinstancearn"))
                .and_then(|arn| RdsTarget::from_arn(arn))
        });
        self.caches
            .secret_targets
            .insert(secret_id.to_string(), target.clone())
            .await;
        Ok(target)
    }
}

/// Step 1's id rule, shared by connections and variables.
pub fn check_id(id: &str) -> Result<(), LookupError> {
    if crate::config::is_valid_id(id) {
        Ok(())
    } else {
        let shown: String = id.chars().take(64).collect();
        Err(LookupError::new(
            ErrorCode::InvalidConnId,
            format!(
                "{shown:?} is not a valid id: use only A-Z a-z 0-9 _ . - (at most {} characters)",
                crate::config::MAX_ID_LEN
            ),
        ))
    }
}

pub(crate) fn parse_version(conn_id: &str, version: &SecretVersion) -> Result<Credential, String> {
    use secrecy::ExposeSecret;
    credential::parse(version.value.expose_secret()).map_err(|m| {
        format!(
            "connection {conn_id}: secret {} (version {}): {m}",
            version.arn, version.version_id
        )
    })
}

fn entry_rds_target(e: &ConnectionEntry) -> Option<RdsTarget> {
    match (&e.db_instance, &e.db_cluster) {
        (_, Some(c)) => Some(RdsTarget::Cluster(
            c.clone(),
            e.endpoint.unwrap_or_default(),
        )),
        (Some(i), None) => Some(RdsTarget::Instance(i.clone())),
        (None, None) => None,
    }
}

/// The rotation templates write `dbClusterIdentifier` / `dbInstanceIdentifier`.
fn secret_rds_target(c: &Credential, entry: Option<&ConnectionEntry>) -> Option<RdsTarget> {
    let role = entry
        .and_then(|e| e.endpoint)
        .unwrap_or(EndpointRole::Writer);
    match (&c.db_instance, &c.db_cluster) {
        (_, Some(cl)) => Some(RdsTarget::Cluster(cl.clone(), role)),
        (Some(i), None) => Some(RdsTarget::Instance(i.clone())),
        (None, None) => None,
    }
}

fn attempt_error(conn_id: &str, a: Attempt, refusals: Vec<Refusal>) -> LookupError {
    match a {
        Attempt::Unreachable(why) => LookupError::new(
            ErrorCode::DatabaseUnreachable,
            format!("connection {conn_id}: database unreachable: {why}"),
        ),
        Attempt::Malformed(why) => LookupError::new(ErrorCode::SecretMalformed, why),
        Attempt::Rejected(why) => {
            let mut all = refusals;
            all.push(Refusal {
                stage: AWSCURRENT,
                version_id: String::new(),
                reason: why,
            });
            rejected_error(conn_id, &all)
        }
    }
}

fn rejected_error(conn_id: &str, refusals: &[Refusal]) -> LookupError {
    let tried: Vec<String> = refusals.iter().map(|r| r.reason.clone()).collect();
    LookupError::new(
        ErrorCode::CredentialsRejected,
        format!(
            "connection {conn_id}: Postgres rejected every version tried: {}",
            tried.join("; ")
        ),
    )
}

fn error_outcome(f: &AwsFailure) -> &str {
    f.code.as_str()
}

fn aws_outcome<T>(r: &Result<Option<T>, AwsFailure>) -> &str {
    match r {
        Ok(Some(_)) => "ok",
        Ok(None) => "not_found",
        Err(f) => error_outcome(f),
    }
}

impl Resolver {
    /// Count an AWS call, and track since when AWS has been failing.
    fn aws_called(&self, api: &'static str, outcome: &str, failed: bool) {
        self.metrics.aws_call(api, outcome);
        let mut since = self.aws_failing_since.lock().expect("aws health lock");
        match (failed, *since) {
            (false, _) => *since = None,
            (true, None) => *since = Some(Instant::now()),
            (true, Some(_)) => {}
        }
    }

    /// How long AWS has failed every call, if it is failing now.
    pub fn aws_failing_for(&self) -> Option<Duration> {
        self.aws_failing_since
            .lock()
            .expect("aws health lock")
            .map(|t| t.elapsed())
    }

    /// An Airflow Variable: the plain string at `<variables_prefix>/<key>`.
    /// Cached like secrets (and "not found" like any miss); not validated.
    pub async fn variable(
        &self,
        key: &str,
        refresh: bool,
    ) -> Result<(Bytes, Instant), LookupError> {
        check_id(key)?;
        let secret_id = self.settings.variable_secret_id(key);
        let freshness = if refresh {
            Freshness::Fresh
        } else {
            Freshness::Cached
        };
        let version = self
            .fetch_current(&format!("variable {key}"), &secret_id, freshness)
            .await?;
        use secrecy::ExposeSecret;
        let body =
            serde_json::to_vec(&serde_json::json!({ "value": version.value.expose_secret() }))
                .expect("a JSON string always serializes");
        Ok((Bytes::from(body), version.fetched_at))
    }
}

impl Resolver {
    /// Refresh ahead: re-check entries in use before they expire, so that
    /// steady-state lookups never wait on AWS or Postgres. Runs until dropped.
    pub async fn refresh_ahead(self: Arc<Self>) {
        let s = &self.settings;
        // Entries are refreshed in their last fifth (two ticks): early enough
        // to finish before expiry, late enough to cost ~1.25 checks per TTL.
        let tick = (s.secret_ttl.min(s.validation_ttl) / 10)
            .clamp(Duration::from_millis(100), Duration::from_secs(15));
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            for (conn_id, answer) in self.caches.answers.iter() {
                let Ok(served) = answer else { continue };
                // Due within the next two ticks, and read since the last
                // refresh (claiming it clears the mark, so one refresh runs).
                if served.expires_at.saturating_duration_since(now) > tick * 2
                    || !served.used.swap(false, Ordering::Relaxed)
                {
                    continue;
                }
                let this = self.clone();
                tokio::spawn(async move { this.refresh_one(&conn_id, &served, tick).await });
            }
        }
    }

    async fn refresh_one(&self, conn_id: &str, served: &Served, tick: Duration) {
        // Version check as the AWS agent does it: DescribeSecret, and
        // GetSecretValue only when AWSCURRENT moved.
        let secret_due = self
            .settings
            .secret_ttl
            .saturating_sub(served.fetched_at.elapsed())
            <= tick * 2;
        if secret_due && served.stage == AWSCURRENT {
            let key = (served.secret_id.clone(), AWSCURRENT);
            match self.describe(&served.secret_id).await {
                Ok(Some(meta)) if meta.version_with(AWSCURRENT) == Some(&served.version_id) => {
                    if let Some(cached) = self.caches.secrets.get(&key).await {
                        if let Some(v) = cached.as_ref() {
                            let mut confirmed = v.clone();
                            confirmed.fetched_at = Instant::now();
                            self.caches
                                .secrets
                                .insert(key, Arc::new(Some(confirmed)))
                                .await;
                        }
                    }
                }
                Ok(_) => self.caches.secrets.invalidate(&key).await,
                // AWS is failing: keep the entry; once it expires, requests
                // get stale-if-error.
                Err(e) => {
                    tracing::debug!(conn_id, error = %e, "refresh-ahead version check failed");
                    return;
                }
            }
        }
        // Re-run the pipeline (re-proving the login when its proof is due),
        // and swap the answer in before the old one expires.
        let proof_due = self
            .settings
            .validation_ttl
            .saturating_sub(served.validated_at.elapsed())
            <= tick * 2;
        let freshness = if proof_due {
            Freshness::Revalidate
        } else {
            Freshness::Cached
        };
        let answer = self.resolve_or_stale(conn_id, freshness).await;
        match &answer {
            Err(e) if matches!(e.code, ErrorCode::UpstreamError | ErrorCode::Timeout) => {}
            _ => {
                self.caches
                    .answers
                    .insert(conn_id.to_string(), answer)
                    .await
            }
        }
    }
}
