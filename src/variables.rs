//! Plain values: Airflow Variables at `<variables_prefix>/<key>` (a team's
//! `<team>--<key>` first) and config options at `<config_prefix>/<key>`
//! (what Airflow asks for options set with a `_secret` suffix). Served
//! exactly as stored, cached like secret values, "not found" like any miss.
//! A config value that is a Postgres URI (`[database] sql_alchemy_conn`) is
//! proven to log in before it is served; nothing else is validated.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};

use crate::cache::ConnKey;
use crate::error::{ErrorCode, LookupError};
use crate::front::Resolver;
use crate::resolve::Use;
use crate::source::candidates;
use crate::sources::secrets_manager::AWSCURRENT;
use crate::sources::Attempts;
use crate::validate::Outcome;

/// A value for Airflow: `{"value": "..."}`, when it was fetched, and the
/// secret that held it.
pub struct Value {
    pub body: Bytes,
    pub fetched_at: Instant,
    pub secret_id: String,
    pub version_id: String,
    /// The value as stored (the body holds it too): never logged.
    pub text: SecretString,
}

/// A SQLAlchemy or libpq Postgres URI (`postgresql+psycopg2://...`), as the
/// plain `postgresql://` URI the login check reads.
fn postgres_uri(value: &str) -> Option<String> {
    let (scheme, rest) = value.trim().split_once("://")?;
    let base = scheme.split('+').next()?.to_ascii_lowercase();
    matches!(base.as_str(), "postgres" | "postgresql").then(|| format!("postgresql://{rest}"))
}

impl Resolver {
    pub async fn variable(
        self: &Arc<Self>,
        key: &ConnKey,
        refresh: bool,
    ) -> Result<Arc<Value>, LookupError> {
        let names = candidates(|id| self.settings.variable_secret_id(id), key);
        self.plain("variable", key, names, refresh).await
    }

    pub async fn config(
        self: &Arc<Self>,
        key: &ConnKey,
        refresh: bool,
    ) -> Result<Arc<Value>, LookupError> {
        let names = vec![self.settings.config_secret_id(key.conn_id())];
        let value = self.plain("config option", key, names, refresh).await?;
        if let Some(uri) = postgres_uri(value.text.expose_secret()) {
            self.prove_config_uri(key, &uri, &value, refresh).await?;
        }
        Ok(value)
    }

    /// A value, fetched once for all concurrent callers in a task of its
    /// own (a client that gives up cancels nothing), with the connections'
    /// outage rules: while AWS has an outage the last value fetched is served
    /// (up to `max_stale`; DAG files that read Variables at parse time keep
    /// importing), AWS is tried again only after a backoff, and a refusal
    /// stops serving.
    async fn plain(
        self: &Arc<Self>,
        what: &'static str,
        key: &ConnKey,
        names: Vec<String>,
        refresh: bool,
    ) -> Result<Arc<Value>, LookupError> {
        let this = self.clone();
        let k = key.clone();
        let work = move || async move { this.plain_with_outages(what, &k, &names, refresh).await };
        // refresh=true is an expensive request like a connection's.
        let (slots, bound) = match refresh {
            true => (&self.expensive, crate::front::Bound::Checks),
            false => (&self.in_flight, crate::front::Bound::InFlight),
        };
        self.values
            .run((what, key.clone(), refresh), Some(slots), work)
            .await
            .unwrap_or_else(|e| Err(crate::front::not_run(e, key, what, bound)))
    }

    async fn plain_with_outages(
        &self,
        what: &'static str,
        key: &ConnKey,
        names: &[String],
        refresh: bool,
    ) -> Result<Arc<Value>, LookupError> {
        let k = (what, key.clone());
        let last = || async {
            self.last_values
                .get(&k)
                .filter(|v| v.fetched_at.elapsed() <= self.settings.max_stale)
        };
        if !refresh {
            if let Some((next_try, _, e)) = self.value_outages.get(&k) {
                if next_try > Instant::now() {
                    return last().await.ok_or(e);
                }
            }
        }
        let attempts = if self.value_outages.contains_key(&k) || self.last_values.contains_key(&k) {
            Attempts::Once
        } else {
            Attempts::Retried
        };
        match self.plain_value(what, key, names, refresh, attempts).await {
            Ok(v) => {
                let v = Arc::new(v);
                self.value_outages.invalidate(&k);
                self.last_values.insert(k, v.clone());
                Ok(v)
            }
            Err(e) if e.transient => {
                let failures = self.value_outages.get(&k).map_or(0, |o| o.1) + 1;
                let next_try = self.next_try(failures, self.last_values.contains_key(&k));
                self.value_outages
                    .insert(k.clone(), (next_try, failures, e.clone()));
                match last().await {
                    Some(v) => {
                        self.metrics.stale_serve();
                        tracing::warn!(what, key = %key, cause = %e.message,
                            "AWS failed; serving the last value fetched");
                        Ok(v)
                    }
                    None => Err(e),
                }
            }
            Err(e) => {
                self.value_outages.invalidate(&k);
                self.last_values.invalidate(&k);
                Err(e)
            }
        }
    }

    /// Log in with a metadata-database URI before Airflow gets it.
    async fn prove_config_uri(
        &self,
        key: &ConnKey,
        uri: &str,
        value: &Value,
        refresh: bool,
    ) -> Result<(), LookupError> {
        let at = format!("config option {key}: secret {}", value.secret_id);
        let mut cred = crate::credential::parse(uri)
            .map_err(|m| LookupError::new(ErrorCode::SecretMalformed, format!("{at}: {m}")))?;
        // The value is served as stored, so the check must use its own TLS
        // mode (libpq's default, prefer, when it names none) and refuse one
        // below the operator's minimum rather than prove a stronger login
        // than Airflow will make.
        let asked = cred
            .extra
            .get("sslmode")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("prefer")
            .to_string();
        let mode: crate::config::SslMode = asked.parse().map_err(|m: String| {
            LookupError::new(ErrorCode::SecretMalformed, format!("{at}: {m}"))
        })?;
        if mode < self.settings.min_sslmode {
            return Err(LookupError::new(
                ErrorCode::SecretMalformed,
                format!(
                    "{at}: the URI asks for sslmode={}{}, below min_sslmode {}: add ?sslmode={} to it, or lower min_sslmode",
                    mode.as_str(),
                    if cred.extra.contains_key("sslmode") { "" } else { " (libpq's default)" },
                    self.settings.min_sslmode.as_str(),
                    self.settings.min_sslmode.as_str()
                ),
            ));
        }
        cred.extra
            .insert("sslmode".into(), serde_json::Value::String(asked));
        let (target, _) = crate::login_plan::plan(&self.settings, None, None, &cred)
            .map_err(|m| LookupError::new(ErrorCode::SecretMalformed, format!("{at}: {m}")))?;
        let proofs = &self.pipeline.proofs;
        match proofs
            .prove(&target, &value.version_id, &value.secret_id, refresh)
            .await
        {
            Ok(_) => Ok(()),
            Err(checked) => {
                let (code, why) = match checked.outcome {
                    Outcome::Rejected { message, .. } => (ErrorCode::CredentialsRejected, message),
                    Outcome::Unreachable { message } => (ErrorCode::DatabaseUnreachable, message),
                    Outcome::Misconfigured { message } => (ErrorCode::SecretMalformed, message),
                    Outcome::Withheld { message } => (ErrorCode::PasswordWithheld, message),
                    Outcome::Ok => unreachable!("prove returns Ok for Outcome::Ok"),
                };
                Err(LookupError::new(
                    code,
                    format!(
                        "{at}: {}:{} as {}: {why}",
                        target.host, target.port, target.user
                    ),
                ))
            }
        }
    }

    /// The first of `names` that exists, as `{"value": ...}`.
    pub(crate) async fn plain_value(
        &self,
        what: &str,
        key: &ConnKey,
        names: &[String],
        refresh: bool,
        attempts: Attempts,
    ) -> Result<Value, LookupError> {
        let use_ = if refresh { Use::Fresh } else { Use::Cache };
        for name in names {
            let fetched = self
                .pipeline
                .aws
                .fetch(name, AWSCURRENT, use_, attempts)
                .await
                .map_err(|e| e.context(&format!("{what} {key}")))?;
            if let Some(version) = fetched {
                let body = serde_json::to_vec(
                    &serde_json::json!({ "value": version.value.expose_secret() }),
                )
                .expect("a JSON string always serializes");
                return Ok(Value {
                    body: Bytes::from(body),
                    fetched_at: version.fetched_at,
                    secret_id: name.clone(),
                    version_id: version.version_id,
                    text: version.value,
                });
            }
        }
        Err(LookupError::new(
            ErrorCode::NotFound,
            format!("{what} {key}: no secret {}", names.join(" or ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::postgres_uri;

    #[test]
    fn sqlalchemy_postgres_uris_are_recognised() {
        assert_eq!(
            postgres_uri("postgresql+psycopg2://u:p@h:5432/airflow").as_deref(),
            Some("postgresql://u:p@h:5432/airflow")
        );
        assert!(postgres_uri("postgres://u:p@h/d").is_some());
        assert!(postgres_uri("mysql+mysqldb://u:p@h/d").is_none());
        assert!(postgres_uri("a-fernet-key=").is_none());
    }
}
