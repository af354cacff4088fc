//! The data plane: every request on the public port is matched against the route table and
//! forwarded, streaming, to its target; websocket upgrades become a two-way byte tunnel.
//!
//! All statuses a user can see from hubgate itself (404 no route, 400 undecodable path, 503 target
//! failed) are decided in [`ProxyError::status`] and rendered in [`Proxy::error_response`].

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use pin_project_lite::pin_project;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::auth::{self, Auth, Verdict};
use crate::metrics::{self, RouteKind};
use crate::path::{self, RequestPath};
use crate::routes::{Route, RouteTable};
use crate::target::Target;
use crate::upstream::{FailureCause, ProxyBody, UpstreamClient};

mod tunnel;

/// What the proxy needs to know about the connection a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address; `None` on a Unix socket.
    pub remote_ip: Option<IpAddr>,
    pub tls: bool,
}

/// What the metrics and the access log need to know about a request once it is answered.
struct Trace {
    kind: RouteKind,
    upstream: Option<Duration>,
    /// The matched route, kept only for the access log.
    route: Option<Arc<Route>>,
}

/// One access-log line's worth, written when the response body is done (or dropped).
struct AccessRecord {
    method: http::Method,
    route: Option<Arc<Route>>,
    status: u16,
    started: Instant,
    client: Option<IpAddr>,
}

/// A response body that writes the access-log line when it ends, with the bytes it carried.
/// Paths, queries, tokens and cookies are never logged: the route's key stands for the path.
struct LoggedBody {
    inner: ProxyBody,
    record: AccessRecord,
    bytes: u64,
}

impl LoggedBody {
    fn new(inner: ProxyBody, record: AccessRecord) -> Self {
        LoggedBody {
            inner,
            record,
            bytes: 0,
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let n = data.len() as u64;
                self.bytes += n;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let r = &self.record;
        tracing::info!(
            target: "hubgate::access",
            method = %r.method,
            route = r.route.as_ref().map_or("-", |route| route.key()),
            status = r.status,
            duration_ms = r.started.elapsed().as_secs_f64() * 1000.0,
            bytes = self.bytes,
            client = %r.client.map_or_else(|| "-".to_owned(), |ip| ip.to_canonical().to_string()),
            "request"
        );
    }
}

/// Forwarding options, fixed at start.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    pub host_routing: bool,
    pub x_forward: bool,
    pub prepend_path: bool,
    pub include_prefix: bool,
    pub custom_headers: Vec<(HeaderName, HeaderValue)>,
    pub proxy_timeout: Option<Duration>,
    pub error_pages: ErrorPages,
    /// Log one line per request when its response is done.
    pub access_log: bool,
}

/// Where error pages come from: `--error-target`, `--error-path`, or neither.
#[derive(Debug, Clone)]
pub enum ErrorPages {
    /// hubgate's own small HTML pages.
    Builtin,
    /// GET `<target>/<code>?url=<path>`.
    Target(Target),
    /// `<dir>/<code>.html`, else `<dir>/error.html`.
    Dir(PathBuf),
}

/// Why hubgate answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches")]
    NoRoute,
    /// No route matches because the table waits for its store's first load.
    #[error("the route table is not loaded from the route store yet")]
    NotLoaded,
    #[error("bad request path: {0}")]
    BadPath(#[from] path::PathError),
    #[error("bad Host header")]
    BadHost,
    /// The cause, and the error chain that says what happened.
    #[error("target failed ({}): {}", .0.as_str(), .1)]
    Upstream(FailureCause, String),
    #[error("target did not answer within the proxy timeout")]
    UpstreamTimeout,
    /// The forwarded request failed because its own body did (malformed chunks, or the client
    /// went away in the middle): the client's fault, not the target's.
    #[error("the request body could not be read: {0}")]
    ClientBody(String),
    #[error("target answered 101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedSwitch,
}

impl ProxyError {
    /// The one place a data-plane failure becomes a status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadPath(_) | ProxyError::BadHost | ProxyError::ClientBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Upstream(..)
            | ProxyError::UpstreamTimeout
            | ProxyError::UnaskedSwitch
            | ProxyError::NotLoaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The forwarding service shared by every connection on the public port.
pub struct Proxy {
    table: Arc<RouteTable>,
    client: UpstreamClient,
    opts: ForwardOptions,
    /// Authentication at the edge, when configured.
    auth: Option<Arc<Auth>>,
    /// Becomes true when hubgate stops: open websocket tunnels then close both sides.
    closing: tokio::sync::watch::Receiver<bool>,
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard ones that old clients still send.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What `url=` escapes in an error-target request: everything but unreserved characters, as
/// JavaScript's URLSearchParams does (it writes a space as `+`; `%20` means the same).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'*');

impl Proxy {
    pub fn new(
        table: Arc<RouteTable>,
        client: UpstreamClient,
        opts: ForwardOptions,
        auth: Option<Arc<Auth>>,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Proxy {
            table,
            client,
            opts,
            auth,
            closing,
        }
    }

    /// Serves one request. Never fails: every error becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        // Authentication reads it (cookies are `Secure` on TLS connections).
        req.extensions_mut().insert(conn);
        if req.uri().path() == "/_chp_healthz" && req.uri().query().is_none() {
            return Ok(json(StatusCode::OK, r#"{"status": "OK"}"#));
        }
        if let Some(auth) = &self.auth {
            if auth.is_callback(req.uri().path()) {
                return Ok(auth.callback(&req).await);
            }
        }
        let started = Instant::now();
        let websocket = is_websocket_upgrade(&req);
        let original = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
        let method = req.method().clone();
        let mut trace = Trace {
            kind: RouteKind::None,
            upstream: None,
            route: None,
        };
        let resp = self
            .answer(req, conn, websocket, &original, &mut trace)
            .await;
        metrics::get().request(
            trace.kind,
            &method,
            resp.status().as_u16(),
            started.elapsed(),
            trace.upstream,
            websocket,
        );
        if self.opts.access_log {
            let record = AccessRecord {
                method,
                route: trace.route.take(),
                status: resp.status().as_u16(),
                started,
                client: conn.remote_ip,
            };
            let (parts, body) = resp.into_parts();
            return Ok(Response::from_parts(
                parts,
                LoggedBody::new(body, record).boxed(),
            ));
        }
        Ok(resp)
    }

    /// Forwards a request, or answers it when hubgate cannot.
    async fn answer(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        websocket: bool,
        original: &str,
        trace: &mut Trace,
    ) -> Response<ProxyBody> {
        let method = req.method().clone();
        match self.forward(req, conn, websocket, trace).await {
            Ok(resp) => resp,
            Err(err) => {
                let status = err.status();
                match &err {
                    ProxyError::NoRoute | ProxyError::NotLoaded => {
                        tracing::debug!(%method, status = status.as_u16(), error = %err, "no route")
                    }
                    ProxyError::BadPath(_) | ProxyError::BadHost | ProxyError::ClientBody(_) => {
                        tracing::info!(%method, status = status.as_u16(), error = %err, "bad request")
                    }
                    _ => tracing::error!(
                        %method,
                        status = status.as_u16(),
                        error = %err,
                        "proxy error"
                    ),
                }
                match &err {
                    ProxyError::Upstream(cause, _) => metrics::get().upstream_error(*cause),
                    ProxyError::UpstreamTimeout => {
                        metrics::get().upstream_error(FailureCause::Timeout)
                    }
                    ProxyError::UnaskedSwitch => metrics::get().upstream_error(FailureCause::Other),
                    _ => {}
                }
                if websocket {
                    // A websocket client gets the bare status, as CHP sends it.
                    return empty(status);
                }
                self.error_response(status, original).await
            }
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        websocket: bool,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let path = RequestPath::parse(req.uri().path())?;
        // RFC 9112 §3.2: more than one Host is a 400. Forwarding them all would let hubgate route
        // (and authenticate) by one while the target acts on another.
        if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
            return Err(ProxyError::BadHost);
        }
        let host = request_host(&req);
        let lookup_started = Instant::now();
        let route = {
            let table = self.table.load();
            let found = if self.opts.host_routing {
                let host = host.as_deref().ok_or(ProxyError::BadHost)?;
                let host = host_without_port(host);
                if host.contains('/') {
                    return Err(ProxyError::BadHost);
                }
                let mut key = String::with_capacity(host.len() + path.lookup.len() + 1);
                key.push('/');
                key.push_str(&host.to_ascii_lowercase());
                if path.lookup != "/" {
                    key.push_str(&path.lookup);
                }
                table.lookup(&key).cloned()
            } else {
                table.lookup(&path.lookup).cloned()
            };
            found.ok_or_else(|| {
                if self.table.is_loaded() {
                    ProxyError::NoRoute
                } else {
                    ProxyError::NotLoaded
                }
            })?
        };
        metrics::get().lookup_time(lookup_started.elapsed());
        trace.kind = route.kind();
        if self.opts.access_log {
            trace.route = Some(route.clone());
        }

        // Decided on the route just matched, so the check and the router cannot disagree.
        let (identity, strip_token, set_cookie) = match &self.auth {
            Some(auth) => match auth.check(&req, &route, websocket).await {
                Verdict::Allow(a) => (a.identity, a.strip_token, a.set_cookie),
                Verdict::Respond(resp) => return Ok(resp),
            },
            None => (None, false, None),
        };

        let rest = if self.opts.include_prefix {
            &path.raw[..]
        } else {
            path::strip_segments(&path.raw, route.path_depth())
        };
        let base = if self.opts.prepend_path {
            route.target().path()
        } else {
            "/"
        };
        let query = if strip_token {
            auth::strip_token_param(req.uri().query())
        } else {
            req.uri().query().map(str::to_owned)
        };
        let uri = route
            .target()
            .uri(&path::join(base, rest), query.as_deref())
            .map_err(|_| ProxyError::BadPath(path::PathError::BadEscape))?;

        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let port = forwarded_port(host.as_deref(), conn.tls);
        let proto = match (websocket, conn.tls) {
            (true, true) => "wss",
            (true, false) => "ws",
            (false, true) => "https",
            (false, false) => "http",
        };
        strip_hop_by_hop(&mut parts.headers, websocket);
        if let Some(auth) = &self.auth {
            auth.scrub(&mut parts.headers, identity.as_deref());
        }
        if !parts.headers.contains_key(header::HOST) {
            if let Some(h) = host.as_deref().and_then(|h| HeaderValue::from_str(h).ok()) {
                parts.headers.insert(header::HOST, h);
            }
        }
        if self.opts.x_forward {
            let ip = conn.remote_ip.map(|ip| ip.to_canonical().to_string());
            append_forwarded(
                &mut parts.headers,
                X_FORWARDED_FOR,
                ip.as_deref().unwrap_or(""),
            );
            append_forwarded(&mut parts.headers, X_FORWARDED_PORT, &port);
            append_forwarded(&mut parts.headers, X_FORWARDED_PROTO, proto);
            if !parts.headers.contains_key(X_FORWARDED_HOST) {
                if let Some(h) = host.as_deref().and_then(|h| HeaderValue::from_str(h).ok()) {
                    parts.headers.insert(X_FORWARDED_HOST, h);
                }
            }
        }
        for (name, value) in &self.opts.custom_headers {
            parts.headers.insert(name.clone(), value.clone());
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let counter = metrics::get().request_bytes(route.kind());
        let client_failed: Arc<std::sync::OnceLock<String>> = Arc::default();
        let noted = client_failed.clone();
        let body = Watched::new(
            ActivityBody::new(body, Some(route.clone()), Some(counter)),
            move |e: &hyper::Error| {
                let _ = noted.set(e.to_string());
            },
        )
        .boxed();
        let upstream_req = Request::from_parts(parts, body);

        tracing::debug!(route = %route.key(), target = ?route.target(), "forwarding");
        let sent = self.client.request(upstream_req);
        let upstream_started = Instant::now();
        let result = match self.opts.proxy_timeout {
            Some(limit) => tokio::time::timeout(limit, sent)
                .await
                .map_err(|_| ProxyError::UpstreamTimeout)?,
            None => sent.await,
        };
        trace.upstream = Some(upstream_started.elapsed());
        let mut resp = result.map_err(|e| match client_failed.get() {
            Some(why) => ProxyError::ClientBody(why.clone()),
            None => ProxyError::Upstream(FailureCause::of(&e), error_chain(&e)),
        })?;

        let status = resp.status();
        if status == StatusCode::SWITCHING_PROTOCOLS && client_upgrade.is_none() {
            // Passing it on would switch a client that asked for nothing; the target is broken.
            return Err(ProxyError::UnaskedSwitch);
        }
        if status.as_u16() < 300 {
            route.touch();
        }
        if let Some(cookie) = set_cookie {
            resp.headers_mut().append(header::SET_COOKIE, cookie);
        }
        if let Some(client_upgrade) = client_upgrade {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(
                    client_upgrade,
                    upstream_upgrade,
                    route.clone(),
                    self.closing.clone(),
                ));
                let (parts, _) = resp.into_parts();
                return Ok(Response::from_parts(parts, empty_body()));
            }
        }
        let (mut parts, body) = resp.into_parts();
        // The target's HTTP version is its business; the client gets the one it speaks.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers, false);
        let counter = metrics::get().response_bytes(route.kind());
        let counted = (status.as_u16() < 300).then_some(route.clone());
        let body = Watched::new(
            ActivityBody::new(body, counted, Some(counter)),
            move |e: &hyper::Error| {
                let cause = FailureCause::of(e);
                metrics::get().upstream_error(cause);
                tracing::error!(
                    route = %route.key(),
                    status = status.as_u16(),
                    cause = %cause.as_str(),
                    error = %error_chain(e),
                    "target failed in the middle of a response; the client's response is cut short"
                );
            },
        );
        Ok(Response::from_parts(parts, body.boxed()))
    }

    /// The page for an error hubgate answers itself, from wherever the configuration says.
    pub async fn error_response(&self, status: StatusCode, original: &str) -> Response<ProxyBody> {
        match &self.opts.error_pages {
            ErrorPages::Builtin => {}
            ErrorPages::Target(target) => {
                let path = path::join(target.path(), status.as_str());
                let query = format!("url={}", utf8_percent_encode(original, QUERY_VALUE));
                match target.uri(&path, Some(&query)) {
                    Ok(uri) => match self.fetch_error_page(uri).await {
                        Ok((headers, body)) => {
                            let mut resp = Response::new(body);
                            *resp.status_mut() = status;
                            for name in [header::CONTENT_TYPE, header::CONTENT_ENCODING] {
                                if let Some(v) = headers.get(&name) {
                                    resp.headers_mut().insert(name, v.clone());
                                }
                            }
                            return resp;
                        }
                        Err(e) => tracing::error!(error = %e, "failed to get custom error page"),
                    },
                    Err(e) => tracing::error!(error = %e, "cannot build the error-target URL"),
                }
            }
            ErrorPages::Dir(dir) => {
                let specific = dir.join(format!("{}.html", status.as_u16()));
                let page = match tokio::fs::read(&specific).await {
                    Ok(page) => Ok(page),
                    Err(_) => tokio::fs::read(dir.join("error.html")).await,
                };
                match page {
                    Ok(page) => return html(status, Bytes::from(page)),
                    Err(e) => tracing::error!(error = %e, dir = %dir.display(), "no error page"),
                }
            }
        }
        html(status, Bytes::from(builtin_page(status)))
    }

    async fn fetch_error_page(
        &self,
        uri: http::Uri,
    ) -> Result<(HeaderMap, ProxyBody), hyper_util::client::legacy::Error> {
        let mut req = Request::new(empty_body());
        *req.uri_mut() = uri;
        let resp = self.client.request(req).await?;
        let (parts, body) = resp.into_parts();
        Ok((parts.headers, body.boxed()))
    }
}

/// Copies bytes both ways between an upgraded client and target until either side closes, or
/// until hubgate stops, when both sides get an orderly TCP close.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    route: Arc<Route>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            return;
        }
    };
    let mut client = ActivityIo {
        inner: TokioIo::new(client),
        route: route.clone(),
    };
    let mut upstream = ActivityIo {
        inner: TokioIo::new(upstream),
        route,
    };
    let m = metrics::get();
    m.websockets.inc();
    m.active_websockets.inc();
    let opened = Instant::now();
    tokio::select! {
        copied = tunnel::copy_both(&mut client, &mut upstream) => {
            if let Err(e) = copied {
                tracing::debug!(error = %e, "websocket tunnel closed with an error");
            }
        }
        _ = stopped(&mut closing) => {
            use tokio::io::AsyncWriteExt;
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = client.shutdown().await;
                let _ = upstream.shutdown().await;
            })
            .await;
            tracing::debug!(route = %client.route.key(), "websocket closed for shutdown");
        }
    }
    m.active_websockets.dec();
    m.websocket_duration.observe(opened.elapsed().as_secs_f64());
}

pin_project! {
    /// A body that records activity on its route for every frame that passes, and counts its
    /// bytes.
    pub struct ActivityBody<B> {
        #[pin]
        inner: B,
        route: Option<Arc<Route>>,
        bytes: Option<&'static IntCounter>,
    }
}

impl<B> ActivityBody<B> {
    pub fn new(inner: B, route: Option<Arc<Route>>, bytes: Option<&'static IntCounter>) -> Self {
        ActivityBody {
            inner,
            route,
            bytes,
        }
    }
}

impl<B: Body> Body for ActivityBody<B>
where
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(route) = this.route.as_ref() {
                route.touch();
            }
            if let (Some(bytes), Some(data)) = (this.bytes, frame.data_ref()) {
                bytes.inc_by(data.remaining() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An error and its sources, `: `-separated: what a log line needs to say why.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

pin_project! {
    /// A body that reports its first failure to `on_error`: the client's request body (a
    /// forwarded request that fails because of it is the client's fault) or the target's
    /// response body (a response cut in the middle is logged and counted).
    struct Watched<B, F> {
        #[pin]
        inner: B,
        on_error: Option<F>,
    }
}

impl<B, F> Watched<B, F> {
    fn new(inner: B, on_error: F) -> Self {
        Watched {
            inner,
            on_error: Some(on_error),
        }
    }
}

impl<B, F> Body for Watched<B, F>
where
    B: Body<Error = hyper::Error>,
    F: FnOnce(&hyper::Error),
{
    type Data = B::Data;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            if let Some(on_error) = this.on_error.take() {
                on_error(e);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves once the flag is true (never, if its sender is gone without setting it).
async fn stopped(flag: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *flag.borrow_and_update() {
            return;
        }
        if flag.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// An upgraded stream that records activity on its route for every read (so both directions of
/// a websocket count, where CHP counts only one).
struct ActivityIo<T> {
    inner: T,
    route: Arc<Route>,
}

impl<T: AsyncRead + Unpin> AsyncRead for ActivityIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.route.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && header_has_token(req.headers(), &header::CONNECTION, "upgrade")
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

fn header_has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Removes hop-by-hop headers, including those the `Connection` header names. For a websocket
/// handshake, `Connection: upgrade` and `Upgrade` are what make it one, so they stay.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::try_from(t.trim()).ok())
        .collect();
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// The host the client asked for: the Host header, or the URI's authority (HTTP/2).
fn request_host<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
}

fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal: the port, if any, follows the closing bracket.
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    host.split(':').next().unwrap_or(host)
}

fn forwarded_port(host: Option<&str>, tls: bool) -> String {
    let port = host.and_then(|h| {
        let after = match h.rfind(']') {
            Some(end) => &h[end + 1..],
            None => h,
        };
        after.rsplit_once(':').map(|(_, p)| p.to_owned())
    });
    port.filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or_else(|| if tls { "443" } else { "80" }.to_owned())
}

/// Appends to an `X-Forwarded-*` header with `,` as CHP's proxy library does.
fn append_forwarded(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.is_empty() => format!("{existing},{value}"),
        _ => value.to_owned(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name, v);
    }
}

pub fn empty_body() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty(status: StatusCode) -> Response<ProxyBody> {
    let mut resp = Response::new(empty_body());
    *resp.status_mut() = status;
    resp
}

pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn html(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut resp = Response::new(full_body(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

fn builtin_page(status: StatusCode) -> String {
    let code = status.as_u16();
    let (title, text) = match code {
        404 => ("Not Found", "Nothing is served at this address."),
        503 => (
            "Service Unavailable",
            "The server behind this address is not answering. It may be starting or stopped.",
        ),
        400 => ("Bad Request", "The request's path could not be understood."),
        _ => (
            status.canonical_reason().unwrap_or("Error"),
            "The proxy could not complete this request.",
        ),
    };
    format!(
        "<!doctype html>\n<html>\n<head><meta charset=\"utf-8\"><title>{code} {title}</title></head>\n\
         <body>\n<h1>{code}: {title}</h1>\n<p>{text}</p>\n<hr>\n<p>hubgate</p>\n</body>\n</html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Drop"),
        );
        h.insert("x-drop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn websocket_handshakes_keep_their_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_port_comes_from_host() {
        assert_eq!(forwarded_port(Some("a.example:8443"), false), "8443");
        assert_eq!(forwarded_port(Some("a.example"), false), "80");
        assert_eq!(forwarded_port(Some("a.example"), true), "443");
        assert_eq!(forwarded_port(Some("[::1]:9"), false), "9");
        assert_eq!(forwarded_port(Some("[::1]"), false), "80");
        assert_eq!(forwarded_port(None, false), "80");
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_without_port("a.example:8000"), "a.example");
        assert_eq!(host_without_port("[::1]:8000"), "[::1]");
        assert_eq!(host_without_port("a.example"), "a.example");
    }

    #[test]
    fn forwarded_values_append_with_commas() {
        let mut h = HeaderMap::new();
        append_forwarded(&mut h, X_FORWARDED_FOR, "127.0.0.1");
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1");
        append_forwarded(&mut h, X_FORWARDED_FOR, "10.0.0.1");
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1,10.0.0.1");
    }

    #[test]
    fn error_chains_name_every_source() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error (SendRequest)")]
        struct Outer(#[source] io::Error);
        let err = Outer(io::Error::new(
            io::ErrorKind::InvalidData,
            "invalid HTTP status-code parsed",
        ));
        assert_eq!(
            error_chain(&err),
            "client error (SendRequest): invalid HTTP status-code parsed"
        );
    }
}
