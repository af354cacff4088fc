//! Listeners and connections: binding TCP and Unix sockets, serving HTTP/1.1 (and HTTP/2 with
//! prior knowledge or ALPN) on each accepted connection, the connection limit, spreading
//! connections over the data-plane workers, idle timeouts, and draining on shutdown.
//!
//! A port is bound once per worker that serves it ([`Bound::bind`] with `copies`): each TCP copy
//! is a socket of its own on the same address (`SO_REUSEPORT`, the kernel spreads new connections
//! by a hash of their addresses); a Unix socket is shared. Every worker registers its copy in its
//! own runtime ([`Listener::register`]). A hash is blind to load: with a few dozen long keep-alive
//! connections one worker can get most of them, so [`Port`] counts each worker's open connections
//! and a worker holding more than its share hands a new one to the least busy worker.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::http::{ConnInfo, ProxyBody};

mod drain;
mod timer;

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

/// Sockets bound and listening, not yet tied to a runtime: each worker registers its own.
pub enum Bound {
    Tcp(Vec<std::net::TcpListener>),
    /// One socket, shared by the workers; removed when the last copy is dropped.
    Unix(Vec<std::os::unix::net::UnixListener>, Arc<SocketFile>),
}

/// A Unix socket's file, removed when hubgate stops serving it.
pub struct SocketFile(PathBuf);

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Bound {
    /// Binds where `listen` says, `copies` times (one per worker that will serve it). An empty
    /// host means all interfaces (IPv6 and IPv4 where the system allows, else IPv4); a host name
    /// is resolved and its first usable address bound.
    ///
    /// # Errors
    /// The bind or resolution error, with the address in its message.
    pub async fn bind(listen: &Listen, copies: usize) -> io::Result<Bound> {
        match listen {
            Listen::Tcp { host, port } => {
                let first = bind_first_tcp(host, *port).await?;
                // Port 0 picked a port: the other copies join that one.
                let addr = first.local_addr()?;
                let mut sockets = vec![first];
                for _ in 1..copies.max(1) {
                    sockets.push(bind_tcp(addr).map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot bind {addr} again: {e}"))
                    })?);
                }
                Ok(Bound::Tcp(sockets))
            }
            Listen::Unix(path) => {
                remove_stale_socket(path).await?;
                let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot bind {}: {e}", path.display()))
                })?;
                l.set_nonblocking(true)?;
                let file = Arc::new(SocketFile(path.clone()));
                let mut sockets = Vec::with_capacity(copies.max(1));
                for _ in 1..copies.max(1) {
                    sockets.push(l.try_clone()?);
                }
                sockets.push(l);
                Ok(Bound::Unix(sockets, file))
            }
        }
    }

    /// The TCP address, when it is one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::Tcp(sockets) => sockets.first().and_then(|l| l.local_addr().ok()),
            Bound::Unix(..) => None,
        }
    }

    /// What to print in the `listening` log line.
    pub fn describe(&self) -> String {
        match self {
            Bound::Tcp(_) => self
                .local_addr()
                .map_or_else(|| "?".to_owned(), |a| a.to_string()),
            Bound::Unix(_, file) => format!("unix:{}", file.0.display()),
        }
    }

    /// One copy per worker.
    pub fn split(self) -> Vec<Unregistered> {
        match self {
            Bound::Tcp(sockets) => sockets.into_iter().map(Unregistered::Tcp).collect(),
            Bound::Unix(sockets, file) => sockets
                .into_iter()
                .map(|l| Unregistered::Unix(l, file.clone()))
                .collect(),
        }
    }
}

/// One worker's copy of a bound socket, before that worker registers it.
pub enum Unregistered {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, Arc<SocketFile>),
}

/// A listener registered with the runtime that accepts on it.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, Arc<SocketFile>),
}

impl Listener {
    /// Registers a copy with the current runtime.
    ///
    /// # Errors
    /// When the runtime cannot watch the socket.
    pub fn register(copy: Unregistered) -> io::Result<Listener> {
        match copy {
            Unregistered::Tcp(l) => Ok(Listener::Tcp(TcpListener::from_std(l)?)),
            Unregistered::Unix(l, file) => Ok(Listener::Unix(UnixListener::from_std(l)?, file)),
        }
    }

    /// Binds one copy and registers it with the current runtime (a listener only one task
    /// serves).
    ///
    /// # Errors
    /// As [`Bound::bind`].
    pub async fn bind(listen: &Listen) -> io::Result<Listener> {
        let copy = Bound::bind(listen, 1).await?.split().pop();
        Listener::register(copy.ok_or_else(|| io::Error::other("nothing was bound"))?)
    }
}

async fn bind_first_tcp(host: &str, port: u16) -> io::Result<std::net::TcpListener> {
    let with_addr = |e: io::Error, what: &str| {
        io::Error::new(e.kind(), format!("cannot bind {what}:{port}: {e}"))
    };
    if host.is_empty() {
        let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        let any4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
        return bind_tcp(any6).or_else(|_| bind_tcp(any4).map_err(|e| with_addr(e, "0.0.0.0")));
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| with_addr(e, host))?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no addresses");
    for addr in addrs {
        match bind_tcp(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = e,
        }
    }
    Err(with_addr(last, host))
}

/// Binds with `SO_REUSEPORT`: the workers' copies share the port, and a second hubgate can
/// serve it while the first one drains and stops (a restart that refuses no connection).
fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
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
    /// At most this many connections at once, over every worker; one more gets a 503.
    pub max_connections: usize,
    /// TLS for this listener.
    pub tls: Option<Arc<crate::tls::Reloadable>>,
}

/// How long connections accepted just before a shutdown get to send their first request before
/// the graceful shutdown starts.
const SETTLE: Duration = Duration::from_millis(250);

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many more open connections than the least busy worker a worker may hold before it hands
/// new ones over. Small enough that a few dozen connections spread evenly; not zero, so that a
/// handoff (two epoll registrations) is paid only for a real imbalance.
const SLACK: usize = 2;

/// What an HTTP/1.1 client gets when the connection limit is reached.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 64\r\nconnection: close\r\n\r\n{\"status\":503,\"message\":\"Too many connections; try again later\"}";

/// A connection one worker accepted and gives to another.
pub struct Handoff {
    stream: HandedStream,
    info: ConnInfo,
}

enum HandedStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// One port as every worker serving it sees it: its settings, the connection limit they share,
/// and how many connections each holds.
pub struct Port {
    name: &'static str,
    settings: ConnSettings,
    builder: auto::Builder<TokioExecutor>,
    slots: Arc<Semaphore>,
    open: Box<[AtomicUsize]>,
    handoffs: Box<[mpsc::UnboundedSender<Handoff>]>,
}

impl Port {
    /// A port served by `workers` workers; the receivers are each worker's incoming handoffs.
    pub fn new(
        name: &'static str,
        settings: ConnSettings,
        workers: usize,
    ) -> (Arc<Port>, Vec<mpsc::UnboundedReceiver<Handoff>>) {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..workers.max(1))
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        let port = Port {
            name,
            builder: http_builder(&settings),
            slots: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
            open: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            handoffs: senders.into(),
        };
        (Arc::new(port), receivers)
    }

    /// Where a connection `me` just accepted is served: `None` for here, or the worker to hand
    /// it to. Counts it for whichever it is.
    fn place(&self, me: usize) -> Option<usize> {
        let mine = self.open[me].load(Ordering::Relaxed);
        let (least, fewest) = self
            .open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .unwrap_or((me, mine));
        let to = if mine > fewest + SLACK { least } else { me };
        self.open[to].fetch_add(1, Ordering::Relaxed);
        (to != me).then_some(to)
    }
}

fn http_builder(settings: &ConnSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // hyper arms this timer for every request head: see `timer` for why it is not tokio's.
        .timer(timer::CoarseTimer)
        .header_read_timeout(settings.keep_alive_timeout)
        .max_buf_size(settings.max_header_size.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_size as u32)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// One worker's share of a port: its listener, the connections handed to it, and its number.
pub struct Intake {
    pub port: Arc<Port>,
    pub worker: usize,
    pub listener: Listener,
    pub handoffs: mpsc::UnboundedReceiver<Handoff>,
}

impl Intake {
    /// A port served by one task on one listener.
    ///
    /// # Errors
    /// As [`Listener::bind`].
    pub async fn single(
        listen: &Listen,
        name: &'static str,
        settings: ConnSettings,
    ) -> io::Result<Intake> {
        let listener = Listener::bind(listen).await?;
        Ok(Intake::of(listener, name, settings))
    }

    /// A port served by one task on a listener already bound.
    pub fn of(listener: Listener, name: &'static str, settings: ConnSettings) -> Intake {
        let (port, mut receivers) = Port::new(name, settings, 1);
        Intake {
            port,
            worker: 0,
            listener,
            handoffs: receivers.remove(0),
        }
    }
}

/// Accepts connections until `shutdown` changes, serving each with `handler`, then waits for the
/// open ones to finish their in-flight requests. Returns `true` when they all finished.
pub async fn serve<H, F>(
    mut intake: Intake,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> bool
where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> + Send + 'static,
{
    let graceful = Arc::new(drain::Drain::default());
    let conns = Conns {
        port: intake.port.clone(),
        worker: intake.worker,
        graceful: &graceful,
    };
    loop {
        tokio::select! {
            accepted = accept(&intake.listener) => conns.place(accepted, &handler, true).await,
            Some(Handoff { stream, info }) = intake.handoffs.recv() => {
                conns.start(stream.into_io(), info, &handler);
            }
            _ = shutdown.changed() => break,
        }
    }
    // Connections the kernel already queued for this socket would be reset when it closes, and
    // connections another worker handed over are this one's to serve: take them first (another
    // process on the port gets the new ones).
    while let Some(accepted) = accept_queued(&intake.listener) {
        conns.place(accepted, &handler, false).await;
    }
    drop(intake.listener);
    // Closed first, so that a worker still accepting cannot hand over a connection that would
    // then wait here unserved: its send fails and it serves the connection itself.
    intake.handoffs.close();
    while let Ok(Handoff { stream, info }) = intake.handoffs.try_recv() {
        conns.start(stream.into_io(), info, &handler);
    }
    // hyper closes a connection at once when asked to shut down before it has read a request:
    // connections accepted in the last moments (the drained queue above) would lose theirs.
    // A short settle lets them read it; then it is in flight and graceful shutdown waits for it.
    tokio::time::sleep(SETTLE.min(grace)).await;
    tokio::select! {
        () = graceful.stop() => true,
        _ = tokio::time::sleep(grace.saturating_sub(SETTLE)) => false,
    }
}

/// One worker's connections on one port.
struct Conns<'a> {
    port: Arc<Port>,
    worker: usize,
    graceful: &'a Arc<drain::Drain>,
}

impl Conns<'_> {
    /// Serves an accepted connection here, hands it to a less busy worker (unless `spread` is
    /// false: while stopping, the others may have stopped taking them), or refuses it.
    async fn place<H, F>(
        &self,
        accepted: io::Result<(Accepted, ConnInfo)>,
        handler: &H,
        spread: bool,
    ) where
        H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> + Send + 'static,
    {
        let (stream, info) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept: keep serving.
                tracing::warn!(listener = self.port.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
        };
        let to = if spread {
            self.port.place(self.worker)
        } else {
            self.port.open[self.worker].fetch_add(1, Ordering::Relaxed);
            None
        };
        match to {
            None => self.start(stream.into_io(), info, handler),
            Some(to) => {
                let handed = match stream.into_std() {
                    Ok(stream) => Handoff { stream, info },
                    Err(e) => {
                        self.port.open[to].fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(listener = self.port.name, error = %e, "could not take a connection off this worker");
                        return;
                    }
                };
                if let Err(refused) = self.port.handoffs[to].send(handed) {
                    // That worker has stopped taking connections: this one serves it.
                    self.port.open[to].fetch_sub(1, Ordering::Relaxed);
                    self.port.open[self.worker].fetch_add(1, Ordering::Relaxed);
                    let Handoff { stream, info } = refused.0;
                    self.start(stream.into_io(), info, handler);
                }
            }
        }
    }

    /// Serves a connection counted for this worker until it closes.
    fn start<H, F>(&self, io: io::Result<BoxedIo>, mut info: ConnInfo, handler: &H)
    where
        H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>> + Send + 'static,
    {
        let counted = Counted {
            port: self.port.clone(),
            worker: self.worker,
        };
        let io = match io {
            Ok(io) => io,
            Err(e) => {
                tracing::warn!(listener = self.port.name, error = %e, "could not take a connection over");
                return;
            }
        };
        let Ok(slot) = self.port.slots.clone().try_acquire_owned() else {
            tracing::warn!(
                listener = self.port.name,
                limit = self.port.settings.max_connections,
                "connection limit reached; refusing a connection"
            );
            crate::metrics::get().connections_refused.inc();
            if self.port.settings.tls.is_none() {
                tokio::spawn(async move {
                    let _counted = counted;
                    refuse(io).await;
                });
            }
            return;
        };
        let handler = handler.clone();
        let watcher = self.graceful.watcher();
        let port = self.port.clone();
        tokio::spawn(async move {
            let _held = (slot, counted);
            let name = port.name;
            let open = crate::metrics::get()
                .active_connections
                .with_label_values(&[name]);
            open.inc();
            let io: BoxedIo = match &port.settings.tls {
                Some(tls) => match tls_handshake(tls, io, name).await {
                    Some(stream) => {
                        info.tls = true;
                        stream
                    }
                    None => {
                        open.dec();
                        return;
                    }
                },
                None => io,
            };
            let service = service_fn(move |req| handler(req, info.clone()));
            let io = TokioIo::new(IdleIo::new(
                io,
                port.settings.idle_timeout,
                port.settings.keep_alive_timeout,
            ));
            let conn = port.builder.serve_connection_with_upgrades(io, service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(listener = name, error = %e, "connection closed with an error");
            }
            open.dec();
        });
    }
}

/// A connection counted in its worker's open connections until dropped.
struct Counted {
    port: Arc<Port>,
    worker: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.port.open[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

async fn tls_handshake(
    tls: &crate::tls::Reloadable,
    io: BoxedIo,
    name: &'static str,
) -> Option<BoxedIo> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(io)).await {
        Ok(Ok(stream)) => Some(Box::pin(stream)),
        Ok(Err(e)) => {
            tracing::debug!(listener = name, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(listener = name, "TLS handshake timed out");
            None
        }
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
        return crate::http::json(
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
    let mut resp = crate::http::empty(http::StatusCode::MOVED_PERMANENTLY);
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

/// A connection just accepted, still registered with this worker's runtime.
enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Accepted {
    fn into_io(self) -> io::Result<BoxedIo> {
        Ok(match self {
            Accepted::Tcp(s) => Box::pin(s),
            Accepted::Unix(s) => Box::pin(s),
        })
    }

    /// Leaves this runtime, to be registered with another worker's.
    fn into_std(self) -> io::Result<HandedStream> {
        Ok(match self {
            Accepted::Tcp(s) => HandedStream::Tcp(s.into_std()?),
            Accepted::Unix(s) => HandedStream::Unix(s.into_std()?),
        })
    }
}

impl HandedStream {
    /// Registers the connection with the current worker's runtime.
    fn into_io(self) -> io::Result<BoxedIo> {
        Ok(match self {
            HandedStream::Tcp(s) => Box::pin(TcpStream::from_std(s)?),
            HandedStream::Unix(s) => Box::pin(UnixStream::from_std(s)?),
        })
    }
}

fn tcp_info(stream: &TcpStream, addr: SocketAddr) -> ConnInfo {
    let _ = stream.set_nodelay(true);
    ConnInfo::tcp(addr.ip())
}

/// A connection already waiting in the listener's queue, without waiting for one. Asks the
/// socket itself: the runtime may not have seen the newest ones yet.
fn accept_queued(listener: &Listener) -> Option<io::Result<(Accepted, ConnInfo)>> {
    let accepted = match listener {
        Listener::Tcp(l) => socket2::SockRef::from(l).accept(),
        Listener::Unix(l, _) => socket2::SockRef::from(l).accept(),
    };
    let (socket, addr) = match accepted {
        Ok(pair) => pair,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
        Err(e) => return Some(Err(e)),
    };
    let registered = socket.set_nonblocking(true).and_then(|()| match listener {
        Listener::Tcp(_) => {
            let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
            let info = match addr.as_socket() {
                Some(addr) => tcp_info(&stream, addr),
                None => ConnInfo::unix(),
            };
            Ok((Accepted::Tcp(stream), info))
        }
        Listener::Unix(..) => {
            let fd = std::os::fd::OwnedFd::from(socket);
            let stream = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?;
            Ok((Accepted::Unix(stream), ConnInfo::unix()))
        }
    });
    Some(registered)
}

async fn accept(listener: &Listener) -> io::Result<(Accepted, ConnInfo)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, addr) = l.accept().await?;
            let info = tcp_info(&stream, addr);
            Ok((Accepted::Tcp(stream), info))
        }
        Listener::Unix(l, _) => {
            let (stream, _) = l.accept().await?;
            Ok((Accepted::Unix(stream), ConnInfo::unix()))
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
