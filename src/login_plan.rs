//! The login plan: where and how Airflow will log in, and the answer that
//! says so. A pure function of the config entry, the RDS endpoint, the
//! secret and the settings, so its precedence rules are unit-tested here.
//!
//! | field        | first of                                                        |
//! |--------------|-----------------------------------------------------------------|
//! | host, port   | config entry, RDS endpoint, secret, (port) 5432                 |
//! | database     | config entry, secret, RDS `DBName`, the user name (libpq's rule) |
//! | sslmode      | config entry, secret's `extra` raised to `min_sslmode`, setting  |
//! | sslrootcert  | config entry, secret's `extra`, setting (none with `disable`)    |
//! | other extra  | config entry over secret (libpq options only)                   |

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::airflow::AirflowConnection;
use crate::config::{ConnectionEntry, Settings, SslMode};
use crate::credential::Credential;
use crate::sources::rds::Endpoint;
use crate::validate::{ChannelBinding, LoginOptions, LoginTarget, SessionAttrs};

/// The plan for one version, or why it cannot be followed (the message names
/// the option or field, never a value that could be secret).
pub fn plan(
    settings: &Settings,
    entry: Option<&ConnectionEntry>,
    endpoint: Option<&Endpoint>,
    cred: &Credential,
) -> Result<(LoginTarget, AirflowConnection), String> {
    let host = entry
        .and_then(|e| e.host.clone())
        .or_else(|| endpoint.map(|e| e.host.clone()))
        .or_else(|| cred.host.clone())
        .ok_or("the secret has no host, and no RDS instance or cluster names one")?;
    let port = entry
        .and_then(|e| e.port)
        .or_else(|| endpoint.map(|e| e.port))
        .or(cred.port)
        .unwrap_or(5432);
    let database = entry
        .and_then(|e| e.database.clone())
        .or_else(|| cred.database.clone())
        .or_else(|| endpoint.and_then(|e| e.database.clone()))
        // libpq's default database is the user's name; say it explicitly.
        .unwrap_or_else(|| cred.login.clone());
    let mut extra: Map<String, Value> = cred.extra.clone();
    if let Some(e) = entry.and_then(|e| e.extra.as_ref()) {
        extra.extend(e.clone());
    }
    let sslmode = match entry.and_then(|e| e.sslmode) {
        Some(m) => m,
        None => match text(&extra, "sslmode") {
            // A secret may ask for more TLS than the operator's minimum, never less.
            Some(s) => s.parse::<SslMode>()?.max(settings.min_sslmode),
            None => settings.sslmode,
        },
    };
    let sslrootcert = entry
        .and_then(|e| e.sslrootcert.clone())
        .or_else(|| text(&extra, "sslrootcert").map(PathBuf::from))
        .or_else(|| settings.sslrootcert.clone())
        .filter(|_| sslmode != SslMode::Disable);
    // Where Airflow's container finds the operator's CA, if not where we do.
    let answer_root = match (&settings.answer_sslrootcert, &settings.sslrootcert) {
        (Some(theirs), Some(ours)) if sslrootcert.as_ref() == Some(ours) => Some(theirs.clone()),
        _ => sslrootcert.clone(),
    };
    extra.insert("sslmode".into(), Value::String(sslmode.as_str().into()));
    match &answer_root {
        Some(p) => extra.insert("sslrootcert".into(), Value::String(p.display().to_string())),
        None => extra.remove("sslrootcert"),
    };
    let target = LoginTarget {
        host: host.clone(),
        port,
        database: database.clone(),
        user: cred.login.clone(),
        password: cred.password.clone(),
        sslmode,
        sslrootcert,
        options: login_options(&extra)?,
    };
    let answer = AirflowConnection {
        host,
        port,
        login: cred.login.clone(),
        password: cred.password.clone(),
        database,
        extra,
        description: entry
            .and_then(|e| e.description.clone())
            .or_else(|| cred.description.clone()),
    };
    Ok((target, answer))
}

fn text<'a>(extra: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    extra
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The libpq options in `extra` that decide whether a login succeeds: each
/// one is honoured by the check or refused here with its name, so that a
/// proven answer never fails in Airflow on an option we skipped.
fn login_options(extra: &Map<String, Value>) -> Result<LoginOptions, String> {
    let mut o = LoginOptions {
        options: text(extra, "options").map(str::to_string),
        ..LoginOptions::default()
    };
    let unsupported = |key: &str, value: &str, supported: &str| {
        format!("extra {key}={value} is not supported by the login check (supported: {supported})")
    };
    if let Some(v) = text(extra, "target_session_attrs") {
        o.target_session_attrs = Some(match v {
            "any" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "read-only" => SessionAttrs::ReadOnly,
            other => {
                return Err(unsupported(
                    "target_session_attrs",
                    other,
                    "any, read-write, read-only",
                ))
            }
        });
    }
    if let Some(v) = text(extra, "channel_binding") {
        o.channel_binding = Some(match v {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            other => {
                return Err(unsupported(
                    "channel_binding",
                    other,
                    "disable, prefer, require",
                ))
            }
        });
    }
    match text(extra, "sslnegotiation") {
        None | Some("postgres") => {}
        Some("direct") => o.direct_tls = true,
        Some(other) => return Err(unsupported("sslnegotiation", other, "postgres, direct")),
    }
    match (text(extra, "sslcert"), text(extra, "sslkey")) {
        (None, None) => {}
        (Some(cert), Some(key)) => o.client_cert = Some((cert.into(), key.into())),
        _ => {
            return Err(
                "extra has only one of sslcert and sslkey: a client certificate needs both".into(),
            )
        }
    }
    match text(extra, "gssencmode") {
        None | Some("disable" | "prefer") => {}
        Some(other) => return Err(unsupported("gssencmode", other, "disable, prefer")),
    }
    for key in [
        "sslcrl",
        "sslcrldir",
        "requirepeer",
        "krbsrvname",
        "ssl_max_protocol_version",
    ] {
        if let Some(v) = extra.get(key) {
            let shown = v.as_str().map(|_| "...").unwrap_or("(not a string)");
            return Err(format!(
                "extra {key}={shown} is not supported by the login check; remove it or serve this connection from another backend"
            ));
        }
    }
    match text(extra, "ssl_min_protocol_version") {
        // rustls never speaks below TLS 1.2, so these minimums always hold.
        None | Some("TLSv1" | "TLSv1.1" | "TLSv1.2") => {}
        Some(other) => {
            return Err(unsupported(
                "ssl_min_protocol_version",
                other,
                "TLSv1.2 or lower",
            ))
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SettingArgs;
    use serde_json::json;

    fn settings(min: SslMode) -> Settings {
        let mut s = Settings::from_args(SettingArgs::default()).unwrap();
        s.min_sslmode = min;
        s.sslmode = SslMode::Require.max(min);
        s
    }

    fn cred(extra: Value) -> Credential {
        let mut c = crate::credential::parse(
            &json!({"login": "u", "password": "pw-1", "host": "secret-host", "port": 5433, "schema": "secretdb"})
                .to_string(),
        )
        .unwrap();
        c.extra = extra.as_object().cloned().unwrap_or_default();
        c
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            host: "rds-host".into(),
            port: 5434,
            database: Some("rdsdb".into()),
            master_secret_arn: None,
            master_secret_status: None,
        }
    }

    #[test]
    fn precedence_entry_then_rds_then_secret() {
        let s = settings(SslMode::Require);
        let (t, _) = plan(&s, None, None, &cred(json!({}))).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.database.as_str()),
            ("secret-host", 5433, "secretdb")
        );
        let (t, _) = plan(&s, None, Some(&endpoint()), &cred(json!({}))).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.database.as_str()),
            ("rds-host", 5434, "secretdb")
        );
        let entry = ConnectionEntry {
            host: Some("entry-host".into()),
            port: Some(6000),
            database: Some("entrydb".into()),
            ..Default::default()
        };
        let (t, a) = plan(&s, Some(&entry), Some(&endpoint()), &cred(json!({}))).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.database.as_str()),
            ("entry-host", 6000, "entrydb")
        );
        assert_eq!(
            (a.host.as_str(), a.port, a.database.as_str()),
            ("entry-host", 6000, "entrydb")
        );
        let mut bare = cred(json!({}));
        bare.database = None;
        let (t, _) = plan(&s, None, Some(&endpoint()), &bare).unwrap();
        assert_eq!(t.database, "rdsdb", "RDS DBName when the secret names none");
        bare.host = None;
        assert!(plan(&s, None, None, &bare).unwrap_err().contains("no host"));
    }

    #[test]
    fn a_secret_never_lowers_tls_below_the_minimum() {
        let s = settings(SslMode::VerifyFull);
        let (t, a) = plan(&s, None, None, &cred(json!({"sslmode": "disable"}))).unwrap();
        assert_eq!(t.sslmode, SslMode::VerifyFull);
        assert_eq!(a.extra["sslmode"], "verify-full");
        let s = settings(SslMode::Disable);
        let (t, _) = plan(&s, None, None, &cred(json!({"sslmode": "disable"}))).unwrap();
        assert_eq!(t.sslmode, SslMode::Disable);
        assert!(t.sslrootcert.is_none());
        let (t, _) = plan(
            &s,
            None,
            None,
            &cred(json!({"sslmode": "verify-ca", "sslrootcert": "/ca.pem"})),
        )
        .unwrap();
        assert_eq!(t.sslmode, SslMode::VerifyCa, "asking for more is fine");
        assert!(plan(&s, None, None, &cred(json!({"sslmode": "bogus"}))).is_err());
    }

    #[test]
    fn the_answer_names_the_ca_where_airflow_sees_it() {
        let mut s = settings(SslMode::Require);
        s.sslrootcert = Some("/sidecar/ca.pem".into());
        s.answer_sslrootcert = Some("/airflow/ca.pem".into());
        let (t, a) = plan(&s, None, None, &cred(json!({}))).unwrap();
        assert_eq!(
            t.sslrootcert.as_deref(),
            Some(std::path::Path::new("/sidecar/ca.pem"))
        );
        assert_eq!(a.extra["sslrootcert"], "/airflow/ca.pem");
        // A secret's own CA path is the secret's business.
        let (_, a) = plan(&s, None, None, &cred(json!({"sslrootcert": "/own.pem"}))).unwrap();
        assert_eq!(a.extra["sslrootcert"], "/own.pem");
    }

    #[test]
    fn login_options_are_honoured_or_refused_by_name() {
        let s = settings(SslMode::Require);
        let (t, a) = plan(
            &s,
            None,
            None,
            &cred(json!({"options": "-c search_path=app", "target_session_attrs": "read-write", "channel_binding": "require"})),
        )
        .unwrap();
        assert_eq!(t.options.options.as_deref(), Some("-c search_path=app"));
        assert_eq!(
            t.options.target_session_attrs,
            Some(SessionAttrs::ReadWrite)
        );
        assert_eq!(t.options.channel_binding, Some(ChannelBinding::Require));
        assert_eq!(
            a.extra["options"], "-c search_path=app",
            "the answer keeps them for Airflow"
        );
        for (extra, named) in [
            (
                json!({"target_session_attrs": "primary"}),
                "target_session_attrs",
            ),
            (json!({"sslcert": "/c.pem"}), "sslkey"),
            (json!({"gssencmode": "require"}), "gssencmode"),
            (json!({"sslcrl": "/crl.pem"}), "sslcrl"),
            (
                json!({"ssl_min_protocol_version": "TLSv1.3"}),
                "ssl_min_protocol_version",
            ),
        ] {
            let err = plan(&s, None, None, &cred(extra)).unwrap_err();
            assert!(err.contains(named), "{err}");
        }
        let (t, _) = plan(
            &s,
            None,
            None,
            &cred(json!({"sslcert": "/c.pem", "sslkey": "/k.pem"})),
        )
        .unwrap();
        assert!(t.options.client_cert.is_some());
    }
}
