//! The stage walk: which version of a secret is served when Postgres
//! rejects AWSCURRENT, and the fallback policy that bounds it. Shared by
//! lookups and rotation checks.
//!
//! Between a rotation's setSecret and finishSecret steps the database already
//! has the AWSPENDING password (single-user rotation); with alternating users
//! AWSPREVIOUS still logs in. So a rejected AWSCURRENT is re-fetched (our copy
//! may be old), then AWSPENDING and AWSPREVIOUS are tried, under two bounds:
//!
//! - AWSPENDING only while a rotation is in flight: a version younger than
//!   `rotation_stuck_after`. An abandoned rotation's candidate is not served.
//! - AWSPREVIOUS only within `serve_previous_for` of the AWSCURRENT version's
//!   creation (0 turns it off): right after a rotation, not forever.
//!
//! An AWS error while fetching one stage is that stage's refusal; the walk
//! goes on with the next.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use crate::airflow::credential::Credential;
use crate::aws::secrets_manager::{SecretVersion, Stage};
use crate::cache::{ConnKey, Served, StepTimes};
use crate::config::Settings;
use crate::error::{ErrorCode, LookupError};
use crate::pipeline::login_plan;
use crate::pipeline::map::Source;
use crate::pipeline::{Pipeline, Policy, Use};
use crate::postgres::validate::Outcome;

/// Why one version could not be served.
#[derive(Debug, Clone)]
pub enum Attempt {
    Rejected(String),
    Unreachable(String),
    Malformed(String),
    /// The server asked for a password it may not be sent: every version
    /// would meet the same server, so the walk stops.
    Withheld(String),
}

impl Attempt {
    pub fn word(&self) -> &'static str {
        match self {
            Attempt::Rejected(_) => "rejected",
            Attempt::Unreachable(_) => "unreachable",
            Attempt::Malformed(_) => "malformed",
            Attempt::Withheld(_) => "withheld",
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Attempt::Rejected(r)
            | Attempt::Unreachable(r)
            | Attempt::Malformed(r)
            | Attempt::Withheld(r) => r,
        }
    }
}

/// How a walk ended without an answer.
pub enum WalkFailed {
    /// The database could not be reached (the caller may follow a moved endpoint).
    Unreachable(String),
    Failed(LookupError),
}

fn withheld(key: &ConnKey, why: String) -> WalkFailed {
    WalkFailed::Failed(LookupError::new(
        ErrorCode::PasswordWithheld,
        format!("connection {key}: {why}"),
    ))
}

/// Fallback stages, in the order they are tried after a rejected AWSCURRENT.
const FALLBACKS: [Stage; 3] = [Stage::Current, Stage::Pending, Stage::Previous];

/// Log in with AWSCURRENT; when Postgres rejects it, walk the fallback stages.
pub async fn walk(
    p: &Pipeline,
    key: &ConnKey,
    source: &Source<'_>,
    current: &SecretVersion,
    cred: &Credential,
    policy: Policy,
) -> Result<Served, WalkFailed> {
    let mut refusals: Vec<String> = Vec::new();
    match try_version(p, key, source, current, cred, Stage::Current, policy).await {
        Ok(served) => return Ok(served),
        Err(Attempt::Unreachable(why)) => return Err(WalkFailed::Unreachable(why)),
        Err(Attempt::Malformed(why)) => return Err(malformed(key, source, current, why)),
        Err(Attempt::Withheld(why)) => return Err(withheld(key, why)),
        Err(Attempt::Rejected(why)) => refusals.push(why),
    }
    let mut refused_versions = vec![current.version_id.clone()];
    let mut newest_current = current.clone();
    let fresh = Policy {
        aws: Use::Fresh,
        login: Use::Fresh,
        ..policy
    };
    for stage in FALLBACKS {
        let version = match p
            .aws
            .fetch(&source.secret_id, stage, Use::Fresh, policy.attempts)
            .await
        {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                refusals.push(format!("{stage}: {}", e.message));
                continue;
            }
        };
        if stage == Stage::Current {
            newest_current = version.clone();
        }
        if refused_versions.contains(&version.version_id) {
            continue;
        }
        refused_versions.push(version.version_id.clone());
        if let Some(why) = fallback_refusal(
            &p.settings,
            stage,
            &version,
            &newest_current,
            SystemTime::now(),
        ) {
            refusals.push(why);
            continue;
        }
        let attempt =
            match crate::airflow::credential::parse_version(&version.value, &version.version_id) {
                Ok(cred) => try_version(p, key, source, &version, &cred, stage, fresh).await,
                Err(why) => Err(Attempt::Malformed(why)),
            };
        match attempt {
            Ok(served) => {
                tracing::warn!(conn_id = %key, stage = %stage, version = %version.version_id,
                    "serving a fallback version: AWSCURRENT was rejected by Postgres");
                return Ok(served);
            }
            Err(Attempt::Unreachable(why)) => return Err(WalkFailed::Unreachable(why)),
            Err(Attempt::Withheld(why)) => return Err(withheld(key, why)),
            Err(Attempt::Rejected(why) | Attempt::Malformed(why)) => refusals.push(why),
        }
    }
    Err(WalkFailed::Failed(LookupError::new(
        ErrorCode::CredentialsRejected,
        format!(
            "connection {key}: no version of secret {} logs in: {}",
            source.secret_id,
            refusals.join("; ")
        ),
    )))
}

fn malformed(key: &ConnKey, source: &Source<'_>, v: &SecretVersion, why: String) -> WalkFailed {
    WalkFailed::Failed(LookupError::new(
        ErrorCode::SecretMalformed,
        format!(
            "connection {key}: secret {} (version {}): {why}",
            source.secret_id, v.version_id
        ),
    ))
}

/// Why a fallback `stage` may not be served (None: it may be tried).
pub fn fallback_refusal(
    settings: &Settings,
    stage: Stage,
    version: &SecretVersion,
    current: &SecretVersion,
    now: SystemTime,
) -> Option<String> {
    // A date out of range (AWS never sends one) or in the future is unknown.
    let age = |created: Option<SystemTime>| {
        crate::aws::secrets_manager::usable_date(created).and_then(|c| now.duration_since(c).ok())
    };
    let shown =
        |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
    match stage {
        Stage::Pending => match age(version.created) {
            Some(a) if a <= settings.rotation_stuck_after => None,
            Some(a) => Some(format!(
                "AWSPENDING (version {}) was created {} ago, longer than rotation_stuck_after ({}): an abandoned rotation is not served",
                version.version_id,
                shown(a),
                shown(settings.rotation_stuck_after)
            )),
            None => Some(format!(
                "AWSPENDING (version {}) has no usable creation date (none, in the future or out of range): not served",
                version.version_id
            )),
        },
        Stage::Previous if settings.serve_previous_for.is_zero() => {
            Some("AWSPREVIOUS is never served (serve_previous_for = 0)".to_string())
        }
        Stage::Previous => match age(current.created) {
            Some(a) if a <= settings.serve_previous_for => None,
            Some(a) => Some(format!(
                "AWSPREVIOUS is served only within serve_previous_for ({}) of a rotation; AWSCURRENT (version {}) is {} old",
                shown(settings.serve_previous_for),
                current.version_id,
                shown(a)
            )),
            None => Some(
                "AWSPREVIOUS: AWSCURRENT has no usable creation date (none, in the future or out of range); not served"
                    .to_string(),
            ),
        },
        _ => None,
    }
}

/// Plan and prove the login of one version and, if it logs in, build the
/// answer (steps 4 and 5 for one version).
pub async fn try_version(
    p: &Pipeline,
    key: &ConnKey,
    source: &Source<'_>,
    version: &SecretVersion,
    cred: &Credential,
    stage: Stage,
    policy: Policy,
) -> Result<Served, Attempt> {
    let (target, answer) =
        login_plan::plan(&p.settings, source.entry, source.endpoint.as_deref(), cred)
            .map_err(Attempt::Malformed)?;
    let proven_at = p
        .proofs
        .prove(
            &target,
            &version.version_id,
            &version.arn,
            policy.login == Use::Fresh,
        )
        .await
        .map_err(|checked| match checked.outcome {
            Outcome::Rejected { message, .. } => Attempt::Rejected(format!(
                "{stage} (version {}): {}:{} rejected {}: {message}",
                version.version_id, target.host, target.port, target.user
            )),
            Outcome::Unreachable { message } => {
                // Name the option when it is what made the server unusable.
                let attrs = match target.options.target_session_attrs {
                    Some(a) if a != crate::postgres::validate::SessionAttrs::Any => {
                        format!(" (extra target_session_attrs={})", a.as_str())
                    }
                    _ => String::new(),
                };
                Attempt::Unreachable(format!("{}:{}: {message}{attrs}", target.host, target.port))
            }
            Outcome::Misconfigured { message } => Attempt::Malformed(message),
            Outcome::Withheld { message } => {
                Attempt::Withheld(format!("{}:{}: {message}", target.host, target.port))
            }
            Outcome::Ok => unreachable!("prove returns Ok for Outcome::Ok"),
        })?;
    let s = &p.settings;
    let expires_at = Instant::now()
        + s.secret_ttl
            .saturating_sub(version.fetched_at.elapsed())
            .min(s.validation_ttl.saturating_sub(proven_at.elapsed()));
    Ok(served(
        key,
        source,
        version,
        stage,
        Bytes::from(answer.to_json()),
        Some((target, proven_at)),
        expires_at,
    ))
}

/// An answer built from one version.
pub fn served(
    key: &ConnKey,
    source: &Source<'_>,
    version: &SecretVersion,
    stage: Stage,
    body: Bytes,
    login: Option<(crate::postgres::validate::LoginTarget, Instant)>,
    expires_at: Instant,
) -> Served {
    let now = Instant::now();
    Served {
        key: key.clone(),
        body,
        stage,
        secret_id: source.secret_id.clone(),
        // Secret names and ARNs are printable ASCII; anything else gets an empty header.
        secret_header: hyper::header::HeaderValue::from_str(&source.secret_id)
            .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("")),
        secret_arn: version.arn.clone(),
        version_id: version.version_id.clone(),
        fetched_at: version.fetched_at,
        login,
        expires_at,
        stale: false,
        used: std::sync::atomic::AtomicBool::new(false),
        created: now,
        steps: StepTimes::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SettingArgs;

    fn version(id: &str, created_ago: Option<u64>, now: SystemTime) -> SecretVersion {
        SecretVersion {
            arn: "arn:secret".into(),
            version_id: id.into(),
            stages: vec![],
            created: created_ago.map(|s| now - Duration::from_secs(s)),
            value: String::new().into(),
            fetched_at: Instant::now(),
        }
    }

    #[test]
    fn pending_only_while_a_rotation_is_in_flight() {
        let mut s = Settings::from_args(SettingArgs::default()).unwrap();
        s.rotation_stuck_after = Duration::from_secs(3600);
        let now = SystemTime::now();
        let current = version("c", Some(86400), now);
        assert!(fallback_refusal(
            &s,
            Stage::Pending,
            &version("p", Some(60), now),
            &current,
            now
        )
        .is_none());
        let old = fallback_refusal(
            &s,
            Stage::Pending,
            &version("p", Some(7200), now),
            &current,
            now,
        )
        .unwrap();
        assert!(
            old.contains("abandoned") && old.contains("version p"),
            "{old}"
        );
        assert!(
            fallback_refusal(&s, Stage::Pending, &version("p", None, now), &current, now).is_some()
        );
    }

    /// A creation date out of range (or in the future) is unknown: the
    /// fallback is not served, and nothing panics on the arithmetic.
    #[test]
    fn fallbacks_with_creation_dates_out_of_range_are_not_served() {
        let s = Settings::from_args(SettingArgs::default()).unwrap();
        let now = SystemTime::now();
        let epoch = SystemTime::UNIX_EPOCH;
        let at = |t: SystemTime| SecretVersion {
            created: Some(t),
            ..version("x", None, now)
        };
        for t in [
            epoch + Duration::from_secs(i64::MAX as u64),
            epoch + Duration::from_secs(253_402_300_800),
            now + Duration::from_secs(60),
            epoch - Duration::from_secs(1),
            epoch - Duration::from_secs(i64::MAX as u64),
        ] {
            let why = fallback_refusal(&s, Stage::Pending, &at(t), &at(now), now).unwrap();
            assert!(why.contains("no usable creation date"), "{t:?}: {why}");
            let why = fallback_refusal(&s, Stage::Previous, &at(now), &at(t), now).unwrap();
            assert!(why.contains("no usable creation date"), "{t:?}: {why}");
        }
    }

    #[test]
    fn previous_only_within_serve_previous_for_of_the_rotation() {
        let mut s = Settings::from_args(SettingArgs::default()).unwrap();
        s.serve_previous_for = Duration::from_secs(24 * 3600);
        let now = SystemTime::now();
        let prev = version("old", Some(40 * 86400), now);
        let fresh_current = version("c", Some(3600), now);
        let old_current = version("c", Some(2 * 86400), now);
        assert!(fallback_refusal(&s, Stage::Previous, &prev, &fresh_current, now).is_none());
        assert!(
            fallback_refusal(&s, Stage::Previous, &prev, &old_current, now)
                .unwrap()
                .contains("serve_previous_for")
        );
        s.serve_previous_for = Duration::ZERO;
        assert!(
            fallback_refusal(&s, Stage::Previous, &prev, &fresh_current, now)
                .unwrap()
                .contains("never served")
        );
        assert!(fallback_refusal(&s, Stage::Current, &prev, &fresh_current, now).is_none());
    }
}
