//! A man in the middle, for the password tests: a server on loopback that
//! speaks just enough of the Postgres protocol to be logged in to. It takes
//! TLS with a certificate it is given (or none), reads the startup message,
//! asks for a cleartext or MD5 password, and records every byte the client
//! sends after that. It never imitates a real server beyond the ask.

#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the fake asks the client for.
#[derive(Debug, Clone, Copy)]
pub enum Ask {
    Cleartext,
    Md5,
    /// No ask: a notice announcing 1 GiB, then zeros for as long as the
    /// client reads (at most 256 MiB).
    Flood,
    /// `AuthenticationOk` at once: "logged in" without any password.
    Trust,
    /// SCRAM with one iteration, so that the client's proof could be
    /// guessed offline at no cost.
    WeakScram,
}

#[derive(Default)]
struct Seen {
    /// Clients that got as far as the password request.
    asked: AtomicUsize,
    /// Every byte sent after a password request.
    after_ask: Mutex<Vec<u8>>,
}

pub struct FakePostgres {
    pub port: u16,
    seen: Arc<Seen>,
    task: JoinHandle<()>,
}

impl FakePostgres {
    /// With `tls` (certificate, key) it accepts TLS; without, it declines it.
    pub async fn start(tls: Option<(&Path, &Path)>, ask: Ask) -> FakePostgres {
        let acceptor = tls.map(|(cert, key)| acceptor(cert, key));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, seen) = (acceptor.clone(), s.clone());
                conns.spawn(async move {
                    let _ = serve(stream, acceptor, ask, seen).await;
                });
            }
        });
        FakePostgres { port, seen, task }
    }

    pub fn asked(&self) -> usize {
        self.seen.asked.load(Ordering::SeqCst)
    }

    /// Everything clients sent after being asked for a password.
    pub fn received_after_ask(&self) -> Vec<u8> {
        self.seen.after_ask.lock().unwrap().clone()
    }
}

impl Drop for FakePostgres {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn acceptor(cert: &Path, key: &Path) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

const SSL_REQUEST: u32 = 80877103;

async fn serve(
    mut stream: tokio::net::TcpStream,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    ask: Ask,
    seen: Arc<Seen>,
) -> std::io::Result<()> {
    let first = read_untyped(&mut stream).await?;
    let is_ssl_request =
        first.len() == 4 && u32::from_be_bytes(first[..4].try_into().unwrap()) == SSL_REQUEST;
    if !is_ssl_request {
        // A plaintext client: `first` was its startup message.
        return converse(stream, ask, seen).await;
    }
    match acceptor {
        Some(acceptor) => {
            stream.write_all(b"S").await?;
            let mut tls = acceptor.accept(stream).await?;
            read_untyped(&mut tls).await?; // the startup message
            converse(tls, ask, seen).await
        }
        None => {
            stream.write_all(b"N").await?;
            read_untyped(&mut stream).await?;
            converse(stream, ask, seen).await
        }
    }
}

/// A message without a type byte (SSLRequest, StartupMessage): its body.
async fn read_untyped<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    let mut body = vec![0u8; len.saturating_sub(4).min(64 * 1024)];
    s.read_exact(&mut body).await?;
    Ok(body)
}

/// Ask for the password, then record what comes, until the client closes.
async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    ask: Ask,
    seen: Arc<Seen>,
) -> std::io::Result<()> {
    if let Ask::Flood = ask {
        s.write_all(&[&b"N"[..], &(1u32 << 30).to_be_bytes()].concat())
            .await?;
        let zeros = vec![0u8; 64 * 1024];
        for _ in 0..4096 {
            s.write_all(&zeros).await?;
        }
        return Ok(());
    }
    if let Ask::WeakScram = ask {
        let sasl = [
            &b"R"[..],
            &23u32.to_be_bytes(),
            &10u32.to_be_bytes(),
            b"SCRAM-SHA-256\0\0",
        ]
        .concat();
        s.write_all(&sasl).await?;
        seen.asked.fetch_add(1, Ordering::SeqCst);
        // The client's first message (`n,,n=,r=<nonce>`), then ours with i=1.
        let first = read_typed(&mut s).await?;
        seen.after_ask.lock().unwrap().extend_from_slice(&first);
        let text = String::from_utf8_lossy(&first).into_owned();
        let nonce = text.split("r=").nth(1).unwrap_or("").to_string();
        let server_first = format!("r={nonce}fake,s=c2FsdHNhbHQ=,i=1");
        let body = [&11u32.to_be_bytes()[..], server_first.as_bytes()].concat();
        s.write_all(&[&b"R"[..], &(body.len() as u32 + 4).to_be_bytes(), &body].concat())
            .await?;
        return record(s, seen).await;
    }
    let request: Vec<u8> = match ask {
        Ask::Cleartext => [&b"R"[..], &8u32.to_be_bytes(), &3u32.to_be_bytes()].concat(),
        Ask::Md5 => [
            &b"R"[..],
            &12u32.to_be_bytes(),
            &5u32.to_be_bytes(),
            &[1, 2, 3, 4],
        ]
        .concat(),
        Ask::Trust => [&b"R"[..], &8u32.to_be_bytes(), &0u32.to_be_bytes()].concat(),
        Ask::Flood | Ask::WeakScram => unreachable!(),
    };
    s.write_all(&request).await?;
    s.flush().await?;
    seen.asked.fetch_add(1, Ordering::SeqCst);
    record(s, seen).await
}

/// A typed message (`p`, ...): type byte and body.
async fn read_typed<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut kind = [0u8; 1];
    s.read_exact(&mut kind).await?;
    let mut body = read_untyped(s).await?;
    body.insert(0, kind[0]);
    Ok(body)
}

/// Record what the client sends until it closes.
async fn record<S: AsyncRead + Unpin>(mut s: S, seen: Arc<Seen>) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await;
        match read {
            Ok(Ok(n)) if n > 0 => seen.after_ask.lock().unwrap().extend_from_slice(&buf[..n]),
            _ => return Ok(()),
        }
    }
}
