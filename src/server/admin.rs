//! The admin listener: probes and metrics, on the pod IP, never a secret.
//!
//! `/livez` and `/readyz` depend on nothing outside the pod: an AWS or
//! Postgres outage must neither restart pods (liveness) nor take an Airflow
//! component out of its Service (readiness; on Airflow 3 the api-server's
//! Service also carries the Execution API, so every running task would be
//! lost). AWS and Postgres health go to `/metrics` and the alerts built on it.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::server::http::json;
use crate::service::resolver::Resolver;

/// Probes and scrapes are few; this only stops a flood from exhausting
/// file descriptors the credential API needs.
pub const MAX_CONNECTIONS: usize = 64;

/// Connections one peer address may hold: the kubelet (the node's address)
/// and Prometheus each have their own budget, so one noisy or hostile pod
/// cannot take every slot and starve the probes.
pub const MAX_PER_PEER: u32 = 8;

/// Open connections per peer address.
#[derive(Default)]
struct Peers(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>);

/// One connection's claim on its peer's budget, released on drop.
struct PeerSlot(Arc<Peers>, std::net::IpAddr);

impl Peers {
    fn claim(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let mut open = self.0.lock().ok()?;
        let n = open.entry(ip).or_insert(0);
        if *n >= MAX_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot(self.clone(), ip))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.0 .0.lock() {
            if let Some(n) = open.get_mut(&self.1) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.1);
                }
            }
        }
    }
}

pub struct Admin {
    pub resolver: Arc<Resolver>,
    /// The token file Airflow reads (`None` with `--insecure-no-token`).
    pub token_file: Option<PathBuf>,
    /// True while the credential listener accepts connections.
    pub api_serving: Arc<AtomicBool>,
}

/// Bind the admin listener. `[::]` is dual-stack on Linux (the kubelet
/// probes the pod's IPv6 address on IPv6-only clusters, its IPv4 address
/// elsewhere); on a kernel without IPv6 it falls back to `0.0.0.0`.
pub async fn bind(addr: SocketAddr) -> io::Result<(TcpListener, SocketAddr)> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok((l, addr)),
        Err(e) => match ipv4_fallback(addr, &e) {
            Some(v4) => {
                tracing::warn!(%addr, error = %e, fallback = %v4,
                    "no IPv6 on this kernel: the admin listener uses IPv4 only");
                Ok((TcpListener::bind(v4).await?, v4))
            }
            None => Err(e),
        },
    }
}

/// `[::]:port` that failed because the kernel has no IPv6 becomes
/// `0.0.0.0:port`; any other address or error stays an error.
pub fn ipv4_fallback(addr: SocketAddr, err: &io::Error) -> Option<SocketAddr> {
    // EAFNOSUPPORT (IPv6 compiled out or ipv6.disable=1), EADDRNOTAVAIL
    // (IPv6 disabled on every interface).
    const EAFNOSUPPORT: i32 = 97;
    const EADDRNOTAVAIL: i32 = 99;
    let no_ipv6 = matches!(err.raw_os_error(), Some(EAFNOSUPPORT | EADDRNOTAVAIL))
        || err.kind() == io::ErrorKind::Unsupported;
    (addr.is_ipv6() && addr.ip().is_unspecified() && no_ipv6)
        .then(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))
}

pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // A probe sends its request at once; a slow sender only holds a slot.
        .header_read_timeout(Duration::from_secs(2))
        // One request per connection, answered with `Connection: close`. A
        // kept-alive connection would be cut by the read timeout above while
        // idle, and a scraper that reuses it just then gets no answer (a
        // failed scrape, `up == 0`). The kubelet opens a connection per probe
        // anyway, and a scrape every 15 s can afford its handshake.
        .keep_alive(false)
        .max_buf_size(8 * 1024);
    let mut backoff = Backoff::default();
    let peers = Arc::new(Peers::default());
    tokio::pin!(shutdown);
    loop {
        // Bounded connections: wait for a free slot before accepting.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = &mut shutdown => return,
        };
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, peer)) => {
                    backoff.reset();
                    match peers.claim(peer.ip()) {
                        Some(slot) => (s, slot),
                        // Over its budget: closed at once, the slot stays free.
                        None => continue,
                    }
                }
                Err(e) => {
                    // EMFILE and friends: accepting again at once would spin.
                    let wait = backoff.next();
                    tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64,
                        "admin listener: accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = &mut shutdown => return,
                    }
                }
            },
            _ = &mut shutdown => return,
        };
        let (stream, peer_slot) = stream;
        let admin = admin.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&admin, req).await) }
            }),
        );
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
            drop(peer_slot);
            drop(permit);
        });
    }
}

/// 50 ms doubling up to 1 s while accept keeps failing.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = Duration::from_millis(50 << self.0.min(5)).min(Duration::from_secs(1));
        self.0 = self.0.saturating_add(1);
        d
    }
    fn reset(&mut self) {
        self.0 = 0;
    }
}

async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/livez" => json(StatusCode::OK, json!({"status": "alive"})),
        "/readyz" => readyz(admin),
        "/metrics" => {
            let r = &admin.resolver;
            r.metrics
                .set_secret_ages(r.connections.iter().filter_map(|(id, e)| {
                    match e.state.answer(std::time::Instant::now()) {
                        Some(Ok(s)) => Some((id.to_string(), s.fetched_at.elapsed().as_secs_f64())),
                        _ => None,
                    }
                }));
            let text = admin.resolver.metrics.render();
            admin.resolver.metrics.clear_secret_ages();
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => json(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "message": "admin endpoints: /livez, /readyz, /metrics"}),
        ),
    }
}

/// Ready when this process can answer Airflow: configuration loaded (it is,
/// or `serve` would have exited), the credential listener accepting, and the
/// token file Airflow reads present. Nothing here calls AWS or Postgres.
fn readyz(admin: &Admin) -> Response<Full<Bytes>> {
    let mut reasons = Vec::new();
    if !admin.api_serving.load(Ordering::Acquire) {
        reasons.push("the credential listener is not accepting connections".to_string());
    }
    if let Some(path) = &admin.token_file {
        match std::fs::metadata(path) {
            Ok(m) if m.len() > 0 => {}
            Ok(_) => reasons.push(format!("the token file {} is empty", path.display())),
            Err(e) => reasons.push(format!(
                "the token file {} is unreadable: {e}",
                path.display()
            )),
        }
    }
    if reasons.is_empty() {
        json(StatusCode::OK, json!({"status": "ready"}))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not_ready", "reason": reasons.join("; ")}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_back_to_ipv4_only_for_the_ipv6_wildcard_without_ipv6() {
        let any6: SocketAddr = "[::]:9798".parse().unwrap();
        let no_af = io::Error::from_raw_os_error(97);
        assert_eq!(
            ipv4_fallback(any6, &no_af),
            Some("0.0.0.0:9798".parse().unwrap())
        );
        assert_eq!(
            ipv4_fallback(any6, &io::Error::from_raw_os_error(99)),
            Some("0.0.0.0:9798".parse().unwrap())
        );
        // Port taken: a real error, not a missing IPv6 stack.
        assert_eq!(ipv4_fallback(any6, &io::Error::from_raw_os_error(98)), None);
        // An explicit address is the operator's choice.
        assert_eq!(ipv4_fallback("[::1]:9798".parse().unwrap(), &no_af), None);
        assert_eq!(ipv4_fallback("0.0.0.0:9798".parse().unwrap(), &no_af), None);
    }

    #[test]
    fn accept_backoff_grows_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..7).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(50));
    }
}
