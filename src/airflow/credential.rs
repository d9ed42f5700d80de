//! Secret text → one internal credential type.
//!
//! Operators already store database secrets in several shapes: Airflow's own
//! connection JSON, the JSON AWS's rotation templates and RDS write, the key
//! aliases Airflow's `SecretsManagerBackend` accepts, and connection URIs. All
//! of them become a [`Credential`]. Parse errors describe *what* is missing or
//! wrong (a key name, a position), never the text itself.

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

/// libpq connection options that may travel in an answer's `extra`. Airflow's
/// Postgres hook hands every `extra` key to libpq, so any other key would make
/// the connect fail; `sslpassword` and `passfile` are left out on purpose.
pub const LIBPQ_OPTIONS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcompression",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "sslnegotiation",
    "channel_binding",
    "require_auth",
    "gssencmode",
    "krbsrvname",
    "requirepeer",
    "connect_timeout",
    "application_name",
    "fallback_application_name",
    "options",
    "client_encoding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "target_session_attrs",
    "load_balance_hosts",
];

/// Database credentials and whatever endpoint hints the secret carried.
#[derive(Clone)]
pub struct Credential {
    pub login: String,
    pub password: SecretString,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub database: Option<String>,
    /// RDS identifiers written by the rotation templates (`dbInstanceIdentifier`, ...).
    pub db_instance: Option<String>,
    pub db_cluster: Option<String>,
    /// libpq options from the secret (Airflow `extra`, or the URI's query).
    pub extra: Map<String, Value>,
    pub description: Option<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("login", &self.login)
            .field("password", &"[redacted]")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("db_instance", &self.db_instance)
            .field("db_cluster", &self.db_cluster)
            .field("extra_keys", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What is wrong with a secret, in words that never quote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn malformed(msg: impl Into<String>) -> Malformed {
    Malformed(msg.into())
}

/// The connection types the sidecar logs in with: Postgres and the RDS /
/// Aurora engine names for it. Redshift speaks the Postgres protocol but
/// Airflow's Redshift hooks connect their own way (redshift_connector, IAM),
/// so a login check would not prove what Airflow does: served unvalidated.
pub const POSTGRES_TYPES: &[&str] = &[
    "postgres",
    "postgresql",
    "aurora-postgresql",
    "postgres-aurora",
];

/// Connection types a message or log line may name: Airflow's and its
/// providers' best-known. A conn_type is text from the secret, so it is
/// named only when it is one of these words, never echoed as written.
const NAMED_TYPES: &[&str] = &[
    "postgres",
    "postgresql",
    "aurora_postgresql",
    "postgres_aurora",
    "redshift",
    "mysql",
    "mssql",
    "oracle",
    "sqlite",
    "snowflake",
    "aws",
    "google_cloud_platform",
    "azure",
    "wasb",
    "http",
    "https",
    "ssh",
    "sftp",
    "ftp",
    "smtp",
    "imap",
    "slack",
    "slackwebhook",
    "kubernetes",
    "databricks",
    "spark",
    "hive_cli",
    "hiveserver2",
    "trino",
    "presto",
    "vertica",
    "mongo",
    "redis",
    "elasticsearch",
    "kafka",
    "jdbc",
    "odbc",
    "docker",
    "generic",
    "email",
    "fs",
];

/// A secret's conn_type as a message may show it: one of [`NAMED_TYPES`]
/// (compared like Airflow normalises: case and `-`/`_` aside), `(none)`, or
/// `(not quoted)` for anything else.
pub fn shown_conn_type(conn_type: Option<&str>) -> &'static str {
    let Some(t) = conn_type else {
        return "(none)";
    };
    let same = |name: &str| {
        name.len() == t.len()
            && name.bytes().zip(t.bytes()).all(|(n, c)| {
                let c = c.to_ascii_lowercase();
                n == c || (n == b'_' && c == b'-')
            })
    };
    NAMED_TYPES
        .iter()
        .find(|n| same(n))
        .copied()
        .unwrap_or("(not quoted)")
}

/// Where Airflow's own secrets backend finds the connection type (aliases).
const CONN_TYPE_KEYS: &[&str] = &["conn_type", "conn_id", "connection_type", "engine"];

/// `extra` keys Airflow's Postgres hook consumes itself (never passed to
/// libpq), so they may travel in an answer.
pub const HOOK_KEYS: &[&str] = &[
    "cursor",
    "sqlalchemy_scheme",
    "sqlalchemy_query",
    "aws_conn_id",
    "azure_conn_id",
    "cluster-identifier",
    "workgroup-name",
];

/// What a secret holds: a Postgres credential the sidecar can prove, or a
/// connection of another type (served as Airflow's backend would serve it).
#[derive(Debug)]
pub enum Kind {
    Postgres(Credential),
    Other { conn_type: Option<String> },
}

/// Sort a secret's text by what the sidecar can do with it.
pub fn classify(text: &str) -> Result<Kind, Malformed> {
    let trimmed = text.trim();
    let uri = if trimmed.starts_with('{') {
        let value: Value = serde_json::from_str(trimmed).map_err(json_error)?;
        let Value::Object(obj) = value else {
            return Err(malformed("the secret value is not a JSON object"));
        };
        match obj.get("uri") {
            Some(Value::String(uri)) => uri.trim().to_string(),
            _ => {
                let conn_type = CONN_TYPE_KEYS
                    .iter()
                    .find_map(|k| obj.get(*k).and_then(Value::as_str))
                    .map(str::to_ascii_lowercase)
                    .filter(|t| !t.is_empty());
                let postgres = conn_type
                    .as_deref()
                    .is_none_or(|t| POSTGRES_TYPES.contains(&t));
                // IAM-token logins have no password to prove.
                let iam = extra_object(obj.get("extra"))
                    .ok()
                    .flatten()
                    .is_some_and(|e| e.get("iam").is_some_and(|v| v == true || v == "true"));
                return if postgres && !iam {
                    parse_json(trimmed).map(Kind::Postgres)
                } else {
                    Ok(Kind::Other { conn_type })
                };
            }
        }
    } else {
        trimmed.to_string()
    };
    match uri.split_once("://") {
        Some((scheme, _)) if is_uri(&uri) => {
            let _ = scheme;
            parse_uri(&uri).map(Kind::Postgres)
        }
        Some((scheme, _)) if !scheme.is_empty() => Ok(Kind::Other {
            conn_type: Some(scheme.to_ascii_lowercase()),
        }),
        _ if uri.is_empty() => Err(malformed("the secret value is empty")),
        _ => Err(malformed(
            "the secret value is neither a JSON object nor a connection URI",
        )),
    }
}

fn json_error(e: serde_json::Error) -> Malformed {
    // serde_json's syntax errors carry only a category and a position.
    malformed(format!(
        "the secret value is not valid JSON ({:?} error at line {} column {})",
        e.classify(),
        e.line(),
        e.column()
    ))
}

/// `extra` as an object (Airflow accepts an object or a JSON-object string).
fn extra_object(v: Option<&Value>) -> Result<Option<Map<String, Value>>, Malformed> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            _ => Err(malformed("extra is a string that is not a JSON object")),
        },
        Some(_) => Err(malformed("extra is neither an object nor a JSON string")),
    }
}

/// Parse a Postgres secret's text in any accepted shape.
pub fn parse(text: &str) -> Result<Credential, Malformed> {
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        parse_json(trimmed)
    } else if is_uri(trimmed) {
        parse_uri(trimmed)
    } else if trimmed.is_empty() {
        Err(malformed("the secret value is empty"))
    } else {
        Err(malformed(
            "the secret value is neither a JSON object nor a postgresql:// URI",
        ))
    }
}

fn is_uri(s: &str) -> bool {
    let lower = s.get(..14).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

fn parse_json(text: &str) -> Result<Credential, Malformed> {
    let value: Value = serde_json::from_str(text).map_err(json_error)?;
    let Value::Object(obj) = value else {
        return Err(malformed("the secret value is not a JSON object"));
    };
    // Airflow also accepts {"uri": "..."}.
    if let Some(Value::String(uri)) = obj.get("uri") {
        return parse_uri(uri.trim());
    }

    for (key, engine_key) in [("conn_type", true), ("engine", false)] {
        if let Some(v) = obj.get(key) {
            let kind = v.as_str().unwrap_or_default().to_ascii_lowercase();
            let ok = matches!(
                kind.as_str(),
                "postgres" | "postgresql" | "aurora-postgresql" | "postgres-aurora"
            ) || (engine_key && kind.is_empty());
            if !ok {
                // The key only: the value is the secret writer's text.
                return Err(malformed(format!(
                    "{key} is not Postgres (postgres, postgresql, aurora-postgresql or postgres-aurora)"
                )));
            }
        }
    }

    let login = first_string(&obj, &["login", "user", "username", "user_name"])?;
    let password = first_string(&obj, &["password", "pass", "key"])?;
    let (Some(login), Some(password)) = (login, password) else {
        let mut missing = vec![];
        if first_string(&obj, &["login", "user", "username", "user_name"])?.is_none() {
            missing.push("login (login, user, username or user_name)");
        }
        if first_string(&obj, &["password", "pass", "key"])?.is_none() {
            missing.push("password (password, pass or key)");
        }
        return Err(malformed(format!(
            "the secret has no {}",
            missing.join(" and no ")
        )));
    };

    let port = match obj.get("port") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_port(v)?),
    };
    let extra = extra_object(obj.get("extra"))?.unwrap_or_default();

    Ok(Credential {
        login,
        password: SecretString::from(password),
        host: first_string(&obj, &["host", "remote_host", "server"])?,
        port,
        // Airflow's `schema` is the database name for Postgres.
        database: first_string(&obj, &["schema", "database", "dbname"])?,
        db_instance: first_string(&obj, &["dbInstanceIdentifier"])?,
        db_cluster: first_string(&obj, &["dbClusterIdentifier"])?,
        extra: libpq_only(extra),
        description: first_string(&obj, &["description"])?,
    })
}

/// The first present, non-empty string among `keys`; a non-string is an error.
fn first_string(obj: &Map<String, Value>, keys: &[&str]) -> Result<Option<String>, Malformed> {
    for key in keys {
        match obj.get(*key) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) if s.is_empty() => continue,
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            // Numbers are tolerated for fields like a numeric database name,
            // but never echoed back into a message.
            Some(Value::Number(n)) => return Ok(Some(n.to_string())),
            Some(_) => return Err(malformed(format!("{key} is not a string"))),
        }
    }
    Ok(None)
}

fn parse_port(v: &Value) -> Result<u16, Malformed> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n @ 1..=65535) => Ok(n as u16),
        _ => Err(malformed("port is not a number between 1 and 65535")),
    }
}

fn libpq_only(extra: Map<String, Value>) -> Map<String, Value> {
    let mut kept = Map::new();
    for (k, v) in extra {
        if LIBPQ_OPTIONS.contains(&k.as_str()) || HOOK_KEYS.contains(&k.as_str()) {
            kept.insert(k, v);
        } else {
            // Key names are not secret; values might be.
            tracing::debug!(key = %k, "dropping non-libpq key from extra");
        }
    }
    kept
}

fn parse_uri(text: &str) -> Result<Credential, Malformed> {
    let url = url::Url::parse(text)
        .map_err(|e| malformed(format!("the connection URI does not parse: {e}")))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(malformed(
            "the connection URI's scheme is not postgres:// or postgresql://",
        ));
    }
    let decode = |s: &str, what: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| malformed(format!("the URI's {what} is not valid UTF-8 once decoded")))
    };
    let login = decode(url.username(), "user")?;
    let password = decode(url.password().unwrap_or_default(), "password")?;
    if login.is_empty() || password.is_empty() {
        let mut missing = vec![];
        if login.is_empty() {
            missing.push("user");
        }
        if password.is_empty() {
            missing.push("password");
        }
        return Err(malformed(format!(
            "the connection URI has no {}",
            missing.join(" and no ")
        )));
    }
    let database = url.path().trim_start_matches('/');
    let mut extra = Map::new();
    for (k, v) in url.query_pairs() {
        extra.insert(k.into_owned(), Value::String(v.into_owned()));
    }
    Ok(Credential {
        login,
        password: SecretString::from(password),
        host: url
            .host_str()
            .filter(|h| !h.is_empty())
            .map(|h| h.trim_matches(['[', ']']).to_string()),
        port: url.port(),
        database: (!database.is_empty())
            .then(|| decode(database, "database"))
            .transpose()?,
        db_instance: None,
        db_cluster: None,
        extra: libpq_only(extra),
        description: None,
    })
}

/// Parse one fetched version; the message names the version, never the value.
pub fn parse_version(value: &SecretString, version_id: &str) -> Result<Credential, String> {
    parse(value.expose_secret()).map_err(|m| format!("version {version_id}: {m}"))
}

impl Credential {
    /// The password as parsed (tests read it; the pipeline moves it out).
    #[cfg(test)]
    fn password(&self) -> &str {
        self.password.expose_secret()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "s3cr3t-Pa55";

    #[test]
    fn airflow_json() {
        let c = parse(&format!(
            r#"{{"conn_type":"postgres","host":"db","login":"u","password":"{PW}","schema":"app","port":"5433","extra":{{"sslmode":"require","cursor":"dictcursor"}}}}"#
        ))
        .unwrap();
        assert_eq!(c.login, "u");
        assert_eq!(c.password(), PW);
        assert_eq!(c.host.as_deref(), Some("db"));
        assert_eq!(c.port, Some(5433));
        assert_eq!(c.database.as_deref(), Some("app"));
        assert_eq!(
            c.extra.len(),
            2,
            "libpq options and the hook's own keys survive"
        );
        assert_eq!(c.extra["sslmode"], "require");
        assert_eq!(c.extra["cursor"], "dictcursor");
    }

    #[test]
    fn rds_rotation_template_json() {
        let c = parse(&format!(
            r#"{{"engine":"postgres","host":"h","username":"u","password":"{PW}","dbname":"d","port":5432,"dbInstanceIdentifier":"inst"}}"#
        ))
        .unwrap();
        assert_eq!(c.login, "u");
        assert_eq!(c.database.as_deref(), Some("d"));
        assert_eq!(c.db_instance.as_deref(), Some("inst"));
        assert!(c.extra.is_empty(), "bookkeeping keys never reach extra");
    }

    #[test]
    fn rds_managed_master_secret_has_only_username_and_password() {
        let c = parse(&format!(r#"{{"username":"master","password":"{PW}"}}"#)).unwrap();
        assert_eq!(c.login, "master");
        assert!(c.host.is_none() && c.port.is_none());
    }

    #[test]
    fn airflow_backend_aliases() {
        let c = parse(&format!(
            r#"{{"user_name":"u","key":"{PW}","remote_host":"h","database":"d"}}"#
        ))
        .unwrap();
        assert_eq!(
            (
                c.login.as_str(),
                c.password(),
                c.host.as_deref(),
                c.database.as_deref()
            ),
            ("u", PW, Some("h"), Some("d"))
        );
        let c = parse(&format!(r#"{{"user":"u","pass":"{PW}","server":"h"}}"#)).unwrap();
        assert_eq!((c.login.as_str(), c.host.as_deref()), ("u", Some("h")));
    }

    #[test]
    fn extra_as_json_string() {
        let c = parse(&format!(
            r#"{{"login":"u","password":"{PW}","extra":"{{\"sslmode\":\"verify-full\"}}"}}"#
        ))
        .unwrap();
        assert_eq!(c.extra["sslmode"], "verify-full");
    }

    #[test]
    fn uri_with_percent_encoding() {
        let c = parse(
            "postgresql://us%40er:p%2Fa%3Ass@db.example:6432/my%20db?sslmode=verify-ca&foo=1",
        )
        .unwrap();
        assert_eq!(c.login, "us@er");
        assert_eq!(c.password(), "p/a:ss");
        assert_eq!(c.host.as_deref(), Some("db.example"));
        assert_eq!(c.port, Some(6432));
        assert_eq!(c.database.as_deref(), Some("my db"));
        assert_eq!(c.extra.len(), 1);
        assert_eq!(c.extra["sslmode"], "verify-ca");
        assert!(parse("postgres://u:p@h/d").is_ok());
        assert!(parse(r#"{"uri":"postgres://u:p@h/d"}"#).is_ok());
    }

    #[test]
    fn malformed_messages_name_the_problem_and_never_the_value() {
        let cases = [
            (
                format!(r#"{{"login":"u","password":"{PW}""#),
                "not valid JSON",
            ),
            (format!(r#"{{"password":"{PW}"}}"#), "no login"),
            (r#"{"login":"u"}"#.to_string(), "no password"),
            (
                format!(r#"{{"login":"u","password":"{PW}","port":"{PW}"}}"#),
                "port",
            ),
            (format!("just-a-password-{PW}"), "neither a JSON object"),
            (format!("postgresql://u@h/{PW}"), "no password"),
            (
                format!(r#"{{"conn_type":"mysql","login":"u","password":"{PW}"}}"#),
                "not Postgres",
            ),
            (format!(r#"["{PW}"]"#), "neither a JSON object"),
            (
                format!(r#"{{"login":"u","password":"{PW}","extra":"{PW}"}}"#),
                "extra",
            ),
        ];
        for (text, want) in cases {
            let err = parse(&text).expect_err(&text).0;
            assert!(err.contains(want), "{err:?} should mention {want:?}");
            assert!(!err.contains(PW), "{err:?} leaks the secret");
        }
    }

    #[test]
    fn a_conn_type_is_named_only_when_it_is_a_known_word() {
        assert_eq!(shown_conn_type(Some("aws")), "aws");
        assert_eq!(shown_conn_type(Some("MySQL")), "mysql");
        assert_eq!(
            shown_conn_type(Some("google-cloud-platform")),
            "google_cloud_platform"
        );
        assert_eq!(shown_conn_type(None), "(none)");
        for other in [PW, "awsx", "", "aws ", "mysql\n"] {
            assert_eq!(shown_conn_type(Some(other)), "(not quoted)", "{other:?}");
        }
        // A secret whose type field holds something else: never echoed.
        for key in ["conn_type", "engine"] {
            let text = format!(r#"{{"{key}":"{PW}","login":"u","password":"p","host":"h"}}"#);
            let err = parse(&text).expect_err(&text).0;
            assert!(err.contains(key) && !err.contains(PW), "{err}");
            let lower = PW.to_ascii_lowercase();
            assert!(!err.to_ascii_lowercase().contains(&lower), "{err}");
        }
    }

    #[test]
    fn debug_redacts_the_password() {
        let c = parse(&format!(r#"{{"login":"u","password":"{PW}"}}"#)).unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains(PW), "{dbg}");
        assert!(dbg.contains("[redacted]"));
    }
}
