//! Amazon RDS endpoint metadata: where a database instance or Aurora cluster
//! really is, and which Secrets Manager secret RDS manages for its master user.

use aws_sdk_rds::Client;

use super::calls::AwsFailure;
use crate::config::EndpointRole;

/// An RDS resource whose endpoint a connection follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RdsTarget {
    Instance(String),
    Cluster(String, EndpointRole),
}

impl std::fmt::Display for RdsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RdsTarget::Instance(id) => write!(f, "RDS instance {id}"),
            RdsTarget::Cluster(id, EndpointRole::Writer) => write!(f, "RDS cluster {id}"),
            RdsTarget::Cluster(id, EndpointRole::Reader) => {
                write!(f, "RDS cluster {id} (reader endpoint)")
            }
        }
    }
}

impl RdsTarget {
    /// From the `aws:rds:primarydbinstancearn` / `...clusterarn` tag values
    /// that RDS puts on the secrets it manages.
    pub fn from_arn(arn: &str) -> Option<RdsTarget> {
        let mut parts = arn.splitn(7, ':');
        let (_arn, _partition, service, _region, _account) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        if service != "rds" {
            return None;
        }
        match (parts.next()?, parts.next()?) {
            ("db", id) if !id.is_empty() => Some(RdsTarget::Instance(id.to_string())),
            ("cluster", id) if !id.is_empty() => {
                Some(RdsTarget::Cluster(id.to_string(), EndpointRole::Writer))
            }
            _ => None,
        }
    }
}

/// Where to connect, as RDS describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub database: Option<String>,
    /// `MasterUserSecret.SecretArn` when RDS manages the master password.
    pub master_secret_arn: Option<String>,
    /// `MasterUserSecret.SecretStatus`: creating | active | rotating | impaired.
    pub master_secret_status: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Rds {
    client: Client,
}

/// RDS's answer was missing what we need, or named nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DescribeError {
    NotFound,
    NoEndpoint,
    Aws(AwsFailure),
}

fn port(p: Option<i32>) -> u16 {
    p.and_then(|p| u16::try_from(p).ok()).unwrap_or(5432)
}

impl Rds {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Rds {
            client: Client::new(config),
        }
    }

    pub async fn describe(&self, target: &RdsTarget) -> Result<Endpoint, DescribeError> {
        match target {
            RdsTarget::Instance(id) => self.describe_instance(id).await,
            RdsTarget::Cluster(id, role) => self.describe_cluster(id, *role).await,
        }
    }

    async fn describe_instance(&self, id: &str) -> Result<Endpoint, DescribeError> {
        let out = self
            .client
            .describe_db_instances()
            .db_instance_identifier(id)
            .send()
            .await
            .map_err(|e| {
                let f = AwsFailure::from_sdk("DescribeDBInstances", e);
                if f.code == "DBInstanceNotFound" || f.code == "DBInstanceNotFoundFault" {
                    DescribeError::NotFound
                } else {
                    DescribeError::Aws(f)
                }
            })?;
        let db = out
            .db_instances
            .unwrap_or_default()
            .into_iter()
            .next()
            .ok_or(DescribeError::NotFound)?;
        let endpoint = db.endpoint.as_ref().ok_or(DescribeError::NoEndpoint)?;
        let secret = db.master_user_secret.as_ref();
        Ok(Endpoint {
            host: endpoint.address.clone().ok_or(DescribeError::NoEndpoint)?,
            port: port(endpoint.port),
            database: db.db_name.clone(),
            master_secret_arn: secret.and_then(|s| s.secret_arn.clone()),
            master_secret_status: secret.and_then(|s| s.secret_status.clone()),
        })
    }

    async fn describe_cluster(
        &self,
        id: &str,
        role: EndpointRole,
    ) -> Result<Endpoint, DescribeError> {
        let out = self
            .client
            .describe_db_clusters()
            .db_cluster_identifier(id)
            .send()
            .await
            .map_err(|e| {
                let f = AwsFailure::from_sdk("DescribeDBClusters", e);
                if f.code == "DBClusterNotFoundFault" || f.code == "DBClusterNotFound" {
                    DescribeError::NotFound
                } else {
                    DescribeError::Aws(f)
                }
            })?;
        let cluster = out
            .db_clusters
            .unwrap_or_default()
            .into_iter()
            .next()
            .ok_or(DescribeError::NotFound)?;
        let host = match role {
            EndpointRole::Writer => cluster.endpoint.clone(),
            EndpointRole::Reader => cluster.reader_endpoint.clone(),
        }
        .ok_or(DescribeError::NoEndpoint)?;
        let secret = cluster.master_user_secret.as_ref();
        Ok(Endpoint {
            host,
            port: port(cluster.port),
            database: cluster.database_name.clone(),
            master_secret_arn: secret.and_then(|s| s.secret_arn.clone()),
            master_secret_status: secret.and_then(|s| s.secret_status.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_from_rds_tag_arns() {
        assert_eq!(
            RdsTarget::from_arn("arn:aws:rds:us-east-1:123456789012:db:orders"),
            Some(RdsTarget::Instance("orders".into()))
        );
        assert_eq!(
            RdsTarget::from_arn("arn:aws:rds:eu-west-1:123456789012:cluster:fleet"),
            Some(RdsTarget::Cluster("fleet".into(), EndpointRole::Writer))
        );
        assert_eq!(RdsTarget::from_arn("arn:aws:s3:::bucket"), None);
        assert_eq!(RdsTarget::from_arn("nonsense"), None);
    }
}
