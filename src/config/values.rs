//! The value types of settings and their rules: ids and team names,
//! durations, TLS modes, and `[connections.<conn_id>]` entries.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

/// Airflow's rule for connection ids and variable keys (ASCII, so that the id
/// is also a valid part of a Secrets Manager name).
pub const MAX_ID_LEN: usize = 250;

/// Airflow team names: short, and never holding the `--` that separates a
/// team from an id in a secret name.
pub const MAX_TEAM_LEN: usize = 50;

/// What is wrong with a team name, if anything. The secret name is
/// `<prefix>/<team>--<id>`: a team holding `--` or ending in `-` would make
/// the split ambiguous (team `a-` + id `b` and team `a` + id `-b` are both
/// `a---b`); one starting with `-` is refused for symmetry.
pub fn team_problem(team: &str) -> Option<&'static str> {
    if team.is_empty() {
        Some("it is empty")
    } else if team.len() > MAX_TEAM_LEN {
        Some("it is too long")
    } else if !team
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        Some("it holds a character other than A-Z a-z 0-9 _ -")
    } else if team.contains("--") {
        Some("it holds \"--\", the separator of team and id in a secret name")
    } else if team.ends_with('-') || team.starts_with('-') {
        Some("it starts or ends with \"-\", which makes <team>--<id> ambiguous (team \"a-\" + id \"b\" and team \"a\" + id \"-b\" are one secret name)")
    } else {
        None
    }
}

#[cfg(test)]
mod team_tests {
    use super::*;
    use crate::config::{Cli, Settings};
    use clap::Parser;

    #[test]
    fn a_team_that_would_make_the_secret_name_ambiguous_is_refused() {
        for ok in ["a", "data-eng", "team_1", "A-b-C"] {
            assert_eq!(team_problem(ok), None, "{ok}");
            assert!(team_problem(ok).is_none());
        }
        for (bad, why) in [
            ("", "empty"),
            ("a-", "ends with"),
            ("-a", "starts or ends"),
            ("-", "ends with"),
            ("a--b", "\"--\""),
            ("a.b", "character"),
            ("a b", "character"),
        ] {
            let problem = team_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(problem.contains(why), "{bad:?}: {problem}");
            assert!(team_problem(bad).is_some());
        }
        assert!(team_problem(&"t".repeat(MAX_TEAM_LEN)).is_none());
        assert!(team_problem(&"t".repeat(MAX_TEAM_LEN + 1)).is_some());
    }

    #[test]
    fn a_pinned_team_ending_in_a_dash_is_a_configuration_error() {
        let cli = Cli::try_parse_from(["x", "--team", "data-", "serve"]).unwrap();
        let e = Settings::from_args(cli.settings).unwrap_err().to_string();
        assert!(e.contains("\"data-\"") && e.contains("ambiguous"), "{e}");
        let cli = Cli::try_parse_from(["x", "--team", "data", "serve"]).unwrap();
        assert_eq!(
            Settings::from_args(cli.settings).unwrap().team.as_deref(),
            Some("data")
        );
    }
}

pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A duration written like `500ms`, `30s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("{s:?} is not a duration like 500ms, 30s, 5m or 1h ({e})"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// libpq's `sslmode` values (the ones that make sense for a client that validates),
/// weakest first: the order is what `min_sslmode` compares.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // The value may be a secret's: never echoed.
        <SslMode as clap::ValueEnum>::from_str(s, true).map_err(|_| {
            "sslmode is not one of disable, prefer, require, verify-ca, verify-full".to_string()
        })
    }
}

/// What to do with connection types the sidecar cannot log in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Unvalidated {
    /// Answer them, with `X-Sidecar-Validated: false`.
    #[default]
    Serve,
    /// Answer 403 `unvalidated_refused`, naming the conn_type.
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// Which endpoint of an Aurora cluster a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EndpointRole {
    #[default]
    Writer,
    Reader,
}

/// `[connections.<conn_id>]` in the config file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionEntry {
    /// Secret id or ARN [default: `<connections_prefix>/<conn_id>`].
    pub secret_id: Option<String>,
    /// RDS instance whose endpoint (and, alone, master secret) to use.
    pub db_instance: Option<String>,
    /// Aurora cluster whose endpoint (and, alone, master secret) to use.
    pub db_cluster: Option<String>,
    /// `writer` (default) or `reader` endpoint of `db_cluster`.
    pub endpoint: Option<EndpointRole>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub database: Option<String>,
    pub sslmode: Option<SslMode>,
    pub sslrootcert: Option<PathBuf>,
    /// Extra libpq options for the answer.
    pub extra: Option<Map<String, Value>>,
    pub description: Option<String>,
}
