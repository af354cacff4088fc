//! Listeners and connections: binding TCP and Unix sockets, serving HTTP/1.1 (and HTTP/2 with
//! prior knowledge) on each accepted connection, idle timeouts, and draining on shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::watch;

use crate::proxy::ConnInfo;
use crate::upstream::ProxyBody;

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A host (IP or name, resolved at bind time; empty means all interfaces) and a port.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds where `listen` says. An empty host means all interfaces (IPv6 and IPv4 where the
    /// system allows, else IPv4); a host name is resolved and its first usable address bound.
    ///
    /// # Errors
    /// The bind or resolution error, with the address in its message.
    pub async fn bind(listen: &Listen) -> io::Result<Listener> {
        match listen {
            Listen::Tcp { host, port } => {
                let with_addr = |e: io::Error, what: &str| {
                    io::Error::new(e.kind(), format!("cannot bind {what}:{port}: {e}"))
                };
                if host.is_empty() {
                    let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, *port));
                    let any4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, *port));
                    return match bind_tcp(any6) {
                        Ok(l) => Ok(Listener::Tcp(l)),
                        Err(_) => bind_tcp(any4)
                            .map(Listener::Tcp)
                            .map_err(|e| with_addr(e, "0.0.0.0")),
                    };
                }
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(|e| with_addr(e, host))?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no addresses");
                for addr in addrs {
                    match bind_tcp(addr) {
                        Ok(l) => return Ok(Listener::Tcp(l)),
                        Err(e) => last = e,
                    }
                }
                Err(with_addr(last, host))
            }
            Listen::Unix(path) => {
                remove_stale_socket(path).await?;
                let l = UnixListener::bind(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot bind {}: {e}", path.display()))
                })?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// What to print in the `listening` log line.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("?({e})"), |a| a.to_string()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

/// Binds with `SO_REUSEPORT`, so a second hubgate can serve the same port while the first one
/// drains and stops (a restart that refuses no connection).
fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A socket file left by a process that is gone is removed; one that answers is not.
async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    if tokio::fs::symlink_metadata(path).await.is_err() {
        return Ok(());
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by another process", path.display()),
        ));
    }
    tokio::fs::remove_file(path).await
}

/// Per-listener connection settings.
#[derive(Clone)]
pub struct ConnSettings {
    /// Closes a client connection with no traffic for this long (CHP's `--timeout`).
    pub idle_timeout: Option<Duration>,
    /// How long a connection may take to send a request's headers, including the wait for the
    /// next request on an idle keep-alive connection.
    pub keep_alive_timeout: Duration,
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list); larger gets 431.
    pub max_header_size: usize,
    /// At most this many connections at once; one more gets a 503 and is closed.
    pub max_connections: usize,
    /// TLS for this listener.
    pub tls: Option<Arc<crate::tls::Reloadable>>,
}

/// How long connections accepted just before a shutdown get to send their first request before
/// the graceful shutdown starts.
const SETTLE: Duration = Duration::from_millis(250);

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What an HTTP/1.1 client gets when the connection limit is reached.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 64\r\nconnection: close\r\n\r\n{\"status\":503,\"message\":\"Too many connections; try again later\"}";

/// Accepts connections until `shutdown` changes, serving each with `handler`, then waits for the
/// open ones to finish their in-flight requests. Returns `true` when they all finished.
pub async fn serve<H, F>(
    listener: Listener,
    name: &'static str,
    settings: ConnSettings,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> bool
where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.keep_alive_timeout)
        .max_buf_size(settings.max_header_size.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_size as u32)
        .keep_alive_interval(Duration::from_secs(30));
    let builder = Arc::new(builder);
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));

    let mut stopping = false;
    loop {
        let accepted = if stopping {
            // Connections the kernel already queued for this socket would be reset when it
            // closes; take them first (another process on the port gets the new ones).
            match accept_queued(&listener) {
                Some(accepted) => accepted,
                None => break,
            }
        } else {
            tokio::select! {
                accepted = accept(&listener) => accepted,
                _ = shutdown.changed() => {
                    stopping = true;
                    continue;
                }
            }
        };
        let (io, mut info) = match accepted {
            Ok(pair) => pair,
            Err(_) if stopping => break,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept: keep serving.
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                listener = name,
                limit = settings.max_connections,
                "connection limit reached; refusing a connection"
            );
            crate::metrics::get().connections_refused.inc();
            if settings.tls.is_none() {
                tokio::spawn(refuse(io));
            }
            continue;
        };
        let handler = handler.clone();
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = settings.tls.clone();
        let idle = settings.idle_timeout;
        let keep_alive = settings.keep_alive_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let open = crate::metrics::get()
                .active_connections
                .with_label_values(&[name]);
            open.inc();
            let io: BoxedIo = match tls {
                Some(tls) => {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(io)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            info.tls = true;
                            Box::pin(stream)
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(listener = name, error = %e, "TLS handshake failed");
                            open.dec();
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(listener = name, "TLS handshake timed out");
                            open.dec();
                            return;
                        }
                    }
                }
                None => io,
            };
            let service = service_fn(move |req| handler(req, info));
            let io = TokioIo::new(IdleIo::new(io, idle, keep_alive));
            let conn = builder.serve_connection_with_upgrades(io, service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(listener = name, error = %e, "connection closed with an error");
            }
            open.dec();
        });
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    // hyper closes a connection at once when asked to shut down before it has read a request:
    // connections accepted in the last moments (the drained queue above) would lose theirs.
    // A short settle lets them read it; then it is in flight and graceful shutdown waits for it.
    tokio::time::sleep(SETTLE.min(grace)).await;
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(grace.saturating_sub(SETTLE)) => false,
    }
}

/// The `--redirect-port` listener: 301 to the same host and path on the HTTPS port, as CHP
/// (400 when the request names no host).
pub fn redirect_to_https<B>(req: &Request<B>, https_port: u16) -> Response<ProxyBody> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| match h.rfind(']') {
            Some(end) => &h[..=end],
            None => h.split(':').next().unwrap_or(h),
        })
        .filter(|h| !h.is_empty());
    let Some(host) = host else {
        return crate::proxy::json(
            http::StatusCode::BAD_REQUEST,
            r#"{"status":400,"message":"This port redirects to HTTPS, but the request names no Host"}"#,
        );
    };
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let location = if https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{https_port}{path}")
    };
    let mut resp = crate::proxy::empty(http::StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = http::HeaderValue::from_str(&location) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

/// Answers a connection over the limit with a 503 and closes it.
async fn refuse(mut io: BoxedIo) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = io.write_all(BUSY).await;
        let _ = io.shutdown().await;
    })
    .await;
}

type BoxedIo = Pin<Box<dyn IoStream>>;

trait IoStream: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> IoStream for T {}

/// A connection already waiting in the listener's queue, without waiting for one.
fn accept_queued(listener: &Listener) -> Option<io::Result<(BoxedIo, ConnInfo)>> {
    let Listener::Tcp(l) = listener else {
        return None;
    };
    let (socket, addr) = match socket2::SockRef::from(l).accept() {
        Ok(pair) => pair,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
        Err(e) => return Some(Err(e)),
    };
    let stream = std::net::TcpStream::from(socket);
    let converted = stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(stream));
    Some(converted.map(|stream| {
        let _ = stream.set_nodelay(true);
        let info = ConnInfo {
            remote_ip: addr.as_socket().map(|a| a.ip()),
            tls: false,
        };
        (Box::pin(stream) as BoxedIo, info)
    }))
}

async fn accept(listener: &Listener) -> io::Result<(BoxedIo, ConnInfo)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, addr) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            let info = ConnInfo {
                remote_ip: Some(addr.ip()),
                tls: false,
            };
            Ok((Box::pin(stream), info))
        }
        Listener::Unix(l, _) => {
            let (stream, _) = l.accept().await?;
            let info = ConnInfo {
                remote_ip: None,
                tls: false,
            };
            Ok((Box::pin(stream), info))
        }
    }
}

/// A stream that fails with `TimedOut` when the client sends nothing for `first_byte` after
/// connecting (before a protocol is even chosen, no other timer runs), and, when configured,
/// once neither side has moved a byte for the idle timeout.
struct IdleIo<T> {
    inner: T,
    /// The running deadline and how far each bit of progress pushes it (`None`: no deadline
    /// once the first byte has arrived).
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, Option<Duration>)>,
    /// Still waiting for the client's first byte.
    fresh: bool,
}

impl<T> IdleIo<T> {
    fn new(inner: T, idle: Option<Duration>, first_byte: Duration) -> Self {
        IdleIo {
            inner,
            deadline: Some((Box::pin(tokio::time::sleep(first_byte)), idle)),
            fresh: true,
        }
    }

    /// On progress, pushes the deadline out (or drops it); on `Pending`, fails once it passed.
    fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let Some((deadline, idle)) = &mut self.deadline else {
            return polled;
        };
        match polled {
            Poll::Ready(r) => {
                match idle {
                    Some(idle) => deadline.as_mut().reset(tokio::time::Instant::now() + *idle),
                    None if !self.fresh => self.deadline = None,
                    None => {}
                }
                Poll::Ready(r)
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    crate::metrics::get().client_timeouts.inc();
                    if !self.fresh {
                        // A client (or a target answering it) that stalled mid-conversation is
                        // worth a line; a connection that never sent a byte is routine.
                        tracing::info!(
                            "closing a client connection that moved no byte for --timeout"
                        );
                    }
                    // Disarm, so the timeout is counted (and reported) once per connection.
                    self.deadline = None;
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client connection idle for too long",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.fresh && matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.fresh = false;
        }
        self.check(cx, polled)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
