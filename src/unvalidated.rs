//! PLACEHOLDER until the parity work lands: connection types the sidecar
//! cannot log in with, answered as Airflow's `SecretsManagerBackend` would.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::credential::Malformed;

pub struct Unvalidated {
    pub conn_type: Option<String>,
    pub body: Bytes,
}

impl std::fmt::Debug for Unvalidated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unvalidated")
            .field("conn_type", &self.conn_type)
            .field("body", &"[redacted]")
            .finish()
    }
}

pub fn to_airflow(secret_text: &str) -> Result<Unvalidated, Malformed> {
    let t = secret_text.trim();
    if !t.starts_with('{') {
        let body = serde_json::to_vec(&serde_json::json!({ "uri": t })).expect("json");
        return Ok(Unvalidated {
            conn_type: t.split_once("://").map(|(s, _)| s.to_string()),
            body: Bytes::from(body),
        });
    }
    let obj: Map<String, Value> =
        serde_json::from_str(t).map_err(|_| Malformed("not JSON".into()))?;
    if let Some(Value::String(u)) = obj.get("uri") {
        let body = serde_json::to_vec(&serde_json::json!({ "uri": u })).expect("json");
        return Ok(Unvalidated {
            conn_type: None,
            body: Bytes::from(body),
        });
    }
    let pick = |keys: &[&str]| keys.iter().find_map(|k| obj.get(*k).cloned());
    let mut out = Map::new();
    for (field, keys) in [
        (
            "conn_type",
            &["conn_type", "conn_id", "connection_type", "engine"][..],
        ),
        ("login", &["login", "user", "username", "user_name"]),
        ("password", &["password", "pass", "key"]),
        ("host", &["host", "remote_host", "server"]),
        ("schema", &["database", "schema"]),
        ("port", &["port"]),
        ("extra", &["extra"]),
    ] {
        if let Some(v) = pick(keys) {
            out.insert(field.to_string(), v);
        }
    }
    let conn_type = out
        .get("conn_type")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(Unvalidated {
        conn_type,
        body: Bytes::from(serde_json::to_vec(&out).expect("json")),
    })
}
