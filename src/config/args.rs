//! The command line and the one list of settings (`settings!`): what clap,
//! the environment and the TOML file fill, the merge, where each value came
//! from, and `check-config`'s listing.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use super::{ConnectionEntry, Dur, LogFormat, Settings, SslMode, Unvalidated};

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

impl Cli {
    /// The command line, with every default in its help.
    pub fn shown() -> clap::Command {
        SettingArgs::show_defaults(<Cli as clap::CommandFactory>::command())
    }
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

/// Declares every setting once: its doc, its flag and `SIDECAR_*` variable
/// (the file uses the field name), and its type. From the one list come the
/// flags/env/file struct ([`SettingArgs`]), the merge (flags and env over the
/// file), where each value came from, and `check-config`'s listing of the
/// effective values. A setting's default is written once, after `=`, as a
/// TOML value: it becomes [`DEFAULTS`] (the layer under the file) and the
/// `[default: ...]` of its `--help`. Defaults that depend on other settings
/// (sslmode, secret_file_dirs, ...) and the checks are in
/// [`Settings::from_args`].
macro_rules! settings {
    ($($(#[$meta:meta])* $name:ident: $ty:ty $(= $default:literal)?,)*) => {
        /// The built-in defaults, as a settings file would write them.
        pub const DEFAULTS: &str = concat!($($(stringify!($name), " = ", stringify!($default), "\n",)?)*);

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
            /// `cmd` with each setting's default (from the same literal as
            /// [`DEFAULTS`]) at the end of its help.
            pub fn show_defaults(mut cmd: clap::Command) -> clap::Command {
                $($(
                    cmd = cmd.mut_arg(stringify!($name), |a| {
                        let shown = |h: Option<&clap::builder::StyledStr>| {
                            let h = h.map(ToString::to_string).unwrap_or_default();
                            format!("{h} [default: {}]", $default)
                        };
                        let long = a.get_long_help().map(|h| shown(Some(h)));
                        let a = a.clone().help(shown(a.get_help()));
                        match long {
                            Some(long) => a.long_help(long),
                            None => a,
                        }
                    });
                )?)*
                cmd
            }

            /// [`DEFAULTS`], parsed (a test proves they parse).
            pub(super) fn defaults() -> SettingArgs {
                toml::from_str(DEFAULTS).expect("the built-in defaults parse")
            }

            /// Flags/env first, then the file.
            pub(super) fn or(self, file: SettingArgs) -> SettingArgs {
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
    /// Credential API address.
    #[arg(long, env = "SIDECAR_LISTEN", global = true)]
    listen: SocketAddr = "127.0.0.1:9797",
    /// Admin listener (/livez, /readyz, /metrics), dual-stack (0.0.0.0 where the node has no IPv6).
    #[arg(long, env = "SIDECAR_ADMIN_LISTEN", global = true)]
    admin_listen: SocketAddr = "[::]:9798",
    /// File holding the X-Sidecar-Token value (re-read when it changes).
    #[arg(long, env = "SIDECAR_TOKEN_FILE", global = true)]
    token_file: PathBuf,
    /// Write a fresh random token to the token file at start if it does not exist.
    #[arg(long, env = "SIDECAR_TOKEN_CREATE", global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    token_create: bool = false,
    /// Serve without a token (logs a warning).
    #[arg(long, env = "SIDECAR_INSECURE_NO_TOKEN", global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    insecure_no_token: bool = false,
    /// Secret id prefix for connections.
    #[arg(long, env = "SIDECAR_CONNECTIONS_PREFIX", global = true)]
    connections_prefix: String = "airflow/connections",
    /// Secret id prefix for variables.
    #[arg(long, env = "SIDECAR_VARIABLES_PREFIX", global = true)]
    variables_prefix: String = "airflow/variables",
    /// Only conn_ids matching this regex are looked up; others answer 404 at once.
    #[arg(long, env = "SIDECAR_LOOKUP_PATTERN", global = true)]
    lookup_pattern: String,
    /// Default sslmode [default: verify-full with an sslrootcert, else require].
    #[arg(long, env = "SIDECAR_SSLMODE", global = true)]
    sslmode: SslMode,
    /// CA bundle for verify-ca / verify-full (e.g. the RDS global bundle).
    #[arg(long, env = "SIDECAR_SSLROOTCERT", global = true)]
    sslrootcert: PathBuf,
    /// Time limit for one validation login.
    #[arg(long, env = "SIDECAR_CONNECT_TIMEOUT", global = true)]
    connect_timeout: Dur = "5s",
    /// "host:port=addr:port,...": validation connects to addr while TLS verifies host.
    #[arg(long, env = "SIDECAR_RESOLVE", global = true)]
    resolve: String,
    /// How long a fetched secret value is used before AWS is asked again.
    #[arg(long, env = "SIDECAR_SECRET_TTL", global = true)]
    secret_ttl: Dur = "5m",
    /// How long RDS endpoint metadata is kept.
    #[arg(long, env = "SIDECAR_ENDPOINT_TTL", global = true)]
    endpoint_ttl: Dur = "1h",
    /// How long a proven login is trusted before it is proven again.
    #[arg(long, env = "SIDECAR_VALIDATION_TTL", global = true)]
    validation_ttl: Dur = "1m",
    /// How long a "not found" answer is kept.
    #[arg(long, env = "SIDECAR_NEGATIVE_TTL", global = true)]
    negative_ttl: Dur = "30s",
    /// How long any other failed answer is kept, so a broken id does not hammer AWS and Postgres.
    #[arg(long, env = "SIDECAR_ERROR_TTL", global = true)]
    error_ttl: Dur = "5s",
    /// Longest a credential that still logs in is served while AWS fails.
    #[arg(long, env = "SIDECAR_MAX_STALE", global = true)]
    max_stale: Dur = "1h",
    /// Most connections kept in the cache.
    #[arg(long, env = "SIDECAR_CACHE_SIZE", global = true)]
    cache_size: u64 = 1000,
    /// Bound on one AWS API call, retries included.
    #[arg(long, env = "SIDECAR_AWS_TIMEOUT", global = true)]
    aws_timeout: Dur = "5s",
    /// Bound on one HTTP request (below the Airflow backend's 10 s timeout, so that the client sees the sidecar's 504 and its cause).
    #[arg(long, env = "SIDECAR_REQUEST_TIMEOUT", global = true)]
    request_timeout: Dur = "8s",
    /// An AWSPENDING version older than this is a stuck rotation.
    #[arg(long, env = "SIDECAR_ROTATION_STUCK_AFTER", global = true)]
    rotation_stuck_after: Dur = "1h",
    /// Most simultaneous client connections on the credential listener.
    #[arg(long, env = "SIDECAR_MAX_CONNECTIONS", global = true)]
    max_connections: usize = 1024,
    /// Most expensive requests (rotation checks, `refresh=true`) running at once, each
    /// conn_id counted once; more answer 429 `too_busy`.
    #[arg(long, env = "SIDECAR_MAX_CONCURRENT_CHECKS", global = true)]
    max_concurrent_checks: usize = 4,
    /// Time limit for one rotation check.
    #[arg(long, env = "SIDECAR_CHECK_TIMEOUT", global = true)]
    check_timeout: Dur = "30s",
    /// AWSPREVIOUS is served (when AWSCURRENT is rejected) only this long after the
    /// AWSCURRENT version was created; 0s never serves it.
    #[arg(long, env = "SIDECAR_SERVE_PREVIOUS_FOR", global = true)]
    serve_previous_for: Dur = "24h",
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
    /// Secret id prefix for Airflow config options.
    #[arg(long, env = "SIDECAR_CONFIG_PREFIX", global = true)]
    config_prefix: String = "airflow/config",
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
    /// at once in this process; more cold lookups answer 429 `too_busy`.
    #[arg(long, env = "SIDECAR_MAX_IN_FLIGHT", global = true)]
    max_in_flight: usize = 64,
    /// Pin this sidecar to one Airflow team: lookups for another team are refused (403).
    #[arg(long, env = "SIDECAR_TEAM", global = true)]
    team: String,
    /// Connection types the sidecar cannot log in with: `serve` them unvalidated or `refuse` them.
    #[arg(long, env = "SIDECAR_UNVALIDATED", global = true)]
    unvalidated: Unvalidated = "serve",
    /// Conn_ids to resolve (fetch and prove) in the background at start, comma-separated.
    #[arg(long, env = "SIDECAR_PREFETCH", value_delimiter = ',', global = true)]
    prefetch: Vec<String>,
    /// Prefetch every `[connections.*]` entry at start.
    #[arg(long, env = "SIDECAR_PREFETCH_ENTRIES", global = true)]
    prefetch_entries: bool = true,
    /// Prefetch up to this many secrets found under connections_prefix (ListSecrets;
    /// needs secretsmanager:ListSecrets); 0 = off.
    #[arg(long, env = "SIDECAR_PREFETCH_ALL", global = true)]
    prefetch_all: u32 = 0,
    /// Fetch prefetched secrets 20 per BatchGetSecretValue call (needs
    /// secretsmanager:BatchGetSecretValue).
    #[arg(long, env = "SIDECAR_PREFETCH_BATCH", global = true)]
    prefetch_batch: bool = false,
    /// Prefetched connections resolved at once.
    #[arg(long, env = "SIDECAR_PREFETCH_CONCURRENCY", global = true)]
    prefetch_concurrency: usize = 4,
    /// Log format.
    #[arg(long, env = "SIDECAR_LOG_FORMAT", global = true)]
    log_format: LogFormat = "json",
    /// Log filter, tracing's EnvFilter syntax (RUST_LOG also works, under SIDECAR_LOG).
    #[arg(long, env = "SIDECAR_LOG", global = true)]
    log: String = "info",
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
