//! Test support: one real Postgres and one moto_server per test run (started
//! by `tests/harness/devenv.py`), and the real sidecar binary per test.
//!
//! The harness process lives as long as this test process: it stops both
//! servers when its stdin closes, which happens however this process ends.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::types::Tag;
use serde::Deserialize;

/// Exactly the keys Airflow's `Connection(**json)` takes: written out here,
/// independently of src/airflow/mod.rs, so a change there cannot pass unseen.
pub const AIRFLOW_KEYS: &[&str] = &[
    "conn_type",
    "host",
    "port",
    "login",
    "password",
    "schema",
    "extra",
    "description",
];

#[derive(Debug, Deserialize)]
pub struct Env {
    pub dir: PathBuf,
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_superuser: String,
    pub pg_password: String,
    pub pg_log: PathBuf,
    pub ca_file: PathBuf,
    pub other_ca_file: PathBuf,
    /// For fake servers: a certificate from the test CA for another name
    /// (`evil.example.net`), and a self-signed one for `localhost`.
    pub wrong_name_cert: PathBuf,
    pub wrong_name_key: PathBuf,
    pub self_signed_cert: PathBuf,
    pub self_signed_key: PathBuf,
    pub moto_url: String,
}

struct Harness {
    env: Env,
    _child: Child,
    _stdin: ChildStdin,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    std::env::var_os("SIDECAR_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Where and why this thread last panicked, for [`Sidecar`]'s drop to
/// repeat after the log it prints (recorded by a hook installed with the
/// harness; a panic re-raised from another thread is not seen by it).
fn last_panic() -> String {
    let taken = LAST_PANIC.try_with(|p| std::mem::take(&mut *p.borrow_mut()));
    match taken {
        Ok(what) if !what.is_empty() => what,
        _ => "(not recorded: see above)".into(),
    }
}

fn record_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let what = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        let what: String = what.chars().take(2000).collect();
        let _ = LAST_PANIC.try_with(|p| *p.borrow_mut() = format!("{at}: {what}"));
        default(info);
    }));
}

/// The shared Postgres + moto of this test run.
pub fn env() -> &'static Env {
    &HARNESS
        .get_or_init(|| {
            record_panics();
            let py = python();
            assert!(
                py.exists(),
                "{} is missing: run `make venv` (or `make test`, which does it)",
                py.display()
            );
            let mut child = Command::new(&py)
                .arg(repo().join("tests/harness/devenv.py"))
                .arg("up")
                .arg("--record")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start tests/harness/devenv.py");
            let stdin = child.stdin.take().unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .expect("read the harness description");
            let env: Env = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("harness did not start ({e}): {line:?}"));
            Harness {
                env,
                _child: child,
                _stdin: stdin,
            }
        })
        .env
}

/// A name unique in this run, safe for roles, databases and secrets.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}_{}_{n}_{nanos:x}", std::process::id())
}

/// A password that is easy to grep for in logs.
pub fn password() -> String {
    format!("Pw-{}-zq9", unique("secret").replace('_', "x"))
}

// ---- Postgres ---------------------------------------------------------------

pub async fn pg_admin() -> tokio_postgres::Client {
    let e = env();
    let (client, conn) = tokio_postgres::Config::new()
        .host(&e.pg_host)
        .port(e.pg_port)
        .user(&e.pg_superuser)
        .password(&e.pg_password)
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to the test Postgres as superuser");
    tokio::spawn(conn);
    client
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A login role with its own database of the same name.
pub async fn create_role(name: &str, password: &str) {
    let c = pg_admin().await;
    c.batch_execute(&format!(
        "CREATE ROLE \"{name}\" LOGIN PASSWORD {}",
        quote_literal(password)
    ))
    .await
    .unwrap();
    c.batch_execute(&format!("CREATE DATABASE \"{name}\" OWNER \"{name}\""))
        .await
        .unwrap();
}

pub async fn set_password(role: &str, password: &str) {
    pg_admin()
        .await
        .batch_execute(&format!(
            "ALTER ROLE \"{role}\" PASSWORD {}",
            quote_literal(password)
        ))
        .await
        .unwrap();
}

/// Successful logins of `role` so far, from the server log (`log_connections`).
pub fn logins_of(role: &str) -> usize {
    let log = std::fs::read_to_string(&env().pg_log).unwrap_or_default();
    let needle = format!("connection authorized: user={role} ");
    log.matches(&needle).count()
}

/// Server processes (backends) of `role` that are still connected.
pub async fn backends_of(role: &str) -> i64 {
    pg_admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await
        .unwrap()
        .get(0)
}

/// Poll `check` until it holds or `bound` passes; the last value of `check`.
/// For waiting on background work; the test asserts the value, not the time.
pub async fn eventually<F, Fut>(bound: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- AWS (moto) ------------------------------------------------------------

pub async fn aws_config() -> aws_config::SdkConfig {
    let creds = aws_credential_types::Credentials::new("testing", "testing", None, None, "tests");
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .endpoint_url(&env().moto_url)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .load()
        .await
}

pub async fn sm() -> aws_sdk_secretsmanager::Client {
    aws_sdk_secretsmanager::Client::new(&aws_config().await)
}

pub async fn rds() -> aws_sdk_rds::Client {
    aws_sdk_rds::Client::new(&aws_config().await)
}

pub async fn put_secret(name: &str, value: &str) -> String {
    sm().await
        .create_secret()
        .name(name)
        .secret_string(value)
        .send()
        .await
        .unwrap()
        .version_id
        .unwrap()
}

pub async fn put_secret_tagged(name: &str, value: &str, tags: &[(&str, &str)]) {
    let mut req = sm().await.create_secret().name(name).secret_string(value);
    for (k, v) in tags {
        req = req.tags(Tag::builder().key(*k).value(*v).build());
    }
    req.send().await.unwrap();
}

/// A new version with the given staging labels; returns its version id.
pub async fn put_version(name: &str, value: &str, stages: &[&str]) -> String {
    let mut req = sm()
        .await
        .put_secret_value()
        .secret_id(name)
        .secret_string(value);
    for s in stages {
        req = req.version_stages(*s);
    }
    req.send().await.unwrap().version_id.unwrap()
}

/// Move AWSCURRENT to `to` (AWSPREVIOUS follows automatically), as finishSecret does.
pub async fn promote(name: &str, to: &str) {
    let c = sm().await;
    let meta = c.describe_secret().secret_id(name).send().await.unwrap();
    let from = meta
        .version_ids_to_stages()
        .unwrap()
        .iter()
        .find(|(_, s)| s.iter().any(|s| s == "AWSCURRENT"))
        .map(|(v, _)| v.clone())
        .unwrap();
    c.update_secret_version_stage()
        .secret_id(name)
        .version_stage("AWSCURRENT")
        .move_to_version_id(to)
        .remove_from_version_id(from)
        .send()
        .await
        .unwrap();
}

/// AWS calls recorded by moto for one action (`GetSecretValue`, ...) whose
/// request names `resource` (a secret id, an RDS identifier).
pub async fn aws_calls(action: &str, resource: &str) -> usize {
    use base64::Engine;
    let text = reqwest::get(format!(
        "{}/moto-api/recorder/download-recording",
        env().moto_url
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let quoted = format!("\"{resource}\"");
    let form = format!(
        "={}",
        url::form_urlencoded::byte_serialize(resource.as_bytes()).collect::<String>()
    );
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|call| {
            let target = call["headers"]["X-Amz-Target"].as_str().unwrap_or_default();
            let body = call["body"].as_str().unwrap_or_default();
            let body = if call["body_encoded"] == true {
                String::from_utf8_lossy(
                    &base64::engine::general_purpose::STANDARD
                        .decode(body)
                        .unwrap_or_default(),
                )
                .into_owned()
            } else {
                body.to_string()
            };
            let action_matches = target.ends_with(&format!(".{action}"))
                || body.contains(&format!("Action={action}&"));
            action_matches
                && (body.contains(&quoted)
                    || body.contains(&format!("{form}&"))
                    || body.ends_with(&form))
        })
        .count()
}

/// A port nothing listens on, held by this test process for its whole run
/// (on 127.0.0.1 and ::1): connecting to it is refused, and no other
/// process can listen on it or use it as an outgoing port. A port merely
/// found free could be taken by another test's server meanwhile, and the
/// sidecar would talk to that server instead of failing to connect.
pub fn closed_port() -> u16 {
    static CLOSED: OnceLock<(u16, Vec<socket2::Socket>)> = OnceLock::new();
    CLOSED
        .get_or_init(|| {
            use socket2::{Domain, Socket, Type};
            let hold = |addr: std::net::SocketAddr| {
                // Bound, never listening, without SO_REUSEADDR.
                let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
                if addr.is_ipv6() {
                    socket.set_only_v6(true)?;
                }
                socket.bind(&addr.into())?;
                Ok::<_, std::io::Error>(socket)
            };
            for _ in 0..20 {
                let v4 = hold("127.0.0.1:0".parse().unwrap()).unwrap();
                let port = v4.local_addr().unwrap().as_socket().unwrap().port();
                match hold(std::net::SocketAddr::from((
                    std::net::Ipv6Addr::LOCALHOST,
                    port,
                ))) {
                    Ok(v6) => return (port, vec![v4, v6]),
                    // ::1 has that port taken: another one.
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                    // No IPv6 here (no ::1, or IPv6 disabled): nothing can
                    // listen on ::1 either.
                    Err(_) => return (port, vec![v4]),
                }
            }
            panic!("no port free on both 127.0.0.1 and ::1");
        })
        .0
}

// ---- the sidecar -------------------------------------------------------------

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Sidecar {
    child: Child,
    pub url: String,
    pub admin_url: String,
    pub token: String,
    pub token_file: PathBuf,
    pub log: PathBuf,
    pub dir: PathBuf,
    /// Strings that must never appear in this sidecar's logs.
    secrets: Mutex<Vec<String>>,
    http: reqwest::Client,
}

#[derive(Default)]
pub struct Options<'a> {
    pub env: Vec<(&'a str, String)>,
    pub config: Option<String>,
    /// Point AWS at a closed port instead of moto.
    pub aws_down: bool,
    /// Point AWS at this URL (a [`Proxy`]) instead of moto.
    pub aws_url: Option<String>,
    /// Variables of the base environment to leave out (`SIDECAR_SSLROOTCERT`: no CA).
    pub unset: Vec<&'a str>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_airflow-secrets-sidecar")
}

/// Environment for any sidecar process of this run (serve or CLI).
pub fn base_env(aws_down: bool) -> Vec<(&'static str, String)> {
    let e = env();
    let aws = if aws_down {
        format!("http://127.0.0.1:{}", closed_port())
    } else {
        e.moto_url.clone()
    };
    aws_env(aws)
}

fn aws_env(aws: String) -> Vec<(&'static str, String)> {
    let e = env();
    vec![
        ("AWS_ENDPOINT_URL", aws),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("AWS_CONFIG_FILE", "/nonexistent".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".into()),
        ("SIDECAR_SSLROOTCERT", e.ca_file.display().to_string()),
        ("SIDECAR_LOG", "trace".into()),
        ("SIDECAR_LOG_FORMAT", "json".into()),
    ]
}

impl Sidecar {
    pub async fn start(opts: Options<'_>) -> Sidecar {
        // A port found free can be taken before the sidecar binds it (another
        // test's outgoing connection may get it as its ephemeral port): then
        // start again on other ports.
        let mut attempt = 1;
        loop {
            let mut sidecar = Self::spawn(&opts);
            match sidecar.wait_ready().await {
                Ok(()) => return sidecar,
                Err(log) if attempt < 5 && log.contains("Address already in use") => attempt += 1,
                Err(log) => panic!("sidecar did not start; log:\n{log}"),
            }
        }
    }

    fn spawn(opts: &Options<'_>) -> Sidecar {
        let dir = env().dir.join(unique("sidecar"));
        std::fs::create_dir_all(&dir).unwrap();
        let token = unique("token");
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let log = dir.join("sidecar.log");
        let port = free_port();
        let admin_port = free_port();
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .envs(match &opts.aws_url {
                Some(url) => aws_env(url.clone()),
                None => base_env(opts.aws_down),
            })
            .env("SIDECAR_LISTEN", format!("127.0.0.1:{port}"))
            .env("SIDECAR_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("SIDECAR_TOKEN_FILE", &token_file)
            .stdin(Stdio::null());
        // Logs go to stdout; errors before logging starts to stderr: keep both.
        let log_file = std::fs::File::create(&log).unwrap();
        cmd.stdout(log_file.try_clone().unwrap()).stderr(log_file);
        if let Some(cfg) = &opts.config {
            let path = dir.join("sidecar.toml");
            std::fs::write(&path, cfg).unwrap();
            cmd.env("SIDECAR_CONFIG", path);
        }
        cmd.envs(opts.env.iter().map(|(k, v)| (*k, v.as_str())));
        for name in &opts.unset {
            cmd.env_remove(name);
        }
        let child = cmd.spawn().expect("start the sidecar");
        Sidecar {
            child,
            url: format!("http://127.0.0.1:{port}"),
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            token,
            token_file,
            log,
            dir,
            secrets: Mutex::new(Vec::new()),
            http: reqwest::Client::new(),
        }
    }

    /// Until `/livez` answers; the log if the sidecar exits or never does.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self
                .http
                .get(format!("{}/livez", self.admin_url))
                .send()
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(self.logs())
    }

    /// A raw keep-alive connection to the credential API that has sent
    /// `GET path` with the token, and the first bytes of the answer.
    pub async fn raw_get(&self, path: &str) -> (tokio::net::TcpStream, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.url.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let get = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nX-Sidecar-Token: {}\r\n\r\n",
            self.token
        );
        conn.write_all(get.as_bytes()).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = conn.read(&mut buf).await.unwrap();
        (conn, String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// The sidecar's resident memory, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Register a value that must never appear in the logs.
    pub fn forbid(&self, secret: &str) {
        self.secrets.lock().unwrap().push(secret.to_string());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(reqwest::Method::GET, path, Some(&self.token), &[])
            .await
    }

    pub async fn post(&self, path: &str) -> Reply {
        self.request(reqwest::Method::POST, path, Some(&self.token), &[])
            .await
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.header("X-Sidecar-Token", t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("sidecar answers");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Reply {
            status,
            headers,
            text,
            json,
        }
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stop with SIGTERM and return the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sidecar ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // CI shows the end of the output: the sidecar's events first
            // (the trace lines of the SDK would push them out), the last
            // raw lines, then the failure itself again.
            let logs = self.logs();
            let events: String = logs
                .lines()
                .filter(|l| !l.contains(r#""level":"TRACE""#) && !l.contains(r#""level":"DEBUG""#))
                .map(|l| format!("{l}\n"))
                .collect();
            eprintln!(
                "--- sidecar log ({}), INFO and above ---\n{}\n--- its last lines ---\n{}\n--- the failure: {} ---",
                self.log.display(),
                tail(&events, 40),
                tail(&logs, 12),
                last_panic()
            );
            return;
        }
        let logs = self.logs();
        for s in self.secrets.lock().unwrap().iter() {
            assert!(
                !logs.contains(s.as_str()),
                "a secret leaked into the sidecar log {}",
                self.log.display()
            );
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub json: serde_json::Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert an error answer with this status and code; return its message.
    pub fn expect_error(&self, status: u16, code: &str) -> &str {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.json["error"], code, "{}", self.text);
        self.json["message"].as_str().expect("message")
    }
}

/// Run the CLI with this run's environment; (exit code, stdout, stderr).
pub fn cli(args: &[&str], extra_env: &[(&str, String)]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .envs(base_env(false))
        .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A role, its database and a secret holding it as Airflow JSON.
pub struct Db {
    pub role: String,
    pub password: String,
    pub conn_id: String,
    pub secret_id: String,
}

pub async fn airflow_json_db() -> Db {
    let role = unique("u");
    let pw = password();
    create_role(&role, &pw).await;
    let conn_id = unique("conn");
    let secret_id = format!("airflow/connections/{conn_id}");
    put_secret(
        &secret_id,
        &serde_json::json!({
            "conn_type": "postgres", "host": "localhost", "port": env().pg_port,
            "login": role, "password": pw, "schema": role,
        })
        .to_string(),
    )
    .await;
    Db {
        role,
        password: pw,
        conn_id,
        secret_id,
    }
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}
