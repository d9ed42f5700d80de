//! The caches that make the login check cheap.
//!
//! Four layers, each with its own lifetime, all `moka` caches, whose
//! `try_get_with` gives single-flight: N concurrent misses of one key run
//! the loader once and share its result.
//!
//! - `answers`: conn_id → the finished answer (the hot path: one hash
//!   lookup, pre-serialized JSON). Lives until the first of its secret or
//!   validation lifetimes ends; "not found" for `negative_ttl`; other
//!   failures for `error_ttl`.
//! - `secrets`: (secret id, stage) → the fetched version, `secret_ttl`
//!   ("does not exist" for `negative_ttl`).
//! - `endpoints`: RDS resource → endpoint metadata, `endpoint_ttl`.
//! - `validations`: (version, endpoint, user, TLS) → proven, `validation_ttl`.
//! - `last_good`: conn_id → the last answer that logged in, kept `max_stale`
//!   for stale-if-error.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache;
use moka::Expiry;

use crate::config::{Settings, SslMode};
use crate::error::{ErrorCode, LookupError};
use crate::sources::rds::{Endpoint, RdsTarget};
use crate::sources::secrets_manager::SecretVersion;
use crate::validate::LoginTarget;

/// A connection proven to log in, ready to send.
pub struct Served {
    pub conn_id: String,
    /// The Airflow JSON, serialized once. Holds the password: never logged.
    pub body: Bytes,
    /// The staging label whose version this is.
    pub stage: &'static str,
    /// The id this version was fetched by (the `secrets` cache key).
    pub secret_id: String,
    pub secret_arn: String,
    pub version_id: String,
    /// When AWS last confirmed this version (fetch or version check).
    pub fetched_at: Instant,
    pub validated_at: Instant,
    /// When the answers cache lets go of it.
    pub expires_at: Instant,
    /// Set when served from `last_good` because AWS failed.
    pub stale: bool,
    /// How this answer logs in (for re-proving it while AWS fails).
    pub login: LoginTarget,
    /// Read since the last refresh-ahead pass (only hot entries are refreshed).
    pub used: AtomicBool,
    /// When this answer was computed, and what each step cost.
    pub created: Instant,
    pub steps: StepTimes,
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

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("conn_id", &self.conn_id)
            .field("body", &"[redacted]")
            .field("stage", &self.stage)
            .field("secret_id", &self.secret_id)
            .field("version_id", &self.version_id)
            .field("stale", &self.stale)
            .finish()
    }
}

/// What a lookup of one conn_id produced, success or failure, as cached.
pub type Answer = Result<Arc<Served>, LookupError>;

pub type Fetched = Option<SecretVersion>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ValidationKey {
    pub version_id: String,
    pub secret_arn: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
}

struct AnswerExpiry {
    negative: Duration,
    error: Duration,
}

impl AnswerExpiry {
    fn ttl(&self, answer: &Answer, now: Instant) -> Duration {
        match answer {
            Ok(served) => served.expires_at.saturating_duration_since(now),
            Err(e) if e.code == ErrorCode::NotFound => self.negative,
            Err(_) => self.error,
        }
    }
}

impl Expiry<String, Answer> for AnswerExpiry {
    fn expire_after_create(&self, _: &String, v: &Answer, now: Instant) -> Option<Duration> {
        Some(self.ttl(v, now))
    }
    fn expire_after_update(
        &self,
        _: &String,
        v: &Answer,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.ttl(v, now))
    }
}

struct SecretExpiry {
    found: Duration,
    missing: Duration,
}

impl Expiry<(String, &'static str), Arc<Fetched>> for SecretExpiry {
    fn expire_after_create(
        &self,
        _: &(String, &'static str),
        v: &Arc<Fetched>,
        _: Instant,
    ) -> Option<Duration> {
        Some(if v.is_some() {
            self.found
        } else {
            self.missing
        })
    }
    fn expire_after_update(
        &self,
        k: &(String, &'static str),
        v: &Arc<Fetched>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(k, v, now)
    }
}

pub struct Caches {
    pub answers: Cache<String, Answer>,
    pub secrets: Cache<(String, &'static str), Arc<Fetched>>,
    pub endpoints: Cache<RdsTarget, Arc<Endpoint>>,
    /// secret id → the RDS resource its tags name (None: no such tags).
    pub secret_targets: Cache<String, Option<RdsTarget>>,
    pub validations: Cache<ValidationKey, Instant>,
    pub last_good: Cache<String, Arc<Served>>,
}

impl Caches {
    pub fn new(s: &Settings) -> Self {
        // Each conn_id holds at most a few entries per layer (three stages,
        // one endpoint); bound every layer by a multiple of cache_size.
        let n = s.cache_size;
        Caches {
            answers: Cache::builder()
                .max_capacity(n)
                .expire_after(AnswerExpiry {
                    negative: s.negative_ttl,
                    error: s.error_ttl,
                })
                .build(),
            secrets: Cache::builder()
                .max_capacity(n * 3)
                .expire_after(SecretExpiry {
                    found: s.secret_ttl,
                    missing: s.negative_ttl,
                })
                .build(),
            endpoints: Cache::builder()
                .max_capacity(n)
                .time_to_live(s.endpoint_ttl)
                .build(),
            secret_targets: Cache::builder()
                .max_capacity(n)
                .time_to_live(s.endpoint_ttl)
                .build(),
            validations: Cache::builder()
                .max_capacity(n * 3)
                .time_to_live(s.validation_ttl)
                .build(),
            last_good: Cache::builder()
                .max_capacity(n)
                .time_to_live(s.max_stale)
                .build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_an_answer_never_shows_the_body() {
        let now = Instant::now();
        let served = Served {
            conn_id: "c".into(),
            body: Bytes::from_static(br#"{"password":"hunter2-xyz"}"#),
            stage: "AWSCURRENT",
            secret_id: "airflow/connections/c".into(),
            secret_arn: "arn".into(),
            version_id: "v1".into(),
            fetched_at: now,
            validated_at: now,
            expires_at: now,
            stale: false,
            login: LoginTarget {
                host: "h".into(),
                port: 5432,
                database: "d".into(),
                user: "u".into(),
                password: "hunter2-xyz".to_string().into(),
                sslmode: SslMode::VerifyFull,
                sslrootcert: None,
            },
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
