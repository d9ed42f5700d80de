//! Settings: flags, `SIDECAR_*` environment variables and an optional TOML
//! file, in that order of precedence, checked once at start-up.
//!
//! Every setting is declared once, in the `settings!` list: one name used
//! three ways, `--secret-ttl` (flag), `SIDECAR_SECRET_TTL` (environment) and
//! `secret_ttl` (file); the merge, where each value came from and
//! `check-config`'s listing follow from that list. Defaults and checks are
//! in [`Settings::from_args`]. The file alone can also hold
//! `[connections.<conn_id>]` entries.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::airflow::credential::LIBPQ_OPTIONS;

/// Airflow's rule for connection ids and variable keys (ASCII, so that the id
/// is also a valid part of a Secrets Manager name).
pub const MAX_ID_LEN: usize = 250;

/// Airflow team names: short, and never holding the `--` that separates a
/// team from an id in a secret name.
pub const MAX_TEAM_LEN: usize = 50;

pub fn is_valid_team(team: &str) -> bool {
    team_problem(team).is_none()
}

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

    #[test]
    fn a_team_that_would_make_the_secret_name_ambiguous_is_refused() {
        for ok in ["a", "data-eng", "team_1", "A-b-C"] {
            assert_eq!(team_problem(ok), None, "{ok}");
            assert!(is_valid_team(ok));
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
            assert!(!is_valid_team(bad));
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

#[derive(Debug, Parser)]
#[command(
    name = "airflow-secrets-sidecar",
    version,
    about = "Serves Airflow connections from AWS Secrets Manager and RDS, after proving they log in to Postgres"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: SettingArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Serve the credential API and the admin listener (the default).
    Serve,
    /// Resolve one connection and print its Airflow JSON.
    Get {
        conn_id: String,
        /// Bypass every cache (there is none in a one-shot run; kept for symmetry).
        #[arg(long)]
        refresh: bool,
    },
    /// Check the rotation state of a connection (exit 0 only when no action is needed).
    RotationCheck {
        conn_id: Option<String>,
        /// Check every connection in the config file.
        #[arg(long, conflicts_with = "conn_id")]
        all: bool,
        /// Print the JSON report instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Load and check the configuration, then exit.
    CheckConfig,
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

/// Declares every setting once: its doc, its flag and `SIDECAR_*` variable
/// (the file uses the field name), and its type. From the one list come the
/// flags/env/file struct ([`SettingArgs`]), the merge (flags and env over the
/// file), where each value came from, and `check-config`'s listing of the
/// effective values. Defaults and checks are in [`Settings::from_args`].
macro_rules! settings {
    ($($(#[$meta:meta])* $name:ident: $ty:ty,)*) => {
        /// The settings as flags/env (and, with the same field names, the file).
        #[derive(Debug, Clone, Default, Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct SettingArgs {
            /// TOML configuration file.
            #[arg(long, env = "SIDECAR_CONFIG", global = true)]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $($(#[$meta])* pub $name: Option<$ty>,)*
            /// Per-connection entries; only in the file.
            #[arg(skip)]
            #[serde(default)]
            pub connections: BTreeMap<String, ConnectionEntry>,
        }

        impl SettingArgs {
            /// Flags/env first, then the file.
            fn or(self, file: SettingArgs) -> SettingArgs {
                SettingArgs {
                    config: self.config,
                    $($name: self.$name.or(file.$name),)*
                    connections: file.connections,
                }
            }

            /// Where each setting's value comes from: these flags/env (`cli`
            /// tells which of the two), else `file`, else the default.
            pub fn sources(&self, file: &SettingArgs, cli: &clap::ArgMatches) -> Sources {
                vec![$((
                    stringify!($name),
                    if self.$name.is_some() {
                        Source::given(cli, stringify!($name))
                    } else if file.$name.is_some() {
                        Source::File
                    } else {
                        Source::Default
                    },
                ),)*]
            }
        }

        impl Settings {
            /// Every setting's effective value, as `check-config` shows it
            /// (never a secret: the token is a file path, and no setting
            /// holds a password).
            pub fn effective(&self) -> Vec<(&'static str, String)> {
                vec![$((stringify!($name), Shown::shown(&self.$name)),)*]
            }
        }
    };
}

settings! {
    /// Credential API address [default: 127.0.0.1:9797].
    #[arg(long, env = "SIDECAR_LISTEN", global = true)]
    listen: SocketAddr,
    /// Admin listener (/livez, /readyz, /metrics) [default: [::]:9798, dual-stack; 0.0.0.0:9798 without IPv6].
    #[arg(long, env = "SIDECAR_ADMIN_LISTEN", global = true)]
    admin_listen: SocketAddr,
    /// File holding the X-Sidecar-Token value (re-read when it changes).
    #[arg(long, env = "SIDECAR_TOKEN_FILE", global = true)]
    token_file: PathBuf,
    /// Write a fresh random token to the token file at start if it does not exist.
    #[arg(long, env = "SIDECAR_TOKEN_CREATE", global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    token_create: bool,
    /// Serve without a token (logs a warning).
    #[arg(long, env = "SIDECAR_INSECURE_NO_TOKEN", global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    insecure_no_token: bool,
    /// Secret id prefix for connections [default: airflow/connections].
    #[arg(long, env = "SIDECAR_CONNECTIONS_PREFIX", global = true)]
    connections_prefix: String,
    /// Secret id prefix for variables [default: airflow/variables].
    #[arg(long, env = "SIDECAR_VARIABLES_PREFIX", global = true)]
    variables_prefix: String,
    /// Only conn_ids matching this regex are looked up; others answer 404 at once.
    #[arg(long, env = "SIDECAR_LOOKUP_PATTERN", global = true)]
    lookup_pattern: String,
    /// Default sslmode [default: verify-full with an sslrootcert, else require].
    #[arg(long, env = "SIDECAR_SSLMODE", global = true)]
    sslmode: SslMode,
    /// CA bundle for verify-ca / verify-full (e.g. the RDS global bundle).
    #[arg(long, env = "SIDECAR_SSLROOTCERT", global = true)]
    sslrootcert: PathBuf,
    /// Time limit for one validation login [default: 5s].
    #[arg(long, env = "SIDECAR_CONNECT_TIMEOUT", global = true)]
    connect_timeout: Dur,
    /// "host:port=addr:port,...": validation connects to addr while TLS verifies host.
    #[arg(long, env = "SIDECAR_RESOLVE", global = true)]
    resolve: String,
    /// How long a fetched secret value is used before AWS is asked again [default: 5m].
    #[arg(long, env = "SIDECAR_SECRET_TTL", global = true)]
    secret_ttl: Dur,
    /// How long RDS endpoint metadata is kept [default: 1h].
    #[arg(long, env = "SIDECAR_ENDPOINT_TTL", global = true)]
    endpoint_ttl: Dur,
    /// How long a proven login is trusted before it is proven again [default: 1m].
    #[arg(long, env = "SIDECAR_VALIDATION_TTL", global = true)]
    validation_ttl: Dur,
    /// How long a "not found" answer is kept [default: 30s].
    #[arg(long, env = "SIDECAR_NEGATIVE_TTL", global = true)]
    negative_ttl: Dur,
    /// How long any other failed answer is kept, so a broken id does not hammer AWS and Postgres [default: 5s].
    #[arg(long, env = "SIDECAR_ERROR_TTL", global = true)]
    error_ttl: Dur,
    /// Longest a credential that still logs in is served while AWS fails [default: 1h].
    #[arg(long, env = "SIDECAR_MAX_STALE", global = true)]
    max_stale: Dur,
    /// Most connections kept in the cache [default: 1000].
    #[arg(long, env = "SIDECAR_CACHE_SIZE", global = true)]
    cache_size: u64,
    /// Bound on one AWS API call, retries included [default: 5s].
    #[arg(long, env = "SIDECAR_AWS_TIMEOUT", global = true)]
    aws_timeout: Dur,
    /// Bound on one HTTP request [default: 8s].
    #[arg(long, env = "SIDECAR_REQUEST_TIMEOUT", global = true)]
    request_timeout: Dur,
    /// An AWSPENDING version older than this is a stuck rotation [default: 1h].
    #[arg(long, env = "SIDECAR_ROTATION_STUCK_AFTER", global = true)]
    rotation_stuck_after: Dur,
    /// Most simultaneous client connections on the credential listener [default: 1024].
    #[arg(long, env = "SIDECAR_MAX_CONNECTIONS", global = true)]
    max_connections: usize,
    /// Most expensive requests (rotation checks, `refresh=true`) running at once, each
    /// conn_id counted once; more answer 429 `too_busy` [default: 4].
    #[arg(long, env = "SIDECAR_MAX_CONCURRENT_CHECKS", global = true)]
    max_concurrent_checks: usize,
    /// Time limit for one rotation check [default: 30s].
    #[arg(long, env = "SIDECAR_CHECK_TIMEOUT", global = true)]
    check_timeout: Dur,
    /// AWSPREVIOUS is served (when AWSCURRENT is rejected) only this long after the
    /// AWSCURRENT version was created; 0s never serves it [default: 24h].
    #[arg(long, env = "SIDECAR_SERVE_PREVIOUS_FOR", global = true)]
    serve_previous_for: Dur,
    /// Lowest sslmode a secret may ask for; lower ones are raised to it (a
    /// `[connections.<id>]` entry may set a lower one for itself)
    /// [default: verify-full with an sslrootcert, else require].
    #[arg(long, env = "SIDECAR_MIN_SSLMODE", global = true)]
    min_sslmode: SslMode,
    /// Directories a secret may name files in (`sslrootcert`, `sslcert`,
    /// `sslkey`), comma-separated [default: the directory of sslrootcert].
    #[arg(
        long,
        env = "SIDECAR_SECRET_FILE_DIRS",
        value_delimiter = ',',
        global = true
    )]
    secret_file_dirs: Vec<PathBuf>,
    /// The sslrootcert path written into answers, when Airflow's container sees the
    /// CA at another path than the sidecar [default: the path the sidecar used].
    #[arg(long, env = "SIDECAR_ANSWER_SSLROOTCERT", global = true)]
    answer_sslrootcert: PathBuf,
    /// Secret id prefix for Airflow config options [default: airflow/config].
    #[arg(long, env = "SIDECAR_CONFIG_PREFIX", global = true)]
    config_prefix: String,
    /// The Airflow config options `GET /config/{key}` may serve, comma-separated
    /// (e.g. sql_alchemy_conn,fernet_key); empty: /config answers 403 [default: empty].
    #[arg(
        long,
        env = "SIDECAR_CONFIG_KEYS",
        value_delimiter = ',',
        global = true
    )]
    config_keys: Vec<String>,
    /// Most resolutions (cold lookups, values, background refreshes) in flight
    /// at once in this process; more cold lookups answer 429 `too_busy` [default: 64].
    #[arg(long, env = "SIDECAR_MAX_IN_FLIGHT", global = true)]
    max_in_flight: usize,
    /// Pin this sidecar to one Airflow team: lookups for another team are refused (403).
    #[arg(long, env = "SIDECAR_TEAM", global = true)]
    team: String,
    /// Connection types the sidecar cannot log in with: `serve` them unvalidated or `refuse` them [default: serve].
    #[arg(long, env = "SIDECAR_UNVALIDATED", global = true)]
    unvalidated: Unvalidated,
    /// Conn_ids to resolve (fetch and prove) in the background at start, comma-separated.
    #[arg(long, env = "SIDECAR_PREFETCH", value_delimiter = ',', global = true)]
    prefetch: Vec<String>,
    /// Prefetch every `[connections.*]` entry at start [default: true].
    #[arg(long, env = "SIDECAR_PREFETCH_ENTRIES", global = true)]
    prefetch_entries: bool,
    /// Prefetch up to this many secrets found under connections_prefix (ListSecrets;
    /// needs secretsmanager:ListSecrets); 0 = off [default: 0].
    #[arg(long, env = "SIDECAR_PREFETCH_ALL", global = true)]
    prefetch_all: u32,
    /// Fetch prefetched secrets 20 per BatchGetSecretValue call (needs
    /// secretsmanager:BatchGetSecretValue) [default: false].
    #[arg(long, env = "SIDECAR_PREFETCH_BATCH", global = true)]
    prefetch_batch: bool,
    /// Prefetched connections resolved at once [default: 4].
    #[arg(long, env = "SIDECAR_PREFETCH_CONCURRENCY", global = true)]
    prefetch_concurrency: usize,
    /// Log format [default: json].
    #[arg(long, env = "SIDECAR_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    /// Log filter, tracing's EnvFilter syntax [default: info; RUST_LOG also works].
    #[arg(long, env = "SIDECAR_LOG", global = true)]
    log: String,
}

/// Each setting's name and where its value came from.
pub type Sources = Vec<(&'static str, Source)>;

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File,
    Default,
}

impl Source {
    /// A value given on the command line or in the environment: which one.
    fn given(cli: &clap::ArgMatches, id: &str) -> Source {
        // Global flags may be given before or after the subcommand.
        let found = cli
            .value_source(id)
            .or_else(|| cli.subcommand().and_then(|(_, sub)| sub.value_source(id)));
        match found {
            Some(clap::parser::ValueSource::EnvVariable) => Source::Env,
            _ => Source::Flag,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Env => "env",
            Source::File => "file",
            Source::Default => "default",
        }
    }
}

/// A setting's value as `check-config` prints it.
trait Shown {
    fn shown(&self) -> String;
}

macro_rules! shown_by_display {
    ($($t:ty),*) => {$(impl Shown for $t {
        fn shown(&self) -> String { self.to_string() }
    })*};
}
shown_by_display!(String, bool, u32, u64, usize, SocketAddr);

impl Shown for Duration {
    fn shown(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}

impl Shown for PathBuf {
    fn shown(&self) -> String {
        self.display().to_string()
    }
}

impl Shown for SslMode {
    fn shown(&self) -> String {
        self.as_str().to_string()
    }
}

impl Shown for Unvalidated {
    fn shown(&self) -> String {
        format!("{self:?}").to_lowercase()
    }
}

impl Shown for LogFormat {
    fn shown(&self) -> String {
        format!("{self:?}").to_lowercase()
    }
}

impl Shown for regex::Regex {
    fn shown(&self) -> String {
        self.as_str().to_string()
    }
}

impl<T: Shown> Shown for Option<T> {
    fn shown(&self) -> String {
        self.as_ref().map_or_else(|| "(none)".into(), Shown::shown)
    }
}

impl<T: Shown> Shown for Vec<T> {
    fn shown(&self) -> String {
        if self.is_empty() {
            return "(none)".into();
        }
        self.iter().map(Shown::shown).collect::<Vec<_>>().join(",")
    }
}

impl Shown for HashMap<(String, u16), SocketAddr> {
    fn shown(&self) -> String {
        let mut pairs: Vec<String> = self
            .iter()
            .map(|((host, port), addr)| format!("{host}:{port}={addr}"))
            .collect();
        pairs.sort();
        if pairs.is_empty() {
            return "(none)".into();
        }
        pairs.join(",")
    }
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

/// Everything resolved and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    pub token_create: bool,
    pub insecure_no_token: bool,
    pub connections_prefix: String,
    pub variables_prefix: String,
    pub lookup_pattern: Option<regex::Regex>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub resolve: HashMap<(String, u16), SocketAddr>,
    pub secret_ttl: Duration,
    pub endpoint_ttl: Duration,
    pub validation_ttl: Duration,
    pub negative_ttl: Duration,
    pub error_ttl: Duration,
    pub max_stale: Duration,
    pub cache_size: u64,
    pub aws_timeout: Duration,
    pub request_timeout: Duration,
    pub rotation_stuck_after: Duration,
    pub max_connections: usize,
    pub max_concurrent_checks: usize,
    pub check_timeout: Duration,
    pub serve_previous_for: Duration,
    pub min_sslmode: SslMode,
    /// Where files a secret names may be (see `secret_files`).
    pub secret_file_dirs: Vec<PathBuf>,
    pub answer_sslrootcert: Option<PathBuf>,
    pub config_prefix: String,
    /// Options `/config` serves; empty: none (see `config_keys`).
    pub config_keys: Vec<String>,
    pub max_in_flight: usize,
    pub team: Option<String>,
    pub unvalidated: Unvalidated,
    /// Start-up prefetch (see `prefetch`).
    pub prefetch: Vec<String>,
    pub prefetch_entries: bool,
    pub prefetch_all: u32,
    pub prefetch_batch: bool,
    pub prefetch_concurrency: usize,
    pub log_format: LogFormat,
    /// The log filter (`log`).
    pub log: String,
    pub connections: BTreeMap<String, ConnectionEntry>,
}

/// A start-up configuration problem, said so that the fix is obvious.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

fn cfg_err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// The settings in the file `--config` names (none without one).
fn read_file(args: &SettingArgs) -> Result<SettingArgs, ConfigError> {
    let Some(path) = &args.config else {
        return Ok(SettingArgs::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| cfg_err(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str::<SettingArgs>(&text).map_err(|e| {
        cfg_err(format!(
            "config file {}: {}",
            path.display(),
            e.message().trim()
        ))
    })
}

impl Settings {
    /// Merge flags/env with the file named by `--config`, apply defaults,
    /// check; and say where each setting came from (`cli`: the parsed
    /// command line, to tell a flag from an environment variable).
    pub fn load(
        args: SettingArgs,
        cli: &clap::ArgMatches,
    ) -> Result<(Settings, Sources), ConfigError> {
        let file = read_file(&args)?;
        let sources = args.sources(&file, cli);
        Ok((Settings::from_args(args.or(file))?, sources))
    }

    pub fn from_args(a: SettingArgs) -> Result<Settings, ConfigError> {
        let d = |v: Option<Dur>, default: Duration| v.map(|d| d.0).unwrap_or(default);
        let sslrootcert = a.sslrootcert;
        if let Some(path) = &sslrootcert {
            std::fs::metadata(path)
                .map_err(|e| cfg_err(format!("sslrootcert {}: {e}", path.display())))?;
        }
        // Verified TLS when we have a CA to verify against; encrypted otherwise
        // (RDS for Postgres 15+ refuses plaintext). The same is the floor a
        // secret cannot go below: with a CA, nothing less than verify-full.
        let verified_if_possible = if sslrootcert.is_some() {
            SslMode::VerifyFull
        } else {
            SslMode::Require
        };
        let sslmode = a.sslmode.unwrap_or(verified_if_possible);
        let min_sslmode = a.min_sslmode.unwrap_or(verified_if_possible);
        let secret_file_dirs = match a.secret_file_dirs {
            Some(dirs) => dirs
                .into_iter()
                .filter(|d| !d.as_os_str().is_empty())
                .collect(),
            None => sslrootcert
                .as_deref()
                .and_then(std::path::Path::parent)
                .filter(|d| !d.as_os_str().is_empty())
                .map(|d| vec![d.to_path_buf()])
                .unwrap_or_default(),
        };
        let lookup_pattern = a
            .lookup_pattern
            .map(|p| {
                regex::Regex::new(&p)
                    .map_err(|e| cfg_err(format!("lookup_pattern is not a valid regex: {e}")))
            })
            .transpose()?;
        let resolve = a.resolve.as_deref().map(parse_resolve).transpose()?;
        let settings = Settings {
            listen: a
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9797))),
            admin_listen: a
                .admin_listen
                .unwrap_or_else(|| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 9798))),
            token_file: a.token_file,
            token_create: a.token_create.unwrap_or(false),
            insecure_no_token: a.insecure_no_token.unwrap_or(false),
            connections_prefix: trim_prefix(
                a.connections_prefix
                    .as_deref()
                    .unwrap_or("airflow/connections"),
            ),
            variables_prefix: trim_prefix(
                a.variables_prefix.as_deref().unwrap_or("airflow/variables"),
            ),
            lookup_pattern,
            sslmode,
            sslrootcert,
            connect_timeout: d(a.connect_timeout, Duration::from_secs(5)),
            resolve: resolve.unwrap_or_default(),
            secret_ttl: d(a.secret_ttl, Duration::from_secs(300)),
            endpoint_ttl: d(a.endpoint_ttl, Duration::from_secs(3600)),
            validation_ttl: d(a.validation_ttl, Duration::from_secs(60)),
            negative_ttl: d(a.negative_ttl, Duration::from_secs(30)),
            error_ttl: d(a.error_ttl, Duration::from_secs(5)),
            max_stale: d(a.max_stale, Duration::from_secs(3600)),
            cache_size: a.cache_size.unwrap_or(1000),
            aws_timeout: d(a.aws_timeout, Duration::from_secs(5)),
            // Below the Airflow backend's default 10 s timeout, so the client sees our 504 message.
            request_timeout: d(a.request_timeout, Duration::from_secs(8)),
            rotation_stuck_after: d(a.rotation_stuck_after, Duration::from_secs(3600)),
            max_connections: a.max_connections.unwrap_or(1024),
            max_concurrent_checks: a.max_concurrent_checks.unwrap_or(4),
            check_timeout: d(a.check_timeout, Duration::from_secs(30)),
            serve_previous_for: d(a.serve_previous_for, Duration::from_secs(24 * 3600)),
            min_sslmode,
            secret_file_dirs,
            answer_sslrootcert: a.answer_sslrootcert,
            config_prefix: trim_prefix(a.config_prefix.as_deref().unwrap_or("airflow/config")),
            config_keys: trimmed(a.config_keys),
            max_in_flight: a.max_in_flight.unwrap_or(64),
            team: a.team,
            unvalidated: a.unvalidated.unwrap_or_default(),
            prefetch: trimmed(a.prefetch),
            prefetch_entries: a.prefetch_entries.unwrap_or(true),
            prefetch_all: a.prefetch_all.unwrap_or(0),
            prefetch_batch: a.prefetch_batch.unwrap_or(false),
            prefetch_concurrency: a.prefetch_concurrency.unwrap_or(4),
            log_format: a.log_format.unwrap_or(LogFormat::Json),
            log: a
                .log
                .or_else(|| std::env::var("RUST_LOG").ok())
                .unwrap_or_else(|| "info".into()),
            connections: a.connections,
        };
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("connect_timeout", self.connect_timeout),
            ("secret_ttl", self.secret_ttl),
            ("validation_ttl", self.validation_ttl),
            ("aws_timeout", self.aws_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if v.is_zero() {
                return Err(cfg_err(format!("{name} must be longer than 0")));
            }
        }
        if self.cache_size == 0 {
            return Err(cfg_err("cache_size must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(cfg_err("max_connections must be at least 1"));
        }
        if self.max_in_flight == 0 {
            return Err(cfg_err("max_in_flight must be at least 1"));
        }
        if let Some(k) = self.config_keys.iter().find(|k| !is_valid_id(k)) {
            let shown: String = k.chars().take(64).collect();
            return Err(cfg_err(format!(
                "config_keys: {shown:?} is not a valid option key: use only A-Z a-z 0-9 _ . -"
            )));
        }
        if self.max_concurrent_checks == 0 {
            return Err(cfg_err("max_concurrent_checks must be at least 1"));
        }
        if self.check_timeout.is_zero() {
            return Err(cfg_err("check_timeout must be longer than 0"));
        }
        if self.prefetch_concurrency == 0 {
            return Err(cfg_err("prefetch_concurrency must be at least 1"));
        }
        if let Some(id) = self.prefetch.iter().find(|id| !is_valid_id(id)) {
            let shown: String = id.chars().take(64).collect();
            return Err(cfg_err(format!(
                "prefetch: {shown:?} is not a valid conn_id: use only A-Z a-z 0-9 _ . - (at most {MAX_ID_LEN})"
            )));
        }
        if self.prefetch_all > 0 && self.connections_prefix.is_empty() {
            return Err(cfg_err(
                "prefetch_all needs a connections_prefix (it lists the secrets under it)",
            ));
        }
        // More than the cache holds would evict what was just prefetched.
        if u64::from(self.prefetch_all) > self.cache_size {
            return Err(cfg_err(format!(
                "prefetch_all {} is larger than cache_size {}: prefetched connections would evict each other",
                self.prefetch_all, self.cache_size
            )));
        }
        // The default for every connection must respect the floor; a weaker
        // mode is a choice made for one connection, in its entry.
        if self.sslmode < self.min_sslmode {
            return Err(cfg_err(format!(
                "sslmode {} is below min_sslmode {}{}: lower min_sslmode too, or set a weaker sslmode only in the [connections.<conn_id>] entries that need it",
                self.sslmode.as_str(),
                self.min_sslmode.as_str(),
                if self.sslrootcert.is_some() { " (the default with an sslrootcert)" } else { "" }
            )));
        }
        for dir in &self.secret_file_dirs {
            if !dir.is_absolute() {
                return Err(cfg_err(format!(
                    "secret_file_dirs: {} is not an absolute path",
                    dir.display()
                )));
            }
        }
        if let Some(team) = &self.team {
            if let Some(why) = team_problem(team) {
                return Err(cfg_err(format!(
                    "team {team:?} is not a valid team name: {why} (use A-Z a-z 0-9 _ -, at most {MAX_TEAM_LEN}, no \"--\", not starting or ending with \"-\")"
                )));
            }
        }
        for (conn_id, e) in &self.connections {
            let at = format!("[connections.{conn_id}]");
            if !is_valid_id(conn_id) {
                return Err(cfg_err(format!(
                    "{at}: a conn_id may only hold A-Z a-z 0-9 _ . - (at most {MAX_ID_LEN})"
                )));
            }
            if e.db_instance.is_some() && e.db_cluster.is_some() {
                return Err(cfg_err(format!(
                    "{at}: set db_instance or db_cluster, not both"
                )));
            }
            if e.endpoint == Some(EndpointRole::Reader) && e.db_cluster.is_none() {
                return Err(cfg_err(format!(
                    "{at}: endpoint = \"reader\" needs db_cluster"
                )));
            }
            if let Some(path) = &e.sslrootcert {
                std::fs::metadata(path).map_err(|err| {
                    cfg_err(format!("{at}: sslrootcert {}: {err}", path.display()))
                })?;
            }
            for key in e.extra.iter().flat_map(|m| m.keys()) {
                if !LIBPQ_OPTIONS.contains(&key.as_str()) {
                    return Err(cfg_err(format!(
                        "{at}: extra key {key:?} is not a libpq option; Airflow's Postgres hook would fail on it"
                    )));
                }
            }
        }
        Ok(())
    }

    /// What `serve` needs on top of `load`: a usable token.
    pub fn check_token(&self) -> Result<(), ConfigError> {
        match (&self.token_file, self.insecure_no_token) {
            (None, false) => Err(cfg_err(
                "no token: set SIDECAR_TOKEN_FILE (or --insecure-no-token for local experiments)",
            )),
            (Some(path), _) if !self.token_create || path.exists() => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    cfg_err(format!("cannot read token file {}: {e}", path.display()))
                })?;
                if token.trim().is_empty() {
                    return Err(cfg_err(format!("token file {} is empty", path.display())));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Entries that chose a TLS mode below `min_sslmode` for themselves:
    /// allowed, and said at start (and in every answer's `extra.sslmode`).
    pub fn weakened_entries(&self) -> impl Iterator<Item = (&str, SslMode)> + '_ {
        self.connections.iter().filter_map(|(id, e)| {
            e.sslmode
                .filter(|m| *m < self.min_sslmode)
                .map(|m| (id.as_str(), m))
        })
    }

    /// The secret id a conn_id maps to when no entry names one.
    pub fn connection_secret_id(&self, conn_id: &str) -> String {
        join_prefix(&self.connections_prefix, conn_id)
    }

    pub fn variable_secret_id(&self, key: &str) -> String {
        join_prefix(&self.variables_prefix, key)
    }

    pub fn config_secret_id(&self, key: &str) -> String {
        join_prefix(&self.config_prefix, key)
    }
}

/// A comma-separated list as given: items trimmed, empty ones dropped.
fn trimmed(list: Option<Vec<String>>) -> Vec<String> {
    list.unwrap_or_default()
        .into_iter()
        .map(|item| item.trim().to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

fn trim_prefix(p: &str) -> String {
    p.trim_end_matches('/').to_string()
}

fn join_prefix(prefix: &str, id: &str) -> String {
    if prefix.is_empty() {
        id.to_string()
    } else {
        format!("{prefix}/{id}")
    }
}

/// `host:port=addr:port,...` (like curl's `--resolve`).
pub fn parse_resolve(spec: &str) -> Result<HashMap<(String, u16), SocketAddr>, ConfigError> {
    let mut map = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || cfg_err(format!("resolve entry {item:?} is not host:port=addr:port"));
        let (from, to) = item.split_once('=').ok_or_else(bad)?;
        let (host, port) = from.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let addr = to
            .to_socket_addrs()
            .map_err(|_| bad())?
            .next()
            .ok_or_else(bad)?;
        map.insert((host.to_ascii_lowercase(), port), addr);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_config_lists_each_setting_once_in_one_order() {
        use clap::{CommandFactory, FromArgMatches};
        let cli = Cli::command().get_matches_from(["sidecar", "check-config"]);
        let args = Cli::from_arg_matches(&cli).unwrap().settings;
        let sources = args.sources(&SettingArgs::default(), &cli);
        let settings = Settings::from_args(args).unwrap();
        let effective = settings.effective();
        let source_names: Vec<&str> = sources.iter().map(|(n, _)| *n).collect();
        let effective_names: Vec<&str> = effective.iter().map(|(n, _)| *n).collect();
        assert_eq!(source_names, effective_names);
        let mut unique: Vec<_> = sources.iter().map(|(n, _)| *n).collect();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), sources.len());
    }

    #[test]
    fn ids_follow_airflows_rule() {
        assert!(is_valid_id("my_conn.v2-x"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("ünï"));
        assert!(is_valid_id(&"a".repeat(250)));
        assert!(!is_valid_id(&"a".repeat(251)));
    }

    #[test]
    fn boolean_flags_stand_alone_or_take_a_value() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["x", "--insecure-no-token", "serve"]).unwrap();
        assert_eq!(cli.settings.insecure_no_token, Some(true));
        let cli = Cli::try_parse_from(["x", "--token-create=false"]).unwrap();
        assert_eq!(cli.settings.token_create, Some(false));
    }

    #[test]
    fn defaults() {
        let s = Settings::from_args(SettingArgs::default()).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:9797");
        assert_eq!(s.connection_secret_id("x"), "airflow/connections/x");
        assert_eq!(s.variable_secret_id("k"), "airflow/variables/k");
        assert_eq!(s.sslmode, SslMode::Require);
        assert_eq!(s.min_sslmode, SslMode::Require);
        assert!(s.secret_file_dirs.is_empty(), "no CA, no directory");
    }

    #[test]
    fn with_a_ca_the_floor_is_verify_full() {
        let dir = std::env::temp_dir().join(format!("sidecar-cfg-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let with_ca = || SettingArgs {
            sslrootcert: Some(ca.clone()),
            ..Default::default()
        };
        let s = Settings::from_args(with_ca()).unwrap();
        assert_eq!(
            (s.sslmode, s.min_sslmode),
            (SslMode::VerifyFull, SslMode::VerifyFull)
        );
        assert_eq!(s.secret_file_dirs, vec![dir.clone()], "the CA's directory");
        // A weaker default for everything is refused, naming the way out ...
        let err = Settings::from_args(SettingArgs {
            sslmode: Some(SslMode::Require),
            ..with_ca()
        })
        .unwrap_err();
        assert!(err.0.contains("[connections."), "{err}");
        // ... a weaker entry is the operator's word for that connection.
        let mut args = with_ca();
        args.connections.insert(
            "legacy".into(),
            ConnectionEntry {
                sslmode: Some(SslMode::Require),
                ..Default::default()
            },
        );
        let s = Settings::from_args(args).unwrap();
        assert_eq!(
            s.weakened_entries().collect::<Vec<_>>(),
            vec![("legacy", SslMode::Require)]
        );
        let s = Settings::from_args(SettingArgs {
            secret_file_dirs: Some(vec!["/a".into(), "/b".into()]),
            ..with_ca()
        })
        .unwrap();
        assert_eq!(
            s.secret_file_dirs,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert!(Settings::from_args(SettingArgs {
            secret_file_dirs: Some(vec!["relative".into()]),
            ..Default::default()
        })
        .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flags_win_over_file() {
        let file: SettingArgs = toml::from_str(
            "secret_ttl = \"10m\"\nconnections_prefix = \"file/\"\n[connections.a]\ndb_instance = \"x\"\n",
        )
        .unwrap();
        let flags = SettingArgs {
            secret_ttl: Some("30s".parse().unwrap()),
            ..Default::default()
        };
        let s = Settings::from_args(flags.or(file)).unwrap();
        assert_eq!(s.secret_ttl, Duration::from_secs(30));
        assert_eq!(s.connection_secret_id("c"), "file/c");
        assert_eq!(s.connections["a"].db_instance.as_deref(), Some("x"));
    }

    #[test]
    fn bad_files_are_named_clearly() {
        let err = toml::from_str::<SettingArgs>("secret_tll = \"5m\"").unwrap_err();
        assert!(
            err.message().contains("unknown field `secret_tll`"),
            "{err}"
        );
        let err = toml::from_str::<SettingArgs>("secret_ttl = \"5 parsecs\"").unwrap_err();
        assert!(err.message().contains("not a duration"), "{err}");
        let file: SettingArgs =
            toml::from_str("[connections.a]\ndb_instance = \"x\"\ndb_cluster = \"y\"\n").unwrap();
        let err = Settings::from_args(file).unwrap_err();
        assert!(err.0.contains("not both"), "{err}");
        let file: SettingArgs =
            toml::from_str("[connections.a]\nextra = { cursor = \"dict\" }\n").unwrap();
        let err = Settings::from_args(file).unwrap_err();
        assert!(err.0.contains("not a libpq option"), "{err}");
    }

    #[test]
    fn prefetch_settings() {
        let s = Settings::from_args(SettingArgs::default()).unwrap();
        assert!(s.prefetch.is_empty() && s.prefetch_entries && !s.prefetch_batch);
        assert_eq!((s.prefetch_all, s.prefetch_concurrency), (0, 4));
        let file: SettingArgs =
            toml::from_str("prefetch = [\"a\", \" b \"]\nprefetch_all = 50\n").unwrap();
        let s = Settings::from_args(file).unwrap();
        assert_eq!(s.prefetch, ["a", "b"]);
        assert_eq!(s.prefetch_all, 50);
        let cli =
            Cli::try_parse_from(["x", "--prefetch", "a,b.c", "--prefetch-batch", "true"]).unwrap();
        let s = Settings::from_args(cli.settings).unwrap();
        assert_eq!(s.prefetch, ["a", "b.c"]);
        assert!(s.prefetch_batch);
        let bad = |toml: &str| {
            Settings::from_args(toml::from_str(toml).unwrap())
                .unwrap_err()
                .0
        };
        assert!(bad("prefetch = [\"a/b\"]").contains("\"a/b\" is not a valid conn_id"));
        assert!(bad("prefetch_concurrency = 0").contains("prefetch_concurrency"));
        assert!(bad("prefetch_all = 2000").contains("cache_size"));
        assert!(bad("prefetch_all = 5\nconnections_prefix = \"\"").contains("connections_prefix"));
    }

    #[test]
    fn resolve_spec() {
        let m = parse_resolve("db.example:5432=127.0.0.1:6000, other:1=127.0.0.2:2").unwrap();
        assert_eq!(
            m[&("db.example".into(), 5432)].to_string(),
            "127.0.0.1:6000"
        );
        assert_eq!(m.len(), 2);
        assert!(parse_resolve("nope").is_err());
        assert!(parse_resolve("h:x=127.0.0.1:1").is_err());
    }
}
