//! The benchmark's baseline: the plainest hyper 1 server, answering the same
//! bytes the sidecar sends for a cached lookup (the body from a file, the same
//! response headers) with no logic at all. The sidecar's cached lookups are
//! measured as a ratio against it, in the same run. wrk sends both the same
//! request (path and token header) and parses identical responses, so the
//! ratio is the sidecar's own work and nothing else.
//!
//! Usage: hello ADDR [BODY_FILE]

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9799".into());
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    let body = match std::env::args().nth(2) {
        Some(path) => Bytes::from(std::fs::read(path).expect("read the body file")),
        None => Bytes::from_static(br#"{"hello":"world"}"#),
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                let body = body.clone();
                async move {
                    let mut r = Response::new(Full::new(body));
                    let h = r.headers_mut();
                    h.insert("content-type", HeaderValue::from_static("application/json"));
                    h.insert("cache-control", HeaderValue::from_static("no-store"));
                    h.insert("x-sidecar-stage", HeaderValue::from_static("AWSCURRENT"));
                    h.insert("x-sidecar-age", HeaderValue::from_static("1"));
                    h.insert("x-sidecar-validated", HeaderValue::from_static("true"));
                    h.insert(
                        "x-sidecar-secret",
                        HeaderValue::from_static("airflow/connections/bench_cached"),
                    );
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
