//! AWS Secrets Manager: `GetSecretValue` (always with an explicit stage) and
//! `DescribeSecret` (rotation metadata, version → stage map, RDS tags).

use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use aws_sdk_secretsmanager::Client;
use secrecy::SecretString;

use super::calls::{Attempts, AwsFailure};

/// A staging label the sidecar reads: the version Secrets Manager serves
/// (`AWSCURRENT`), the one a rotation is testing (`AWSPENDING`), and the one
/// before (`AWSPREVIOUS`). Other labels a secret carries are never asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Current,
    Pending,
    Previous,
}

impl Stage {
    /// The label as AWS writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Current => "AWSCURRENT",
            Stage::Pending => "AWSPENDING",
            Stage::Previous => "AWSPREVIOUS",
        }
    }

    /// Whether a version's labels, as AWS lists them, include this one.
    pub fn is_in(self, labels: &[String]) -> bool {
        labels.iter().any(|l| l == self.as_str())
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Stage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One version of a secret, as fetched.
#[derive(Clone)]
pub struct SecretVersion {
    pub arn: String,
    pub version_id: String,
    pub stages: Vec<String>,
    pub created: Option<SystemTime>,
    pub value: SecretString,
    pub fetched_at: Instant,
}

impl std::fmt::Debug for SecretVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretVersion")
            .field("arn", &self.arn)
            .field("version_id", &self.version_id)
            .field("stages", &self.stages)
            .field("value", &"[redacted]")
            .finish()
    }
}

/// What `DescribeSecret` says about a secret.
#[derive(Debug, Clone, Default)]
pub struct SecretMeta {
    pub arn: String,
    pub rotation_enabled: bool,
    pub last_rotated: Option<SystemTime>,
    pub next_rotation: Option<SystemTime>,
    /// Set when the secret is scheduled for deletion (DescribeSecret still
    /// answers then; GetSecretValue refuses with InvalidRequestException).
    pub deleted: Option<SystemTime>,
    pub versions_to_stages: HashMap<String, Vec<String>>,
    pub tags: HashMap<String, String>,
}

impl SecretMeta {
    /// The version id holding `stage`, if any.
    pub fn version_with(&self, stage: Stage) -> Option<&str> {
        self.versions_to_stages
            .iter()
            .find(|(_, stages)| stage.is_in(stages))
            .map(|(v, _)| v.as_str())
    }
}

#[derive(Clone, Debug)]
pub struct SecretsManager {
    client: Client,
    /// The same client without SDK retries (see [`Attempts`]).
    once: Client,
}

/// A date from AWS as it was sent (`None` when even `SystemTime` cannot
/// hold it); whoever shows it or counts with it goes through [`usable_date`].
fn to_system_time(t: &aws_smithy_types::DateTime) -> Option<SystemTime> {
    SystemTime::try_from(*t).ok()
}

/// The last second RFC 3339 writes (9999-12-31T23:59:59Z).
pub const LAST_DATE_SECS: u64 = 253_402_300_799;

/// A date the sidecar believes: from 1970-01-01 to 9999-12-31, the range
/// RFC 3339 writes (formatting one outside it panics). AWS sends no other;
/// an answer that does has that date treated as unknown, never a panic.
pub fn usable_date(t: Option<SystemTime>) -> Option<SystemTime> {
    t.filter(|t| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .is_ok_and(|d| d.as_secs() <= LAST_DATE_SECS)
    })
}

fn is_not_found(code: &str) -> bool {
    code == "ResourceNotFoundException"
}

impl SecretsManager {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        let once = aws_sdk_secretsmanager::config::Builder::from(config)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .build();
        SecretsManager {
            client: Client::new(config),
            once: Client::from_conf(once),
        }
    }

    fn client(&self, attempts: Attempts) -> &Client {
        match attempts {
            Attempts::Retried => &self.client,
            Attempts::Once => &self.once,
        }
    }

    /// `GetSecretValue` for one staging label; `Ok(None)` when the secret or
    /// that stage does not exist.
    pub async fn get(
        &self,
        secret_id: &str,
        stage: Stage,
        attempts: Attempts,
    ) -> Result<Option<SecretVersion>, AwsFailure> {
        let result = self
            .client(attempts)
            .get_secret_value()
            .secret_id(secret_id)
            .version_stage(stage.as_str())
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                let failure = AwsFailure::from_sdk("GetSecretValue", e);
                return if is_not_found(&failure.code) {
                    Ok(None)
                } else {
                    Err(failure)
                };
            }
        };
        let value = match (out.secret_string, out.secret_binary) {
            (Some(s), _) => s,
            (None, Some(b)) => String::from_utf8(b.into_inner()).unwrap_or_default(),
            (None, None) => String::new(),
        };
        Ok(Some(SecretVersion {
            arn: out.arn.unwrap_or_else(|| secret_id.to_string()),
            version_id: out.version_id.unwrap_or_default(),
            stages: out.version_stages.unwrap_or_default(),
            created: out.created_date.as_ref().and_then(to_system_time),
            value: SecretString::from(value),
            fetched_at: Instant::now(),
        }))
    }

    /// `DescribeSecret`; `Ok(None)` when the secret does not exist.
    pub async fn describe(
        &self,
        secret_id: &str,
        attempts: Attempts,
    ) -> Result<Option<SecretMeta>, AwsFailure> {
        let out = match self
            .client(attempts)
            .describe_secret()
            .secret_id(secret_id)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let failure = AwsFailure::from_sdk("DescribeSecret", e);
                return if is_not_found(&failure.code) {
                    Ok(None)
                } else {
                    Err(failure)
                };
            }
        };
        Ok(Some(SecretMeta {
            arn: out.arn.clone().unwrap_or_else(|| secret_id.to_string()),
            rotation_enabled: out.rotation_enabled.unwrap_or(false),
            last_rotated: out.last_rotated_date.as_ref().and_then(to_system_time),
            next_rotation: out.next_rotation_date.as_ref().and_then(to_system_time),
            deleted: out.deleted_date.as_ref().and_then(to_system_time),
            versions_to_stages: out.version_ids_to_stages.unwrap_or_default(),
            tags: out
                .tags
                .unwrap_or_default()
                .into_iter()
                .filter_map(|t| Some((t.key?, t.value.unwrap_or_default())))
                .collect(),
        }))
    }
}

/// What one `BatchGetSecretValue` returned: the versions it fetched (with
/// the name AWS knows each secret by) and, per secret it could not fetch,
/// the id asked for and AWS's error code.
#[derive(Debug, Default)]
pub struct Batch {
    pub found: Vec<(String, SecretVersion)>,
    pub errors: Vec<(String, String)>,
}

/// Most secret ids one `BatchGetSecretValue` takes.
pub const BATCH_MAX: usize = 20;

impl SecretsManager {
    /// `BatchGetSecretValue` for up to [`BATCH_MAX`] ids. AWS answers each
    /// secret's AWSCURRENT (the call takes no stage); a secret it cannot
    /// fetch is in `errors`, not a failure of the call.
    pub async fn batch_get(&self, ids: &[String], attempts: Attempts) -> Result<Batch, AwsFailure> {
        let out = self
            .client(attempts)
            .batch_get_secret_value()
            .set_secret_id_list(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| AwsFailure::from_sdk("BatchGetSecretValue", e))?;
        let mut batch = Batch::default();
        for e in out.secret_values.unwrap_or_default() {
            let value = match (e.secret_string, e.secret_binary) {
                (Some(s), _) => s,
                (None, Some(b)) => String::from_utf8(b.into_inner()).unwrap_or_default(),
                (None, None) => String::new(),
            };
            let arn = e.arn.unwrap_or_default();
            let name = e.name.unwrap_or_else(|| arn.clone());
            batch.found.push((
                name,
                SecretVersion {
                    arn,
                    version_id: e.version_id.unwrap_or_default(),
                    stages: e.version_stages.unwrap_or_default(),
                    created: e.created_date.as_ref().and_then(to_system_time),
                    value: SecretString::from(value),
                    fetched_at: Instant::now(),
                },
            ));
        }
        for e in out.errors.unwrap_or_default() {
            batch.errors.push((
                e.secret_id.unwrap_or_default(),
                e.error_code.unwrap_or_else(|| "unknown".into()),
            ));
        }
        Ok(batch)
    }

    /// One page of `ListSecrets` filtered by name prefix (AWS matches the
    /// prefix case-insensitively; callers check it exactly): the names, and
    /// the token of the next page.
    pub async fn list_names(
        &self,
        prefix: &str,
        next_token: Option<String>,
        attempts: Attempts,
    ) -> Result<(Vec<String>, Option<String>), AwsFailure> {
        use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType};
        let out = self
            .client(attempts)
            .list_secrets()
            .filters(
                Filter::builder()
                    .key(FilterNameStringType::Name)
                    .values(prefix)
                    .build(),
            )
            .max_results(100)
            .set_next_token(next_token)
            .send()
            .await
            .map_err(|e| AwsFailure::from_sdk("ListSecrets", e))?;
        let names = out
            .secret_list
            .unwrap_or_default()
            .into_iter()
            .filter_map(|s| s.name)
            .collect();
        Ok((names, out.next_token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_types::DateTime;

    /// Whatever date AWS sends converts without a panic; only 1970..=9999
    /// is believed.
    #[test]
    fn dates_out_of_range_convert_without_a_panic_and_are_not_believed() {
        let date = |secs: i64, nanos: u32| {
            usable_date(to_system_time(&DateTime::from_secs_and_nanos(secs, nanos)))
        };
        assert!(date(0, 0).is_some());
        assert!(date(1_700_000_000, 5).is_some());
        assert!(date(LAST_DATE_SECS as i64, 999_999_999).is_some());
        for (secs, nanos) in [
            (LAST_DATE_SECS as i64 + 1, 0),
            (i64::MAX, 0),
            (i64::MAX, 999_999_999),
            (-1, 0),
            (-1, 5),
            (i64::MIN + 1, 0),
            (i64::MIN, 0),
            (i64::MIN, 999_999_999),
        ] {
            assert_eq!(date(secs, nanos), None, "{secs}.{nanos}");
        }
        // What the SDK's JSON parser makes of huge epoch numbers.
        for f in [1e30, -1e30, 253402300800.0, f64::MAX, f64::MIN] {
            assert_eq!(
                usable_date(to_system_time(&DateTime::from_secs_f64(f))),
                None,
                "{f}"
            );
        }
    }

    #[test]
    fn a_stage_is_its_aws_label_and_nothing_else_matches_it() {
        let labels = vec!["AWSPENDING".to_string(), "custom".to_string()];
        assert!(Stage::Pending.is_in(&labels));
        assert!(!Stage::Current.is_in(&labels));
        // AWS labels are case-sensitive: a look-alike is not the stage.
        assert!(!Stage::Current.is_in(&["awscurrent".to_string()]));
        assert_eq!(
            serde_json::to_string(&[Stage::Current, Stage::Previous]).unwrap(),
            r#"["AWSCURRENT","AWSPREVIOUS"]"#
        );
        assert_eq!(Stage::Pending.to_string(), "AWSPENDING");
    }
}
