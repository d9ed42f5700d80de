//! The two AWS services the sidecar reads from, behind small typed wrappers.
//!
//! Read-only by design: the calls here are exactly the minimal IAM policy
//! (`GetSecretValue`, `DescribeSecret`, `DescribeDBInstances`,
//! `DescribeDBClusters`).

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

/// What an AWS failure means for serving. Only the outages in
/// [`Failure::is_outage`] (an allow-list) let a cached credential that
/// still logs in be served; every other answer is a decision that stops
/// serving, an error code nobody has seen before included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer within `aws_timeout` (or an attempt's share of it).
    Timeout,
    /// No HTTP answer at all: connect, TLS, reset.
    Network,
    /// AWS asked us to slow down (a throttling code, or HTTP 429).
    Throttled,
    /// AWS failed (HTTP 5xx).
    ServerError,
    /// The credentials provider (STS, the Pod Identity agent, IMDS) could
    /// not be reached or timed out.
    CredentialsUnreachable,
    /// The credentials provider answered no: role revoked or untrusted,
    /// web-identity token missing, expired or invalid, no credentials found.
    CredentialsRefused,
    /// Any other answer: access denied, KMS, deleted, not found, a bad
    /// request, an unknown code, a 4xx without one.
    Refused,
}

impl Failure {
    pub fn is_outage(self) -> bool {
        matches!(
            self,
            Failure::Timeout
                | Failure::Network
                | Failure::Throttled
                | Failure::ServerError
                | Failure::CredentialsUnreachable
        )
    }
}

/// The throttling codes AWS services answer with (as the SDK's own retry
/// classifier lists them).
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

/// How an AWS call failed, reduced to what callers act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsFailure {
    pub api: &'static str,
    /// AWS's error code (`AccessDeniedException`, ...), `http_<status>` for
    /// an answer without one, or our word for a failure without an answer
    /// (`timeout`, `dispatch_failure`, `credentials_refused`,
    /// `credentials_unavailable`): for messages and metric labels.
    pub code: String,
    pub message: String,
    pub failure: Failure,
}

type HttpResponse = aws_smithy_runtime_api::client::orchestrator::HttpResponse;

impl AwsFailure {
    pub fn from_sdk<E>(api: &'static str, err: SdkError<E, HttpResponse>) -> AwsFailure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let chain = || short_chain(&DisplayErrorContext(&err).to_string());
        let answered = |code: Option<&str>, status: u16| {
            let code = code.map(str::to_string).unwrap_or(format!("http_{status}"));
            let failure = if THROTTLING_CODES.contains(&code.as_str()) || status == 429 {
                Failure::Throttled
            } else if status >= 500 {
                Failure::ServerError
            } else {
                Failure::Refused
            };
            (code, failure)
        };
        let (code, message, failure) = match &err {
            SdkError::ServiceError(e) => {
                let (code, failure) = answered(e.err().code(), e.raw().status().as_u16());
                // AWS's messages name resources, never secret values.
                let message = e.err().message().map(str::to_string).unwrap_or_else(chain);
                (code, message, failure)
            }
            SdkError::ResponseError(e) => {
                let (code, failure) = answered(None, e.raw().status().as_u16());
                (code, chain(), failure)
            }
            SdkError::TimeoutError(_) => (
                "timeout".to_string(),
                "no answer within the AWS timeout".to_string(),
                Failure::Timeout,
            ),
            _ => match credentials_failure(&err) {
                Some(f @ Failure::CredentialsRefused) => ("credentials_refused".into(), chain(), f),
                Some(f) => ("credentials_unavailable".into(), chain(), f),
                None => {
                    let failure = match &err {
                        SdkError::DispatchFailure(d) if d.is_timeout() => Failure::Timeout,
                        SdkError::DispatchFailure(d) if d.is_io() || d.is_other() => {
                            Failure::Network
                        }
                        // The request could not even be built: a decision.
                        _ => Failure::Refused,
                    };
                    ("dispatch_failure".into(), chain(), failure)
                }
            },
        };
        AwsFailure {
            api,
            code,
            message,
            failure,
        }
    }

    pub fn is_timeout(&self) -> bool {
        self.failure == Failure::Timeout
    }

    /// An outage, as opposed to a decision (see [`Failure`]).
    pub fn is_transient(&self) -> bool {
        self.failure.is_outage()
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

/// A failure to get credentials, found by type in the error's causes: a
/// provider that could not be reached (a network failure or a timeout among
/// its causes) is an outage; any other answer of the provider is a refusal.
fn credentials_failure(err: &(dyn std::error::Error + 'static)) -> Option<Failure> {
    use aws_credential_types::provider::error::CredentialsError;
    let credentials = causes(err).find_map(|e| e.downcast_ref::<CredentialsError>())?;
    if let CredentialsError::ProviderTimedOut(_) = credentials {
        return Some(Failure::CredentialsUnreachable);
    }
    let unreachable = causes(credentials).any(|e| {
        e.downcast_ref::<aws_smithy_runtime_api::client::result::ConnectorError>()
            .is_some_and(|c| c.is_io() || c.is_timeout())
            || e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                use std::io::ErrorKind::*;
                matches!(
                    io.kind(),
                    ConnectionRefused
                        | ConnectionReset
                        | ConnectionAborted
                        | NotConnected
                        | TimedOut
                        | HostUnreachable
                        | NetworkUnreachable
                        | AddrNotAvailable
                        | BrokenPipe
                        | UnexpectedEof
                )
            })
    });
    Some(if unreachable {
        Failure::CredentialsUnreachable
    } else {
        Failure::CredentialsRefused
    })
}

/// An error and its causes, outermost first.
fn causes<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
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
    use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;
    use aws_smithy_runtime_api::client::result::ConnectorError;
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    type Err = SdkError<GetSecretValueError, HttpResponse>;

    fn answer(code: Option<&str>, status: u16) -> Err {
        let mut meta = ErrorMetadata::builder().message("from the test");
        if let Some(code) = code {
            meta = meta.code(code);
        }
        let raw = HttpResponse::new(status.try_into().unwrap(), SdkBody::empty());
        SdkError::service_error(GetSecretValueError::generic(meta.build()), raw)
    }

    fn dispatch(source: impl std::error::Error + Send + Sync + 'static) -> Err {
        SdkError::dispatch_failure(ConnectorError::other(Box::new(source), None))
    }

    fn failure(e: Err) -> (String, Failure) {
        let f = AwsFailure::from_sdk("GetSecretValue", e);
        (f.code, f.failure)
    }

    #[test]
    fn only_the_listed_outages_are_outages() {
        use Failure::*;
        let io = |kind| std::io::Error::new(kind, "from the test");
        let cases: Vec<(Err, &str, Failure)> = vec![
            (
                answer(Some("ThrottlingException"), 400),
                "ThrottlingException",
                Throttled,
            ),
            (answer(Some("Throttling"), 400), "Throttling", Throttled),
            (answer(None, 429), "http_429", Throttled),
            (
                answer(Some("InternalServiceError"), 500),
                "InternalServiceError",
                ServerError,
            ),
            (answer(None, 503), "http_503", ServerError),
            // Decisions, the ones nobody listed included.
            (
                answer(Some("AccessDeniedException"), 400),
                "AccessDeniedException",
                Refused,
            ),
            (answer(Some("NotAuthorized"), 400), "NotAuthorized", Refused),
            (answer(Some("SomethingNew"), 400), "SomethingNew", Refused),
            (answer(None, 403), "http_403", Refused),
            (answer(None, 400), "http_400", Refused),
            (
                SdkError::timeout_error(Box::new(io(std::io::ErrorKind::TimedOut))),
                "timeout",
                Timeout,
            ),
            (
                SdkError::dispatch_failure(ConnectorError::io(Box::new(io(
                    std::io::ErrorKind::ConnectionRefused,
                )))),
                "dispatch_failure",
                Network,
            ),
        ];
        for (e, code, want) in cases {
            assert_eq!(failure(e), (code.to_string(), want), "{code}");
        }
    }

    #[test]
    fn a_refused_credentials_provider_is_a_decision_an_unreachable_one_an_outage() {
        use aws_credential_types::provider::error::CredentialsError;
        let io = |kind| std::io::Error::new(kind, "from the test");
        let refused = [
            CredentialsError::provider_error(io(std::io::ErrorKind::Other)),
            CredentialsError::not_loaded(io(std::io::ErrorKind::NotFound)),
            CredentialsError::invalid_configuration("bad profile"),
            CredentialsError::unhandled(
                "AccessDenied: not authorized to perform sts:AssumeRoleWithWebIdentity",
            ),
        ];
        for c in refused {
            let shown = c.to_string();
            assert_eq!(
                failure(dispatch(c)),
                (
                    "credentials_refused".to_string(),
                    Failure::CredentialsRefused
                ),
                "{shown}"
            );
        }
        let unreachable = [
            CredentialsError::provider_timed_out(std::time::Duration::from_secs(5)),
            CredentialsError::provider_error(io(std::io::ErrorKind::ConnectionRefused)),
            CredentialsError::provider_error(ConnectorError::io(Box::new(io(
                std::io::ErrorKind::ConnectionReset,
            )))),
        ];
        for c in unreachable {
            let shown = c.to_string();
            let (code, f) = failure(dispatch(c));
            assert_eq!(
                (code.as_str(), f),
                ("credentials_unavailable", Failure::CredentialsUnreachable),
                "{shown}"
            );
            assert!(f.is_outage());
        }
    }
}
