//! The credential listener: a small hyper 1 server on loopback.
//!
//! Every request: refused if it came through a proxy, refused without the
//! token, bounded in header size and time; idle connections are closed.
//! Every answer is JSON with `Cache-Control: no-store`; errors are
//! `{"error", "message"}`.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, FORWARDED, HOST, VIA};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::aws::secrets_manager::AWSCURRENT;
use crate::error::{ErrorCode, LookupError};
use crate::server::tcp::{Connections, Verdict, Watch, IDLE_CLOSE};
use crate::server::token::TokenStore;
use crate::service::resolver::Resolver;

pub const TOKEN_HEADER: &str = "x-sidecar-token";
// Parsed once, not on every request.
const TOKEN: HeaderName = HeaderName::from_static(TOKEN_HEADER);
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `X-Forwarded-For`, `-Host`, `-Proto`, `-Port`, ...: every one of them.
const X_FORWARDED_: &str = "x-forwarded-";
const STAGE: HeaderName = HeaderName::from_static("x-sidecar-stage");
const AGE: HeaderName = HeaderName::from_static("x-sidecar-age");
const STALE: HeaderName = HeaderName::from_static("x-sidecar-stale");
const OUTCOME: HeaderName = HeaderName::from_static("x-sidecar-outcome");
const VALIDATED: HeaderName = HeaderName::from_static("x-sidecar-validated");
const SECRET: HeaderName = HeaderName::from_static("x-sidecar-secret");
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
    let connections = Arc::new(Connections::default());
    let sweeper = tokio::spawn({
        let connections = connections.clone();
        async move { connections.sweep_every(IDLE_CLOSE).await }
    });
    let mut builder = http1::Builder::new();
    builder.max_buf_size(16 * 1024).keep_alive(true);
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
        let registration = connections.open();
        let watch = registration.watch.clone();
        let service = ConnService {
            api: api.clone(),
            watch: watch.clone(),
        };
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _registration = registration; // leaves however the task ends
            let mut conn = std::pin::pin!(conn);
            let (mut waker, mut draining) = (None, false);
            std::future::poll_fn(|cx| {
                match watch.verdict(cx, &mut waker) {
                    Verdict::Close => return Poll::Ready(()), // dropping it closes the socket
                    Verdict::Drain if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ => {}
                }
                conn.as_mut().poll(cx).map(|_| ())
            })
            .await;
            drop(permit);
        });
    }
    drop(listener);
    // The sweep goes on during the drain: it still closes a client that
    // trickles a request head (hyper's drain waits for a started head).
    let drained = tokio::time::timeout(grace, connections.drain()).await;
    sweeper.abort();
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight requests still running at the end of the grace period"
        );
    }
}

/// What a request's log line says besides method, path and status.
struct Logged {
    /// The request's one clock reading (expiry, age, token recheck, latency).
    started: Instant,
    id: Option<String>,
    stage: Option<&'static str>,
    /// A connection served from the cache as it was: a metric, not an event.
    hit: bool,
}

impl Logged {
    fn id(started: Instant, id: impl Into<String>) -> Logged {
        Logged {
            started,
            id: Some(id.into()),
            stage: None,
            hit: false,
        }
    }
    fn none(started: Instant) -> Logged {
        Logged {
            started,
            id: None,
            stage: None,
            hit: false,
        }
    }
}

/// What a request comes to: an answer at once, or work to wait for.
enum Routed {
    /// Everything that needs no waiting: refusals, cached answers, bad paths.
    Now(Resp, Logged),
    /// A lookup or check that goes to AWS or a database, in a future of its own.
    Later(Pending),
}

type Pending = Pin<Box<dyn Future<Output = (Resp, Logged)> + Send>>;

/// hyper's view of one client connection: what its requests need, and
/// the counter that tells the idle sweep whether they move.
struct ConnService {
    api: Arc<CredentialApi>,
    watch: Arc<Watch>,
}

/// The response future hyper keeps for a connection: a few words.
enum Reply {
    Now(Option<Resp>),
    Later(Pin<Box<dyn Future<Output = Resp> + Send>>),
}

impl Future for Reply {
    type Output = Result<Resp, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            // hyper never polls a finished future again.
            Reply::Now(resp) => resp.take().map_or(Poll::Pending, |r| Poll::Ready(Ok(r))),
            Reply::Later(work) => work.as_mut().poll(cx).map(Ok),
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Resp;
    type Error = Infallible;
    type Future = Reply;

    /// A request that needs no waiting (a cache hit above all) is answered
    /// here and dropped before hyper reads the socket again: a request
    /// still alive pins hyper's read buffer, and hyper would set it aside
    /// and allocate another 8 KiB to read on.
    fn call(&self, req: Request<Incoming>) -> Reply {
        match route(&self.api, &req, Instant::now()) {
            Routed::Now(resp, logged) => {
                self.watch.answered();
                log_request(req.method(), req.uri().path(), &logged, &resp);
                Reply::Now(Some(resp))
            }
            Routed::Later(work) => self.later(&req, work),
        }
    }
}

impl ConnService {
    /// Work to wait for, in a future that keeps what its log line needs.
    #[inline(never)]
    fn later(&self, req: &Request<Incoming>, work: Pending) -> Reply {
        let watch = self.watch.clone();
        let method = req.method().clone();
        let path = match tracing::enabled!(tracing::Level::INFO) {
            true => truncate(req.uri().path(), 300).to_owned(),
            false => String::new(),
        };
        Reply::Later(Box::pin(async move {
            let _in_flight = watch.in_flight();
            let (resp, logged) = work.await;
            log_request(&method, &path, &logged, &resp);
            resp
        }))
    }
}

/// A request's log line. Misses, errors, stale serves, fallbacks and
/// rotation checks are events, logged at INFO; a plain cache hit is counted
/// in the metrics and logged only at DEBUG, so a busy pod neither floods its
/// log pipeline nor pays for formatting on the hot path.
fn log_request(method: &Method, path: &str, logged: &Logged, resp: &Resp) {
    if tracing::enabled!(tracing::Level::INFO)
        && (!logged.hit || tracing::enabled!(tracing::Level::DEBUG))
    {
        write_request_line(method, path, logged, resp);
    }
}

#[inline(never)] // out of the hot path's code: a plain hit never gets here at INFO
fn write_request_line(method: &Method, path: &str, logged: &Logged, resp: &Resp) {
    let status = resp.status().as_u16();
    let header = |name: &HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    macro_rules! request_line {
        ($level:expr) => {
            tracing::event!(
                $level,
                method = %method,
                path = %truncate(path, 300),
                id = logged.id.as_deref().unwrap_or(""),
                status,
                outcome = resp.headers().get(OUTCOME).and_then(|v| v.to_str().ok()).unwrap_or("ok"),
                stage = logged.stage.unwrap_or(""),
                validated = header(&VALIDATED),
                stale = header(&STALE) == "true",
                cache_hit = logged.hit,
                latency_us = logged.started.elapsed().as_micros() as u64,
                "request"
            )
        };
    }
    if logged.hit {
        request_line!(tracing::Level::DEBUG);
    } else {
        request_line!(tracing::Level::INFO);
    }
}

/// Every request, top to bottom: refused if it came through a proxy or
/// without the token, then matched by method and path. Never panics on input.
///
/// Out of line, with every branch but a cached lookup's in functions of
/// their own: hyper calls it between two system calls that evict the
/// core's code cache, and a cached lookup that runs through a few lines of
/// code is measurably faster than one spread over the 13 KiB this was
/// when all of it was inlined into hyper's read loop.
#[inline(never)]
fn route(api: &Arc<CredentialApi>, req: &Request<Incoming>, started: Instant) -> Routed {
    // One pass over the few request headers, instead of hashing names.
    let (mut token, mut host) = (None, None);
    for (name, value) in req.headers() {
        if *name == TOKEN {
            token = token.or(Some(value.as_bytes()));
        } else if *name == HOST {
            host = host.or(Some(value.as_bytes()));
        } else if is_forwarding(name) {
            return forwarded(name, started);
        }
    }
    // Without a token, only a loopback Host (no DNS rebinding: a browser
    // page of evil.example whose name now points at 127.0.0.1).
    if !api.token.required() && !loopback_request(req, host) {
        return host_refused(host, started);
    }
    if !api.token.verify_at(token, started) {
        return refused(
            ErrorCode::Unauthorized,
            "missing or wrong X-Sidecar-Token header",
            started,
        );
    }
    let Query { refresh, team } = match req.uri().query().map(query) {
        None => Query::default(),
        Some(Ok(q)) => q,
        Some(Err(e)) => return Routed::Now(error(&e), Logged::none(started)),
    };
    // Matched without collecting: /a/b/c as up to four parts.
    let path = req.uri().path();
    let mut parts = path.strip_prefix('/').unwrap_or(path).splitn(4, '/');
    let parts = (parts.next(), parts.next(), parts.next(), parts.next());
    match (req.method(), parts) {
        (&Method::GET, (Some("connections"), Some(raw), None, _)) => {
            connection(api, decode(raw), refresh, team, started)
        }
        (method, parts) => other_endpoint(api, method, parts, path, refresh, team, started),
    }
}

#[cold]
#[inline(never)]
fn refused(code: ErrorCode, why: &'static str, started: Instant) -> Routed {
    Routed::Now(error(&LookupError::new(code, why)), Logged::none(started))
}

/// A header a proxy adds: `X-Forwarded-For` and every other `X-Forwarded-*`,
/// `Forwarded`, `X-Real-IP`, `Via`. Compared as names, without allocating
/// (hyper keeps names lowercase).
fn is_forwarding(name: &HeaderName) -> bool {
    *name == FORWARDED
        || *name == VIA
        || *name == X_REAL_IP
        || name.as_str().starts_with(X_FORWARDED_)
}

#[cold]
#[inline(never)]
fn forwarded(name: &HeaderName, started: Instant) -> Routed {
    let e = LookupError::new(
        ErrorCode::ForwardedRefused,
        format!(
            "requests through a proxy (header {}) are refused: the credential API is for the local pod only",
            truncate(name.as_str(), 64)
        ),
    );
    Routed::Now(error(&e), Logged::none(started))
}

#[cold]
#[inline(never)]
fn host_refused(host: Option<&[u8]>, started: Instant) -> Routed {
    let shown = match host {
        Some(h) => format!("{:?}", truncate(&String::from_utf8_lossy(h), 100)),
        None => "(none)".to_string(),
    };
    let e = LookupError::new(
        ErrorCode::HostRefused,
        format!(
            "Host {shown} is not loopback: without a token (insecure_no_token) only localhost, 127.0.0.0/8 and [::1] are served (a guard against DNS rebinding)"
        ),
    );
    Routed::Now(error(&e), Logged::none(started))
}

/// The request names a loopback host: its Host header and, for an
/// absolute-form request target, the target's authority too.
fn loopback_request(req: &Request<Incoming>, host: Option<&[u8]>) -> bool {
    host.is_some_and(is_loopback_host)
        && req
            .uri()
            .authority()
            .is_none_or(|a| is_loopback_host(a.as_str().as_bytes()))
}

/// `localhost`, an address in 127.0.0.0/8 or `[::1]`, each with an optional
/// `:port`, case-insensitive; nothing else (no trailing dot, no userinfo).
fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let port_ok = |port: Option<&str>| {
        port.is_none_or(|p| {
            (1..=5).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok()
        })
    };
    if let Some(rest) = host.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(p) => Some(p),
                None => return false,
            },
        };
        return ip
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.is_loopback())
            && port_ok(port);
    }
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let named = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    named && port_ok(port)
}

/// `GET /connections/<id>`: from the cache while it holds the answer,
/// otherwise looked up.
fn connection(
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
fn lookup(
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
fn from_cache(api: &CredentialApi, key: &str, id: &str, started: Instant) -> Option<Routed> {
    let answer = api.resolver.cached(key, started)?;
    let (resp, logged) = connection_response(api, answer, true, id, started);
    Some(Routed::Now(resp, logged))
}

/// A request's path in parts: /a/b/c as up to four.
type Parts<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

/// Every endpoint but a connection lookup, and the refusals of the rest.
#[inline(never)]
fn other_endpoint(
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
                    plain_value(&api, "config option", &id, work).await
                } else {
                    let work = api.resolver.variable(&key, refresh);
                    plain_value(&api, "variable", &id, work).await
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
fn config_refused(settings: &crate::config::Settings, key: &str) -> Option<LookupError> {
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
fn connection_response(
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
    let plain_hit = hit && !computed && !served.stale && served.stage == AWSCURRENT;
    let logged = Logged {
        started,
        id: (!plain_hit || tracing::enabled!(tracing::Level::DEBUG)).then(|| id.to_owned()),
        stage: Some(served.stage),
        hit: plain_hit,
    };
    (r, logged)
}

/// A connection's body with the headers every answer carries.
fn answer_response(
    body: Bytes,
    stage: &'static str,
    age: Duration,
    validated: bool,
    secret: HeaderValue,
) -> Resp {
    let mut r = ok(body);
    let h = r.headers_mut();
    h.insert(STAGE, HeaderValue::from_static(stage));
    h.insert(AGE, age_header(age));
    h.insert(
        VALIDATED,
        HeaderValue::from_static(if validated { "true" } else { "false" }),
    );
    h.insert(SECRET, secret);
    r
}

/// A variable or config value (`what`), bounded by `request_timeout`.
async fn plain_value(
    api: &CredentialApi,
    what: &'static str,
    id: &str,
    work: impl std::future::Future<Output = Result<Arc<crate::service::variables::Value>, LookupError>>,
) -> Resp {
    let kind = what.split(' ').next().unwrap_or(what);
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
fn age_header(age: Duration) -> HeaderValue {
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

fn timed_out(what: &str, id: &str, after: Duration) -> LookupError {
    LookupError::new(
        ErrorCode::Timeout,
        format!("{what} {id}: the lookup did not finish within {after:?}"),
    )
}

fn decode(raw: &str) -> Cow<'_, str> {
    if !raw.contains('%') {
        return raw.into();
    }
    // Invalid UTF-8 becomes U+FFFD, which the id rule then refuses.
    percent_encoding::percent_decode_str(raw).decode_utf8_lossy()
}

/// The query parameters every lookup takes.
#[derive(Default)]
struct Query {
    refresh: bool,
    team: Option<String>,
}

#[inline(never)]
fn query(query: &str) -> Result<Query, LookupError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_localhost_127_slash_8_and_ipv6_loopback() {
        for ok in [
            "localhost",
            "LocalHost:9797",
            "127.0.0.1",
            "127.0.0.1:1",
            "127.255.3.4:65535",
            "[::1]",
            "[::1]:9797",
            "[0:0:0:0:0:0:0:1]:80",
        ] {
            assert!(is_loopback_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:9797",
            "localhost.",
            "localhost.evil.example",
            "localhost:",
            "localhost:65536",
            "localhost:99999999",
            "localhost:+80",
            "localhost:80:80",
            "user@localhost",
            "128.0.0.1",
            "0.0.0.0",
            "10.0.0.1:9797",
            "127.1",
            "0x7f.0.0.1",
            "[::1",
            "[::1]x",
            "[::2]:80",
            "[::ffff:127.0.0.1]",
            "::1",
            "[::]",
        ] {
            assert!(!is_loopback_host(bad.as_bytes()), "{bad}");
        }
        assert!(!is_loopback_host(b"localhost\xff"));
    }

    #[test]
    fn every_forwarding_header_is_one() {
        for name in [
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-forwarded-port",
            "forwarded",
            "x-real-ip",
            "via",
        ] {
            assert!(is_forwarding(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "host",
            "x-sidecar-token",
            "x-forwarded",
            "user-agent",
            "x-real",
        ] {
            assert!(!is_forwarding(&HeaderName::from_static(name)), "{name}");
        }
    }

    /// hyper keeps one response future per connection for the
    /// connection's whole life and moves it on every request: the work of a
    /// cold lookup (a config option's login check was 10 KiB) must be boxed,
    /// not inlined into it, or every idle keep-alive costs that much memory
    /// and every cache hit that much copying.
    #[test]
    fn the_response_future_hyper_keeps_stays_small() {
        type Kept = <ConnService as hyper::service::Service<Request<Incoming>>>::Future;
        let size = std::mem::size_of::<Kept>();
        assert!(
            size <= 256,
            "hyper keeps a {size}-byte future per connection"
        );
    }
}
