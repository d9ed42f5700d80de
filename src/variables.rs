//! Airflow Variables: the plain string at `<variables_prefix>/<key>` (a
//! team's `<team>--<key>` first). Cached like secret values, "not found"
//! like any miss; never validated.

use std::time::Instant;

use bytes::Bytes;
use secrecy::ExposeSecret;

use crate::cache::ConnKey;
use crate::error::{ErrorCode, LookupError};
use crate::front::Resolver;
use crate::resolve::Use;
use crate::source::candidates;
use crate::sources::secrets_manager::AWSCURRENT;
use crate::sources::Attempts;

/// A value for Airflow: `{"value": "..."}`, when it was fetched, and the
/// secret that held it.
pub struct Value {
    pub body: Bytes,
    pub fetched_at: Instant,
    pub secret_id: String,
}

impl Resolver {
    pub async fn variable(&self, key: &ConnKey, refresh: bool) -> Result<Value, LookupError> {
        let names = candidates(|id| self.settings.variable_secret_id(id), key);
        self.plain_value("variable", key, &names, refresh).await
    }

    /// The first of `names` that exists, as `{"value": ...}`.
    pub(crate) async fn plain_value(
        &self,
        what: &str,
        key: &ConnKey,
        names: &[String],
        refresh: bool,
    ) -> Result<Value, LookupError> {
        let use_ = if refresh { Use::Fresh } else { Use::Cache };
        for name in names {
            let fetched = self
                .pipeline
                .aws
                .fetch(name, AWSCURRENT, use_, Attempts::Retried)
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
                });
            }
        }
        Err(LookupError::new(
            ErrorCode::NotFound,
            format!("{what} {key}: no secret {}", names.join(" or ")),
        ))
    }
}
