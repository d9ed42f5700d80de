//! On-demand rotation checks: "is what Airflow gets right now good, and is
//! the rotation in flight healthy?"
//!
//! Bypasses every cache: DescribeSecret for the rotation metadata and the
//! version → stage map, then each stage present is fetched and tried against
//! the database. The front (coalescing, bounds, caching) is in `front`.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::airflow::credential;
use crate::aws::calls::Attempts;
use crate::aws::secrets_manager::{usable_date, Stage};
use crate::cache::{ConnKey, Served};
use crate::error::{ErrorCode, LookupError};
use crate::pipeline::map;
use crate::pipeline::stages::{self, Attempt};
use crate::pipeline::{Pipeline, Policy, Use};

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
    /// A connection type the sidecar cannot log in with: no login was tried.
    NotValidated,
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
            Verdict::NotValidated => "not_validated",
        }
    }

    /// Verdicts that need nobody to act (the CLI exits 0 for these).
    pub fn needs_no_action(self) -> bool {
        matches!(
            self,
            Verdict::Ok
                | Verdict::RefreshedStaleCache
                | Verdict::RotationInProgress
                | Verdict::NotValidated
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub stage: Stage,
    pub version_id: String,
    /// When this version was created (RFC 3339), when AWS says.
    pub created: Option<String>,
    /// `ok`, `rejected`, `unreachable`, `malformed`, `aws_error` or `not_tried`.
    pub login: &'static str,
    /// The Postgres (or parse, or AWS) error when the login failed; never a password.
    pub error: Option<String>,
    /// Why a version that logs in is not served anyway (the fallback policy).
    pub served_refused: Option<String>,
    pub elapsed_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServedVersion {
    pub stage: Stage,
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
    /// What the report could not show as AWS sent it (a date out of range).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A date for the report (RFC 3339, seconds); a date AWS sent outside
/// 1970..=9999 is shown as null, with a note naming the field (`what`), and
/// never formatted (formatting it panics).
fn rfc3339(t: Option<SystemTime>, what: &str, notes: &mut Vec<String>) -> Option<String> {
    let t = t?;
    match usable_date(Some(t)) {
        Some(t) => Some(humantime::format_rfc3339_seconds(t).to_string()),
        None => {
            notes.push(format!(
                "{what}: AWS sent a date outside 1970-01-01..9999-12-31; shown as null and treated as unknown"
            ));
            None
        }
    }
}

impl Verdict {
    /// The error lookups get when a check finds nothing to serve.
    pub fn error_code(self) -> ErrorCode {
        match self {
            Verdict::DatabaseUnreachable => ErrorCode::DatabaseUnreachable,
            _ => ErrorCode::CredentialsRejected,
        }
    }
}

/// Check one connection's rotation state, bypassing every cache: every
/// stage DescribeSecret lists is fetched and tried against the database.
/// Returns the report and the version lookups should get now (the first
/// stage that logs in and that the fallback policy lets us serve).
pub async fn check(
    p: &Pipeline,
    key: &ConnKey,
    previously_cached_version: Option<String>,
) -> Result<(RotationReport, Option<Served>), LookupError> {
    let ctx = |e: LookupError| e.context(&format!("connection {key}"));
    let mut source = map::map(&p.settings, &p.aws, key, Policy::FRESH)
        .await
        .map_err(ctx)?;
    let current = map::fetch_current(&p.aws, &mut source, Policy::FRESH)
        .await
        .map_err(ctx)?;
    let secret_id = source.secret_id.clone();
    let meta = p
        .aws
        .describe(&secret_id, Attempts::Retried)
        .await
        .map_err(ctx)?
        .ok_or_else(|| {
            LookupError::new(
                ErrorCode::NotFound,
                format!("connection {key}: secret {secret_id} does not exist"),
            )
        })?;

    if let Ok(credential::Kind::Other { conn_type }) =
        credential::classify(secrecy::ExposeSecret::expose_secret(&current.value))
    {
        let served = p.unvalidated(key, &source, &current, conn_type.as_deref())?;
        let shown = credential::shown_conn_type(conn_type.as_deref());
        let mut notes = Vec::new();
        let last_rotated = rfc3339(meta.last_rotated, "last_rotated", &mut notes);
        let next_rotation = rfc3339(meta.next_rotation, "next_rotation", &mut notes);
        let created = rfc3339(current.created, "AWSCURRENT created", &mut notes);
        let report = RotationReport {
            conn_id: key.conn_id().to_string(),
            secret_id,
            secret_arn: meta.arn.clone(),
            verdict: Verdict::NotValidated,
            message: format!(
                "conn_type {shown}: no login was tried (the sidecar proves Postgres logins only); AWSCURRENT is served unvalidated"
            ),
            rotation_enabled: meta.rotation_enabled,
            last_rotated,
            next_rotation,
            rds_master_secret_status: None,
            stages: vec![StageReport {
                stage: Stage::Current,
                version_id: current.version_id.clone(),
                created,
                login: "not_tried",
                error: None,
                served_refused: None,
                elapsed_ms: 0.0,
            }],
            served: Some(ServedVersion {
                stage: Stage::Current,
                version_id: current.version_id.clone(),
            }),
            previously_cached_version,
            notes,
        };
        return Ok((report, Some(served)));
    }

    // Try every stage present, in the order lookups fall back.
    let mut stages = Vec::new();
    let mut notes = Vec::new();
    let mut served: Option<Served> = None;
    let mut pending_created = None;
    for stage in [Stage::Current, Stage::Pending, Stage::Previous] {
        let version = if stage == Stage::Current {
            current.clone()
        } else {
            // Only what DescribeSecret lists: no call for an absent stage.
            if meta.version_with(stage).is_none() {
                continue;
            }
            match p
                .aws
                .fetch(&secret_id, stage, Use::Fresh, Attempts::Retried)
                .await
            {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) => {
                    stages.push(StageReport {
                        stage,
                        version_id: meta.version_with(stage).unwrap_or_default().to_string(),
                        created: None,
                        login: "aws_error",
                        error: Some(e.message),
                        served_refused: None,
                        elapsed_ms: 0.0,
                    });
                    continue;
                }
            }
        };
        // A pending label still on the current version is no rotation in flight.
        if stage == Stage::Pending && Stage::Current.is_in(&version.stages) {
            continue;
        }
        if stage == Stage::Pending {
            pending_created = usable_date(version.created);
        }
        let started = std::time::Instant::now();
        let attempt = match credential::parse_version(&version.value, &version.version_id) {
            Err(m) => Err(Attempt::Malformed(m)),
            Ok(cred) => {
                map::locate(&p.aws, &mut source, &cred, Policy::FRESH)
                    .await
                    .map_err(ctx)?;
                stages::try_version(p, key, &source, &version, &cred, stage, Policy::FRESH).await
            }
        };
        let refused =
            stages::fallback_refusal(&p.settings, stage, &version, &current, SystemTime::now());
        let (login, error, served_refused) = match attempt {
            Ok(ok) => {
                if served.is_none() && refused.is_none() {
                    served = Some(ok);
                }
                ("ok", None, refused)
            }
            Err(a) => (a.word(), Some(a.reason().to_string()), None),
        };
        stages.push(StageReport {
            stage,
            version_id: version.version_id.clone(),
            created: rfc3339(version.created, &format!("{stage} created"), &mut notes),
            login,
            error,
            served_refused,
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        });
    }

    let rds_status = source
        .endpoint
        .as_ref()
        .filter(|e| e.master_secret_arn.as_deref() == Some(meta.arn.as_str()))
        .and_then(|e| e.master_secret_status.clone());
    let login_of = |stage: Stage| stages.iter().find(|s| s.stage == stage).map(|s| s.login);
    let current_login = login_of(Stage::Current);
    let pending = login_of(Stage::Pending);
    let pending_age = pending_created.and_then(|c| SystemTime::now().duration_since(c).ok());
    let stuck_after = p.settings.rotation_stuck_after;
    let pending_stuck = pending.is_some() && pending_age.is_some_and(|a| a > stuck_after);
    let current_version = Some(current.version_id.clone());

    let (verdict, message) = if current_login == Some("unreachable") {
        (
            Verdict::DatabaseUnreachable,
            "Postgres could not be reached with AWSCURRENT".to_string(),
        )
    } else if current_login == Some("withheld") {
        (
            Verdict::DatabaseUnreachable,
            "AWSCURRENT's server asked for a password that is never sent to a server whose identity was not verified".to_string(),
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
    } else if current_login == Some("ok") && pending.is_some() {
        (
            Verdict::RotationInProgress,
            "an AWSPENDING version exists and AWSCURRENT still logs in".to_string(),
        )
    } else if current_login == Some("ok")
        && previously_cached_version.is_some()
        && previously_cached_version != current_version
    {
        (
            Verdict::RefreshedStaleCache,
            "the cache held an older version; it now holds AWSCURRENT".to_string(),
        )
    } else if current_login == Some("ok") {
        (
            Verdict::Ok,
            "AWSCURRENT logs in and no rotation is in flight".to_string(),
        )
    } else if pending == Some("ok") {
        (
            Verdict::CurrentRejectedPendingOk,
            "AWSCURRENT is rejected and AWSPENDING logs in: between setSecret and finishSecret; serving AWSPENDING".to_string(),
        )
    } else if served.as_ref().is_some_and(|w| w.stage == Stage::Previous) {
        (
            Verdict::CurrentRejected,
            "AWSCURRENT is rejected; only AWSPREVIOUS logs in (served for now, within serve_previous_for)".to_string(),
        )
    } else {
        (
            Verdict::CurrentRejected,
            "no version that may be served logs in".to_string(),
        )
    };

    let report = RotationReport {
        conn_id: key.conn_id().to_string(),
        secret_id,
        secret_arn: meta.arn.clone(),
        verdict,
        message,
        rotation_enabled: meta.rotation_enabled,
        last_rotated: rfc3339(meta.last_rotated, "last_rotated", &mut notes),
        next_rotation: rfc3339(meta.next_rotation, "next_rotation", &mut notes),
        rds_master_secret_status: rds_status,
        stages,
        served: served.as_ref().map(|s| ServedVersion {
            stage: s.stage,
            version_id: s.version_id.clone(),
        }),
        previously_cached_version,
        notes,
    };
    Ok((report, served))
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
        for note in &self.notes {
            out.push_str(&format!("  note: {note}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// humantime panics on dates before 1970 or after 9999: those are
    /// null with a note, never formatted.
    #[test]
    fn dates_out_of_range_are_null_with_a_note_never_a_panic() {
        let epoch = SystemTime::UNIX_EPOCH;
        let mut notes = Vec::new();
        assert_eq!(rfc3339(None, "x", &mut notes), None);
        assert_eq!(
            rfc3339(Some(epoch), "x", &mut notes).as_deref(),
            Some("1970-01-01T00:00:00Z")
        );
        let last = epoch + Duration::from_secs(crate::aws::secrets_manager::LAST_DATE_SECS);
        assert_eq!(
            rfc3339(Some(last), "x", &mut notes).as_deref(),
            Some("9999-12-31T23:59:59Z")
        );
        assert!(notes.is_empty());
        let extremes = [
            last + Duration::from_secs(1),
            epoch + Duration::from_secs(i64::MAX as u64),
            epoch - Duration::from_secs(1),
            epoch - Duration::from_secs(i64::MAX as u64),
        ];
        for t in extremes {
            assert_eq!(rfc3339(Some(t), "last_rotated", &mut notes), None, "{t:?}");
        }
        assert_eq!(notes.len(), extremes.len());
        assert!(notes[0].starts_with("last_rotated: ") && notes[0].contains("outside"));
    }
}
