//! The credential listener: a small hyper 1 server on loopback.
//!
//! Every request: refused if it came through a proxy, refused without the
//! token, bounded in header size and time. Every answer is JSON with
//! `Cache-Control: no-store`; errors are `{"error", "message"}`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::error::{ErrorCode, LookupError};
use crate::resolve::Resolver;
use crate::token::TokenStore;

pub const TOKEN_HEADER: &str = "x-sidecar-token";
// Parsed once, not on every answer.
const STAGE: HeaderName = HeaderName::from_static("x-sidecar-stage");
const AGE: HeaderName = HeaderName::from_static("x-sidecar-age");
const STALE: HeaderName = HeaderName::from_static("x-sidecar-stale");
const OUTCOME: HeaderName = HeaderName::from_static("x-sidecar-outcome");
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

pub struct CredentialApi {
    pub resolver: Arc<Resolver>,
    pub token: TokenStore,
}

type Resp = Response<Full<Bytes>>;

/// Accept connections until `shutdown` resolves, then let in-flight requests
/// finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    api: Arc<CredentialApi>,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    let settings = api.resolver.settings.clone();
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(16 * 1024)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        // Bounded connections: wait for a free slot before accepting.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(handle(&api, req).await) }
            }),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "in-flight requests still running at the end of the grace period"
        );
    }
}

/// One request, logged once with its outcome. Never panics on input.
pub async fn handle(api: &CredentialApi, req: Request<Incoming>) -> Resp {
    if !tracing::enabled!(tracing::Level::INFO) {
        return route(api, req).await.0;
    }
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (resp, id, stage) = route(api, req).await;
    let status = resp.status().as_u16();
    tracing::info!(
        method = %method,
        path = %truncate(&path, 300),
        id = id.as_deref().unwrap_or(""),
        status,
        outcome = resp.headers().get(OUTCOME).and_then(|v| v.to_str().ok()).unwrap_or("ok"),
        stage = stage.unwrap_or(""),
        latency_us = started.elapsed().as_micros() as u64,
        "request"
    );
    resp
}

async fn route(
    api: &CredentialApi,
    req: Request<Incoming>,
) -> (Resp, Option<String>, Option<&'static str>) {
    let started = Instant::now();
    if req.headers().contains_key("x-forwarded-for") {
        return (
            error(&LookupError::new(
                ErrorCode::ForwardedRefused,
                "requests through a proxy (X-Forwarded-For) are refused: the credential API is for the local pod only",
            )),
            None,
            None,
        );
    }
    let token = req.headers().get(TOKEN_HEADER).map(HeaderValue::as_bytes);
    if !api.token.verify(token) {
        return (
            error(&LookupError::new(
                ErrorCode::Unauthorized,
                "missing or wrong X-Sidecar-Token header",
            )),
            None,
            None,
        );
    }
    let refresh = match refresh_param(req.uri().query()) {
        Ok(r) => r,
        Err(e) => return (error(&e), None, None),
    };
    let segments: Vec<&str> = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .collect();
    let timeout = api.resolver.settings.request_timeout;
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["connections", raw]) => {
            let id = decode(raw);
            // A cache hit needs no time bound (and no timer).
            let cached = match refresh {
                false => api.resolver.cached(&id).await,
                true => None,
            };
            let answer = match cached {
                Some(answer) => Ok(answer),
                None => tokio::time::timeout(timeout, api.resolver.connection(&id, refresh)).await,
            };
            let resp = match answer {
                Ok(Ok(served)) => {
                    api.resolver.metrics.lookup("connection", "ok");
                    let age = served.fetched_at.elapsed().as_secs();
                    let mut r = ok(served.body.clone());
                    let h = r.headers_mut();
                    h.insert(STAGE, HeaderValue::from_static(served.stage));
                    h.insert(AGE, HeaderValue::from(age));
                    if served.stale {
                        h.insert(STALE, HeaderValue::from_static("true"));
                    }
                    // Computed for this request (a cache miss): say what it cost.
                    if served.created >= started {
                        if let Ok(v) = HeaderValue::from_str(&served.steps.server_timing()) {
                            h.insert(SERVER_TIMING, v);
                        }
                    }
                    return (r, Some(id), Some(served.stage));
                }
                Ok(Err(e)) => e,
                Err(_) => timed_out("connection", &id, timeout),
            };
            api.resolver
                .metrics
                .lookup("connection", resp.code.as_str());
            (error(&resp), Some(id), None)
        }
        (&Method::GET, ["variables", raw]) => {
            let key = decode(raw);
            let work = Box::pin(api.resolver.variable(&key, refresh));
            let e = match tokio::time::timeout(timeout, work).await {
                Ok(Ok((body, fetched_at))) => {
                    api.resolver.metrics.lookup("variable", "ok");
                    let mut r = ok(body);
                    r.headers_mut()
                        .insert(AGE, HeaderValue::from(fetched_at.elapsed().as_secs()));
                    return (r, Some(key), None);
                }
                Ok(Err(e)) => e,
                Err(_) => timed_out("variable", &key, timeout),
            };
            api.resolver.metrics.lookup("variable", e.code.as_str());
            (error(&e), Some(key), None)
        }
        (&Method::POST, ["connections", raw, "rotation-check"]) => {
            let id = decode(raw);
            let work = Box::pin(api.resolver.rotation_check(&id));
            let e = match tokio::time::timeout(timeout * 4, work).await {
                Ok(Ok(report)) => return (ok(Bytes::from(report.to_json())), Some(id), None),
                Ok(Err(e)) => e,
                Err(_) => timed_out("rotation check of connection", &id, timeout * 4),
            };
            (error(&e), Some(id), None)
        }
        (&Method::POST, ["rotation-check"]) => {
            let reports = Box::pin(api.resolver.rotation_check_all()).await;
            let body: Vec<serde_json::Value> = reports
                .into_iter()
                .map(|(id, r)| match r {
                    Ok(report) => serde_json::to_value(&report).unwrap_or_default(),
                    Err(e) => serde_json::json!({"conn_id": id, "error": e.code.as_str(), "message": e.message}),
                })
                .collect();
            (
                ok(Bytes::from(
                    serde_json::to_vec_pretty(&body).unwrap_or_default(),
                )),
                None,
                None,
            )
        }
        (_, ["connections", _, "rotation-check"] | ["rotation-check"]) => (
            error(&LookupError::new(
                ErrorCode::MethodNotAllowed,
                format!("{} is not allowed here; use POST", req.method()),
            )),
            None,
            None,
        ),
        (_, ["connections", _] | ["variables", _]) => (
            error(&LookupError::new(
                ErrorCode::MethodNotAllowed,
                format!("{} is not allowed here; use GET", req.method()),
            )),
            None,
            None,
        ),
        _ => (
            error(&LookupError::new(
                ErrorCode::NotFound,
                format!(
                    "no such endpoint: {} {}",
                    req.method(),
                    truncate(req.uri().path(), 100)
                ),
            )),
            None,
            None,
        ),
    }
}

fn timed_out(what: &str, id: &str, after: Duration) -> LookupError {
    LookupError::new(
        ErrorCode::Timeout,
        format!("{what} {id}: the lookup did not finish within {after:?}"),
    )
}

fn decode(raw: &str) -> String {
    // Invalid UTF-8 becomes U+FFFD, which the id rule then refuses.
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

fn refresh_param(query: Option<&str>) -> Result<bool, LookupError> {
    let mut refresh = false;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match (k.as_ref(), v.as_ref()) {
            ("refresh", "true" | "1" | "") => refresh = true,
            ("refresh", "false" | "0") => refresh = false,
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
    Ok(refresh)
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn ok(body: Bytes) -> Resp {
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
