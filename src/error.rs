//! The one error type every layer returns, and how it looks on the wire.
//!
//! Each variant is a promise to the client: a stable `code`, an HTTP status,
//! and a message that names the conn_id or secret id and the cause. Messages
//! are built from identifiers and upstream error codes only, never from a
//! secret's text, so they are safe to log and to send.

use hyper::StatusCode;

/// Why a lookup did not produce a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No secret (or no route) for this id: Airflow moves on to its next source.
    NotFound,
    /// The id breaks Airflow's rule `^[A-Za-z0-9_.-]+$`, at most 250 chars.
    InvalidConnId,
    /// Missing or wrong `X-Sidecar-Token`.
    Unauthorized,
    /// The request came through a proxy (`X-Forwarded-For`, `Forwarded`,
    /// `X-Real-IP`, `Via`, any `X-Forwarded-*`).
    ForwardedRefused,
    /// Without a token (`--insecure-no-token`), a Host header that does not
    /// name loopback: a page in a browser reaching the API by DNS rebinding.
    HostRefused,
    /// Anything else a client got wrong: method, path, query.
    BadRequest,
    MethodNotAllowed,
    /// AWS failed or refused (the message names the API and AWS's error code).
    UpstreamError,
    /// The secret exists but cannot be turned into a Postgres connection.
    SecretMalformed,
    /// Postgres answered, and said no to every version tried.
    CredentialsRejected,
    /// Postgres could not be reached (DNS, refused, timeout, TLS).
    DatabaseUnreachable,
    /// The server asked for a cleartext or MD5 password, and its identity
    /// was not verified: the password was not sent.
    PasswordWithheld,
    /// The lookup did not finish within its time bound.
    Timeout,
    /// Too many expensive requests (rotation checks, refreshes) at once.
    TooBusy,
    /// This sidecar is pinned to another Airflow team.
    TeamForbidden,
    /// A connection type the sidecar cannot log in with, and `unvalidated = refuse`.
    UnvalidatedRefused,
    /// `/config` serves only the options listed in `config_keys` (none by default).
    ConfigDisabled,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidConnId => "invalid_conn_id",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ForwardedRefused => "forwarded_refused",
            ErrorCode::HostRefused => "host_refused",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::SecretMalformed => "secret_malformed",
            ErrorCode::CredentialsRejected => "credentials_rejected",
            ErrorCode::DatabaseUnreachable => "database_unreachable",
            ErrorCode::PasswordWithheld => "password_withheld",
            ErrorCode::Timeout => "timeout",
            ErrorCode::TooBusy => "too_busy",
            ErrorCode::TeamForbidden => "team_forbidden",
            ErrorCode::UnvalidatedRefused => "unvalidated_refused",
            ErrorCode::ConfigDisabled => "config_disabled",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::InvalidConnId | ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::ForwardedRefused
            | ErrorCode::HostRefused
            | ErrorCode::TeamForbidden
            | ErrorCode::UnvalidatedRefused
            | ErrorCode::ConfigDisabled => StatusCode::FORBIDDEN,
            ErrorCode::TooBusy => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::UpstreamError | ErrorCode::SecretMalformed => StatusCode::BAD_GATEWAY,
            ErrorCode::CredentialsRejected
            | ErrorCode::DatabaseUnreachable
            | ErrorCode::PasswordWithheld => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// A failed lookup: a code and a message safe to show anyone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct LookupError {
    pub code: ErrorCode,
    pub message: String,
    /// An outage (AWS throttling, timeouts, 5xx, network), not a decision:
    /// a cached credential that still logs in may be served meanwhile.
    pub transient: bool,
}

impl LookupError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        LookupError {
            code,
            message: message.into(),
            transient: false,
        }
    }

    /// An error caused by an outage (see [`LookupError::transient`]).
    pub fn transient(code: ErrorCode, message: impl Into<String>) -> Self {
        LookupError {
            transient: true,
            ..LookupError::new(code, message)
        }
    }

    /// The same error with `context` ("connection x") in front of its message.
    pub fn context(mut self, context: &str) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The JSON body of an error answer.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "error": self.code.as_str(),
            "message": self.message,
        }))
        .expect("a map of two strings always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_a_4xx_or_5xx_that_is_not_500() {
        use ErrorCode::*;
        for code in [
            NotFound,
            InvalidConnId,
            Unauthorized,
            ForwardedRefused,
            HostRefused,
            BadRequest,
            MethodNotAllowed,
            UpstreamError,
            SecretMalformed,
            CredentialsRejected,
            DatabaseUnreachable,
            PasswordWithheld,
            Timeout,
            TooBusy,
            TeamForbidden,
            UnvalidatedRefused,
            ConfigDisabled,
        ] {
            let s = code.status();
            assert!(s.is_client_error() || s.is_server_error(), "{code:?}");
            assert_ne!(s, StatusCode::INTERNAL_SERVER_ERROR, "{code:?}");
        }
    }

    #[test]
    fn refusals_of_the_request_itself_are_403() {
        for (code, word) in [
            (ErrorCode::ForwardedRefused, "forwarded_refused"),
            (ErrorCode::HostRefused, "host_refused"),
        ] {
            assert_eq!(code.status(), StatusCode::FORBIDDEN);
            assert_eq!(code.as_str(), word);
        }
    }

    #[test]
    fn json_body_has_error_and_message() {
        let e = LookupError::new(ErrorCode::NotFound, "no secret airflow/connections/x");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["error"], "not_found");
        assert_eq!(v["message"], "no secret airflow/connections/x");
    }
}
