//! The answer for a connection the sidecar cannot log in with (any non-Postgres
//! `conn_type`): the body that makes Airflow build exactly the `Connection` the
//! amazon provider's `SecretsManagerBackend` gives it for the same secret.
//!
//! The provider's rules (apache-airflow-providers-amazon 9.17 for Airflow 2.10
//! and 9.39 for 3.x, `airflow/providers/amazon/aws/secrets/secrets_manager.py`,
//! identical in both):
//! - `get_conn_value`: a secret whose text, stripped, starts with `{` is
//!   `json.loads`-ed and passed through `_standardize_secret_keys`, then
//!   `json.dumps`-ed; any other text is returned unchanged and Airflow parses
//!   it as a connection URI.
//! - `_standardize_secret_keys` builds a dict of exactly seven fields, each the
//!   value of the *first key of the secret, in the secret's own key order*,
//!   that is one of the field's words (`None` when none is):
//!   login ← `login|user|username|user_name`, password ← `password|pass|key`,
//!   host ← `host|remote_host|server`, port ← `port`, schema ←
//!   `database|schema`, conn_type ← `conn_type|conn_id|connection_type|engine`,
//!   extra ← `extra`. Values are taken as they are (no type conversion); every
//!   other key (`description`, `dbname`, `uri`, ...) is dropped.
//! - `extra_conn_words` (a backend kwarg) adds words per field; the sidecar
//!   has no such setting, so the default words apply. The old
//!   `are_secret_values_urlencoded` / `full_url_mode` kwargs no longer change
//!   anything (9.17 and 9.39 always treat `{`-secrets as JSON).
//!
//! Airflow's `Connection.from_json` (2.10 core and the 3.x task SDK alike) then
//! drops a falsy `extra`/`port`/`conn_type`, `json.dumps` an object `extra`,
//! `int()`s the port and normalises the conn_type (`postgresql` → `postgres`,
//! `-` → `_`). Answering the provider's seven fields (a `null` one left out,
//! which `from_json` treats the same) gives it the same input, so it builds
//! the same `Connection` on every version.
//!
//! A URI secret is answered as `{"uri": "<the URI>"}`: the backend class hands
//! the URI string to Airflow, which parses it with its own code (percent
//! decoding, query parameters, `__extra__`, `host` with a protocol) exactly as
//! it parses the provider's answer. One documented difference: a secret that
//! is `{"uri": "..."}` alone is served as that URI, whereas the provider drops
//! the `uri` key and Airflow builds an empty connection (every field `None`).

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::airflow::credential::Malformed;

/// Airflow's connection fields and the secret keys the provider takes for each.
const FIELD_WORDS: &[(&str, &[&str])] = &[
    ("login", &["login", "user", "username", "user_name"]),
    ("password", &["password", "pass", "key"]),
    ("host", &["host", "remote_host", "server"]),
    ("port", &["port"]),
    ("schema", &["database", "schema"]),
    (
        "conn_type",
        &["conn_type", "conn_id", "connection_type", "engine"],
    ),
    ("extra", &["extra"]),
];

/// An answer served without a login check.
pub struct Unvalidated {
    /// Airflow's (normalised) conn_type, for the log, the metric label and the
    /// refusal message; `None` when the secret names none.
    pub conn_type: Option<String>,
    /// The JSON body to answer with. It holds the password.
    pub body: Bytes,
}

impl std::fmt::Debug for Unvalidated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unvalidated")
            .field("conn_type", &self.conn_type)
            .field(
                "body",
                &format_args!("[redacted, {} bytes]", self.body.len()),
            )
            .finish()
    }
}

/// The answer body for a secret's text, as the provider would have it parsed.
pub fn to_airflow(secret_text: &str) -> Result<Unvalidated, Malformed> {
    let text = py_strip(secret_text);
    if text.is_empty() {
        return Err(Malformed("the secret value is empty".into()));
    }
    if !text.starts_with('{') {
        return uri_answer(text);
    }
    let entries = ordered_entries(text)?;
    if let [(key, Value::String(uri))] = entries.as_slice() {
        if key == "uri" {
            return uri_answer(py_strip(uri));
        }
    }
    let mut out = Map::new();
    for (field, words) in FIELD_WORDS {
        // The provider takes the first matching key in the secret's order, even a null one.
        let Some((_, value)) = entries.iter().find(|(k, _)| words.contains(&k.as_str())) else {
            continue;
        };
        if !value.is_null() {
            out.insert((*field).to_string(), value.clone());
        }
    }
    let conn_type = match out.get("conn_type") {
        None => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(normalize_conn_type(s)),
        // Airflow's normalisation would raise a TypeError on it.
        Some(_) => return Err(Malformed("conn_type is not a string".into())),
    };
    if let Some(port) = out.get("port") {
        check_port(port)?;
    }
    let body = serde_json::to_vec(&Value::Object(out))
        .map_err(|_| Malformed("the connection could not be serialised".into()))?;
    Ok(Unvalidated {
        conn_type,
        body: Bytes::from(body),
    })
}

/// Whether a (normalised or raw) conn_type / RDS engine name means Postgres.
#[cfg(test)]
fn names_postgres(conn_type: &str) -> bool {
    matches!(
        conn_type.to_ascii_lowercase().replace('-', "_").as_str(),
        "postgres" | "postgresql" | "aurora_postgresql" | "postgres_aurora"
    )
}

fn uri_answer(uri: &str) -> Result<Unvalidated, Malformed> {
    // Airflow refuses these (with the whole URI, password included, in its message).
    match uri.matches("://").count() {
        0 | 1 => {}
        2 => {
            // conn_type://protocol://login:password@host: nothing may come before the protocol.
            let rest = uri.split_once("://").map_or("", |(_, r)| r);
            let before = rest.split_once("://").map_or("", |(b, _)| b);
            if before.contains(['@', ':']) {
                return Err(Malformed(
                    "the connection URI puts something before the host's protocol; Airflow expects \
                     conn_type://protocol://login:password@host"
                        .into(),
                ));
            }
        }
        _ => {
            return Err(Malformed(
                "the connection URI has more than two \"://\"".into(),
            ))
        }
    }
    let conn_type = uri_scheme(uri).map(|s| normalize_conn_type(&s));
    let body = serde_json::to_vec(&serde_json::json!({ "uri": uri }))
        .map_err(|_| Malformed("the connection could not be serialised".into()))?;
    Ok(Unvalidated {
        conn_type,
        body: Bytes::from(body),
    })
}

/// The scheme as Python's `urllib.parse.urlsplit` finds it (lower-cased).
fn uri_scheme(uri: &str) -> Option<String> {
    let (scheme, _) = uri.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    if !first.is_ascii_alphabetic()
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return None;
    }
    Some(scheme.to_ascii_lowercase())
}

/// Airflow's `Connection._normalize_conn_type`.
fn normalize_conn_type(conn_type: &str) -> String {
    if conn_type == "postgresql" {
        "postgres".into()
    } else {
        conn_type.replace('-', "_")
    }
}

/// `from_json` does `int(port)` when the port is truthy: refuse what would raise there.
fn check_port(port: &Value) -> Result<(), Malformed> {
    let ok = match port {
        Value::Number(_) | Value::Bool(_) => true,
        Value::String(s) => {
            let s = py_strip(s);
            let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
            s.is_empty()
                || (!digits.is_empty()
                    && !digits.starts_with('_')
                    && !digits.ends_with('_')
                    && !digits.contains("__")
                    && digits.chars().all(|c| c.is_ascii_digit() || c == '_'))
        }
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Null => true,
    };
    if ok {
        Ok(())
    } else {
        Err(Malformed("port is not an integer".into()))
    }
}

/// Python's `str.strip()`: Unicode whitespace plus the separators U+001C..U+001F.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The top-level object's entries in the secret's own order. A repeated key
/// keeps its first position and its last value, as Python's `json.loads` does.
fn ordered_entries(text: &str) -> Result<Vec<(String, Value)>, Malformed> {
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<(String, Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, Value)> = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, Value>()? {
                match out.iter_mut().find(|(seen, _)| *seen == k) {
                    Some(slot) => slot.1 = v,
                    None => out.push((k, v)),
                }
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    // serde_json's errors carry only a category and a position, never the text.
    let describe = |e: serde_json::Error| {
        Malformed(format!(
            "the secret value is not a valid JSON object ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    };
    let entries = (&mut de).deserialize_map(Entries).map_err(describe)?;
    de.end().map_err(describe)?;
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(text: &str) -> (Option<String>, Value) {
        let u = to_airflow(text).expect("served");
        (u.conn_type, serde_json::from_slice(&u.body).unwrap())
    }

    #[test]
    fn aws_connection_with_role_arn_keeps_its_extra_object() {
        let secret = json!({
            "conn_type": "aws",
            "login": "AKIAEXAMPLE",
            "password": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "extra": {"role_arn": "arn:aws:iam::123456789012:role/airflow", "region_name": "eu-west-1"}
        });
        let (ct, body) = answer(&secret.to_string());
        assert_eq!(ct.as_deref(), Some("aws"));
        assert_eq!(body, secret);
    }

    #[test]
    fn http_and_snowflake_json_pass_unchanged_with_special_characters() {
        let http = json!({"conn_type": "http", "host": "api.example.com", "login": "svc@example.com",
            "password": "p@ss:w/rd?#%&=+ é€ \"quoted\" \\ end", "port": 8443, "schema": "https",
            "extra": {"verify": false, "headers": {"X-Api": "1"}}});
        assert_eq!(answer(&http.to_string()), (Some("http".into()), http));
        let snowflake = json!({"conn_type": "snowflake", "login": "AIRFLOW_SVC", "password": "Sn0w!flake#1",
            "schema": "PUBLIC", "description": "dropped, as by the provider",
            "extra": {"account": "xy12345", "warehouse": "COMPUTE_WH", "role": "TRANSFORMER"}});
        let (ct, body) = answer(&snowflake.to_string());
        let mut want = snowflake.clone();
        want.as_object_mut().unwrap().remove("description");
        assert_eq!((ct.as_deref(), body), (Some("snowflake"), want));
    }

    #[test]
    fn aliases_are_standardised_and_unknown_keys_dropped() {
        // An RDS MySQL secret: engine → conn_type, username → login, dbname is dropped
        // (the provider has no word for it), like description and dbInstanceIdentifier.
        let secret = r#"{"engine": "mysql", "username": "admin", "pass": "p@ss:w/rd%",
            "server": "db.example.com", "port": "3306", "database": "shop",
            "dbname": "ignored", "dbInstanceIdentifier": "shop-db", "description": "x"}"#;
        let (ct, body) = answer(secret);
        assert_eq!(ct.as_deref(), Some("mysql"));
        assert_eq!(
            body,
            json!({"conn_type": "mysql", "login": "admin", "password": "p@ss:w/rd%",
                   "host": "db.example.com", "port": "3306", "schema": "shop"})
        );
    }

    #[test]
    fn the_first_alias_in_the_secrets_own_order_wins() {
        let (_, body) =
            answer(r#"{"user": "first", "login": "second", "key": "k", "password": "p"}"#);
        assert_eq!(body["login"], "first");
        assert_eq!(body["password"], "k");
        let (_, body) = answer(r#"{"login": "second", "user": "first"}"#);
        assert_eq!(body["login"], "second");
        // A null first match is the provider's None: the later alias is not used.
        let (_, body) = answer(r#"{"login": null, "user": "u", "conn_type": "http"}"#);
        assert_eq!(body, json!({"conn_type": "http"}));
        // A repeated key keeps its first position and its last value (Python's json.loads).
        let (_, body) = answer(r#"{"user": "a", "login": "b", "user": "c"}"#);
        assert_eq!(body["login"], "c");
        // conn_id is one of the provider's words for conn_type.
        let (ct, _) = answer(r#"{"conn_id": "slackwebhook"}"#);
        assert_eq!(ct.as_deref(), Some("slackwebhook"));
    }

    #[test]
    fn extra_as_a_json_string_and_nested_keyfile_pass_unchanged() {
        let ssh = json!({"conn_type": "ssh", "host": "bastion", "login": "airflow",
                         "extra": "{\"key_file\": \"/keys/id\", \"no_host_key_check\": true}"});
        assert_eq!(answer(&ssh.to_string()).1, ssh);
        let gcp = json!({"conn_type": "google_cloud_platform",
            "extra": {"keyfile_dict": {"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n"},
                      "project": "p"}});
        assert_eq!(answer(&gcp.to_string()).1, gcp);
    }

    #[test]
    fn conn_type_is_normalised_like_airflow() {
        assert_eq!(
            answer(r#"{"conn_type": "google-cloud-platform"}"#)
                .0
                .as_deref(),
            Some("google_cloud_platform")
        );
        assert_eq!(
            answer("postgresql://u:p@h/db").0.as_deref(),
            Some("postgres")
        );
        assert_eq!(
            answer(r#"{"engine": "aurora-postgresql"}"#).0.as_deref(),
            Some("aurora_postgresql")
        );
        assert!(
            names_postgres("aurora-postgresql")
                && names_postgres("postgresql")
                && !names_postgres("mysql")
        );
        assert_eq!(answer(r#"{"login": "x"}"#).0, None);
        assert_eq!(answer(r#"{"conn_type": ""}"#).0, None);
    }

    #[test]
    fn uris_are_answered_unchanged_for_airflow_to_parse() {
        for uri in [
            "http://api%40user:p%40ss%2Fw%3Ard@api.example.com:8443/v1?timeout=30&verify=false",
            "slackwebhook://:T000%2FB000%2Fxyz@hooks.slack.com/services",
            "ftp://ftpuser:ftp%20pass@ftp.example.com:2121",
            "slackwebhook://https://:T000%2FB000%2Fxyz@hooks.slack.com/services",
        ] {
            let (ct, body) = answer(&format!("  {uri}\n"));
            assert_eq!(body, json!({ "uri": uri }));
            assert_eq!(ct.as_deref(), Some(uri.split(':').next().unwrap()));
        }
        // {"uri": ...} alone is a URI secret too.
        let (ct, body) = answer(r#"{"uri": " ftp://u:p@ftp.example.com "}"#);
        assert_eq!(
            (ct.as_deref(), body),
            (Some("ftp"), json!({"uri": "ftp://u:p@ftp.example.com"}))
        );
        // With other keys, "uri" is dropped as the provider does.
        let (_, body) = answer(r#"{"uri": "ftp://u:p@h", "conn_type": "ftp", "host": "h2"}"#);
        assert_eq!(body, json!({"conn_type": "ftp", "host": "h2"}));
        // Scheme-less text: Airflow's parser gets it anyway; no conn_type to name.
        assert_eq!(answer("just-a-token").0, None);
    }

    #[test]
    fn bad_secrets_get_messages_that_never_quote_them() {
        let secret = "S3cr3t-Value";
        for text in [
            format!(r#"{{"password": "{secret}", "conn_type": "http" "#),
            format!(r#"{{"password": "{secret}"}} trailing"#),
            format!(r#"{{"password": "{secret}", "port": "80{secret}"}}"#),
            format!(r#"{{"password": "{secret}", "conn_type": 7}}"#),
            format!("http://u:{secret}@a://b://c://d"),
            format!("slackwebhook://:{secret}@https://hooks.slack.com/services"),
            "  \n ".to_string(),
        ] {
            let err = to_airflow(&text).expect_err(&text);
            assert!(!err.0.contains(secret), "{err}");
            assert!(!err.0.is_empty());
        }
        // Ports Python's int() accepts are served.
        for port in [r#""5432""#, r#"" +5_432 ""#, "5432", r#""""#, "0"] {
            to_airflow(&format!(r#"{{"conn_type": "http", "port": {port}}}"#)).expect(port);
        }
    }

    #[test]
    fn debug_redacts_the_body() {
        let u = to_airflow(r#"{"conn_type": "http", "password": "hunter2-secret"}"#).unwrap();
        let shown = format!("{u:?}");
        assert!(shown.contains("http") && shown.contains("redacted"));
        assert!(!shown.contains("hunter2-secret"));
    }
}
