//! On-demand rotation checks: "is what Airflow gets right now good, and is
//! the rotation in flight healthy?"
//!
//! Bypasses every cache: DescribeSecret for the rotation metadata and the
//! version → stage map, then each stage present is fetched and tried against
//! the database. The cache is updated to the version that should be served.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cache::Served;
use crate::error::{ErrorCode, LookupError};
use crate::resolve::{check_id, Attempt, Freshness, Resolver};
use crate::sources::secrets_manager::{AWSCURRENT, AWSPENDING, AWSPREVIOUS};

/// The one-word answer of a rotation check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// AWSCURRENT logs in and no rotation is in flight.
    Ok,
    /// The cache held an older version; it now holds AWSCURRENT.
    RefreshedStaleCache,
    /// An AWSPENDING version exists and AWSCURRENT still logs in.
    RotationInProgress,
    /// AWSPENDING older than `rotation_stuck_after`, or RDS says `impaired`.
    RotationStuck,
    /// AWSCURRENT is rejected, AWSPENDING logs in (and is served).
    CurrentRejectedPendingOk,
    /// Nothing logs in.
    CurrentRejected,
    /// Postgres could not be reached.
    DatabaseUnreachable,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::RefreshedStaleCache => "refreshed_stale_cache",
            Verdict::RotationInProgress => "rotation_in_progress",
            Verdict::RotationStuck => "rotation_stuck",
            Verdict::CurrentRejectedPendingOk => "current_rejected_pending_ok",
            Verdict::CurrentRejected => "current_rejected",
            Verdict::DatabaseUnreachable => "database_unreachable",
        }
    }

    /// Verdicts that need nobody to act (the CLI exits 0 for these).
    pub fn needs_no_action(self) -> bool {
        matches!(
            self,
            Verdict::Ok | Verdict::RefreshedStaleCache | Verdict::RotationInProgress
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: &'static str,
    pub version_id: String,
    /// When this version was created (RFC 3339), when AWS says.
    pub created: Option<String>,
    /// `ok`, `rejected`, `unreachable` or `malformed`.
    pub login: &'static str,
    /// The Postgres (or parse) error when the login failed; never a password.
    pub error: Option<String>,
    pub elapsed_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServedVersion {
    pub stage: &'static str,
    pub version_id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RotationReport {
    pub conn_id: String,
    pub secret_id: String,
    pub secret_arn: String,
    pub verdict: Verdict,
    /// One sentence saying why.
    pub message: String,
    pub rotation_enabled: bool,
    pub last_rotated: Option<String>,
    pub next_rotation: Option<String>,
    /// RDS `MasterUserSecret.SecretStatus` (creating | active | rotating | impaired).
    pub rds_master_secret_status: Option<String>,
    pub stages: Vec<StageReport>,
    /// The version now served (and cached), if any logs in.
    pub served: Option<ServedVersion>,
    /// The version the cache held before the check.
    pub previously_cached_version: Option<String>,
}

fn rfc3339(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

impl Resolver {
    /// Check one connection's rotation state, bypassing every cache.
    pub async fn rotation_check(&self, conn_id: &str) -> Result<RotationReport, LookupError> {
        check_id(conn_id)?;
        let previously_cached_version = match self.caches.answers.get(conn_id).await {
            Some(Ok(served)) => Some(served.version_id.clone()),
            _ => None,
        };
        let mut source = self.map(conn_id, Freshness::Fresh).await?;
        let secret_id = source.secret_id.clone();
        let meta = self.describe(&secret_id).await?.ok_or_else(|| {
            LookupError::new(
                ErrorCode::NotFound,
                format!("connection {conn_id}: secret {secret_id} does not exist"),
            )
        })?;

        // Try every stage present, in the order lookups fall back.
        let mut stages = Vec::new();
        let mut winners: Vec<Served> = Vec::new();
        let mut pending_created = None;
        for stage in [AWSCURRENT, AWSPENDING, AWSPREVIOUS] {
            let Some(version) = self.fetch(&secret_id, stage, Freshness::Fresh).await? else {
                continue;
            };
            // A pending label still on the current version is no rotation in flight.
            if stage == AWSPENDING && version.stages.iter().any(|s| s == AWSCURRENT) {
                continue;
            }
            if stage == AWSPENDING {
                pending_created = version.created;
            }
            let started = std::time::Instant::now();
            let attempt = match crate::resolve::parse_version(conn_id, &version) {
                Err(m) => Err(Attempt::Malformed(m)),
                Ok(cred) => {
                    self.locate(conn_id, &mut source, &cred, Freshness::Fresh)
                        .await?;
                    self.try_version(
                        conn_id,
                        &source,
                        source.endpoint.as_deref(),
                        &version,
                        &cred,
                        stage,
                        Freshness::Fresh,
                    )
                    .await
                }
            };
            let (login, error) = match attempt {
                Ok(served) => {
                    winners.push(served);
                    ("ok", None)
                }
                Err(Attempt::Rejected(e)) => ("rejected", Some(e)),
                Err(Attempt::Unreachable(e)) => ("unreachable", Some(e)),
                Err(Attempt::Malformed(e)) => ("malformed", Some(e)),
            };
            stages.push(StageReport {
                stage,
                version_id: version.version_id.clone(),
                created: rfc3339(version.created),
                login,
                error,
                elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
            });
        }

        let rds_status = source
            .endpoint
            .as_ref()
            .filter(|e| e.master_secret_arn.as_deref() == Some(meta.arn.as_str()))
            .and_then(|e| e.master_secret_status.clone());
        let login_of = |stage: &str| stages.iter().find(|s| s.stage == stage).map(|s| s.login);
        let current = login_of(AWSCURRENT);
        let pending = login_of(AWSPENDING);
        let pending_age = pending_created.and_then(|c| SystemTime::now().duration_since(c).ok());
        let stuck_after = self.settings.rotation_stuck_after;
        let pending_stuck = pending.is_some() && pending_age.is_some_and(|a| a > stuck_after);
        let current_version = stages
            .iter()
            .find(|s| s.stage == AWSCURRENT)
            .map(|s| s.version_id.clone());

        let (verdict, message) = if current == Some("unreachable") {
            (
                Verdict::DatabaseUnreachable,
                "Postgres could not be reached with AWSCURRENT".to_string(),
            )
        } else if rds_status.as_deref() == Some("impaired") {
            (
                Verdict::RotationStuck,
                "RDS reports the managed master secret as impaired".to_string(),
            )
        } else if pending_stuck {
            (
                Verdict::RotationStuck,
                format!(
                    "AWSPENDING has waited {} without being promoted (threshold {})",
                    humantime::format_duration(round(pending_age.unwrap_or_default())),
                    humantime::format_duration(stuck_after)
                ),
            )
        } else if current == Some("ok") && pending.is_some() {
            (
                Verdict::RotationInProgress,
                "an AWSPENDING version exists and AWSCURRENT still logs in".to_string(),
            )
        } else if current == Some("ok")
            && previously_cached_version.is_some()
            && previously_cached_version != current_version
        {
            (
                Verdict::RefreshedStaleCache,
                "the cache held an older version; it now holds AWSCURRENT".to_string(),
            )
        } else if current == Some("ok") {
            (
                Verdict::Ok,
                "AWSCURRENT logs in and no rotation is in flight".to_string(),
            )
        } else if pending == Some("ok") {
            (
                Verdict::CurrentRejectedPendingOk,
                "AWSCURRENT is rejected and AWSPENDING logs in: between setSecret and finishSecret; serving AWSPENDING".to_string(),
            )
        } else if winners.iter().any(|w| w.stage == AWSPREVIOUS) {
            (
                Verdict::CurrentRejected,
                "AWSCURRENT is rejected; only AWSPREVIOUS logs in (served for now)".to_string(),
            )
        } else {
            (Verdict::CurrentRejected, "no version logs in".to_string())
        };

        // The first stage that logged in is what lookups should get now.
        let served = winners.into_iter().next().map(Arc::new);
        if let Some(s) = &served {
            self.caches
                .answers
                .insert(conn_id.to_string(), Ok(s.clone()))
                .await;
            self.caches
                .last_good
                .insert(conn_id.to_string(), s.clone())
                .await;
        } else {
            self.caches.answers.invalidate(conn_id).await;
            self.caches.last_good.invalidate(conn_id).await;
        }
        self.metrics.rotation_check(verdict.as_str());
        tracing::info!(conn_id, verdict = verdict.as_str(), "rotation check");
        Ok(RotationReport {
            conn_id: conn_id.to_string(),
            secret_id,
            secret_arn: meta.arn.clone(),
            verdict,
            message,
            rotation_enabled: meta.rotation_enabled,
            last_rotated: rfc3339(meta.last_rotated),
            next_rotation: rfc3339(meta.next_rotation),
            rds_master_secret_status: rds_status,
            stages,
            served: served.map(|s| ServedVersion {
                stage: s.stage,
                version_id: s.version_id.clone(),
            }),
            previously_cached_version,
        })
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

impl RotationReport {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("the report always serializes")
    }

    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "connection {} (secret {})\n  verdict: {} - {}\n",
            self.conn_id,
            self.secret_id,
            self.verdict.as_str(),
            self.message
        );
        out.push_str(&format!(
            "  rotation: {}, last {}, next {}\n",
            if self.rotation_enabled {
                "enabled"
            } else {
                "not enabled"
            },
            self.last_rotated.as_deref().unwrap_or("-"),
            self.next_rotation.as_deref().unwrap_or("-")
        ));
        if let Some(s) = &self.rds_master_secret_status {
            out.push_str(&format!("  RDS master secret status: {s}\n"));
        }
        for s in &self.stages {
            out.push_str(&format!(
                "  {:<11} {:<38} {:<11} {:>7.1} ms{}\n",
                s.stage,
                s.version_id,
                s.login,
                s.elapsed_ms,
                s.error
                    .as_deref()
                    .map(|e| format!("  {e}"))
                    .unwrap_or_default()
            ));
        }
        match &self.served {
            Some(s) => out.push_str(&format!("  serving: {} {}\n", s.stage, s.version_id)),
            None => out.push_str("  serving: nothing (no version logs in)\n"),
        }
        out
    }
}

impl Resolver {
    /// Every connection this process has served (still cached) or has
    /// configured, checked one after another.
    pub async fn rotation_check_all(&self) -> Vec<(String, Result<RotationReport, LookupError>)> {
        let mut ids: Vec<String> = self
            .caches
            .answers
            .iter()
            .filter(|(_, a)| a.is_ok())
            .map(|(k, _)| (*k).clone())
            .collect();
        ids.extend(self.settings.connections.keys().cloned());
        ids.sort();
        ids.dedup();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let report = self.rotation_check(&id).await;
            out.push((id, report));
        }
        out
    }
}
