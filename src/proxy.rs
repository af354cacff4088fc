//! The data plane: every request on the public port is matched against the route table and
//! forwarded, streaming, to its target; websocket upgrades become a two-way byte tunnel.
//!
//! A request goes through its phases in [`Proxy::handle`]: the server accepted it (see
//! [`crate::server`]); its path is normalised ([`RequestPath::parse`]); a route is matched
//! ([`Proxy::route_for`]); the edge checks credentials ([`Proxy::authorize`]); the request for
//! the target is prepared ([`Proxy::upstream_request`]) and sent on this worker's connection
//! pool ([`Proxy::exchange`]), and the answer is shaped for the client
//! ([`Proxy::client_response`]); finally metrics and the access log record it.
//!
//! All statuses a user can see from hubgate itself (404 no route, 400 undecodable path, 503 target
//! failed) are decided in [`ProxyError::status`] and rendered in [`Proxy::error_response`].

use std::borrow::Cow;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::auth::{self, Auth, Verdict};
use crate::http::{empty, empty_body, ConnInfo, ProxyBody};
use crate::limits::{self, Limits, Permit};
use crate::metrics;
use crate::path::{self, RequestPath};
use crate::routes::{Route, RouteKind, RouteTable};
use crate::target::Target;
use crate::upstream::{FailureCause, Pool, SendError};

mod body;
mod pages;
mod tunnel;

use body::{AccessRecord, ActivityBody, LoggedBody, TargetBody, Watched};

/// What the metrics and the access log need to know about a request once it is answered.
struct Trace {
    kind: RouteKind,
    upstream: Option<Duration>,
    /// The matched route, kept only for the access log.
    route: Option<Arc<Route>>,
}

/// What the edge decided a forwarded request carries.
#[derive(Default)]
struct Grant {
    identity: Option<Arc<auth::Identity>>,
    strip_token: bool,
    set_cookie: Option<HeaderValue>,
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

    /// Logs it at the level its kind deserves, and counts target failures.
    fn report(&self, method: &http::Method) {
        let status = self.status().as_u16();
        match self {
            ProxyError::NoRoute | ProxyError::NotLoaded => {
                tracing::debug!(%method, status, error = %self, "no route")
            }
            ProxyError::BadPath(_) | ProxyError::BadHost | ProxyError::ClientBody(_) => {
                tracing::info!(%method, status, error = %self, "bad request")
            }
            _ => tracing::error!(%method, status, error = %self, "proxy error"),
        }
        let cause = match self {
            ProxyError::Upstream(cause, _) => *cause,
            ProxyError::UpstreamTimeout => FailureCause::Timeout,
            ProxyError::UnaskedSwitch => FailureCause::Other,
            _ => return,
        };
        metrics::get().upstream_error(cause);
    }
}

/// The forwarding service of one worker: shares the route table, the options and the edge with
/// every other worker, and owns its connections to targets.
pub struct Proxy {
    table: Arc<RouteTable>,
    pool: Arc<Pool>,
    opts: ForwardOptions,
    /// Authentication at the edge, when configured.
    auth: Option<Arc<Auth>>,
    /// Fair-use limits, when configured: shared by every worker.
    limits: Option<Arc<Limits>>,
    /// Becomes true when hubgate stops: open websocket tunnels then close both sides.
    closing: tokio::sync::watch::Receiver<bool>,
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard ones that old clients still send. Asked of every header of every message: a
/// `match` on the name compares lengths first, where comparing `HeaderName`s does not.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

impl Proxy {
    pub fn new(
        table: Arc<RouteTable>,
        pool: Arc<Pool>,
        opts: ForwardOptions,
        auth: Option<Arc<Auth>>,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Proxy {
            table,
            pool,
            opts,
            auth,
            limits: None,
            closing,
        }
    }

    /// The same proxy with fair-use limits.
    pub fn with_limits(mut self, limits: Option<Arc<Limits>>) -> Self {
        self.limits = limits;
        self
    }

    /// This worker's connections to targets.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Serves one request. Never fails: every error becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if req.uri().path() == "/_chp_healthz" && req.uri().query().is_none() {
            return Ok(crate::http::json(StatusCode::OK, r#"{"status": "OK"}"#));
        }
        if let Some(auth) = &self.auth {
            if auth.is_callback(req.uri().path()) {
                return Ok(auth.callback(&req, &conn).await);
            }
        }
        let started = Instant::now();
        let websocket = is_websocket_upgrade(&req);
        let method = req.method().clone();
        let mut trace = Trace {
            kind: RouteKind::None,
            upstream: None,
            route: None,
        };
        let resp = self.answer(req, &conn, websocket, &mut trace).await;
        Ok(self.record(resp, method, conn.remote_ip, started, websocket, trace))
    }

    /// The last phase: metrics, and the access-log line when the response body ends.
    fn record(
        &self,
        resp: Response<ProxyBody>,
        method: http::Method,
        client: Option<std::net::IpAddr>,
        started: Instant,
        websocket: bool,
        trace: Trace,
    ) -> Response<ProxyBody> {
        let status = resp.status().as_u16();
        metrics::get().request(
            trace.kind,
            &method,
            status,
            started.elapsed(),
            trace.upstream,
            websocket,
        );
        if !self.opts.access_log {
            return resp;
        }
        let record = AccessRecord {
            method,
            route: trace.route,
            status,
            started,
            client,
        };
        resp.map(|body| LoggedBody::new(body, record).boxed())
    }

    /// Forwards a request, or answers it when hubgate cannot.
    async fn answer(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        websocket: bool,
        trace: &mut Trace,
    ) -> Response<ProxyBody> {
        let method = req.method().clone();
        // Kept for `--error-target`'s `url=` and to forward unchanged when nothing changes it;
        // cloning shares its bytes.
        let asked = req.uri().path_and_query().cloned();
        match self
            .forward(req, asked.as_ref(), conn, websocket, trace)
            .await
        {
            Ok(resp) => resp,
            Err(err) => {
                err.report(&method);
                if websocket {
                    // A websocket client gets the bare status, as CHP sends it.
                    return empty(err.status());
                }
                let original = asked.as_ref().map_or("", PathAndQuery::as_str);
                self.error_response(err.status(), original).await
            }
        }
    }

    /// Normalise, match, authorize, forward.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        asked: Option<&PathAndQuery>,
        conn: &ConnInfo,
        websocket: bool,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let path = RequestPath::parse(asked.map_or("", PathAndQuery::path))?;
        // RFC 9112 §3.2: more than one Host is a 400. Forwarding them all would let hubgate route
        // (and authenticate) by one while the target acts on another.
        if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
            return Err(ProxyError::BadHost);
        }
        let host = request_host(&req);
        let route = self.route_for(&path, host.as_ref())?;
        trace.kind = route.kind();
        if self.opts.access_log {
            trace.route = Some(route.clone());
        }
        // Decided on the route just matched, so the check and the router cannot disagree.
        let grant = match self.authorize(&req, conn, &route, websocket).await {
            Ok(grant) => grant,
            Err(resp) => return Ok(resp),
        };
        let permit = match self.limit(&req, &path, conn, &grant, route.kind(), websocket) {
            Ok(permit) => permit,
            Err(refusal) => return Ok(refusal.response(req.headers())),
        };
        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        let (upstream_req, client_failed) =
            self.upstream_request(req, asked, conn, &path, &route, host, &grant, websocket)?;
        let resp = self
            .exchange(upstream_req, &route, websocket, &client_failed, trace)
            .await?;
        self.client_response(resp, route, client_upgrade, grant.set_cookie, permit)
    }

    /// The route for a request: by path, or by host and path under host routing.
    fn route_for(
        &self,
        path: &RequestPath<'_>,
        host: Option<&HeaderValue>,
    ) -> Result<Arc<Route>, ProxyError> {
        let lookup_started = Instant::now();
        let table = self.table.load();
        let found = if self.opts.host_routing {
            let host = host
                .and_then(|h| h.to_str().ok())
                .ok_or(ProxyError::BadHost)?;
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
        let route = found.ok_or_else(|| {
            if self.table.is_loaded() {
                ProxyError::NoRoute
            } else {
                ProxyError::NotLoaded
            }
        })?;
        metrics::get().lookup_time(lookup_started.elapsed());
        Ok(route)
    }

    /// The edge's verdict: what the forwarded request carries, or hubgate's own answer.
    async fn authorize(
        &self,
        req: &Request<Incoming>,
        conn: &ConnInfo,
        route: &Route,
        websocket: bool,
    ) -> Result<Grant, Response<ProxyBody>> {
        let Some(auth) = &self.auth else {
            return Ok(Grant::default());
        };
        match auth.check(req, conn, route, websocket).await {
            Verdict::Allow(a) => Ok(Grant {
                identity: a.identity,
                strip_token: a.strip_token,
                set_cookie: a.set_cookie,
            }),
            Verdict::Respond(resp) => Err(resp),
        }
    }

    /// Fair use: a permit the request holds while it runs, or the limit that refuses it.
    fn limit(
        &self,
        req: &Request<Incoming>,
        path: &RequestPath<'_>,
        conn: &ConnInfo,
        grant: &Grant,
        kind: RouteKind,
        websocket: bool,
    ) -> Result<Permit, limits::Refusal> {
        let Some(limits) = &self.limits else {
            return Ok(Permit::default());
        };
        let ask = limits::Ask {
            method: req.method(),
            path: &path.lookup,
            headers: req.headers(),
            peer: conn.remote_ip,
            user: grant
                .identity
                .as_deref()
                .map(|i| (i.name.as_str(), i.admin)),
            kind,
            websocket,
        };
        limits.admit(&ask)
    }

    /// The request as the target gets it: its path under the target's, hop-by-hop headers gone,
    /// forged identities scrubbed, `X-Forwarded-*` added, and a body that notes the client's
    /// failures (returned beside it) and counts activity.
    #[allow(clippy::too_many_arguments)]
    fn upstream_request(
        &self,
        req: Request<Incoming>,
        asked: Option<&PathAndQuery>,
        conn: &ConnInfo,
        path: &RequestPath<'_>,
        route: &Arc<Route>,
        host: Option<HeaderValue>,
        grant: &Grant,
        websocket: bool,
    ) -> Result<(Request<ProxyBody>, ClientFailure), ProxyError> {
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
        let query = match grant.strip_token {
            true => auth::strip_token_param(req.uri().query()).map(Cow::Owned),
            false => req.uri().query().map(Cow::Borrowed),
        };
        let uri = route
            .target()
            .origin_form(base, rest, query.as_deref(), asked)
            .map_err(|_| ProxyError::BadPath(path::PathError::BadEscape))?;
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, websocket);
        if let Some(auth) = &self.auth {
            auth.scrub(&mut parts.headers, grant.identity.as_deref());
        }
        if self.opts.x_forward {
            add_forwarded(&mut parts.headers, conn, host.as_ref(), websocket);
        }
        let host = host.or_else(|| target_host(route));
        if let Some(host) = host {
            parts.headers.entry(header::HOST).or_insert(host);
        }
        for (name, value) in &self.opts.custom_headers {
            parts.headers.insert(name.clone(), value.clone());
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let (body, client_failed) = watch_request_body(body, route);
        Ok((Request::from_parts(parts, body), client_failed))
    }

    /// Sends the request on this worker's pool, within `--proxy-timeout`.
    async fn exchange(
        &self,
        req: Request<ProxyBody>,
        route: &Route,
        websocket: bool,
        client_failed: &ClientFailure,
        trace: &mut Trace,
    ) -> Result<Response<TargetBody>, ProxyError> {
        let target = route.target();
        tracing::debug!(route = %route.key(), ?target, "forwarding");
        let started = Instant::now();
        let sent = async {
            if websocket {
                let resp = self.pool.send_upgrade(target, req).await?;
                Ok::<_, SendError>(resp.map(TargetBody::Upgrade))
            } else {
                let resp = self.pool.send(target, req).await?;
                Ok(resp.map(TargetBody::Pooled))
            }
        };
        let result = match self.opts.proxy_timeout {
            Some(limit) => tokio::time::timeout(limit, sent)
                .await
                .map_err(|_| ProxyError::UpstreamTimeout)?,
            None => sent.await,
        };
        trace.upstream = Some(started.elapsed());
        result.map_err(|e| match client_failed.as_ref().and_then(|f| f.get()) {
            Some(why) => ProxyError::ClientBody(why.clone()),
            None => ProxyError::Upstream(FailureCause::of(&e), error_chain(&e)),
        })
    }

    /// The target's answer as the client gets it; a switch of protocols becomes a tunnel.
    fn client_response(
        &self,
        mut resp: Response<TargetBody>,
        route: Arc<Route>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        set_cookie: Option<HeaderValue>,
        permit: Permit,
    ) -> Result<Response<ProxyBody>, ProxyError> {
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
                let tunnel = tunnel::tunnel(
                    client_upgrade,
                    upstream_upgrade,
                    route,
                    self.closing.clone(),
                );
                // The websocket holds its place in the limits until it closes.
                tokio::spawn(async move {
                    tunnel.await;
                    drop(permit);
                });
                let (parts, _) = resp.into_parts();
                return Ok(Response::from_parts(parts, empty_body()));
            }
        }
        let (mut parts, body) = resp.into_parts();
        // The target's HTTP version is its business; the client gets the one it speaks.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(
            parts,
            permit.attach(watch_response_body(body, route, status)),
        ))
    }

    /// The page for an error hubgate answers itself, from wherever the configuration says.
    pub async fn error_response(&self, status: StatusCode, original: &str) -> Response<ProxyBody> {
        pages::error_page(&self.opts.error_pages, &self.pool, status, original).await
    }
}

/// Why the client's request body failed, once it has: a forwarded request that fails because of
/// it is the client's fault. `None` for a request without a body.
type ClientFailure = Option<Arc<std::sync::OnceLock<String>>>;

/// The request body the target gets: counted, touching the route, noting its own failure. A
/// request without a body sends none, and needs no watching.
fn watch_request_body(body: Incoming, route: &Arc<Route>) -> (ProxyBody, ClientFailure) {
    if body.is_end_stream() {
        return (empty_body(), None);
    }
    let client_failed = Arc::new(std::sync::OnceLock::new());
    let counter = metrics::get().request_bytes(route.kind());
    let noted = client_failed.clone();
    let body = Watched::new(
        ActivityBody::new(body, Some(route.clone()), Some(counter)),
        move |e: &hyper::Error| {
            let _ = noted.set(e.to_string());
        },
    );
    (body.boxed(), Some(client_failed))
}

/// The response body the client gets: counted, touching the route while it succeeds, and
/// logged when the target fails in the middle of it.
fn watch_response_body(body: TargetBody, route: Arc<Route>, status: StatusCode) -> ProxyBody {
    let counter = metrics::get().response_bytes(route.kind());
    let counted = (status.as_u16() < 300).then_some(route.clone());
    Watched::new(
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
    )
    .boxed()
}

/// The Host a request the client sent without one carries: the target's own authority (what a
/// client library would send), or `localhost` for a Unix socket.
fn target_host(route: &Route) -> Option<HeaderValue> {
    match route.target().endpoint() {
        crate::target::Endpoint::Unix(_) => Some(HeaderValue::from_static("localhost")),
        _ => HeaderValue::from_str(route.target().authority().as_str()).ok(),
    }
}

/// `X-Forwarded-For`, `-Port`, `-Proto` appended as CHP's proxy library does; `-Host` set when
/// absent.
fn add_forwarded(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    host: Option<&HeaderValue>,
    websocket: bool,
) {
    let proto = match (websocket, conn.tls) {
        (true, true) => "wss",
        (true, false) => "ws",
        (false, true) => "https",
        (false, false) => "http",
    };
    let host_str = host.and_then(|h| h.to_str().ok());
    append_forwarded(headers, X_FORWARDED_FOR, conn.forwarded_for.clone());
    if let Some(port) = value_of(forwarded_port(host_str, conn.tls)) {
        append_forwarded(headers, X_FORWARDED_PORT, port);
    }
    append_forwarded(headers, X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(h) = host {
        headers.entry(X_FORWARDED_HOST).or_insert_with(|| h.clone());
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
///
/// Most messages carry none, and finding that out by looking at the names present is cheaper
/// than asking the map for each of them.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let mut connection = headers.get_all(header::CONNECTION).iter();
    let (first, more) = (connection.next().cloned(), connection.next().is_some());
    let named: Vec<HeaderValue> = match more {
        // Several `Connection` lines are rare; one is the usual case and needs no list.
        true => headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect(),
        false => Vec::new(),
    };
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    for value in first.iter().chain(&named) {
        let tokens = value.to_str().ok().into_iter().flat_map(|s| s.split(','));
        for token in tokens.map(str::trim).filter(|t| !t.is_empty()) {
            headers.remove(token);
        }
    }
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k))
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// The host the client asked for: the Host header, or the URI's authority (HTTP/2).
fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
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

/// The port the client asked for: the digits after the host's last `:` (not inside an IPv6
/// literal's brackets), else the scheme's. One backward scan: this runs on every request.
fn forwarded_port(host: Option<&str>, tls: bool) -> &str {
    let default = if tls { "443" } else { "80" };
    let Some(host) = host else { return default };
    let b = host.as_bytes();
    let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    let start = b.len() - digits;
    match start.checked_sub(1).map(|colon| b[colon]) {
        Some(b':') if digits > 0 => &host[start..],
        _ => default,
    }
}

/// A header value from a string that is most often one of a few constants.
fn value_of(s: &str) -> Option<HeaderValue> {
    match s {
        "80" => Some(HeaderValue::from_static("80")),
        "443" => Some(HeaderValue::from_static("443")),
        _ => HeaderValue::from_str(s).ok(),
    }
}

/// Appends to an `X-Forwarded-*` header with `,` as CHP's proxy library does.
fn append_forwarded(headers: &mut HeaderMap, name: HeaderName, value: HeaderValue) {
    match headers.entry(name) {
        header::Entry::Vacant(e) => {
            e.insert(value);
        }
        header::Entry::Occupied(mut e) => {
            let existing = e.get().to_str().ok().filter(|v| !v.is_empty());
            let joined = match (existing, value.to_str()) {
                (Some(existing), Ok(value)) => {
                    HeaderValue::from_str(&format!("{existing},{value}")).ok()
                }
                _ => Some(value),
            };
            if let Some(joined) = joined {
                e.insert(joined);
            }
        }
    }
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
        assert_eq!(forwarded_port(Some("a.example:"), false), "80");
        assert_eq!(forwarded_port(Some("a.example:8a"), true), "443");
        assert_eq!(forwarded_port(Some("a.example:a8"), false), "80");
        assert_eq!(forwarded_port(Some("[::1]5"), false), "80");
        assert_eq!(forwarded_port(Some("[1:2]"), false), "80");
        assert_eq!(forwarded_port(Some("8080"), false), "80");
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
        append_forwarded(
            &mut h,
            X_FORWARDED_FOR,
            HeaderValue::from_static("127.0.0.1"),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1");
        append_forwarded(
            &mut h,
            X_FORWARDED_FOR,
            HeaderValue::from_static("10.0.0.1"),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1,10.0.0.1");
    }

    #[test]
    fn error_chains_name_every_source() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error (SendRequest)")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid HTTP status-code parsed",
        ));
        assert_eq!(
            error_chain(&err),
            "client error (SendRequest): invalid HTTP status-code parsed"
        );
    }
}
