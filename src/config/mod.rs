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
use std::time::Duration;

mod args;
mod values;

pub use args::{Cli, Command, SettingArgs, Sources};
pub use values::*;

use crate::airflow::credential::LIBPQ_OPTIONS;
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

    /// The settings from flags/env over the file (`a`), over the built-in
    /// [`args::DEFAULTS`]; then the defaults that depend on other settings,
    /// and the checks.
    pub fn from_args(mut a: SettingArgs) -> Result<Settings, ConfigError> {
        a.log = a.log.or_else(|| std::env::var("RUST_LOG").ok());
        let connections = std::mem::take(&mut a.connections);
        let a = SettingArgs {
            connections,
            ..a.or(SettingArgs::defaults())
        };
        // Every setting below has a default in DEFAULTS (a test proves it).
        fn set<T>(v: Option<T>) -> T {
            v.expect("a default in DEFAULTS")
        }
        let d = |v: Option<Dur>| set(v).0;
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
            listen: set(a.listen),
            admin_listen: set(a.admin_listen),
            token_file: a.token_file,
            token_create: set(a.token_create),
            insecure_no_token: set(a.insecure_no_token),
            connections_prefix: trim_prefix(&set(a.connections_prefix)),
            variables_prefix: trim_prefix(&set(a.variables_prefix)),
            lookup_pattern,
            sslmode,
            sslrootcert,
            connect_timeout: d(a.connect_timeout),
            resolve: resolve.unwrap_or_default(),
            secret_ttl: d(a.secret_ttl),
            endpoint_ttl: d(a.endpoint_ttl),
            validation_ttl: d(a.validation_ttl),
            negative_ttl: d(a.negative_ttl),
            error_ttl: d(a.error_ttl),
            max_stale: d(a.max_stale),
            cache_size: set(a.cache_size),
            aws_timeout: d(a.aws_timeout),
            request_timeout: d(a.request_timeout),
            rotation_stuck_after: d(a.rotation_stuck_after),
            max_connections: set(a.max_connections),
            max_concurrent_checks: set(a.max_concurrent_checks),
            check_timeout: d(a.check_timeout),
            serve_previous_for: d(a.serve_previous_for),
            min_sslmode,
            secret_file_dirs,
            answer_sslrootcert: a.answer_sslrootcert,
            config_prefix: trim_prefix(&set(a.config_prefix)),
            config_keys: trimmed(a.config_keys),
            max_in_flight: set(a.max_in_flight),
            team: a.team,
            unvalidated: set(a.unvalidated),
            prefetch: trimmed(a.prefetch),
            prefetch_entries: set(a.prefetch_entries),
            prefetch_all: set(a.prefetch_all),
            prefetch_batch: set(a.prefetch_batch),
            prefetch_concurrency: set(a.prefetch_concurrency),
            log_format: set(a.log_format),
            log: set(a.log),
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
    fn every_default_is_written_once_and_parses() {
        let d = SettingArgs::defaults();
        assert_eq!(d.secret_ttl, Some(Dur(Duration::from_secs(300))));
        assert_eq!(d.listen, Some("127.0.0.1:9797".parse().unwrap()));
        assert_eq!(d.unvalidated, Some(Unvalidated::Serve));
        // The same text is the help's default.
        let help = args::Cli::shown().render_help().to_string();
        assert!(help.contains("[default: 5m]"), "{help}");
        assert!(help.contains("[default: airflow/connections]"), "{help}");
        // And what a run without flags, env or file gets.
        let s = Settings::from_args(SettingArgs::default()).unwrap();
        assert_eq!(s.secret_ttl, Duration::from_secs(300));
        assert_eq!(s.admin_listen.port(), 9798);
        assert_eq!(s.request_timeout, Duration::from_secs(8));
    }
    use clap::Parser;

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
