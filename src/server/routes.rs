//! The credential API's endpoints: connection lookups (the hot path, a
//! cached answer as a response), variables, config options, rotation
//! checks, and the responses they make.

use crate::aws::secrets_manager::Stage;
use crate::error::{ErrorCode, LookupError};
use crate::service::variables::ValueKind;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::http::*;

/// `GET /connections/<id>`: from the cache while it holds the answer,
/// otherwise looked up.
pub(super) fn connection(
    api: &Arc<CredentialApi>,
    id: Cow<'_, str>,
    refresh: bool,
    team: Option<String>,
    started: Instant,
) -> Routed {
    // The hot path: a teamless id is looked up as it came (its key's
    // text), without building a key.
    let teamless =
        team.is_none() && api.resolver.settings.team.is_none() && crate::config::is_valid_id(&id);
    if !refresh && teamless {
        if let Some(answered) = from_cache(api, &id, &id, started) {
            return answered;
        }
    }
    lookup(api, id, refresh, team, teamless, started)
}

/// A connection the hot path did not find: its key built, a team's looked
/// up in the cache, then resolved.
#[inline(never)]
pub(super) fn lookup(
    api: &Arc<CredentialApi>,
    id: Cow<'_, str>,
    refresh: bool,
    team: Option<String>,
    teamless: bool,
    started: Instant,
) -> Routed {
    let key = match api.resolver.key(team.as_deref(), &id) {
        Ok(k) => k,
        Err(e) => return Routed::Now(error(&e), Logged::id(started, id)),
    };
    // A teamless id's key is the text the hot path looked up: not twice.
    if !refresh && !teamless {
        if let Some(answered) = from_cache(api, key.as_str(), &id, started) {
            return answered;
        }
    }
    let (api, id) = (api.clone(), id.into_owned());
    let timeout = api.resolver.settings.request_timeout;
    Routed::Later(Box::pin(async move {
        let answer = tokio::time::timeout(timeout, api.resolver.connection(&key, refresh))
            .await
            .unwrap_or_else(|_| Err(timed_out("connection", &id, timeout)));
        connection_response(&api, answer, false, &id, started)
    }))
}

/// The answer the cache holds for `key` (a [`ConnKey`](crate::cache::ConnKey)'s
/// text) as a response, if it holds one.
pub(super) fn from_cache(
    api: &CredentialApi,
    key: &str,
    id: &str,
    started: Instant,
) -> Option<Routed> {
    let answer = api.resolver.cached(key, started)?;
    let (resp, logged) = connection_response(api, answer, true, id, started);
    Some(Routed::Now(resp, logged))
}

/// A request's path in parts: /a/b/c as up to four.
pub(super) type Parts<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

/// Every endpoint but a connection lookup, and the refusals of the rest.
#[inline(never)]
pub(super) fn other_endpoint(
    api: &Arc<CredentialApi>,
    method: &Method,
    parts: Parts<'_>,
    path: &str,
    refresh: bool,
    team: Option<String>,
    started: Instant,
) -> Routed {
    use Routed::{Later, Now};
    match (method, parts) {
        (&Method::GET, (Some(kind @ ("variables" | "config")), Some(raw), None, _)) => {
            let id = decode(raw);
            let config = kind == "config";
            let key = match api.resolver.key(team.as_deref(), &id) {
                // Config options are not team-scoped (Airflow's backend has no
                // team for them), but a pinned sidecar still refuses other teams.
                Ok(_) if config => crate::cache::ConnKey::new(None, &id),
                Ok(k) => k,
                Err(e) => return Now(error(&e), Logged::id(started, id)),
            };
            // Airflow 3 keeps these options (the metadata DB URI, the fernet
            // key) away from task code: served only when listed, no AWS call otherwise.
            if config {
                if let Some(refused) = config_refused(&api.resolver.settings, &id) {
                    return Now(error(&refused), Logged::id(started, id));
                }
            }
            let (api, id) = (api.clone(), id.into_owned());
            Later(Box::pin(async move {
                let resp = if config {
                    let work = api.resolver.config(&key, refresh);
                    plain_value(&api, ValueKind::ConfigOption, &id, work).await
                } else {
                    let work = api.resolver.variable(&key, refresh);
                    plain_value(&api, ValueKind::Variable, &id, work).await
                };
                (resp, Logged::id(started, id))
            }))
        }
        (&Method::POST, (Some("connections"), Some(raw), Some("rotation-check"), None)) => {
            let id = decode(raw);
            let key = match api.resolver.key(team.as_deref(), &id) {
                Ok(k) => k,
                Err(e) => return Now(error(&e), Logged::id(started, id)),
            };
            let (api, id) = (api.clone(), id.into_owned());
            Later(Box::pin(async move {
                // The check bounds itself (check_timeout); this is a backstop.
                let limit = api.resolver.settings.check_timeout + Duration::from_secs(1);
                let e = match tokio::time::timeout(limit, api.resolver.rotation_check(&key)).await {
                    Ok(Ok(report)) => {
                        return (ok(Bytes::from(report.to_json())), Logged::id(started, id))
                    }
                    Ok(Err(e)) => e,
                    Err(_) => timed_out("rotation check of connection", &id, limit),
                };
                (error(&e), Logged::id(started, id))
            }))
        }
        (&Method::POST, (Some("rotation-check"), None, _, _)) => {
            let api = api.clone();
            Later(Box::pin(async move {
                // Bounded like one check: a long list belongs to the CLI (`rotation-check --all`).
                let limit = api.resolver.settings.check_timeout;
                let Ok(reports) =
                    tokio::time::timeout(limit, api.resolver.rotation_check_all()).await
                else {
                    let e = LookupError::new(
                        ErrorCode::Timeout,
                        format!("checking every connection did not finish within {limit:?} (check_timeout); run `airflow-secrets-sidecar rotation-check --all` instead"),
                    );
                    return (error(&e), Logged::none(started));
                };
                let body: Vec<serde_json::Value> = reports
                    .into_iter()
                    .map(|(key, r)| match r {
                        Ok(report) => serde_json::to_value(&*report).unwrap_or_default(),
                        Err(e) => serde_json::json!({"conn_id": key.conn_id(), "team": key.team(), "error": e.code.as_str(), "message": e.message}),
                    })
                    .collect();
                (
                    ok(Bytes::from(
                        serde_json::to_vec_pretty(&body).unwrap_or_default(),
                    )),
                    Logged::none(started),
                )
            }))
        }
        (
            _,
            (Some("connections"), Some(_), Some("rotation-check"), None)
            | (Some("rotation-check"), None, _, _),
        ) => Now(
            error(&LookupError::new(
                ErrorCode::MethodNotAllowed,
                format!("{} is not allowed here; use POST", method),
            )),
            Logged::none(started),
        ),
        (_, (Some("connections" | "variables" | "config"), Some(_), None, _)) => Now(
            error(&LookupError::new(
                ErrorCode::MethodNotAllowed,
                format!("{} is not allowed here; use GET", method),
            )),
            Logged::none(started),
        ),
        _ => Now(
            error(&LookupError::new(
                ErrorCode::NotFound,
                format!("no such endpoint: {} {}", method, truncate(path, 100)),
            )),
            Logged::none(started),
        ),
    }
}

/// Why `/config/{key}` may not serve `key`, if it may not.
pub(super) fn config_refused(settings: &crate::config::Settings, key: &str) -> Option<LookupError> {
    if settings.config_keys.iter().any(|k| k == key) {
        return None;
    }
    let shown: String = key.chars().take(64).collect();
    let why = if settings.config_keys.is_empty() {
        "/config is off: set config_keys (SIDECAR_CONFIG_KEYS) to the options Airflow may read through this sidecar (Airflow 3 keeps them from task code)"
    } else {
        "it is not in config_keys (SIDECAR_CONFIG_KEYS)"
    };
    Some(LookupError::new(
        ErrorCode::ConfigDisabled,
        format!("config option {shown:?}: {why}"),
    ))
}

/// A connection's answer as a response (`hit`: from the cache).
pub(super) fn connection_response(
    api: &CredentialApi,
    answer: crate::cache::Answer,
    hit: bool,
    id: &str,
    started: Instant,
) -> (Resp, Logged) {
    let served = match answer {
        Ok(served) => served,
        Err(e) => {
            api.resolver.metrics.lookup("connection", e.code.as_str());
            return (error(&e), Logged::id(started, id));
        }
    };
    api.resolver.metrics.connection_served(served.validated());
    let mut r = answer_response(
        served.body.clone(),
        served.stage,
        started.saturating_duration_since(served.fetched_at),
        served.validated(),
        served.secret_header.clone(),
    );
    let h = r.headers_mut();
    if served.stale {
        h.insert(STALE, HeaderValue::from_static("true"));
    }
    // Computed for this request (a cache miss): say what it cost.
    let computed = served.created >= started;
    if computed {
        if let Ok(v) = HeaderValue::from_str(&served.steps.server_timing()) {
            h.insert(SERVER_TIMING, v);
        }
    }
    // Logged as an event unless it is a plain hit (see `log_request`).
    let plain_hit = hit && !computed && !served.stale && served.stage == Stage::Current;
    let logged = Logged {
        started,
        id: (!plain_hit || tracing::enabled!(tracing::Level::DEBUG)).then(|| id.to_owned()),
        stage: Some(served.stage),
        hit: plain_hit,
    };
    (r, logged)
}

/// A connection's body with the headers every answer carries.
pub(super) fn answer_response(
    body: Bytes,
    stage: Stage,
    age: Duration,
    validated: bool,
    secret: HeaderValue,
) -> Resp {
    let mut r = ok(body);
    let h = r.headers_mut();
    h.insert(STAGE, HeaderValue::from_static(stage.as_str()));
    h.insert(AGE, age_header(age));
    h.insert(
        VALIDATED,
        HeaderValue::from_static(if validated { "true" } else { "false" }),
    );
    h.insert(SECRET, secret);
    r
}

/// A variable or config value (`what`), bounded by `request_timeout`.
pub(super) async fn plain_value(
    api: &CredentialApi,
    what: ValueKind,
    id: &str,
    work: impl std::future::Future<Output = Result<Arc<crate::service::variables::Value>, LookupError>>,
) -> Resp {
    let kind = what.label();
    let timeout = api.resolver.settings.request_timeout;
    let e = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(value)) => {
            api.resolver.metrics.lookup(kind, "ok");
            let mut r = ok(value.body.clone());
            let h = r.headers_mut();
            let age = value.fetched_at.elapsed();
            h.insert(AGE, HeaderValue::from(age.as_secs()));
            // Older than a secret lives: served from the last value while AWS fails.
            if age > api.resolver.settings.secret_ttl {
                h.insert(STALE, HeaderValue::from_static("true"));
            }
            if let Ok(v) = HeaderValue::from_str(&value.secret_id) {
                h.insert(SECRET, v);
            }
            return r;
        }
        Ok(Err(e)) => e,
        Err(_) => timed_out(what, id, timeout),
    };
    api.resolver.metrics.lookup(kind, e.code.as_str());
    error(&e)
}

/// `X-Sidecar-Age`: whole seconds, from a table built once for the ages a
/// fresh answer has (no allocation per request), formatted beyond it.
pub(super) fn age_header(age: Duration) -> HeaderValue {
    static AGES: std::sync::LazyLock<Vec<HeaderValue>> = std::sync::LazyLock::new(|| {
        (0..600u32)
            .map(|n| HeaderValue::from_static(Box::leak(n.to_string().into_boxed_str())))
            .collect()
    });
    let secs = age.as_secs();
    match AGES.get(secs as usize) {
        Some(v) => v.clone(),
        None => HeaderValue::from(secs),
    }
}

pub(super) fn timed_out(what: impl std::fmt::Display, id: &str, after: Duration) -> LookupError {
    LookupError::new(
        ErrorCode::Timeout,
        format!("{what} {id}: the lookup did not finish within {after:?}"),
    )
}

pub(super) fn decode(raw: &str) -> Cow<'_, str> {
    if !raw.contains('%') {
        return raw.into();
    }
    // Invalid UTF-8 becomes U+FFFD, which the id rule then refuses.
    percent_encoding::percent_decode_str(raw).decode_utf8_lossy()
}

/// The query parameters every lookup takes.
#[derive(Default)]
pub(super) struct Query {
    pub(super) refresh: bool,
    pub(super) team: Option<String>,
}

#[inline(never)]
pub(super) fn query(query: &str) -> Result<Query, LookupError> {
    let mut q = Query::default();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match (k.as_ref(), v.as_ref()) {
            ("team", "") => q.team = None,
            ("team", team) => q.team = Some(team.to_string()),
            ("refresh", "true" | "1" | "") => q.refresh = true,
            ("refresh", "false" | "0") => q.refresh = false,
            ("refresh", other) => {
                return Err(LookupError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "refresh must be true or false, not {:?}",
                        truncate(other, 20)
                    ),
                ))
            }
            _ => {}
        }
    }
    Ok(q)
}

pub(super) fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(super) fn ok(body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub fn error(e: &LookupError) -> Resp {
    let mut r = ok(Bytes::from(e.to_json()));
    *r.status_mut() = e.code.status();
    r.headers_mut()
        .insert(OUTCOME, HeaderValue::from_static(e.code.as_str()));
    r
}

/// For the admin listener's plain answers.
pub fn json(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut r = ok(Bytes::from(body.to_string()));
    *r.status_mut() = status;
    r
}
