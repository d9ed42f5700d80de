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
//!
//! How the password may travel follows from the mode that is proven:
//! - `verify-full` (the server's name and chain checked): as the server asks;
//! - anything less: never as cleartext or MD5 (the login refuses such a
//!   request, see `auth_guard`), and over TLS only SCRAM with channel binding
//!   (`channel_binding=require`, in the answer too, so Airflow's libpq logs in
//!   the same way), unless the operator's entry says otherwise;
//! - `prefer` falls back to plaintext when a server (or a man in the middle)
//!   declines TLS, so it is proven, and answered, as `require`.
//!
//! What a secret chose can only raise the operator's floor; what an entry
//! chose is the operator's word for that connection.

use serde_json::{Map, Value};

use crate::airflow::credential::Credential;
use crate::airflow::AirflowConnection;
use crate::aws::rds::Endpoint;
use crate::config::{ConnectionEntry, Settings, SslMode};
use crate::postgres::secret_files::{NamedFile, Origin};
use crate::postgres::validate::{ChannelBinding, LoginOptions, LoginTarget, SessionAttrs};

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
    let entry_extra = entry.and_then(|e| e.extra.as_ref());
    if let Some(e) = entry_extra {
        extra.extend(e.clone());
    }
    // Who chose an `extra` option: the entry's win over the secret's.
    let origin = |key: &str| match entry_extra.is_some_and(|x| x.contains_key(key)) {
        true => Origin::Operator,
        false => Origin::Secret,
    };
    let sslmode = match entry.and_then(|e| e.sslmode) {
        Some(m) => m,
        None => match text(&extra, "sslmode") {
            Some(s) => {
                let asked = s.parse::<SslMode>()?;
                match origin("sslmode") {
                    Origin::Operator => asked,
                    // A secret may ask for more TLS than the operator's floor, never less.
                    Origin::Secret => asked.max(settings.min_sslmode),
                }
            }
            None => settings.sslmode,
        },
    };
    let sslmode = match sslmode {
        SslMode::Prefer => SslMode::Require,
        other => other,
    };
    let sslrootcert = entry
        .and_then(|e| e.sslrootcert.clone())
        .map(|p| NamedFile::new("sslrootcert", p, Origin::Operator))
        .or_else(|| {
            text(&extra, "sslrootcert")
                .map(|p| NamedFile::new("sslrootcert", p, origin("sslrootcert")))
        })
        .or_else(|| {
            settings
                .sslrootcert
                .clone()
                .map(|p| NamedFile::new("sslrootcert", p, Origin::Operator))
        })
        .filter(|_| sslmode != SslMode::Disable);
    // Where Airflow's container finds the operator's CA, if not where we do.
    let root_path = sslrootcert.as_ref().map(|f| f.path.clone());
    let answer_root = match (&settings.answer_sslrootcert, &settings.sslrootcert) {
        (Some(theirs), Some(ours)) if root_path.as_ref() == Some(ours) => Some(theirs.clone()),
        _ => root_path,
    };
    extra.insert("sslmode".into(), Value::String(sslmode.as_str().into()));
    match &answer_root {
        Some(p) => extra.insert("sslrootcert".into(), Value::String(p.display().to_string())),
        None => extra.remove("sslrootcert"),
    };
    // libpq 16's require_auth=scram-sha-256 (an entry's way to guard
    // Airflow's own login where the sidecar cannot add channel binding).
    let refuse_passwords =
        sslmode != SslMode::VerifyFull || text(&extra, "require_auth") == Some("scram-sha-256");
    if refuse_passwords
        && sslmode != SslMode::Disable
        && origin("channel_binding") == Origin::Secret
    {
        extra.insert("channel_binding".into(), Value::String("require".into()));
    }
    sqlalchemy_query_as_proven(&mut extra);
    let target = LoginTarget {
        host: host.clone(),
        port,
        database: database.clone(),
        user: cred.login.clone(),
        password: cred.password.clone(),
        sslmode,
        sslrootcert,
        refuse_passwords,
        options: login_options(&extra, origin)?,
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

/// `extra.sqlalchemy_query` is what the Postgres hook's SQLAlchemy engine
/// connects with (plain extras do not reach it): it may hold libpq options
/// only (never another host, port or user), and the TLS options the login
/// was proven with, so that a secret cannot send that path elsewhere or in
/// plaintext.
fn sqlalchemy_query_as_proven(extra: &mut Map<String, Value>) {
    let Some(query) = extra.get("sqlalchemy_query") else {
        return;
    };
    let Value::Object(query) = query else {
        extra.remove("sqlalchemy_query");
        return;
    };
    let mut query: Map<String, Value> = query
        .iter()
        .filter(|(k, _)| crate::airflow::credential::LIBPQ_OPTIONS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for key in [
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "channel_binding",
    ] {
        match extra.get(key) {
            Some(v) => query.insert(key.into(), v.clone()),
            None => query.remove(key),
        };
    }
    extra.insert("sqlalchemy_query".into(), Value::Object(query));
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
fn login_options(
    extra: &Map<String, Value>,
    origin: impl Fn(&str) -> Origin,
) -> Result<LoginOptions, String> {
    let mut o = LoginOptions {
        options: text(extra, "options").map(str::to_string),
        ..LoginOptions::default()
    };
    // Values are the secret's: named by key only.
    let unsupported = |key: &str, _value: &str, supported: &str| {
        format!("extra {key} has a value the login check does not support (supported: {supported})")
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
        (Some(cert), Some(key)) => {
            o.client_cert = Some((
                NamedFile::new("sslcert", cert, origin("sslcert")),
                NamedFile::new("sslkey", key, origin("sslkey")),
            ))
        }
        _ => {
            return Err(
                "extra has only one of sslcert and sslkey: a client certificate needs both".into(),
            )
        }
    }
    match text(extra, "require_auth") {
        None | Some("scram-sha-256") => {}
        Some(other) => return Err(unsupported("require_auth", other, "scram-sha-256")),
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
        let mut c = crate::airflow::credential::parse(
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
            t.sslrootcert,
            Some(NamedFile::new(
                "sslrootcert",
                "/sidecar/ca.pem",
                Origin::Operator
            ))
        );
        assert_eq!(a.extra["sslrootcert"], "/airflow/ca.pem");
        // A secret's own CA path is the secret's business, and read as one.
        let (t, a) = plan(&s, None, None, &cred(json!({"sslrootcert": "/own.pem"}))).unwrap();
        assert_eq!(a.extra["sslrootcert"], "/own.pem");
        assert_eq!(t.sslrootcert.unwrap().origin, Origin::Secret);
        // ... unless the entry names it.
        let entry = ConnectionEntry {
            extra: Some(
                json!({"sslrootcert": "/entry.pem"})
                    .as_object()
                    .cloned()
                    .unwrap(),
            ),
            ..Default::default()
        };
        let (t, _) = plan(
            &s,
            Some(&entry),
            None,
            &cred(json!({"sslrootcert": "/own.pem"})),
        )
        .unwrap();
        assert_eq!(
            t.sslrootcert,
            Some(NamedFile::new(
                "sslrootcert",
                "/entry.pem",
                Origin::Operator
            ))
        );
    }

    /// Who may receive a password how: (a) unverified servers never get a
    /// cleartext or MD5 one, and over TLS only SCRAM with channel binding;
    /// (b) the floor wins over a secret; (c) an entry may choose less.
    #[test]
    fn passwords_go_only_where_the_server_was_verified() {
        let s = settings(SslMode::VerifyFull);
        let (t, a) = plan(&s, None, None, &cred(json!({"sslmode": "require"}))).unwrap();
        assert_eq!(t.sslmode, SslMode::VerifyFull, "raised to the floor");
        assert!(!t.refuse_passwords, "a verified server may ask as it likes");
        assert_eq!(a.extra["sslmode"], "verify-full");
        assert!(!a.extra.contains_key("channel_binding"));

        // Below the floor only by the entry's word, and the answer says so.
        let entry = ConnectionEntry {
            sslmode: Some(SslMode::Require),
            ..Default::default()
        };
        let (t, a) = plan(&s, Some(&entry), None, &cred(json!({}))).unwrap();
        assert_eq!(t.sslmode, SslMode::Require);
        assert!(t.refuse_passwords);
        assert_eq!(t.options.channel_binding, Some(ChannelBinding::Require));
        assert_eq!(a.extra["sslmode"], "require");
        assert_eq!(a.extra["channel_binding"], "require", "Airflow's libpq too");

        // Without a CA: require, SCRAM with channel binding; a secret cannot lower either.
        let s = settings(SslMode::Require);
        let (t, a) = plan(
            &s,
            None,
            None,
            &cred(json!({"sslmode": "prefer", "channel_binding": "disable"})),
        )
        .unwrap();
        assert_eq!(t.sslmode, SslMode::Require);
        assert!(t.refuse_passwords);
        assert_eq!(t.options.channel_binding, Some(ChannelBinding::Require));
        assert_eq!(a.extra["channel_binding"], "require");

        // prefer falls back to plaintext: proven and answered as require.
        let low = settings(SslMode::Disable);
        let (t, a) = plan(&low, None, None, &cred(json!({"sslmode": "prefer"}))).unwrap();
        assert_eq!(
            (t.sslmode, a.extra["sslmode"].as_str()),
            (SslMode::Require, Some("require"))
        );
        // disable: no TLS, so no channel binding, but still no password sent.
        let (t, a) = plan(&low, None, None, &cred(json!({"sslmode": "disable"}))).unwrap();
        assert_eq!(t.sslmode, SslMode::Disable);
        assert!(t.refuse_passwords);
        assert!(!a.extra.contains_key("channel_binding"));

        // require_auth=scram-sha-256 (libpq 16) is honoured even when verified.
        let v = settings(SslMode::VerifyFull);
        let (t, a) = plan(
            &v,
            None,
            None,
            &cred(json!({"require_auth": "scram-sha-256"})),
        )
        .unwrap();
        assert!(t.refuse_passwords);
        assert_eq!(a.extra["require_auth"], "scram-sha-256");
        assert!(plan(&v, None, None, &cred(json!({"require_auth": "password"}))).is_err());

        // An entry may choose its own channel binding; the answer keeps it.
        let entry = ConnectionEntry {
            extra: Some(
                json!({"channel_binding": "prefer"})
                    .as_object()
                    .cloned()
                    .unwrap(),
            ),
            ..Default::default()
        };
        let (t, a) = plan(&s, Some(&entry), None, &cred(json!({}))).unwrap();
        assert_eq!(t.options.channel_binding, Some(ChannelBinding::Prefer));
        assert_eq!(a.extra["channel_binding"], "prefer");
        assert!(t.refuse_passwords, "still never cleartext or MD5");
    }

    #[test]
    fn sqlalchemy_query_cannot_lead_elsewhere_or_below_the_floor() {
        let s = settings(SslMode::VerifyFull);
        let (_, a) = plan(
            &s,
            None,
            None,
            &cred(json!({"sqlalchemy_query": {
                "hostaddr": "203.0.113.5", "host": "evil", "port": "1", "user": "x",
                "sslmode": "disable", "sslrootcert": "/evil.pem", "application_name": "etl",
            }})),
        )
        .unwrap();
        assert_eq!(
            a.extra["sqlalchemy_query"],
            json!({"sslmode": "verify-full", "application_name": "etl"})
        );
        let (_, a) = plan(
            &s,
            None,
            None,
            &cred(json!({"sqlalchemy_query": "host=evil"})),
        )
        .unwrap();
        assert!(!a.extra.contains_key("sqlalchemy_query"));
        let (_, a) = plan(&s, None, None, &cred(json!({}))).unwrap();
        assert!(!a.extra.contains_key("sqlalchemy_query"), "never added");
    }

    #[test]
    fn refusals_name_the_option_never_its_value() {
        let s = settings(SslMode::Require);
        for extra in [
            json!({"sslmode": "Marker-XYZ"}),
            json!({"target_session_attrs": "Marker-XYZ"}),
            json!({"sslnegotiation": "Marker-XYZ"}),
            json!({"gssencmode": "Marker-XYZ"}),
            json!({"ssl_min_protocol_version": "Marker-XYZ"}),
            json!({"sslcrl": "Marker-XYZ"}),
        ] {
            let err = plan(&s, None, None, &cred(extra.clone())).unwrap_err();
            assert!(!err.contains("Marker-XYZ"), "{extra}: {err}");
        }
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
