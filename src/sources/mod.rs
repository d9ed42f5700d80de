//! The two AWS services the sidecar reads from, behind small typed wrappers.
//!
//! Read-only by design: the calls here are exactly the minimal IAM policy
//! (`GetSecretValue`, `DescribeSecret`, `DescribeDBInstances`,
//! `DescribeDBClusters`).

pub mod rds;
pub mod secrets_manager;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::error::{ErrorCode, LookupError};

/// The SDK's standard chain (env, profile, IRSA web identity, EKS Pod
/// Identity, IMDS), with rustls on ring and bounded time: `aws_timeout` caps
/// a whole call including retries, so a lookup fails in seconds, not minutes.
pub async fn load_aws_config(aws_timeout: Duration) -> SdkConfig {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let attempt = (aws_timeout / 2).max(Duration::from_millis(200));
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(attempt.min(Duration::from_secs(2)))
                .operation_attempt_timeout(attempt)
                .operation_timeout(aws_timeout)
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .load()
        .await
}

/// Whether the SDK may retry a call. Background work (refresh-ahead, retries
/// during an outage) calls once: its own backoff decides when to try again,
/// so an outage never costs more calls than healthy operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempts {
    Retried,
    Once,
}

/// How an AWS call failed, reduced to what callers act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsFailure {
    pub api: &'static str,
    /// AWS's error code (`AccessDeniedException`, ...) or our word for a
    /// transport failure (`timeout`, `dispatch_failure`).
    pub code: String,
    pub message: String,
}

impl AwsFailure {
    pub fn from_sdk<E, R>(api: &'static str, err: SdkError<E, R>) -> AwsFailure
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        match &err {
            SdkError::TimeoutError(_) => AwsFailure {
                api,
                code: "timeout".into(),
                message: "no answer within the AWS timeout".into(),
            },
            SdkError::DispatchFailure(_) => {
                let message = short_chain(&DisplayErrorContext(&err).to_string());
                AwsFailure {
                    api,
                    code: dispatch_code(&message).into(),
                    message,
                }
            }
            _ => AwsFailure {
                api,
                code: err.code().unwrap_or("unknown").to_string(),
                // AWS's messages name resources, never secret values.
                message: err
                    .message()
                    .map(str::to_string)
                    .unwrap_or_else(|| short_chain(&DisplayErrorContext(&err).to_string())),
            },
        }
    }

    pub fn is_timeout(&self) -> bool {
        self.code == "timeout"
    }

    /// An outage (throttling, timeouts, 5xx, network), as opposed to a
    /// decision: AWS refusing access, KMS refusing to decrypt, a secret
    /// deleted or scheduled for deletion, a bad request. Only outages let a
    /// cached credential be served; a decision stops serving.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self.code.as_str(),
            "AccessDeniedException"
                | "AccessDenied"
                | "UnauthorizedOperation"
                | "UnrecognizedClientException"
                | "credentials_refused"
                | "InvalidClientTokenId"
                | "DecryptionFailure"
                | "InvalidRequestException"
                | "InvalidParameterException"
                | "InvalidParameterValue"
                | "ValidationException"
                | "ResourceNotFoundException"
        )
    }

    /// The client-facing error, naming the resource (`what`).
    pub fn into_lookup_error(self, what: &str) -> LookupError {
        let code = if self.is_timeout() {
            ErrorCode::Timeout
        } else {
            ErrorCode::UpstreamError
        };
        let message = format!(
            "{what}: AWS {} failed: {}: {}",
            self.api, self.code, self.message
        );
        if self.is_transient() {
            LookupError::transient(code, message)
        } else {
            LookupError::new(code, message)
        }
    }
}

/// What a dispatch failure was. Failing to load credentials surfaces as a
/// dispatch failure too; when the credentials provider was refused (the role
/// revoked or untrusted, the web-identity token missing, expired or invalid),
/// that is a decision, not an outage, and must stop stale serving like an
/// `AccessDeniedException` does. Reaching STS or the Pod Identity agent and
/// failing on the network stays an outage.
fn dispatch_code(chain: &str) -> &'static str {
    if !chain.contains("credentials") {
        return "dispatch_failure";
    }
    const REFUSED: &[&str] = &[
        "AccessDenied",
        "InvalidIdentityToken",
        "ExpiredToken",
        "IDPRejectedClaim",
        "InvalidClientTokenId",
        "not authorized",
        "No such file",
        "403",
        "401",
    ];
    if REFUSED.iter().any(|r| chain.contains(r)) {
        "credentials_refused"
    } else {
        "credentials_unavailable"
    }
}

/// Error chains from the SDK can run long; keep the first few hundred characters.
fn short_chain(s: &str) -> String {
    let mut s = s.replace('\n', " ");
    if s.len() > 400 {
        let mut cut = 400;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_credentials_provider_is_a_decision_a_network_failure_an_outage() {
        let refused = [
            "dispatch failure: other: an error occurred while loading credentials: AccessDenied: Not authorized to perform sts:AssumeRoleWithWebIdentity",
            "dispatch failure: other: an error occurred while loading credentials: failed to read web identity token: No such file or directory (os error 2)",
            "dispatch failure: an error occurred while loading credentials: ExpiredTokenException: token expired",
        ];
        for chain in refused {
            let f = AwsFailure {
                api: "GetSecretValue",
                code: dispatch_code(chain).into(),
                message: chain.into(),
            };
            assert_eq!(f.code, "credentials_refused", "{chain}");
            assert!(!f.is_transient(), "{chain}");
        }
        for chain in [
            "dispatch failure: an error occurred while loading credentials: io error: connection refused",
            "dispatch failure: io error: connection reset by peer",
        ] {
            let f = AwsFailure { api: "GetSecretValue", code: dispatch_code(chain).into(), message: chain.into() };
            assert!(f.is_transient(), "{chain}");
        }
    }
}
