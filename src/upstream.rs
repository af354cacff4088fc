//! Connections to targets: dialing (`http://`, `https://` with rustls, `http+unix://`), each
//! worker's own pool of HTTP/1.1 connections for forwarded requests ([`pool`]), the pooled
//! client that control-plane calls to the hub go through, and the classification of failures.
//!
//! hyper-util's pooling client keys its pool by scheme and authority; a Unix-socket target travels
//! under the `http+unix` scheme with its socket path hex-encoded as the authority (see
//! [`crate::target`]), so each socket gets its own pool and the connector knows where to dial.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::http::ProxyBody;
use crate::target::{hex_decode, Endpoint, UNIX_SCHEME};

mod pool;

pub use pool::{Pool, PoolSettings, PooledBody, SendError, SWEEP_EVERY};

/// The pooled client the hub's API is called through (control plane: handshakes, credential
/// checks, OAuth). Forwarded requests go through each worker's [`Pool`] instead.
pub type UpstreamClient = Client<Connector, ProxyBody>;

/// How long a TCP (and TLS) connection to a target may take before the request fails with 503.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the client, with the TLS configuration for `https://` targets.
pub fn client(tls: rustls::ClientConfig) -> UpstreamClient {
    let connector = Connector {
        tls: TlsConnector::from(Arc::new(tls)),
    };
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// Dials targets. Cheap to clone: the TLS configuration is shared.
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect(tls, uri))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            Ok(TokioIo::new(stream))
        })
    }
}

async fn connect(tls: TlsConnector, uri: Uri) -> io::Result<UpstreamStream> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
    let authority = uri
        .authority()
        .ok_or_else(|| invalid("target has no authority"))?;
    let endpoint = match uri.scheme_str() {
        Some(UNIX_SCHEME) => Endpoint::Unix(
            hex_decode(authority.as_str())
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| invalid("bad unix socket authority"))?,
        ),
        Some("http") => Endpoint::Http,
        Some("https") => Endpoint::Https,
        _ => return Err(invalid("unsupported target scheme")),
    };
    dial(&tls, &endpoint, authority).await
}

/// Opens a connection to a target's server (without a time limit: callers set theirs).
///
/// # Errors
/// The connect, TLS handshake or name error.
pub async fn dial(
    tls: &TlsConnector,
    endpoint: &Endpoint,
    authority: &Authority,
) -> io::Result<UpstreamStream> {
    match endpoint {
        Endpoint::Unix(path) => Ok(UpstreamStream::Unix(UnixStream::connect(path).await?)),
        Endpoint::Http => {
            let tcp =
                TcpStream::connect((host(authority.host()), authority.port_u16().unwrap_or(80)))
                    .await?;
            tune(&tcp)?;
            Ok(UpstreamStream::Tcp(tcp))
        }
        Endpoint::Https => {
            let host = host(authority.host());
            let tcp = TcpStream::connect((host, authority.port_u16().unwrap_or(443))).await?;
            tune(&tcp)?;
            let name = ServerName::try_from(host.to_owned()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "target host is not a valid TLS server name",
                )
            })?;
            let stream = tls.connect(name, tcp).await?;
            Ok(UpstreamStream::Tls(Box::new(stream)))
        }
    }
}

/// How long data sent to a target may stay unacknowledged (TCP level) before the connection is
/// given up. A target that is slow to answer still acknowledges what it receives; one that
/// vanished without a reset (host down, packets dropped) never does, and without this a request
/// waits for the kernel's ~15 minutes of retransmissions.
const UNACKED_LIMIT: Duration = Duration::from_secs(30);

/// No delay, a bound on unacknowledged data, and keepalive probes so that pooled connections to
/// a vanished target are found dead instead of reused.
fn tune(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let sock = socket2::SockRef::from(tcp);
    sock.set_tcp_user_timeout(Some(UNACKED_LIMIT))?;
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(3),
    )
}

/// `[::1]` in a URI is `::1` to the resolver.
fn host(h: &str) -> &str {
    h.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h)
}

/// A connection to a target.
pub enum UpstreamStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            UpstreamStream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            UpstreamStream::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            UpstreamStream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Tcp(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
            UpstreamStream::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// Why a request to a target failed, for logs (and later metrics). Every cause is a 503 to the
/// client, as in CHP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    Refused,
    Timeout,
    Reset,
    Tls,
    Other,
}

impl FailureCause {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCause::Refused => "refused",
            FailureCause::Timeout => "timeout",
            FailureCause::Reset => "reset",
            FailureCause::Tls => "tls",
            FailureCause::Other => "other",
        }
    }

    /// Finds the cause in a client error's source chain.
    pub fn of(err: &(dyn std::error::Error + 'static)) -> Self {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if io
                    .get_ref()
                    .is_some_and(|inner| inner.is::<rustls::Error>())
                {
                    return FailureCause::Tls;
                }
                return match io.kind() {
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => {
                        FailureCause::Refused
                    }
                    io::ErrorKind::TimedOut => FailureCause::Timeout,
                    io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof => FailureCause::Reset,
                    _ => FailureCause::Other,
                };
            }
            if e.downcast_ref::<rustls::Error>().is_some() {
                return FailureCause::Tls;
            }
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                if h.is_incomplete_message() || h.is_canceled() {
                    return FailureCause::Reset;
                }
                if h.is_timeout() {
                    return FailureCause::Timeout;
                }
            }
            source = e.source();
        }
        FailureCause::Other
    }
}
