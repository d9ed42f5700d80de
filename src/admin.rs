//! The admin listener: probes and metrics, on the pod IP, never a secret.
//!
//! `/livez` depends on nothing outside the process: an AWS or Postgres
//! outage must not make the kubelet restart every Airflow pod.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::provider::ProvideCredentials;
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

use crate::front::Resolver;
use crate::http::json;

pub struct Admin {
    pub resolver: Arc<Resolver>,
    pub aws: aws_config::SdkConfig,
}

pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .max_buf_size(8 * 1024);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
            _ = &mut shutdown => return,
        };
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
        });
    }
}

async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/livez" => json(StatusCode::OK, json!({"status": "alive"})),
        "/readyz" => readyz(admin).await,
        "/metrics" => {
            let r = &admin.resolver;
            r.metrics
                .set_secret_ages(r.caches.answers.iter().filter_map(|(id, a)| {
                    a.ok()
                        .map(|s| (id.to_string(), s.fetched_at.elapsed().as_secs_f64()))
                }));
            let mut r = Response::new(Full::new(Bytes::from(admin.resolver.metrics.render())));
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

/// Ready when AWS credentials resolve (the SDK caches them) and AWS has not
/// been failing for longer than `max_stale` (past that, no cached credential
/// may be served any more).
async fn readyz(admin: &Admin) -> Response<Full<Bytes>> {
    let credentials = match admin.aws.credentials_provider() {
        None => Err("no AWS credentials provider configured".to_string()),
        Some(p) => {
            match tokio::time::timeout(Duration::from_secs(3), p.provide_credentials()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("AWS credentials do not resolve: {e}")),
                Err(_) => Err("AWS credentials did not resolve within 3s".to_string()),
            }
        }
    };
    match credentials {
        Ok(()) => json(StatusCode::OK, json!({"status": "ready"})),
        Err(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not_ready", "reason": reason}),
        ),
    }
}
