//! The answer: Airflow connection JSON with only the keys Airflow accepts.
//!
//! Airflow builds `Connection(**json)`; any other key raises inside Airflow
//! and the task sees "conn_id isn't defined". `schema` is the database name
//! (that is what the Postgres hook uses it for) and `extra` holds libpq
//! options only, because the hook hands every extra key to libpq.

pub mod credential;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};

/// A connection ready to hand to Airflow.
pub struct AirflowConnection {
    pub host: String,
    pub port: u16,
    pub login: String,
    pub password: SecretString,
    pub database: String,
    pub extra: Map<String, Value>,
    pub description: Option<String>,
}

impl AirflowConnection {
    /// The JSON body. The only place a password is written out.
    pub fn to_json(&self) -> Vec<u8> {
        let mut obj = json!({
            "conn_type": "postgres",
            "host": self.host,
            "port": self.port,
            "login": self.login,
            "password": self.password.expose_secret(),
            "schema": self.database,
            "extra": self.extra,
        });
        if let Some(d) = &self.description {
            obj["description"] = Value::String(d.clone());
        }
        serde_json::to_vec(&obj).expect("a JSON value always serializes")
    }
}

impl std::fmt::Debug for AirflowConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AirflowConnection({}@{}:{}/{}, password: [redacted])",
            self.login, self.host, self.port, self.database
        )
    }
}

/// Exactly what Airflow's `Connection(**json)` takes.
#[cfg(test)]
const AIRFLOW_KEYS: &[&str] = &[
    "conn_type",
    "host",
    "port",
    "login",
    "password",
    "schema",
    "extra",
    "description",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_airflow_keys_and_the_right_types() {
        let c = AirflowConnection {
            host: "h".into(),
            port: 5432,
            login: "u".into(),
            password: SecretString::from("pw-xyz"),
            database: "d".into(),
            extra: Map::from_iter([("sslmode".to_string(), json!("verify-full"))]),
            description: Some("from airflow/connections/x".into()),
        };
        let v: Value = serde_json::from_slice(&c.to_json()).unwrap();
        let obj = v.as_object().unwrap();
        assert!(
            obj.keys().all(|k| AIRFLOW_KEYS.contains(&k.as_str())),
            "{obj:?}"
        );
        assert_eq!(v["conn_type"], "postgres");
        assert_eq!(v["port"], 5432);
        assert_eq!(v["schema"], "d");
        assert!(v["extra"].is_object());
        assert!(!format!("{c:?}").contains("pw-xyz"));
    }
}
