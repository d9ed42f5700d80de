//! Never hand a password to a server whose identity was not verified.
//!
//! tokio-postgres answers whatever a server asks for, a cleartext or MD5
//! password included: a man in the middle only has to ask. [`AuthGuard`]
//! sits on the stream the login reads (above TLS when there is TLS), reads
//! the server's messages up to its authentication request, and when the
//! login may not send a password it fails the read instead of letting the
//! request through: the password is never written. SCRAM (which proves the
//! password without sending it) passes; over TLS the login also requires
//! channel binding, which a man in the middle cannot complete.
//!
//! The guard also bounds what a server can make the login hold: a message
//! longer than [`MAX_MESSAGE`] (a login's are a few hundred bytes) fails the
//! read before tokio-postgres buffers it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// The longest server message a login reads (an ErrorResponse or notice is
/// far shorter): more is a hostile server, not Postgres.
pub const MAX_MESSAGE: u32 = 1024 * 1024;

/// The fewest SCRAM iterations an unverified server may ask for: the client
/// proof a login sends can be guessed offline at the server's chosen cost,
/// so a man in the middle asking for one iteration must get none. 4096 is
/// Postgres's default and RFC 7677's minimum.
pub const MIN_SCRAM_ITERATIONS: u32 = 4096;

/// What the guard refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    Cleartext,
    Md5,
    /// `AuthenticationOk` with no authentication: nothing would be proven.
    NoPassword,
    /// SCRAM with fewer than [`MIN_SCRAM_ITERATIONS`].
    WeakScram,
    /// A message longer than [`MAX_MESSAGE`].
    Oversized,
}

impl Asked {
    /// What the server did, as in "the server {}".
    pub fn as_str(self) -> &'static str {
        match self {
            Asked::Cleartext => "asked for a cleartext password",
            Asked::Md5 => "asked for an MD5 password hash",
            Asked::NoPassword => "let the login in without any password",
            Asked::WeakScram => "offered SCRAM with fewer than 4096 iterations",
            Asked::Oversized => "sent a message longer than a login ever needs",
        }
    }

    fn code(self) -> u8 {
        match self {
            Asked::Cleartext => 3,
            Asked::Md5 => 5,
            Asked::NoPassword => 1,
            Asked::WeakScram => 11,
            Asked::Oversized => 9,
        }
    }
}

/// Shared between a login and the guard on its stream: what was refused.
#[derive(Debug, Clone, Default)]
pub struct Refusal(Arc<AtomicU8>);

impl Refusal {
    fn set(&self, asked: Asked) {
        self.0.store(asked.code(), Ordering::Relaxed);
    }

    /// What the guard refused, if it refused anything.
    pub fn get(&self) -> Option<Asked> {
        [
            Asked::Cleartext,
            Asked::Md5,
            Asked::NoPassword,
            Asked::WeakScram,
            Asked::Oversized,
        ]
        .into_iter()
        .find(|a| a.code() == self.0.load(Ordering::Relaxed))
    }
}

/// Which authentication message the scan waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// The server's first authentication request (unverified servers only).
    Request,
    /// SCRAM's server-first message, for its iteration count.
    ScramFirst,
    /// Nothing but message sizes.
    Sizes,
}

/// Where the reader is in the server's message stream (type byte, 4-byte
/// length that counts itself, body).
#[derive(Debug, Clone)]
enum At {
    /// Collecting a message's head: its type and length, and for an
    /// authentication message (`R`) that is watched its 4-byte code.
    Head { buf: [u8; 9], have: usize },
    /// Inside a message's body.
    Skip(u32),
    /// Reading SCRAM's server-first message (at most [`SCRAM_FIRST_MAX`]).
    Collect { body: Vec<u8>, left: u32 },
    /// Refused: every later read is refused the same way.
    Refused(Asked),
}

/// `r=<nonce>,s=<salt>,i=<count>`: a few hundred bytes.
const SCRAM_FIRST_MAX: u32 = 4096;

#[derive(Debug, Clone)]
struct Scan {
    at: At,
    watch: Watch,
}

impl Scan {
    const HEAD: At = At::Head {
        buf: [0; 9],
        have: 0,
    };

    fn new(refuse_passwords: bool) -> Scan {
        Scan {
            at: Scan::HEAD,
            watch: if refuse_passwords {
                Watch::Request
            } else {
                Watch::Sizes
            },
        }
    }

    /// Feed bytes as they arrive; what must be refused, if they hold it.
    fn feed(&mut self, bytes: &[u8]) -> Option<Asked> {
        if let At::Refused(asked) = self.at {
            return Some(asked);
        }
        let refused = self.scan(bytes);
        if let Some(asked) = refused {
            self.at = At::Refused(asked);
        }
        refused
    }

    fn scan(&mut self, mut bytes: &[u8]) -> Option<Asked> {
        while !bytes.is_empty() {
            match &mut self.at {
                At::Refused(asked) => return Some(*asked),
                At::Skip(left) => {
                    let n = (*left as usize).min(bytes.len());
                    bytes = &bytes[n..];
                    *left -= n as u32;
                    if *left == 0 {
                        self.at = Scan::HEAD;
                    }
                }
                At::Collect { body, left } => {
                    let n = (*left as usize).min(bytes.len());
                    body.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    *left -= n as u32;
                    if *left == 0 {
                        if scram_iterations(body).is_none_or(|i| i < MIN_SCRAM_ITERATIONS) {
                            return Some(Asked::WeakScram);
                        }
                        self.watch = Watch::Sizes;
                        self.at = Scan::HEAD;
                    }
                }
                At::Head { buf, have } => {
                    let watched = |b: &[u8; 9]| b[0] == b'R' && self.watch != Watch::Sizes;
                    let need = if *have > 0 && watched(buf) { 9 } else { 5 };
                    let n = (need - *have).min(bytes.len());
                    buf[*have..*have + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    if *have < need || (need == 5 && watched(buf)) {
                        continue;
                    }
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                    if len > MAX_MESSAGE {
                        return Some(Asked::Oversized);
                    }
                    let mut body = len.saturating_sub(4);
                    if watched(buf) {
                        body = body.saturating_sub(4);
                        let code = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
                        match (self.watch, code) {
                            (Watch::Request, 3) => return Some(Asked::Cleartext),
                            (Watch::Request, 5) => return Some(Asked::Md5),
                            (Watch::Request, 0) => return Some(Asked::NoPassword),
                            (Watch::Request, 10) => self.watch = Watch::ScramFirst,
                            (Watch::ScramFirst, 11) => {
                                if body > SCRAM_FIRST_MAX {
                                    return Some(Asked::Oversized);
                                }
                                self.at = At::Collect {
                                    body: Vec::with_capacity(body as usize),
                                    left: body,
                                };
                                if body == 0 {
                                    return Some(Asked::WeakScram);
                                }
                                continue;
                            }
                            // Anything else the login itself refuses.
                            _ => self.watch = Watch::Sizes,
                        }
                    }
                    self.at = match body {
                        0 => Scan::HEAD,
                        body => At::Skip(body),
                    };
                }
            }
        }
        None
    }
}

/// The `i=` of a SCRAM server-first message.
fn scram_iterations(message: &[u8]) -> Option<u32> {
    std::str::from_utf8(message)
        .ok()?
        .split(',')
        .find_map(|part| part.strip_prefix("i="))?
        .parse()
        .ok()
}

/// A stream that fails instead of passing on a password request (when
/// `refuse_passwords`); otherwise it only forwards.
pub struct AuthGuard<S> {
    inner: S,
    scan: Scan,
    refusal: Refusal,
}

impl<S> AuthGuard<S> {
    pub fn new(inner: S, refuse_passwords: bool, refusal: Refusal) -> Self {
        AuthGuard {
            inner,
            scan: Scan::new(refuse_passwords),
            refusal,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(asked) = this.scan.feed(&buf.filled()[before..]) {
            // The request never reaches the login code.
            buf.set_filled(before);
            this.refusal.set(asked);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("refused: the server {}", asked.as_str()),
            )));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for AuthGuard<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

/// A TLS connector whose streams carry an [`AuthGuard`] above the TLS.
pub struct GuardedTls<M> {
    inner: M,
    refuse_passwords: bool,
    refusal: Refusal,
}

impl<M> GuardedTls<M> {
    pub fn new(inner: M, refuse_passwords: bool, refusal: Refusal) -> Self {
        GuardedTls {
            inner,
            refuse_passwords,
            refusal,
        }
    }
}

impl<S, M> MakeTlsConnect<S> for GuardedTls<M>
where
    M: MakeTlsConnect<S>,
    <M::TlsConnect as TlsConnect<S>>::Future: Unpin,
{
    type Stream = AuthGuard<M::Stream>;
    type TlsConnect = GuardedTls<M::TlsConnect>;
    type Error = M::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(GuardedTls::new(
            self.inner.make_tls_connect(domain)?,
            self.refuse_passwords,
            self.refusal.clone(),
        ))
    }
}

impl<S, T> TlsConnect<S> for GuardedTls<T>
where
    T: TlsConnect<S>,
    T::Future: Unpin,
{
    type Stream = AuthGuard<T::Stream>;
    type Error = T::Error;
    type Future = Guarding<T::Future>;

    fn connect(self, stream: S) -> Self::Future {
        Guarding {
            handshake: self.inner.connect(stream),
            guard: Some((self.refuse_passwords, self.refusal)),
        }
    }
}

/// The TLS handshake, then the guard put on its stream.
pub struct Guarding<F> {
    handshake: F,
    guard: Option<(bool, Refusal)>,
}

impl<F, S, E> std::future::Future for Guarding<F>
where
    F: std::future::Future<Output = Result<S, E>> + Unpin,
{
    type Output = Result<AuthGuard<S>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let stream = ready!(Pin::new(&mut this.handshake).poll(cx))?;
        let (refuse, refusal) = this.guard.take().expect("polled after completion");
        Poll::Ready(Ok(AuthGuard::new(stream, refuse, refusal)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Every split of the stream into reads finds the same request.
    fn scan_in_pieces(stream: &[u8]) -> Vec<Option<Asked>> {
        let mut seen = vec![];
        for cut in 0..=stream.len() {
            let mut s = Scan::new(true);
            let first = s.feed(&stream[..cut]);
            seen.push(first.or_else(|| s.feed(&stream[cut..])));
        }
        seen.dedup();
        seen
    }

    #[test]
    fn password_requests_are_found_however_the_bytes_arrive() {
        let notice = message(b'N', b"SNOTICE\0Mhello\0\0");
        let cleartext = message(b'R', &3u32.to_be_bytes());
        let md5 = message(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]);
        let sasl = message(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0");
        let ok = message(b'R', &0u32.to_be_bytes());
        let cases: [(Vec<u8>, Option<Asked>); 5] = [
            (cleartext.clone(), Some(Asked::Cleartext)),
            ([notice.clone(), md5].concat(), Some(Asked::Md5)),
            ([notice.clone(), sasl.clone()].concat(), None),
            // No authentication at all: nothing would be proven.
            (ok.clone(), Some(Asked::NoPassword)),
            // After SCRAM started, later `R` messages are SCRAM's own.
            ([sasl, cleartext].concat(), None),
        ];
        for (stream, want) in cases {
            assert_eq!(scan_in_pieces(&stream), vec![want], "{stream:?}");
        }
        // An empty-bodied message and an error before the request.
        let stream = [message(b'E', b""), message(b'R', &3u32.to_be_bytes())].concat();
        assert_eq!(scan_in_pieces(&stream), vec![Some(Asked::Cleartext)]);
    }

    fn scram_first(text: &str) -> Vec<u8> {
        message(b'R', &[&11u32.to_be_bytes()[..], text.as_bytes()].concat())
    }

    #[test]
    fn scram_that_a_proof_could_be_guessed_from_is_refused() {
        let sasl = message(b'R', b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0\0");
        for (first, want) in [
            ("r=abc,s=c2FsdA==,i=4096", None),
            ("r=abc,s=c2FsdA==,i=600000", None),
            ("r=abc,s=c2FsdA==,i=1", Some(Asked::WeakScram)),
            ("r=abc,s=c2FsdA==,i=4095", Some(Asked::WeakScram)),
            ("r=abc,s=c2FsdA==", Some(Asked::WeakScram)),
            ("r=abc,s=c2FsdA==,i=lots", Some(Asked::WeakScram)),
        ] {
            let stream = [sasl.clone(), scram_first(first)].concat();
            assert_eq!(scan_in_pieces(&stream), vec![want], "{first}");
        }
        // A server-first message far longer than SCRAM's is not collected.
        let long = scram_first(&"x".repeat(5000));
        assert_eq!(
            scan_in_pieces(&[sasl, long].concat()),
            vec![Some(Asked::Oversized)]
        );
    }

    #[test]
    fn after_a_refusal_every_read_is_refused() {
        let mut s = Scan::new(true);
        assert_eq!(
            s.feed(&message(b'R', &3u32.to_be_bytes())),
            Some(Asked::Cleartext)
        );
        assert_eq!(s.feed(b"anything"), Some(Asked::Cleartext));
        assert_eq!(s.feed(&[0; 20]), Some(Asked::Cleartext));
    }

    #[test]
    fn a_guard_that_allows_passwords_still_bounds_messages() {
        let mut s = Scan::new(false);
        let stream = [
            message(b'R', &3u32.to_be_bytes()),
            message(b'S', b"server_version\x0015\0"),
        ]
        .concat();
        assert_eq!(s.feed(&stream), None);
        // A head announcing 1 GiB, before or after the authentication request.
        let huge = [&b"N"[..], &(1u32 << 30).to_be_bytes()].concat();
        assert_eq!(s.feed(&huge), Some(Asked::Oversized));
        assert_eq!(scan_in_pieces(&huge), vec![Some(Asked::Oversized)]);
        let r_huge = [&b"R"[..], &(1u32 << 30).to_be_bytes(), &10u32.to_be_bytes()].concat();
        assert_eq!(scan_in_pieces(&r_huge), vec![Some(Asked::Oversized)]);
        // After SCRAM started, later messages are scanned for size, not kind.
        let stream = [
            message(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0"),
            message(b'R', &3u32.to_be_bytes()),
            huge,
        ]
        .concat();
        assert_eq!(scan_in_pieces(&stream), vec![Some(Asked::Oversized)]);
    }
}
