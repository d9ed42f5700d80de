//! Fault tools for the failure-mode tests: real servers on loopback that
//! misbehave on command, placed between the sidecar and the real moto or
//! Postgres. Nothing here imitates AWS or Postgres; it only forwards, counts,
//! and breaks what it forwards.
//!
//! - [`AwsFaults`]: an HTTP/1.1 endpoint in front of moto that counts calls per
//!   API (and secret id / stage) and can throttle, deny, answer any error
//!   code or any 200 body, hang or cut, per API, secret id and stage.
//! - [`SilentListener`]: accepts TCP connections and never answers.
//! - [`SilentAfterLogin`]: a Postgres proxy that forwards the login, then goes
//!   silent after the server's first `ReadyForQuery`.

#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::support::env;

// ---- AWS ---------------------------------------------------------------------

/// What the endpoint does with a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward to moto.
    Pass,
    /// HTTP 400 throttling error (`ThrottlingException`; RDS: `Throttling`).
    Throttle,
    /// HTTP 400 `AccessDeniedException` (RDS: `AccessDenied`).
    Deny,
    /// HTTP 400 with this error code (`InvalidRequestException`, `DecryptionFailure`, ...).
    Error(String),
    /// Read the request, never answer, keep the connection open.
    Hang,
    /// This HTTP status with an empty JSON body: no error code at all.
    Status(u16),
    /// Read the request, then close the connection without an answer.
    Cut,
    /// HTTP 200 with this body (awsJson1.1), instead of moto's answer:
    /// what AWS might send that moto never does (dates out of range, ...).
    Answer(String),
}

/// Which requests a fault applies to; `None` matches anything.
#[derive(Debug, Clone)]
struct Rule {
    api: Option<String>,
    secret_id: Option<String>,
    stage: Option<String>,
    fault: Fault,
}

/// One request seen by the endpoint (whatever was done with it).
#[derive(Debug, Clone)]
pub struct Call {
    /// `GetSecretValue`, `DescribeSecret`, `DescribeDBInstances`, ...
    pub api: String,
    /// `SecretId` (Secrets Manager) or the DB instance / cluster identifier (RDS).
    pub resource: Option<String>,
    /// `VersionStage` of a `GetSecretValue`.
    pub stage: Option<String>,
    pub fault: Fault,
}

#[derive(Default)]
struct AwsState {
    /// Later rules win.
    rules: Vec<Rule>,
    calls: Vec<Call>,
}

/// An AWS endpoint in front of moto; give its `url` to the sidecar
/// (`Options::aws_url`, which becomes `AWS_ENDPOINT_URL`).
pub struct AwsFaults {
    pub url: String,
    state: Arc<Mutex<AwsState>>,
    task: JoinHandle<()>,
}

/// Does a request's secret id (a name or an ARN) name this secret?
fn same_secret(requested: &str, wanted: &str) -> bool {
    // A secret's ARN is `arn:...:secret:<name>-<6 random chars>`.
    requested == wanted || requested.contains(&format!(":secret:{wanted}-"))
}

impl Rule {
    fn matches(&self, call: &Call) -> bool {
        self.api.as_deref().is_none_or(|a| a == call.api)
            && self.secret_id.as_deref().is_none_or(|want| {
                call.resource
                    .as_deref()
                    .is_some_and(|got| same_secret(got, want))
            })
            && self
                .stage
                .as_deref()
                .is_none_or(|s| call.stage.as_deref() == Some(s))
    }
}

impl AwsFaults {
    pub async fn start() -> AwsFaults {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(AwsState::default()));
        let upstream = env().moto_url.clone();
        let http = reqwest::Client::new();
        let st = state.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the task closes them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (st, http, upstream) = (st.clone(), http.clone(), upstream.clone());
                conns.spawn(async move {
                    let cut = Arc::new(Notify::new());
                    let on_cut = cut.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        aws_handle(st.clone(), http.clone(), upstream.clone(), cut.clone(), req)
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    // A cut drops the connection (and its socket) mid-request.
                    tokio::select! {
                        _ = conn => {}
                        _ = on_cut.notified() => {}
                    }
                });
                // Reap finished connections.
                while conns.try_join_next().is_some() {}
            }
        });
        AwsFaults { url, state, task }
    }

    fn push(&self, api: Option<&str>, secret_id: Option<&str>, stage: Option<&str>, fault: Fault) {
        self.state.lock().unwrap().rules.push(Rule {
            api: api.map(str::to_string),
            secret_id: secret_id.map(str::to_string),
            stage: stage.map(str::to_string),
            fault,
        });
    }

    /// Every call of `api` (`"*"`: every API) gets `fault`.
    pub fn on(&self, api: &str, fault: Fault) {
        self.push((api != "*").then_some(api), None, None, fault);
    }

    /// Calls of `api` (`"*"`: any) naming `secret_id` (and, if given, asking
    /// for `stage`) get `fault`. Later rules win over earlier ones.
    pub fn on_secret(&self, api: &str, secret_id: &str, stage: Option<&str>, fault: Fault) {
        self.push((api != "*").then_some(api), Some(secret_id), stage, fault);
    }

    /// Back to forwarding everything.
    pub fn clear(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// Calls of `api` (`"*"`: any) seen so far.
    pub fn calls(&self, api: &str) -> usize {
        self.count(|c| api == "*" || c.api == api)
    }

    /// Calls of `api` (`"*"`: any) naming `secret_id`, for `stage` if given.
    pub fn calls_for(&self, api: &str, secret_id: &str, stage: Option<&str>) -> usize {
        self.count(|c| {
            (api == "*" || c.api == api)
                && c.resource
                    .as_deref()
                    .is_some_and(|r| same_secret(r, secret_id))
                && stage.is_none_or(|s| c.stage.as_deref() == Some(s))
        })
    }

    pub fn count(&self, pred: impl Fn(&Call) -> bool) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| pred(c))
            .count()
    }

    /// Every call so far (for failure messages).
    pub fn log(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }
}

impl Drop for AwsFaults {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Which API a request calls and what it names: Secrets Manager speaks
/// awsJson1.1 (`X-Amz-Target` + JSON body), RDS the query protocol (form body).
fn identify(req: &hyper::http::request::Parts, body: &[u8]) -> Call {
    let target = req
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if let Some((_, op)) = target.rsplit_once('.') {
        let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        return Call {
            api: op.to_string(),
            resource: json["SecretId"].as_str().map(str::to_string),
            stage: json["VersionStage"].as_str().map(str::to_string),
            fault: Fault::Pass,
        };
    }
    let form: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    Call {
        api: field("Action").unwrap_or_else(|| "unknown".into()),
        resource: field("DBInstanceIdentifier").or_else(|| field("DBClusterIdentifier")),
        stage: None,
        fault: Fault::Pass,
    }
}

/// An AWS error answer in the calling protocol's shape, as the SDK parses it:
/// awsJson1.1 reads `__type` (or `x-amzn-ErrorType`); the query protocol reads
/// `ErrorResponse/Error/Code`.
fn aws_error(json_protocol: bool, code: &str, message: &str) -> Response<Full<Bytes>> {
    let builder = Response::builder()
        .status(400)
        .header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000");
    if json_protocol {
        let body = serde_json::json!({"__type": code, "message": message}).to_string();
        builder
            .header("content-type", "application/x-amz-json-1.1")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    } else {
        let body = format!(
            "<ErrorResponse xmlns=\"http://rds.amazonaws.com/doc/2014-10-31/\"><Error>\
             <Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>\
             <RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
        );
        builder
            .header("content-type", "text/xml")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }
}

async fn aws_handle(
    state: Arc<Mutex<AwsState>>,
    http: reqwest::Client,
    upstream: String,
    cut: Arc<Notify>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut call = identify(&parts, &body);
    let json_protocol = parts.headers.contains_key("x-amz-target");
    let fault = {
        let mut st = state.lock().unwrap();
        let fault = st
            .rules
            .iter()
            .rev()
            .find(|r| r.matches(&call))
            .map(|r| r.fault.clone())
            .unwrap_or(Fault::Pass);
        call.fault = fault.clone();
        st.calls.push(call);
        fault
    };
    let (throttle, deny) = if json_protocol {
        ("ThrottlingException", "AccessDeniedException")
    } else {
        ("Throttling", "AccessDenied")
    };
    match fault {
        Fault::Pass => {}
        Fault::Throttle => return Ok(aws_error(json_protocol, throttle, "Rate exceeded")),
        Fault::Deny => {
            return Ok(aws_error(
                json_protocol,
                deny,
                "User is not authorized to perform this operation (fault endpoint)",
            ))
        }
        Fault::Error(code) => {
            return Ok(aws_error(
                json_protocol,
                &code,
                &format!("{code} (fault endpoint)"),
            ))
        }
        Fault::Hang => std::future::pending::<()>().await,
        Fault::Status(status) => {
            return Ok(Response::builder()
                .status(status)
                .header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap())
        }
        Fault::Cut => {
            cut.notify_one();
            std::future::pending::<()>().await
        }
        Fault::Answer(body) => {
            return Ok(Response::builder()
                .status(200)
                .header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000")
                .header("content-type", "application/x-amz-json-1.1")
                .body(Full::new(Bytes::from(body)))
                .unwrap())
        }
    }
    // Forward to moto as is (moto does not check signatures).
    let uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut fwd = http.request(parts.method.clone(), format!("{upstream}{uri}"));
    for (k, v) in parts.headers.iter() {
        if !matches!(
            k.as_str(),
            "host" | "content-length" | "connection" | "transfer-encoding"
        ) {
            fwd = fwd.header(k, v);
        }
    }
    let resp = match fwd.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return Ok(Response::builder()
                .status(502)
                .body(Full::new(Bytes::from(format!("fault endpoint: moto: {e}"))))
                .unwrap())
        }
    };
    let mut out = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if !matches!(
            k.as_str(),
            "content-length" | "connection" | "transfer-encoding"
        ) {
            out = out.header(k, v);
        }
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    Ok(out.body(Full::new(bytes)).unwrap())
}

// ---- TCP -----------------------------------------------------------------------

/// Counts of a listener's client connections.
#[derive(Default)]
struct ConnCounts {
    accepted: AtomicUsize,
    open: AtomicUsize,
}

/// Decrements `open` when the client side is gone, however the handler ends.
struct OpenGuard(Arc<ConnCounts>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP listener that accepts and never answers: a database host that is
/// up at the network level but never speaks.
pub struct SilentListener {
    pub port: u16,
    counts: Arc<ConnCounts>,
    task: JoinHandle<()>,
}

impl SilentListener {
    pub async fn start() -> SilentListener {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(ConnCounts::default());
        let c = counts.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                c.accepted.fetch_add(1, Ordering::SeqCst);
                c.open.fetch_add(1, Ordering::SeqCst);
                let guard = OpenGuard(c.clone());
                conns.spawn(async move {
                    let _guard = guard;
                    // Read and discard until the client closes.
                    let mut buf = [0u8; 4096];
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                });
                while conns.try_join_next().is_some() {}
            }
        });
        SilentListener { port, counts, task }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Connections the client has not closed yet.
    pub fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- Postgres ------------------------------------------------------------------

/// `SSLRequest` / `GSSENCRequest` codes of the startup phase.
const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;

/// A Postgres proxy to the test server that forwards the login (startup,
/// SCRAM, parameter status) and goes silent once the server has sent its
/// first `ReadyForQuery`: later bytes in both directions are read and
/// discarded, both sockets stay open. When the client closes, the upstream
/// connection is closed too (so the backend ends).
///
/// It speaks plaintext only: it answers `SSLRequest` with `N` itself, so
/// point a secret with `sslmode=disable` (or `prefer`) at it.
pub struct SilentAfterLogin {
    pub port: u16,
    counts: Arc<ConnCounts>,
    task: JoinHandle<()>,
}

impl SilentAfterLogin {
    pub async fn start() -> SilentAfterLogin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(ConnCounts::default());
        let c = counts.clone();
        let upstream = format!("{}:{}", env().pg_host, env().pg_port);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                c.accepted.fetch_add(1, Ordering::SeqCst);
                c.open.fetch_add(1, Ordering::SeqCst);
                let guard = OpenGuard(c.clone());
                let upstream = upstream.clone();
                conns.spawn(async move {
                    let _guard = guard;
                    let _ = proxy_silent_after_login(client, &upstream).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        SilentAfterLogin { port, counts, task }
    }

    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Client connections not closed yet.
    pub fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }
}

impl Drop for SilentAfterLogin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read one startup-phase packet (int32 length, then the rest).
async fn read_startup(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = s.read_u32().await? as usize;
    if !(8..=10_000).contains(&len) {
        return Err(std::io::Error::other("bad startup packet length"));
    }
    let mut pkt = vec![0u8; len];
    pkt[..4].copy_from_slice(&(len as u32).to_be_bytes());
    s.read_exact(&mut pkt[4..]).await?;
    Ok(pkt)
}

/// Ends when the client side closes (or on an error before going silent).
async fn proxy_silent_after_login(mut client: TcpStream, upstream: &str) -> std::io::Result<()> {
    // Startup: refuse encryption ourselves, so that the rest is readable.
    let startup = loop {
        let pkt = read_startup(&mut client).await?;
        let code = u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]);
        if pkt.len() == 8 && (code == SSL_REQUEST || code == GSSENC_REQUEST) {
            client.write_all(b"N").await?;
            continue;
        }
        break pkt;
    };
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(&startup).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    let silent = Arc::new(AtomicBool::new(false));

    // Client → server: forwarded until silent, then read and discarded; ends
    // when the client closes.
    let s = silent.clone();
    let client_to_server = async move {
        let mut buf = vec![0u8; 8192];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if !s.load(Ordering::SeqCst) && uw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    // Server → client: whole messages until the first ReadyForQuery ('Z')
    // has been passed on, then nothing. Ends only if the server closes
    // before that (the login failed); after it, the client decides.
    let server_to_client = async move {
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) if silent.load(Ordering::SeqCst) => {
                    return std::future::pending::<()>().await
                }
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if silent.load(Ordering::SeqCst) {
                continue;
            }
            pending.extend_from_slice(&buf[..n]);
            // Pass on every complete message; stop right after the first 'Z'.
            let mut at = 0;
            while pending.len() >= at + 5 {
                let len = u32::from_be_bytes([
                    pending[at + 1],
                    pending[at + 2],
                    pending[at + 3],
                    pending[at + 4],
                ]) as usize;
                if pending.len() < at + 1 + len {
                    break;
                }
                let kind = pending[at];
                at += 1 + len;
                if kind == b'Z' {
                    silent.store(true, Ordering::SeqCst);
                    break;
                }
            }
            if cw.write_all(&pending[..at]).await.is_err() {
                return;
            }
            pending.drain(..at);
        }
    };
    tokio::select! {
        _ = client_to_server => {}
        _ = server_to_client => {}
    }
    // Dropping the halves closes both sockets.
    Ok(())
}

// ---- the tools' own tests: each fault as the real SDK / client sees it --------

#[cfg(test)]
mod tool_tests {
    use std::time::Duration;

    use aws_sdk_secretsmanager::error::ProvideErrorMetadata;

    use super::*;
    use crate::support::{self, eventually, put_secret, unique};

    /// Clients of the fault endpoint, without retries so that one call is one request.
    async fn clients(
        faults: &AwsFaults,
        timeout: Duration,
    ) -> (aws_sdk_secretsmanager::Client, aws_sdk_rds::Client) {
        let creds =
            aws_credential_types::Credentials::new("testing", "testing", None, None, "tests");
        let cfg = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .endpoint_url(&faults.url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_timeout(timeout)
                    .build(),
            )
            .load()
            .await;
        (
            aws_sdk_secretsmanager::Client::new(&cfg),
            aws_sdk_rds::Client::new(&cfg),
        )
    }

    #[tokio::test]
    async fn aws_fault_endpoint_answers_each_fault_as_the_sdk_parses_it() {
        let id = format!("faults/{}", unique("tool"));
        put_secret(&id, "value-1").await;
        let faults = AwsFaults::start().await;
        let (sm, rds) = clients(&faults, Duration::from_millis(800)).await;
        let get = |stage: &'static str| {
            sm.get_secret_value()
                .secret_id(&id)
                .version_stage(stage)
                .send()
        };

        assert_eq!(
            get("AWSCURRENT").await.unwrap().secret_string(),
            Some("value-1")
        );

        faults.on_secret("GetSecretValue", &id, Some("AWSPENDING"), Fault::Deny);
        let e = get("AWSPENDING").await.unwrap_err();
        assert_eq!(e.code(), Some("AccessDeniedException"), "{e:?}");
        // Only that stage.
        assert!(get("AWSCURRENT").await.is_ok());

        faults.on("GetSecretValue", Fault::Throttle);
        let e = get("AWSCURRENT").await.unwrap_err();
        assert_eq!(e.code(), Some("ThrottlingException"), "{e:?}");

        faults.on_secret("*", &id, None, Fault::Error("DecryptionFailure".into()));
        let e = get("AWSCURRENT").await.unwrap_err();
        assert_eq!(e.code(), Some("DecryptionFailure"), "{e:?}");
        let e = sm
            .describe_secret()
            .secret_id(&id)
            .send()
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("DecryptionFailure"), "{e:?}");

        faults.on("DescribeDBInstances", Fault::Throttle);
        let e = rds
            .describe_db_instances()
            .db_instance_identifier("x")
            .send()
            .await;
        let e = e.unwrap_err();
        assert_eq!(e.code(), Some("Throttling"), "{e:?}");
        faults.on("DescribeDBInstances", Fault::Deny);
        let e = rds
            .describe_db_instances()
            .db_instance_identifier("x")
            .send()
            .await;
        assert_eq!(e.unwrap_err().code(), Some("AccessDenied"));

        faults.on("DescribeSecret", Fault::Cut);
        let e = sm
            .describe_secret()
            .secret_id(&id)
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                aws_sdk_secretsmanager::error::SdkError::DispatchFailure(_)
            ),
            "{e:?}"
        );
        faults.on("DescribeSecret", Fault::Hang);
        let e = sm
            .describe_secret()
            .secret_id(&id)
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(e, aws_sdk_secretsmanager::error::SdkError::TimeoutError(_)),
            "{e:?}"
        );

        faults.clear();
        assert!(sm.describe_secret().secret_id(&id).send().await.is_ok());
        assert_eq!(
            faults.calls_for("GetSecretValue", &id, Some("AWSPENDING")),
            1
        );
        assert_eq!(faults.calls_for("GetSecretValue", &id, None), 5);
        assert_eq!(faults.calls_for("DescribeSecret", &id, None), 4);
        assert_eq!(faults.calls("DescribeDBInstances"), 2);
        assert_eq!(faults.calls("*"), 11);
    }

    #[tokio::test]
    async fn silent_listener_counts_accepted_and_open_connections() {
        let silent = SilentListener::start().await;
        let a = TcpStream::connect(("127.0.0.1", silent.port))
            .await
            .unwrap();
        let mut b = TcpStream::connect(("127.0.0.1", silent.port))
            .await
            .unwrap();
        b.write_all(b"hello?").await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), b.read(&mut buf)).await;
        assert!(read.is_err(), "it never answers");
        assert!(eventually(Duration::from_secs(5), || async { silent.open() == 2 }).await);
        drop(a);
        assert!(eventually(Duration::from_secs(5), || async { silent.open() == 1 }).await);
        assert_eq!(silent.accepted(), 2);
    }

    #[tokio::test]
    async fn postgres_proxy_forwards_the_login_then_goes_silent() {
        let proxy = SilentAfterLogin::start().await;
        let role = unique("proxied");
        let pw = support::password();
        support::create_role(&role, &pw).await;
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(proxy.port)
            .user(&role)
            .password(&pw)
            .dbname(&role)
            .ssl_mode(tokio_postgres::config::SslMode::Prefer)
            .connect(tokio_postgres::NoTls)
            .await
            .expect("the login goes through");
        let conn = tokio::spawn(conn);
        assert_eq!(support::logins_of(&role), 1);
        let q = tokio::time::timeout(Duration::from_millis(500), client.simple_query("SELECT 1"));
        assert!(q.await.is_err(), "SELECT 1 is never answered");
        assert_eq!(support::backends_of(&role).await, 1);
        assert_eq!((proxy.accepted(), proxy.open()), (1, 1));
        // The client goes away: the proxy closes upstream, the backend ends.
        drop(client);
        conn.abort();
        assert!(eventually(Duration::from_secs(5), || async { proxy.open() == 0 }).await);
        let role2 = role.clone();
        assert!(
            eventually(Duration::from_secs(5), || {
                let r = role2.clone();
                async move { support::backends_of(&r).await == 0 }
            })
            .await
        );
    }
}
