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

use crate::aws::calls::Attempts;
use crate::aws::secrets_manager::Stage;
use crate::cache::ConnKey;
use crate::error::{ErrorCode, LookupError};
use crate::pipeline::map::candidates;
use crate::pipeline::Use;
use crate::postgres::validate::Outcome;
use crate::service::resolver::{life_left, Resolver, ValueKey};
use crate::service::state::{Event, Origin, State};

/// A value for Airflow: `{"value": "..."}`, when it was fetched, and the
/// secret that held it.
pub struct Value {
    pub body: Bytes,
    pub fetched_at: Instant,
    /// Until when it is served without asking AWS (`secret_ttl`; for a
    /// metadata-DB URI, its proof's end if sooner; a stale copy's outage).
    pub expires_at: Instant,
    pub secret_id: String,
    pub version_id: String,
    /// The value as stored (the body holds it too): never logged.
    pub text: SecretString,
}

impl crate::service::state::Kept for Value {
    fn fetched_at(&self) -> Instant {
        self.fetched_at
    }
    fn expires_at(&self) -> Instant {
        self.expires_at
    }
}

impl Value {
    /// The same value, served until `expires_at`.
    fn until(&self, expires_at: Instant) -> Arc<Value> {
        Arc::new(Value {
            body: self.body.clone(),
            fetched_at: self.fetched_at,
            expires_at,
            secret_id: self.secret_id.clone(),
            version_id: self.version_id.clone(),
            text: self.text.clone(),
        })
    }
}

/// What a plain value is: it decides its secret's name, whether it is
/// proven, and how errors and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueKind {
    Variable,
    ConfigOption,
}

impl ValueKind {
    /// The metrics' `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            ValueKind::Variable => "variable",
            ValueKind::ConfigOption => "config",
        }
    }

    /// The Postgres URI to prove before `value` is served: a config option
    /// holding one (`[database] sql_alchemy_conn`); nothing else is proven.
    fn uri_of(self, value: &Value) -> Option<String> {
        match self {
            ValueKind::ConfigOption => postgres_uri(value.text.expose_secret()),
            ValueKind::Variable => None,
        }
    }
}

impl std::fmt::Display for ValueKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ValueKind::Variable => "variable",
            ValueKind::ConfigOption => "config option",
        })
    }
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
        self.plain(ValueKind::Variable, key, names, refresh).await
    }

    /// A config option; a metadata-DB URI is proven to log in first (in the
    /// same single-flight run as its fetch).
    pub async fn config(
        self: &Arc<Self>,
        key: &ConnKey,
        refresh: bool,
    ) -> Result<Arc<Value>, LookupError> {
        let names = vec![self.settings.config_secret_id(key.conn_id())];
        self.plain(ValueKind::ConfigOption, key, names, refresh)
            .await
    }

    /// A value: what its state serves while that lives, else fetched once
    /// for all concurrent callers in a task of its own (a client that gives
    /// up cancels nothing), with the connections' outage rules: while AWS
    /// has an outage the last value fetched is served (up to `max_stale`;
    /// DAG files that read Variables at parse time keep importing), AWS is
    /// tried again only after a backoff, and a refusal stops serving.
    async fn plain(
        self: &Arc<Self>,
        what: ValueKind,
        key: &ConnKey,
        names: Vec<String>,
        refresh: bool,
    ) -> Result<Arc<Value>, LookupError> {
        let k: ValueKey = (what, key.clone());
        if !refresh {
            let entry = self.values.get(&k);
            if let Some(answer) = entry.as_ref().and_then(|e| e.state.answer(Instant::now())) {
                return answer.cloned().map_err(Clone::clone);
            }
        }
        let this = self.clone();
        let work = move || async move { this.load_value(k, &names, refresh).await };
        // refresh=true is an expensive request like a connection's.
        let (slots, bound) = match refresh {
            true => (&self.expensive, crate::service::resolver::Bound::Checks),
            false => (&self.in_flight, crate::service::resolver::Bound::InFlight),
        };
        self.value_runs
            .run((what, key.clone(), refresh), Some(slots), work)
            .await
            .unwrap_or_else(|e| Err(crate::service::resolver::not_run(e, key, what, bound)))
    }

    async fn load_value(
        &self,
        k: ValueKey,
        names: &[String],
        refresh: bool,
    ) -> Result<Arc<Value>, LookupError> {
        let (what, key) = (k.0, &k.1);
        let origin = if refresh {
            Origin::Fresh
        } else {
            Origin::Lookup
        };
        let entry = self.values.get(&k);
        let began = crate::service::keys::generation(entry.as_ref());
        let now = Instant::now();
        let state = entry.as_ref().map(|e| &e.state);
        let last_good = state.and_then(|s| s.last_good(now, self.settings.max_stale));
        let outage = state.and_then(State::outage);
        if !refresh {
            if let Some(answer) = state.and_then(|s| s.answer(now)) {
                return answer.cloned().map_err(Clone::clone);
            }
            // No background retry for values: the lookup that finds the
            // next try due makes it.
            if let Some(outage) = outage.filter(|o| o.next_try > now) {
                let stale = self.restale_value(&k, last_good).await;
                let answer = stale.clone().ok_or_else(|| outage.error.clone());
                return self.values.apply_or_current(
                    &k,
                    origin,
                    began,
                    Event::Restaled(stale),
                    answer,
                );
            }
        }
        let attempts = if outage.is_some() || last_good.is_some() {
            Attempts::Once
        } else {
            Attempts::Retried
        };
        let fetched = match self.plain_value(what, key, names, refresh, attempts).await {
            Ok(v) => self.proven(&k, v, refresh).await,
            Err(e) => Err(e),
        };
        let (event, answer) = match fetched {
            Ok(v) => (Event::Resolved(v.clone()), Ok(v)),
            Err(e) => {
                let stale = match e.transient {
                    true => self.restale_value(&k, last_good).await,
                    false => None,
                };
                let answer = match &stale {
                    Some(v) => {
                        tracing::warn!(what = %what, key = %key, cause = %e.message,
                            "AWS failed; serving the last value fetched");
                        Ok(v.clone())
                    }
                    None => Err(e.clone()),
                };
                (Event::failed(e, stale), answer)
            }
        };
        self.values
            .apply_or_current(&k, origin, began, event, answer)
    }

    /// `value`, proven first if it is a config option holding a Postgres
    /// URI, and served until that proof ends if sooner than its TTL.
    async fn proven(
        &self,
        k: &ValueKey,
        value: Value,
        refresh: bool,
    ) -> Result<Arc<Value>, LookupError> {
        let key = &k.1;
        let Some(uri) = k.0.uri_of(&value) else {
            return Ok(Arc::new(value));
        };
        let proven_at = self.prove_config_uri(key, &uri, &value, refresh).await?;
        let proof_end = proven_at + self.settings.validation_ttl;
        let expires_at = value.expires_at.min(proof_end);
        Ok(value.until(expires_at))
    }

    /// The last good value, if younger than `max_stale` (and, for a
    /// metadata-DB URI, if it still logs in), as a copy served until then.
    async fn restale_value(
        &self,
        k: &ValueKey,
        last_good: Option<Arc<Value>>,
    ) -> Option<Arc<Value>> {
        let old = last_good?;
        life_left(&self.settings, old.fetched_at, None)?;
        let proven_at = match k.0.uri_of(&old) {
            Some(uri) => Some(self.prove_config_uri(&k.1, &uri, &old, false).await.ok()?),
            None => None,
        };
        let life = life_left(&self.settings, old.fetched_at, proven_at)?;
        self.metrics.stale_serve();
        Some(old.until(Instant::now() + life))
    }

    /// Log in with a metadata-database URI before Airflow gets it.
    async fn prove_config_uri(
        &self,
        key: &ConnKey,
        uri: &str,
        value: &Value,
        refresh: bool,
    ) -> Result<Instant, LookupError> {
        let at = format!("config option {key}: secret {}", value.secret_id);
        let mut cred = crate::airflow::credential::parse(uri)
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
        let (target, _) = crate::pipeline::login_plan::plan(&self.settings, None, None, &cred)
            .map_err(|m| LookupError::new(ErrorCode::SecretMalformed, format!("{at}: {m}")))?;
        let proofs = &self.pipeline.proofs;
        match proofs
            .prove(&target, &value.version_id, &value.secret_id, refresh)
            .await
        {
            Ok(at) => Ok(at),
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
        what: ValueKind,
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
                .fetch(name, Stage::Current, use_, attempts)
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
                    expires_at: version.fetched_at + self.settings.secret_ttl,
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
