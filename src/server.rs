//! Listeners and connections: binding TCP and Unix sockets, serving HTTP/1.1 (and HTTP/2 with
//! prior knowledge) on each accepted connection, idle timeouts, and draining on shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::config::Listen;
use crate::proxy::ConnInfo;
use crate::upstream::ProxyBody;

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
                    return match TcpListener::bind(("::", *port)).await {
                        Ok(l) => Ok(Listener::Tcp(l)),
                        Err(_) => TcpListener::bind(("0.0.0.0", *port))
                            .await
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
                    match TcpListener::bind(addr).await {
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

/// Per-connection settings.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// Closes a client connection with no traffic for this long (CHP's `--timeout`).
    pub idle_timeout: Option<Duration>,
    /// How long an idle keep-alive connection waits for its next request's headers.
    pub keep_alive_timeout: Duration,
}

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
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());

    loop {
        let accepted = tokio::select! {
            accepted = accept(&listener) => accepted,
            _ = shutdown.changed() => break,
        };
        let (io, info) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept: keep serving.
                tracing::warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let service = service_fn(move |req| handler(req, info));
        let open = crate::metrics::get()
            .active_connections
            .with_label_values(&[name]);
        open.inc();
        let io = TokioIo::new(IdleIo::new(io, settings.idle_timeout));
        let conn = builder.serve_connection_with_upgrades(io, service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(listener = name, error = %e, "connection closed with an error");
            }
            open.dec();
        });
    }
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(grace) => false,
    }
}

type BoxedIo = Pin<Box<dyn IoStream>>;

trait IoStream: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> IoStream for T {}

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

/// A stream that fails with `TimedOut` once neither side has moved a byte for the timeout.
struct IdleIo<T> {
    inner: T,
    /// `None` when no timeout is configured: then this wrapper costs nothing but a branch.
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
}

impl<T> IdleIo<T> {
    fn new(inner: T, timeout: Option<Duration>) -> Self {
        IdleIo {
            inner,
            deadline: timeout.map(|t| (Box::pin(tokio::time::sleep(t)), t)),
        }
    }

    /// On progress, pushes the deadline out; on `Pending`, fails once the deadline has passed.
    fn check<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let Some((deadline, timeout)) = &mut self.deadline else {
            return polled;
        };
        match polled {
            Poll::Ready(r) => {
                deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + *timeout);
                Poll::Ready(r)
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client connection idle for too long",
                ))),
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
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
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
