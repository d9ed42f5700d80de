//! Where a conn_id's secret and its database endpoint come from (steps 1
//! and 3 of the pipeline).
//!
//! The secret: a `[connections.<conn_id>]` entry's `secret_id`, the secret
//! RDS manages for the entry's instance or cluster, or by name:
//! `<prefix>/<team>--<conn_id>` for a team, then `<prefix>/<conn_id>` (the
//! amazon provider's order). The endpoint: the entry's RDS resource, else the
//! secret's rotation-template fields, else the tags RDS puts on the secrets
//! it manages; RDS metadata wins over a host stored in the secret.

use std::sync::Arc;

use crate::airflow::credential::Credential;
use crate::aws::rds::{Endpoint, RdsTarget};
use crate::aws::secrets_manager::SecretVersion;
use crate::aws::Aws;
use crate::cache::ConnKey;
use crate::config::{ConnectionEntry, EndpointRole, Settings};
use crate::error::{ErrorCode, LookupError};
use crate::pipeline::{Policy, Use};

pub struct Source<'a> {
    pub entry: Option<&'a ConnectionEntry>,
    /// The secret that serves this lookup (after [`fetch_current`], the
    /// first of the candidates that exists).
    pub secret_id: String,
    /// Secret names to try in order (a team's own, then the shared one).
    pub candidates: Vec<String>,
    pub rds_target: Option<RdsTarget>,
    pub endpoint: Option<Arc<Endpoint>>,
}

/// The secret names a lookup tries, in order, under `prefix`.
pub fn candidates(prefix_join: impl Fn(&str) -> String, key: &ConnKey) -> Vec<String> {
    match key.team() {
        Some(team) => vec![
            prefix_join(&format!("{team}--{}", key.conn_id())),
            prefix_join(key.conn_id()),
        ],
        None => vec![prefix_join(key.conn_id())],
    }
}

/// Step 1: which secret holds a conn_id, and which RDS resource (if a config
/// entry names one) says where the database is.
pub async fn map<'a>(
    settings: &'a Settings,
    aws: &Aws,
    key: &ConnKey,
    policy: Policy,
) -> Result<Source<'a>, LookupError> {
    let entry = settings.connections.get(key.conn_id());
    if entry.is_none() {
        if let Some(pattern) = &settings.lookup_pattern {
            if !pattern.is_match(key.conn_id()) {
                return Err(LookupError::new(
                    ErrorCode::NotFound,
                    "does not match lookup_pattern; not looked up",
                ));
            }
        }
    }
    let rds_target = entry.and_then(entry_rds_target);
    let endpoint = match &rds_target {
        Some(t) => Some(aws.endpoint(t, policy.aws).await?),
        None => None,
    };
    let candidates = match entry.and_then(|e| e.secret_id.clone()) {
        Some(id) => vec![id],
        // An entry naming only an RDS resource uses the secret RDS manages for it.
        None => match endpoint.as_ref().and_then(|e| e.master_secret_arn.clone()) {
            Some(arn) => vec![arn],
            None => candidates(|id| settings.connection_secret_id(id), key),
        },
    };
    Ok(Source {
        entry,
        secret_id: candidates[0].clone(),
        candidates,
        rds_target,
        endpoint,
    })
}

/// Step 2: AWSCURRENT of the first candidate secret that exists.
pub async fn fetch_current(
    aws: &Aws,
    source: &mut Source<'_>,
    policy: Policy,
) -> Result<SecretVersion, LookupError> {
    for id in &source.candidates {
        let found = aws
            .fetch(
                id,
                crate::aws::secrets_manager::Stage::Current,
                policy.aws,
                policy.attempts,
            )
            .await?;
        if let Some(version) = found {
            source.secret_id = id.clone();
            return Ok(version);
        }
    }
    Err(LookupError::new(
        ErrorCode::NotFound,
        format!("no secret {}", source.candidates.join(" or ")),
    ))
}

/// Step 3: with no RDS resource from the config, the secret may name one
/// (rotation-template fields, or the tags RDS puts on its secrets).
pub async fn locate(
    aws: &Aws,
    source: &mut Source<'_>,
    cred: &Credential,
    policy: Policy,
) -> Result<(), LookupError> {
    if source.rds_target.is_some() {
        return Ok(());
    }
    let entry_host = source.entry.and_then(|e| e.host.as_ref());
    source.rds_target = match secret_rds_target(cred, source.entry) {
        Some(t) => Some(t),
        None if cred.host.is_none() && entry_host.is_none() => {
            aws.tagged_target(&source.secret_id, policy.aws, policy.attempts)
                .await?
        }
        None => None,
    };
    if let Some(t) = &source.rds_target {
        source.endpoint = Some(aws.endpoint(t, policy.aws).await?);
    }
    Ok(())
}

/// After a network failure: the endpoint RDS describes now, if it moved
/// (a failover or blue/green switchover).
pub async fn moved(aws: &Aws, source: &Source<'_>) -> Result<Option<Arc<Endpoint>>, LookupError> {
    let Some(t) = &source.rds_target else {
        return Ok(None);
    };
    let now = aws.endpoint(t, Use::Fresh).await?;
    Ok((Some(&now) != source.endpoint.as_ref()).then_some(now))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_team_tries_its_own_secret_first_then_the_shared_one() {
        let join = |id: &str| format!("airflow/connections/{id}");
        assert_eq!(
            candidates(join, &ConnKey::new(Some("blue"), "db")),
            ["airflow/connections/blue--db", "airflow/connections/db"]
        );
        assert_eq!(
            candidates(join, &ConnKey::new(None, "db")),
            ["airflow/connections/db"]
        );
    }
}
