//! The credential listener: a small hyper 1 server on loopback.
//!
//! Every request: refused if it came through a proxy, refused without the
//! token, bounded in header size and time; idle connections are closed.
//! Every answer is JSON with `Cache-Control: no-store`; errors are
//! `{"error", "message"}`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderName, FORWARDED, HOST, VIA};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::error::{ErrorCode, LookupError};
use crate::server::tcp::{Connections, Verdict, Watch, IDLE_CLOSE};
use crate::server::token::TokenStore;
use crate::service::resolver::Resolver;

use super::routes::*;
pub use super::routes::{error, json};

pub const TOKEN_HEADER: &str = "x-sidecar-token";
// Parsed once, not on every request.
pub(super) const TOKEN: HeaderName = HeaderName::from_static(TOKEN_HEADER);
pub(super) const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `X-Forwarded-For`, `-Host`, `-Proto`, `-Port`, ...: every one of them.
pub(super) const X_FORWARDED_: &str = "x-forwarded-";
pub(super) const STAGE: HeaderName = HeaderName::from_static("x-sidecar-stage");
pub(super) const AGE: HeaderName = HeaderName::from_static("x-sidecar-age");
pub(super) const STALE: HeaderName = HeaderName::from_static("x-sidecar-stale");
pub(super) const OUTCOME: HeaderName = HeaderName::from_static("x-sidecar-outcome");
pub(super) const VALIDATED: HeaderName = HeaderName::from_static("x-sidecar-validated");
pub(super) const SECRET: HeaderName = HeaderName::from_static("x-sidecar-secret");
pub(super) const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

pub struct CredentialApi {
    pub resolver: Arc<Resolver>,
    pub token: TokenStore,
}

pub(super) type Resp = Response<Full<Bytes>>;

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
pub(super) struct Logged {
    /// The request's one clock reading (expiry, age, token recheck, latency).
    pub(super) started: Instant,
    pub(super) id: Option<String>,
    pub(super) stage: Option<crate::aws::secrets_manager::Stage>,
    /// A connection served from the cache as it was: a metric, not an event.
    pub(super) hit: bool,
}

impl Logged {
    pub(super) fn id(started: Instant, id: impl Into<String>) -> Logged {
        Logged {
            started,
            id: Some(id.into()),
            stage: None,
            hit: false,
        }
    }
    pub(super) fn none(started: Instant) -> Logged {
        Logged {
            started,
            id: None,
            stage: None,
            hit: false,
        }
    }
}

/// What a request comes to: an answer at once, or work to wait for.
pub(super) enum Routed {
    /// Everything that needs no waiting: refusals, cached answers, bad paths.
    Now(Resp, Logged),
    /// A lookup or check that goes to AWS or a database, in a future of its own.
    Later(Pending),
}

pub(super) type Pending = Pin<Box<dyn Future<Output = (Resp, Logged)> + Send>>;

/// hyper's view of one client connection: what its requests need, and
/// the counter that tells the idle sweep whether they move.
pub(super) struct ConnService {
    api: Arc<CredentialApi>,
    watch: Arc<Watch>,
}

/// The response future hyper keeps for a connection: a few words.
pub(super) enum Reply {
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
pub(super) fn log_request(method: &Method, path: &str, logged: &Logged, resp: &Resp) {
    if tracing::enabled!(tracing::Level::INFO)
        && (!logged.hit || tracing::enabled!(tracing::Level::DEBUG))
    {
        write_request_line(method, path, logged, resp);
    }
}

#[inline(never)] // out of the hot path's code: a plain hit never gets here at INFO
pub(super) fn write_request_line(method: &Method, path: &str, logged: &Logged, resp: &Resp) {
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
                stage = logged.stage.map_or("", |s| s.as_str()),
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
pub(super) fn route(api: &Arc<CredentialApi>, req: &Request<Incoming>, started: Instant) -> Routed {
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
pub(super) fn refused(code: ErrorCode, why: &'static str, started: Instant) -> Routed {
    Routed::Now(error(&LookupError::new(code, why)), Logged::none(started))
}

/// A header a proxy adds: `X-Forwarded-For` and every other `X-Forwarded-*`,
/// `Forwarded`, `X-Real-IP`, `Via`. Compared as names, without allocating
/// (hyper keeps names lowercase).
pub(super) fn is_forwarding(name: &HeaderName) -> bool {
    *name == FORWARDED
        || *name == VIA
        || *name == X_REAL_IP
        || name.as_str().starts_with(X_FORWARDED_)
}

#[cold]
#[inline(never)]
pub(super) fn forwarded(name: &HeaderName, started: Instant) -> Routed {
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
pub(super) fn host_refused(host: Option<&[u8]>, started: Instant) -> Routed {
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
pub(super) fn loopback_request(req: &Request<Incoming>, host: Option<&[u8]>) -> bool {
    host.is_some_and(is_loopback_host)
        && req
            .uri()
            .authority()
            .is_none_or(|a| is_loopback_host(a.as_str().as_bytes()))
}

/// `localhost`, an address in 127.0.0.0/8 or `[::1]`, each with an optional
/// `:port`, case-insensitive; nothing else (no trailing dot, no userinfo).
pub(super) fn is_loopback_host(host: &[u8]) -> bool {
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
