//! The resolution pipeline: conn_id → secret → endpoint → proven login →
//! answer, in the order of DESIGN.md. [`Pipeline::resolve`] is the whole of
//! it; each step lives in the module named for it:
//!
//! | step | module |
//! |---|---|
//! | 1. map a conn_id to its secret (and RDS resource) | [`crate::pipeline::map`] |
//! | 2. fetch AWSCURRENT (cached AWS layer) | [`crate::aws`] |
//! | 3. locate the endpoint | [`crate::pipeline::map`] |
//! | 4. plan the login, prove it, walk the rotation stages | [`crate::pipeline::login_plan`], [`crate::postgres::validate`], [`crate::pipeline::stages`] |
//! | 5. answer Airflow JSON (other types: unvalidated) | [`crate::airflow`], [`crate::pipeline::unvalidated`] |
//!
//! The caches, single-flight, stale-if-error and backoff in front of the
//! pipeline are in [`crate::service::resolver`]; refresh-ahead in [`crate::service::refresh`].

pub mod login_plan;
pub mod map;
pub mod stages;
pub mod unvalidated;

use std::sync::Arc;
use std::time::Instant;

use secrecy::ExposeSecret;

use crate::airflow::credential::{self, Kind};
use crate::aws::calls::Attempts;
use crate::aws::secrets_manager::{SecretVersion, Stage};
use crate::aws::Aws;
use crate::cache::{ConnKey, Served};
use crate::config::{Settings, Unvalidated};
use crate::error::{ErrorCode, LookupError};
use crate::postgres::validate::{Proofs, Validator};
use crate::telemetry::metrics::Metrics;
use stages::WalkFailed;

pub use crate::cache::Use;

/// What one resolution may take from caches, and how it calls AWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Secret values, endpoints, tags.
    pub aws: Use,
    /// Login proofs.
    pub login: Use,
    pub attempts: Attempts,
}

impl Policy {
    /// A request's cache miss: whatever still lives in the caches.
    pub const CACHED: Policy = Policy {
        aws: Use::Cache,
        login: Use::Cache,
        attempts: Attempts::Retried,
    };
    /// `refresh=true`, rotation checks: ask AWS and Postgres again.
    pub const FRESH: Policy = Policy {
        aws: Use::Fresh,
        login: Use::Fresh,
        attempts: Attempts::Retried,
    };

    /// Background work: one AWS call per try (its own backoff decides retries).
    pub fn background(login: Use) -> Policy {
        Policy {
            aws: Use::Cache,
            login,
            attempts: Attempts::Once,
        }
    }
}

/// The parts the pipeline runs on.
pub struct Pipeline {
    pub settings: Arc<Settings>,
    pub aws: Aws,
    pub proofs: Proofs,
}

impl Pipeline {
    pub fn new(
        settings: Arc<Settings>,
        aws: &aws_config::SdkConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let validator = Validator::new(
            settings.connect_timeout,
            settings.resolve.clone(),
            crate::postgres::secret_files::FileReader::new(&settings.secret_file_dirs),
        );
        Pipeline {
            aws: Aws::new(&settings, aws, metrics.clone()),
            proofs: Proofs::new(
                validator,
                settings.cache_size,
                settings.validation_ttl,
                metrics.clone(),
            ),
            settings,
        }
    }

    /// The pipeline, in DESIGN.md's order.
    pub async fn resolve(&self, key: &ConnKey, policy: Policy) -> Result<Served, LookupError> {
        let ctx = |e: LookupError| e.context(&format!("connection {key}"));

        // 1. Map: a config entry wins; otherwise <prefix>/[<team>--]<conn_id>.
        let mut source = map::map(&self.settings, &self.aws, key, policy)
            .await
            .map_err(ctx)?;

        // 2. Fetch AWSCURRENT of the first candidate secret that exists.
        let current = map::fetch_current(&self.aws, &mut source, policy)
            .await
            .map_err(ctx)?;
        let malformed = |why: String| {
            LookupError::new(
                ErrorCode::SecretMalformed,
                format!(
                    "connection {key}: secret {} (version {}): {why}",
                    source.secret_id, current.version_id
                ),
            )
        };
        let cred = match credential::classify(current.value.expose_secret()) {
            Ok(Kind::Postgres(cred)) => cred,
            // Types we cannot log in with skip steps 3-4.
            Ok(Kind::Other { conn_type }) => {
                return self.unvalidated(key, &source, &current, conn_type.as_deref())
            }
            Err(why) => return Err(malformed(why.0)),
        };

        // 3. Locate the endpoint: the entry's, the secret's RDS identifiers or tags.
        map::locate(&self.aws, &mut source, &cred, policy)
            .await
            .map_err(ctx)?;

        // 4. Prove the login, walking the rotation stages if AWSCURRENT is
        //    rejected. A network failure may mean the endpoint moved
        //    (failover): follow it once and walk again.
        let walked = match stages::walk(self, key, &source, &current, &cred, policy).await {
            Err(WalkFailed::Unreachable(why)) => {
                match map::moved(&self.aws, &source).await.map_err(ctx)? {
                    Some(endpoint) => {
                        tracing::info!(conn_id = %key, host = %endpoint.host, "endpoint moved; logging in again");
                        source.endpoint = Some(endpoint);
                        stages::walk(self, key, &source, &current, &cred, Policy::FRESH).await
                    }
                    None => Err(WalkFailed::Unreachable(why)),
                }
            }
            other => other,
        };

        // 5. Answer: the walk built the Airflow JSON of the version that logged in.
        walked.map_err(|failed| match failed {
            WalkFailed::Unreachable(why) => LookupError::new(
                ErrorCode::DatabaseUnreachable,
                format!("connection {key}: database unreachable: {why}"),
            ),
            WalkFailed::Failed(e) => e,
        })
    }
}

impl Pipeline {
    /// A connection type the sidecar cannot log in with: answered as
    /// Airflow's own `SecretsManagerBackend` would answer it, saying it was
    /// not validated; or refused (`unvalidated = refuse`).
    pub(crate) fn unvalidated(
        &self,
        key: &ConnKey,
        source: &map::Source<'_>,
        version: &SecretVersion,
        conn_type: Option<&str>,
    ) -> Result<Served, LookupError> {
        // Named only when it is a known word: it is the secret writer's text.
        let shown = credential::shown_conn_type(conn_type);
        if self.settings.unvalidated == Unvalidated::Refuse {
            return Err(LookupError::new(
                ErrorCode::UnvalidatedRefused,
                format!(
                    "connection {key}: conn_type {shown} cannot be proven to log in, and this sidecar serves only proven connections (unvalidated = refuse)"
                ),
            ));
        }
        let answer = crate::pipeline::unvalidated::to_airflow(version.value.expose_secret())
            .map_err(|m| {
                LookupError::new(
                    ErrorCode::SecretMalformed,
                    format!(
                        "connection {key}: secret {} (version {}): {m}",
                        source.secret_id, version.version_id
                    ),
                )
            })?;
        let expires_at = Instant::now()
            + self
                .settings
                .secret_ttl
                .saturating_sub(version.fetched_at.elapsed());
        Ok(stages::served(
            key,
            source,
            version,
            Stage::Current,
            answer.body,
            None,
            expires_at,
        ))
    }
}

/// Step 1's id rule, shared by connections, variables and config.
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
