//! The benchmark's baseline: the plainest hyper 1 server that answers a
//! fixed JSON body, built with the same settings as the sidecar. The sidecar's
//! cached lookups are measured as a ratio against it, in the same run.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
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
    let body = Bytes::from_static(br#"{"conn_type":"postgres","host":"localhost","port":5432,"login":"u","password":"p","schema":"d","extra":{"sslmode":"verify-full"}}"#);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
