//! The login check: connect exactly as Airflow will, authenticate, `SELECT 1`.
//!
//! This is the part nobody else does. The outcome is one of three words,
//! because callers act on exactly three things: serve it, try another
//! version (`Rejected`), or report the database as down (`Unreachable`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::postgres::auth_guard::{Asked, AuthGuard, GuardedTls, Refusal};
use crate::postgres::secret_files::{FileReader, NamedFile};

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::postgres::verifiers::{AcceptAnyCert, ChainOnly};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::error::SqlState;

use crate::config::SslMode;
pub use crate::postgres::proofs::Proofs;

/// Everything needed to log in the way Airflow will.
#[derive(Clone)]
pub struct LoginTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: SecretString,
    pub sslmode: SslMode,
    pub sslrootcert: Option<NamedFile>,
    /// The server's identity is not verified (anything but `verify-full`):
    /// a request for a cleartext or MD5 password is refused, never answered.
    pub refuse_passwords: bool,
    /// The libpq options from `extra` that change whether a login succeeds.
    pub options: LoginOptions,
}

/// libpq options that the login check honours, because they decide whether
/// Airflow's own connect succeeds (see `login_plan` for the rest).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LoginOptions {
    /// `options`, e.g. `-c search_path=app` (a bad GUC fails the login).
    pub options: Option<String>,
    pub target_session_attrs: Option<SessionAttrs>,
    pub channel_binding: Option<ChannelBinding>,
    /// `sslnegotiation=direct` (Postgres 17+).
    pub direct_tls: bool,
    /// `sslcert` + `sslkey`: a client certificate.
    pub client_cert: Option<(NamedFile, NamedFile)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionAttrs {
    Any,
    ReadWrite,
    ReadOnly,
}

impl SessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelBinding {
    Disable,
    Prefer,
    Require,
}

impl std::fmt::Debug for LoginTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LoginTarget({}@{}:{}/{} sslmode={})",
            self.user,
            self.host,
            self.port,
            self.database,
            self.sslmode.as_str()
        )
    }
}

/// What Postgres said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The check could not be set up: a CA or client certificate file is
    /// missing or unreadable. A configuration problem, not an outage.
    Misconfigured {
        message: String,
    },
    /// Authentication or authorization refused (SQLSTATE 28P01, 28000, 3D000).
    Rejected {
        sqlstate: String,
        message: String,
    },
    /// Could not get as far as asking (DNS, refused, timeout, TLS).
    Unreachable {
        message: String,
    },
    /// The server asked for a password the login may not send: its
    /// identity was not verified (see [`crate::postgres::auth_guard`]).
    Withheld {
        message: String,
    },
}

/// One login attempt's result and how long it took.
#[derive(Debug, Clone)]
pub struct Checked {
    pub outcome: Outcome,
    pub elapsed: Duration,
}

/// rustls settings are built once per (sslmode, CA file, client certificate).
type TlsKey = (SslMode, Option<NamedFile>, Option<(NamedFile, NamedFile)>);

pub struct Validator {
    connect_timeout: Duration,
    resolve: HashMap<(String, u16), SocketAddr>,
    files: FileReader,
    /// Built TLS settings and when: rebuilt after [`TLS_CONFIG_TTL`], so a CA
    /// bundle or client key replaced on disk is read again.
    tls: Mutex<HashMap<TlsKey, (Arc<ClientConfig>, Instant)>>,
}

/// How long built TLS settings (the files they were read from) are used.
const TLS_CONFIG_TTL: Duration = Duration::from_secs(300);
/// Most TLS settings kept (one per CA file and client certificate in use).
const TLS_CONFIGS_MAX: usize = 256;

impl Validator {
    pub fn new(
        connect_timeout: Duration,
        resolve: HashMap<(String, u16), SocketAddr>,
        files: FileReader,
    ) -> Self {
        Validator {
            connect_timeout,
            resolve,
            files,
            tls: Mutex::new(HashMap::new()),
        }
    }

    /// Log in once. Never panics; every failure is an [`Outcome`].
    pub async fn check(&self, target: &LoginTarget) -> Checked {
        let started = Instant::now();
        let outcome = match tokio::time::timeout(self.connect_timeout, self.login(target)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Unreachable {
                message: format!(
                    "no answer from {}:{} within {:?}",
                    target.host, target.port, self.connect_timeout
                ),
            },
        };
        Checked {
            outcome,
            elapsed: started.elapsed(),
        }
    }

    async fn login(&self, t: &LoginTarget) -> Outcome {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&t.host)
            .user(&t.user)
            .password(t.password.expose_secret())
            .dbname(&t.database)
            .application_name("airflow-secrets-sidecar")
            .connect_timeout(self.connect_timeout);
        let o = &t.options;
        if let Some(options) = &o.options {
            cfg.options(options);
        }
        if let Some(attrs) = o.target_session_attrs {
            use tokio_postgres::config::TargetSessionAttrs as T;
            cfg.target_session_attrs(match attrs {
                SessionAttrs::Any => T::Any,
                SessionAttrs::ReadWrite => T::ReadWrite,
                SessionAttrs::ReadOnly => T::ReadOnly,
            });
        }
        if let Some(binding) = o.channel_binding {
            use tokio_postgres::config::ChannelBinding as C;
            cfg.channel_binding(match binding {
                ChannelBinding::Disable => C::Disable,
                ChannelBinding::Prefer => C::Prefer,
                ChannelBinding::Require => C::Require,
            });
        }
        if o.direct_tls {
            cfg.ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
        }
        // SIDECAR_RESOLVE: dial another address, keep verifying the real name.
        let dial_to = self
            .resolve
            .get(&(t.host.to_ascii_lowercase(), t.port))
            .copied();
        match dial_to {
            Some(addr) => {
                cfg.hostaddr(addr.ip()).port(addr.port());
            }
            None => {
                cfg.port(t.port);
            }
        }
        let refusal = Refusal::default();
        let result = match t.sslmode {
            SslMode::Disable => {
                // tokio-postgres makes its own plain socket: make it here, so
                // that the guard can sit on it.
                cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let socket = match dial(&t.host, t.port, dial_to).await {
                    Ok(s) => s,
                    Err(e) => {
                        return Outcome::Unreachable {
                            message: format!("cannot connect: {e}"),
                        }
                    }
                };
                let guarded = AuthGuard::new(socket, t.refuse_passwords, refusal.clone());
                let connected = cfg.connect_raw(guarded, tokio_postgres::NoTls).await;
                run(connected, o.target_session_attrs).await
            }
            mode => {
                let tls = match self
                    .tls_config(mode, t.sslrootcert.as_ref(), o.client_cert.as_ref())
                    .await
                {
                    Ok(tls) => tls,
                    Err(message) => return Outcome::Misconfigured { message },
                };
                // Never tokio-postgres's prefer: a server that declines TLS
                // would get a plain stream with no guard on it.
                cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
                let connector = GuardedTls::new(
                    tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone()),
                    t.refuse_passwords,
                    refusal.clone(),
                );
                // tokio-postgres checks target_session_attrs itself here.
                run(cfg.connect(connector).await, None).await
            }
        };
        match result {
            Ok(()) => Outcome::Ok,
            Err(e) => match refusal.get() {
                Some(Asked::Oversized) => Outcome::Unreachable {
                    message: format!(
                        "the server sent a message longer than {} KiB during the login: not Postgres, or not a well-behaved one",
                        crate::postgres::auth_guard::MAX_MESSAGE / 1024
                    ),
                },
                Some(asked) => Outcome::Withheld {
                    message: format!(
                        "the server {}, but its identity was not verified (sslmode {}): the password was not sent. Give the sidecar the server's CA (sslrootcert, for verify-full), or let the server use SCRAM (password_encryption = scram-sha-256)",
                        asked.as_str(),
                        t.sslmode.as_str()
                    ),
                },
                None => classify_failed(&e),
            },
        }
    }

    /// rustls settings per (sslmode, CA file), built once.
    async fn tls_config(
        &self,
        mode: SslMode,
        root: Option<&NamedFile>,
        client_cert: Option<&(NamedFile, NamedFile)>,
    ) -> Result<Arc<ClientConfig>, String> {
        // libpq: with a root certificate, `require` verifies the chain like `verify-ca`.
        let key = (mode, root.cloned(), client_cert.cloned());
        if let Some((found, built)) = self.tls.lock().expect("tls cache lock").get(&key) {
            if built.elapsed() < TLS_CONFIG_TTL {
                return Ok(found.clone());
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup failed: {e}"))?;
        let verify = match (mode, root) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(format!(
                "sslmode={} needs a CA: set SIDECAR_SSLROOTCERT or the connection's sslrootcert",
                mode.as_str()
            ))
            }
            (SslMode::Disable | SslMode::Prefer | SslMode::Require, None) => None,
            (SslMode::VerifyFull, Some(root)) => Some((self.load_roots(root).await?, true)),
            (_, Some(root)) => Some((self.load_roots(root).await?, false)),
        };
        let builder = match verify {
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider))),
            Some((roots, true)) => builder.with_root_certificates(roots),
            Some((roots, false)) => {
                let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("TLS setup failed: {e}"))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
            }
        };
        let config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let (chain, key) = self.load_client_cert(cert, key).await?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{}: {e}", cert.describe()))?
            }
        };
        let config = Arc::new(config);
        let mut cache = self.tls.lock().expect("tls cache lock");
        if cache.len() >= TLS_CONFIGS_MAX {
            cache.retain(|_, (_, built)| built.elapsed() < TLS_CONFIG_TTL);
            if cache.len() >= TLS_CONFIGS_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (config.clone(), Instant::now()));
        Ok(config)
    }
}

impl Validator {
    /// A client certificate and its key, read by the rules of
    /// [`crate::postgres::secret_files`]; never echoing the key's contents.
    async fn load_client_cert(
        &self,
        cert: &NamedFile,
        key: &NamedFile,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ),
        String,
    > {
        use rustls::pki_types::pem::PemObject;
        let pem = self.files.read(cert).await?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|_| format!("{} is not PEM", cert.describe()))?;
        if chain.is_empty() {
            return Err(format!("{} holds no certificate", cert.describe()));
        }
        let pem = self.files.read(key).await?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|_| format!("{} is not a PEM private key", key.describe()))?;
        Ok((chain, key))
    }

    async fn load_roots(&self, file: &NamedFile) -> Result<RootCertStore, String> {
        use rustls::pki_types::pem::PemObject;
        let pem = self.files.read(file).await?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|_| format!("{} is not PEM", file.describe()))?;
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("{} holds no certificate", file.describe()));
        }
        Ok(roots)
    }
}

/// A plain TCP connection to `host:port` (or to `to`, SIDECAR_RESOLVE's
/// address), trying each address the name resolves to, as libpq does.
async fn dial(
    host: &str,
    port: u16,
    to: Option<SocketAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let addrs: Vec<SocketAddr> = match to {
        Some(addr) => vec![addr],
        None => tokio::net::lookup_host((host, port)).await?.collect(),
    };
    let mut last =
        std::io::Error::new(std::io::ErrorKind::NotFound, "the host name has no address");
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Aborts the connection's driver task when the check ends, however it ends
/// (a timeout drops the check mid-query): the socket closes with it, so no
/// Postgres backend is left waiting on a client that is gone.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Outcome {
    /// The word for metrics and reports.
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Unreachable { .. } => "unreachable",
            Outcome::Misconfigured { .. } => "misconfigured",
            Outcome::Withheld { .. } => "withheld",
        }
    }
}

/// `SELECT 1` on a fresh connection, then close it; with `attrs`, first the
/// check tokio-postgres makes itself only on connections it opened.
async fn run<S, T>(
    connected: Result<
        (tokio_postgres::Client, tokio_postgres::Connection<S, T>),
        tokio_postgres::Error,
    >,
    attrs: Option<SessionAttrs>,
) -> Result<(), Failed>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = connected.map_err(Failed::Postgres)?;
    let driver = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let result = match attrs {
        Some(wanted @ (SessionAttrs::ReadWrite | SessionAttrs::ReadOnly)) => {
            session_attrs_hold(&client, wanted).await
        }
        _ => Ok(()),
    };
    let result = match result {
        Ok(()) => client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(Failed::Postgres),
        Err(e) => Err(e),
    };
    drop(client); // sends Terminate; the driver then ends
    let mut driver = driver;
    let _ = tokio::time::timeout(Duration::from_secs(1), &mut driver.0).await;
    result
}

/// Why a login that connected did not succeed.
enum Failed {
    Postgres(tokio_postgres::Error),
    /// `target_session_attrs` does not hold (the server said why).
    SessionAttrs(&'static str),
}

/// tokio-postgres's own check, for a connection it did not open itself.
async fn session_attrs_hold(
    client: &tokio_postgres::Client,
    wanted: SessionAttrs,
) -> Result<(), Failed> {
    let rows = client
        .simple_query("SHOW transaction_read_only")
        .await
        .map_err(Failed::Postgres)?;
    let read_only = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(|v| v == "on"),
        _ => None,
    });
    match (wanted, read_only) {
        (SessionAttrs::ReadWrite, Some(true)) => {
            Err(Failed::SessionAttrs("database does not allow writes"))
        }
        (SessionAttrs::ReadOnly, Some(false)) => {
            Err(Failed::SessionAttrs("database is not read only"))
        }
        _ => Ok(()),
    }
}

fn classify_failed(failed: &Failed) -> Outcome {
    match failed {
        Failed::Postgres(e) => classify(e),
        Failed::SessionAttrs(why) => Outcome::Unreachable {
            message: (*why).to_string(),
        },
    }
}

fn classify(e: &tokio_postgres::Error) -> Outcome {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let text = format!("{} (SQLSTATE {})", db.message(), code.code());
        return if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            || *code == SqlState::INVALID_CATALOG_NAME
        {
            Outcome::Rejected {
                sqlstate: code.code().to_string(),
                message: text,
            }
        } else {
            // Too many connections, starting up, ...: the server, not the credential.
            Outcome::Unreachable { message: text }
        };
    }
    // tokio-postgres' Display is terse ("db error", "error connecting to
    // server"): append the source chain, which names the real cause.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Outcome::Unreachable { message }
}
