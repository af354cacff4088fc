//! The control plane's REST API: `/api/routes`, answered exactly as configurable-http-proxy
//! answers it so JupyterHub can drive hubgate unchanged, plus hubgate's own `/api/proxy` (sync,
//! batches, paging; in [`sync`]) and `/api/handshake`.
//!
//! Every failure status and body is decided in [`ApiError`]. Route changes go through
//! [`Control`], which makes them durable before requests see them, all-or-nothing.
//!
//! The router dispatches on [`ENDPOINTS`], the list of every path and method it answers; the
//! OpenAPI document (`docs/openapi.json`, served at `/api/openapi.json`) describes exactly that
//! list, which `tests/it/openapi.rs` checks in both directions.

mod sync;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value;

use crate::auth::Auth;
use crate::control::{Control, ControlError, Op};
use crate::http::ProxyBody;
use crate::http::{empty, json};
use crate::hub::Hub;
use crate::path;
use crate::routes::{format_timestamp, Change, Outcome, Route, RouteData, RouteTable};
use crate::status::Status;
use crate::target::Target;

const ROUTES: &str = "/api/routes";

/// The OpenAPI 3.1 document of this API, as kept in the repository. JSON rather than YAML so
/// that it is served as it is, with no YAML parser in the dependency tree.
pub const OPENAPI: &str = include_str!("../docs/openapi.json");

/// One path of the API port and the methods the router answers there.
pub struct Endpoint {
    /// The path as the OpenAPI document writes it. A final `{parameter}` stands for the rest of
    /// the request's path (slashes included; the handler decides what it accepts).
    pub path: &'static str,
    /// Any other method gets 405 with these in `Allow`.
    pub methods: &'static [&'static str],
    handler: Handler,
}

#[derive(Debug, Clone, Copy)]
enum Handler {
    Live,
    Ready,
    Metrics,
    Status,
    Openapi,
    Routes,
    Proxy,
    Handshake,
    Revoke,
    LogLevel,
}

/// Every endpoint of the API port, in the order the router tries them. The router dispatches
/// on this list and nothing else, so a path is answered if and only if it is here.
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        path: "/health/live",
        methods: &["GET", "HEAD"],
        handler: Handler::Live,
    },
    Endpoint {
        path: "/health/ready",
        methods: &["GET", "HEAD"],
        handler: Handler::Ready,
    },
    Endpoint {
        path: "/metrics",
        methods: &["GET", "HEAD"],
        handler: Handler::Metrics,
    },
    Endpoint {
        path: "/api/status",
        methods: &["GET"],
        handler: Handler::Status,
    },
    Endpoint {
        path: "/api/openapi.json",
        methods: &["GET"],
        handler: Handler::Openapi,
    },
    Endpoint {
        path: "/api/routes",
        methods: &["GET", "POST", "DELETE"],
        handler: Handler::Routes,
    },
    Endpoint {
        path: "/api/routes/{route_path}",
        methods: &["GET", "POST", "DELETE"],
        handler: Handler::Routes,
    },
    Endpoint {
        path: "/api/proxy",
        methods: &["GET", "POST", "PATCH"],
        handler: Handler::Proxy,
    },
    Endpoint {
        path: "/api/handshake",
        methods: &["POST"],
        handler: Handler::Handshake,
    },
    Endpoint {
        path: "/api/auth/cache",
        methods: &["DELETE"],
        handler: Handler::Revoke,
    },
    Endpoint {
        path: "/api/auth/cache/users/{name}",
        methods: &["DELETE"],
        handler: Handler::Revoke,
    },
    Endpoint {
        path: "/api/log-level",
        methods: &["GET", "PUT"],
        handler: Handler::LogLevel,
    },
];

impl Endpoint {
    /// Whether a request for `path` is this endpoint's.
    fn answers(&self, path: &str) -> bool {
        match self.path.find('{') {
            None => path == self.path,
            Some(i) => path.starts_with(&self.path[..i]),
        }
    }
}

/// The endpoint that answers requests for `path`, if any.
pub fn endpoint(path: &str) -> Option<&'static Endpoint> {
    ENDPOINTS.iter().find(|e| e.answers(path))
}

/// The response header that carries the table version a listing was taken at.
pub const VERSION_HEADER: &str = "x-hubgate-version";

/// A refused API request. Statuses and messages follow CHP; bodies are JSON (CHP sends plain
/// text with no content type, which is one of the differences the README lists).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Not Found")]
    NotFound,
    /// With the methods the path answers, for `Allow`.
    #[error("Method not supported")]
    Method(&'static [&'static str]),
    /// 403 with an empty body, exactly as CHP.
    #[error("forbidden")]
    Forbidden,
    #[error("Body not valid JSON: {0}")]
    BadJson(String),
    #[error("Must specify 'target' as string")]
    NoTarget,
    #[error("{0}")]
    BadTarget(#[from] crate::target::TargetError),
    #[error("Invalid route path: {0}")]
    BadPath(#[from] path::PathError),
    #[error("Invalid datestamp '{0}' must be ISO8601.")]
    BadDate(String),
    #[error("Request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("Could not read the request body: {0}")]
    Body(String),
    /// A `/api/proxy` body that is JSON but not the right shape, with the offending entry named.
    #[error("{0}")]
    Invalid(String),
    #[error("Invalid {0} parameter: expected a non-negative integer")]
    BadParam(&'static str),
    #[error("Invalid {0} parameter: expected true or false (or 1, 0, yes, no)")]
    BadFlag(&'static str),
    #[error("Unknown query parameter '{0}' (this request takes {1})")]
    UnknownParam(String, &'static str),
    #[error("Changes since version {since} are no longer known (history starts at {floor}); fetch the whole table")]
    Gone { since: u64, floor: u64 },
    #[error("{0}")]
    Unavailable(#[from] ControlError),
    #[error("No hub is configured (--hub-api-url)")]
    NoHub,
    #[error("Authentication is not on (--hub-api-url, --auth-mode)")]
    NoAuth,
    #[error("The hub refused or failed: {0}")]
    Hub(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Gone { .. } => StatusCode::GONE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NoHub | ApiError::NoAuth => StatusCode::CONFLICT,
            ApiError::Hub(_) => StatusCode::BAD_GATEWAY,
            ApiError::Invalid(_)
            | ApiError::BadParam(_)
            | ApiError::BadFlag(_)
            | ApiError::UnknownParam(..)
            | ApiError::BadJson(_)
            | ApiError::NoTarget
            | ApiError::BadTarget(_)
            | ApiError::BadPath(_)
            | ApiError::BadDate(_)
            | ApiError::Body(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        if matches!(self, ApiError::Forbidden) {
            return empty(status);
        }
        let body = serde_json::json!({"status": status.as_u16(), "message": self.to_string()});
        let mut resp = json(status, body.to_string());
        if let ApiError::Method(allowed) = self {
            if let Ok(allow) = http::HeaderValue::from_str(&allowed.join(", ")) {
                resp.headers_mut().insert(header::ALLOW, allow);
            }
        }
        resp
    }
}

/// What the API needs from the rest of hubgate.
pub struct ApiSettings {
    pub token: Option<String>,
    pub host_routing: bool,
    /// Largest body of `POST /api/routes/...`.
    pub max_body: usize,
    /// Largest body of `POST`/`PATCH /api/proxy`.
    pub max_sync_body: usize,
}

/// The API service.
pub struct Api {
    table: Arc<RouteTable>,
    control: Control,
    hub: Option<Arc<Hub>>,
    auth: Option<Arc<Auth>>,
    status: Arc<Status>,
    settings: ApiSettings,
}

impl Api {
    pub fn new(
        table: Arc<RouteTable>,
        control: Control,
        hub: Option<Arc<Hub>>,
        auth: Option<Arc<Auth>>,
        status: Arc<Status>,
        settings: ApiSettings,
    ) -> Self {
        Api {
            table,
            control,
            hub,
            auth,
            status,
            settings,
        }
    }

    /// Serves one API request. Never fails: every error becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let method = req.method().clone();
        let op = operation(&method, req.uri().path());
        let resp = match self.route(req).await {
            Ok(resp) => resp,
            Err(err) => {
                match &err {
                    ApiError::Forbidden => {
                        tracing::warn!(%method, "API request refused: bad or missing token")
                    }
                    other => tracing::warn!(%method, error = %other, "API request refused"),
                }
                err.into_response()
            }
        };
        let status = resp.status();
        tracing::debug!(%method, status = status.as_u16(), "api");
        let m = crate::metrics::get();
        let class =
            ["1xx", "2xx", "3xx", "4xx", "5xx"][usize::from(status.as_u16() / 100).clamp(1, 5) - 1];
        m.api_operations.with_label_values(&[op, class]).inc();
        m.chp_requests_api
            .with_label_values(&[status.as_str()])
            .inc();
        match (op, status.is_success()) {
            ("routes_list", true) => m.chp_api_route_get.inc(),
            ("route_add", true) => m.chp_api_route_add.inc(),
            ("route_delete", _) => m.chp_api_route_delete.inc(),
            _ => {}
        }
        Ok(resp)
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, ApiError> {
        let endpoint = endpoint(req.uri().path()).ok_or(ApiError::NotFound)?;
        if !endpoint.methods.contains(&req.method().as_str()) {
            return Err(ApiError::Method(endpoint.methods));
        }
        match endpoint.handler {
            Handler::Live => Ok(self.status.live()),
            Handler::Ready => Ok(self.status.ready()),
            Handler::Metrics => {
                self.authorize(&req)?;
                Ok(self.status.metrics())
            }
            Handler::Status => {
                self.authorize(&req)?;
                Ok(self.status.report())
            }
            // Behind the token like everything else on this port but the probes: the document
            // is public (it is in the repository), but a stranger at the API port should not
            // learn what answers there, nor its version.
            Handler::Openapi => {
                self.authorize(&req)?;
                Ok(json(StatusCode::OK, Bytes::from_static(OPENAPI.as_bytes())))
            }
            Handler::Proxy => {
                self.require_loaded()?;
                self.proxy_resource(req, endpoint.methods).await
            }
            Handler::Revoke => {
                self.authorize(&req)?;
                let path = req.uri().path().to_owned();
                self.revoke(&path).await
            }
            Handler::LogLevel => {
                self.authorize(&req)?;
                self.log_level(req, endpoint.methods).await
            }
            Handler::Handshake => {
                self.authorize(&req)?;
                self.handshake().await
            }
            Handler::Routes => self.routes(req, endpoint.methods).await,
        }
    }

    /// `/api/routes` and `/api/routes/<path>`, as configurable-http-proxy answers them.
    async fn routes(
        &self,
        req: Request<Incoming>,
        methods: &'static [&'static str],
    ) -> Result<Response<ProxyBody>, ApiError> {
        let rest = match req.uri().path().strip_prefix(ROUTES) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.to_owned(),
            _ => return Err(ApiError::NotFound),
        };
        self.require_loaded()?;
        match *req.method() {
            Method::GET => {
                self.authorize(&req)?;
                if rest.is_empty() || rest == "/" {
                    self.list(req.uri().query())
                } else {
                    self.get_one(&rest)
                }
            }
            Method::POST => {
                // CHP reads and parses the body before it checks the token, so bad JSON is a 400
                // even with a bad token. JupyterHub never depends on it; we keep the order.
                let authorized = self.authorize(&req);
                let data = self
                    .read_json(req.into_body(), self.settings.max_body)
                    .await?;
                authorized?;
                self.post(&rest, data).await
            }
            Method::DELETE => {
                self.authorize(&req)?;
                self.delete(&rest).await
            }
            _ => Err(ApiError::Method(methods)),
        }
    }

    /// The table must hold what the store has before the API reads or changes it: an empty
    /// table read while a shared store is unreachable at start would tell the hub that every
    /// route is gone.
    fn require_loaded(&self) -> Result<(), ApiError> {
        self.control.require_loaded().map_err(ApiError::Unavailable)
    }

    /// `DELETE /api/auth/cache` drops every cached credential and voids every session;
    /// `DELETE /api/auth/cache/users/<name>` does that for one user. For revocations that must
    /// take effect at once. Applied here first, then sent to the other replicas through a
    /// shared store; 503 when that fails (this replica has revoked, the others may not have).
    async fn revoke(&self, path: &str) -> Result<Response<ProxyBody>, ApiError> {
        let auth = self.auth.as_ref().ok_or(ApiError::NoAuth)?;
        let user = match path.strip_prefix("/api/auth/cache") {
            Some("") => None,
            Some(rest) => {
                let user = rest.strip_prefix("/users/").ok_or(ApiError::NotFound)?;
                let user = path::decode(user)?;
                if user.is_empty() || user.contains('/') {
                    return Err(ApiError::NotFound);
                }
                Some(user.into_owned())
            }
            None => return Err(ApiError::NotFound),
        };
        let revocation = crate::store::Revocation {
            user,
            at_ms: crate::routes::now_ms(),
        };
        auth.apply_revocation(&revocation);
        self.control
            .publish_revocation(revocation)
            .await
            .map_err(|e| {
                ApiError::Unavailable(ControlError::Store(format!(
                    "revoked on this replica, but not sent to the others: {e}"
                )))
            })?;
        Ok(empty(StatusCode::NO_CONTENT))
    }

    /// `GET /api/log-level` says the current level filter; `PUT` with `{"level": "debug"}` (or a
    /// full `tracing` filter) changes it until the next restart.
    async fn log_level(
        &self,
        req: Request<Incoming>,
        methods: &'static [&'static str],
    ) -> Result<Response<ProxyBody>, ApiError> {
        let level = match *req.method() {
            Method::GET => crate::logging::level().unwrap_or_default(),
            Method::PUT => {
                let body = self.read_json(req.into_body(), 4096).await?;
                let wanted = body.get("level").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::Invalid("Body must be {\"level\": \"<level>\"}".into())
                })?;
                crate::logging::set_level(wanted).map_err(ApiError::Invalid)?
            }
            _ => return Err(ApiError::Method(methods)),
        };
        Ok(json(
            StatusCode::OK,
            serde_json::json!({ "level": level }).to_string(),
        ))
    }

    /// `POST /api/handshake`: ask the hub to sync its routes into hubgate now.
    async fn handshake(&self) -> Result<Response<ProxyBody>, ApiError> {
        let hub = self.hub.as_ref().ok_or(ApiError::NoHub)?;
        hub.handshake_once()
            .await
            .map_err(|e| ApiError::Hub(e.to_string()))?;
        Ok(json(
            StatusCode::OK,
            r#"{"status":"ok","message":"the hub synced its routes"}"#,
        ))
    }

    /// `Authorization: token <t>`, the whole header, compared in constant time. CHP's pattern
    /// is unanchored (`xtoken <t>` passes); this one is not.
    fn authorize<B>(&self, req: &Request<B>) -> Result<(), ApiError> {
        let Some(expected) = &self.settings.token else {
            return Ok(());
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(char::is_whitespace)?;
                let token = token.trim_start();
                (scheme.eq_ignore_ascii_case("token")
                    && !token.is_empty()
                    && !token.contains(char::is_whitespace))
                .then_some(token)
            });
        match given {
            Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
            _ => Err(ApiError::Forbidden),
        }
    }

    async fn read_json(&self, body: Incoming, limit: usize) -> Result<Value, ApiError> {
        let bytes = self.read_body(body, limit).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadJson(e.to_string()))
    }

    /// The whole body, refused past `limit` bytes.
    async fn read_body(&self, body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
        let bytes = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ApiError::TooLarge(limit)
                } else {
                    ApiError::Body(e.to_string())
                }
            })?
            .to_bytes();
        Ok(bytes)
    }

    fn list(&self, query: Option<&str>) -> Result<Response<ProxyBody>, ApiError> {
        // Both parameters are checked even when `since` makes the filter moot.
        let since = changes_since(query)?;
        let idle = inactive_since(query)?;
        let snapshot = self.table.snapshot();
        let body = match since {
            Some(since) => {
                let changes = snapshot.changes_since(since).ok_or(ApiError::Gone {
                    since,
                    floor: snapshot.history_floor(),
                })?;
                serialize_routes(changes.put.iter(), &changes.removed)
            }
            None => {
                let sorted = snapshot.sorted();
                let routes = sorted
                    .iter()
                    .filter(|r| idle.is_none_or(|since| r.last_activity_ms() < since));
                serialize_routes(routes, &[])
            }
        };
        Ok(with_version(json(StatusCode::OK, body), snapshot.version()))
    }

    fn get_one(&self, raw: &str) -> Result<Response<ProxyBody>, ApiError> {
        let key = path::route_key(raw)?;
        match self.table.load().get(&key) {
            Some(route) => {
                let body = serde_json::to_vec(&RouteView(route)).unwrap_or_default();
                Ok(json(StatusCode::OK, body))
            }
            None => Ok(empty(StatusCode::NOT_FOUND)),
        }
    }

    async fn post(&self, raw: &str, data: Value) -> Result<Response<ProxyBody>, ApiError> {
        let route = build_route(raw, data, self.settings.host_routing)?;
        tracing::info!(route = %route.key(), target = ?route.target(), "adding route");
        self.control
            .apply(Op::Batch(vec![Change::Upsert(Arc::new(route))]))
            .await?;
        Ok(empty(StatusCode::CREATED))
    }

    async fn delete(&self, raw: &str) -> Result<Response<ProxyBody>, ApiError> {
        let key: Arc<str> = path::route_key(raw)?.into();
        let applied = self
            .control
            .apply(Op::Batch(vec![Change::Remove(key.clone())]))
            .await?;
        if applied.outcomes.first() == Some(&Outcome::Removed) {
            tracing::info!(route = %key, "removed route");
            Ok(empty(StatusCode::NO_CONTENT))
        } else {
            Ok(empty(StatusCode::NOT_FOUND))
        }
    }
}

/// Checks a posted route (key, JSON object, string target that is a reachable URL) and builds
/// it. Shared by `/api/routes` and `/api/proxy`.
fn build_route(raw_key: &str, data: Value, host_routing: bool) -> Result<Route, ApiError> {
    let key = path::route_key(raw_key)?;
    // Requests have their dot segments resolved before routing, in every encoding: a route
    // whose whole path is one could never be reached (deeper ones can, with `%2F` between).
    if key == "/." || key == "/.." {
        return Err(ApiError::Invalid(format!(
            "Route path '{key}' is a dot segment, which no request can reach"
        )));
    }
    let Value::Object(mut data) = data else {
        return Err(ApiError::NoTarget);
    };
    let target = match data.get("target") {
        Some(Value::String(t)) => Target::parse(t)?,
        _ => return Err(ApiError::NoTarget),
    };
    check_protection(&data)?;
    data.remove("last_activity");
    if host_routing && key != "/" {
        let host = key[1..].split('/').next().unwrap_or_default().to_owned();
        data.insert("host".to_owned(), Value::String(host));
    }
    Ok(Route::new(key.into(), target, data, host_routing))
}

/// The members authentication reads must mean what they say: a `user` that is not a string, or
/// an `auth` of another value, would otherwise be read as absent and leave the route open.
fn check_protection(data: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    for field in ["user", "server_name", "service"] {
        if data.get(field).is_some_and(|v| !v.is_string()) {
            return Err(ApiError::Invalid(format!("'{field}' must be a string")));
        }
    }
    match data.get("auth").map(Value::as_str) {
        None | Some(Some("required" | "none")) => Ok(()),
        Some(_) => Err(ApiError::Invalid(
            "'auth' must be \"required\" or \"none\"".into(),
        )),
    }
}

/// A bounded label naming what an API request does.
fn operation(method: &Method, path: &str) -> &'static str {
    let single = path
        .strip_prefix(ROUTES)
        .is_some_and(|rest| !rest.is_empty() && rest != "/");
    match (method.as_str(), path) {
        (_, "/health/live" | "/health/ready") => "health",
        (_, "/metrics") => "metrics",
        (_, "/api/status") => "status",
        (_, "/api/openapi.json") => "openapi",
        ("GET", "/api/proxy") => "proxy_get",
        ("POST", "/api/proxy") => "sync",
        ("PATCH", "/api/proxy") => "batch",
        (_, "/api/handshake") => "handshake",
        (_, "/api/log-level") => "log_level",
        (_, p) if p.starts_with("/api/auth/cache") => "revoke",
        ("GET", p) if p.starts_with(ROUTES) && !single => "routes_list",
        ("GET", p) if p.starts_with(ROUTES) => "route_get",
        ("POST", p) if p.starts_with(ROUTES) => "route_add",
        ("DELETE", p) if p.starts_with(ROUTES) => "route_delete",
        _ => "other",
    }
}

/// The decoded value of a query parameter (the last one, if repeated).
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').rev().find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            let v = v.replace('+', " ");
            path::decode(&v).map(|c| c.into_owned()).unwrap_or(v)
        })
    })
}

/// A non-negative integer query parameter.
fn int_param(query: Option<&str>, name: &'static str) -> Result<Option<u64>, ApiError> {
    query_param(query, name)
        .map(|v| v.parse::<u64>().map_err(|_| ApiError::BadParam(name)))
        .transpose()
}

/// `?since=<version>`: ask for changes after a table version instead of the whole table.
fn changes_since(query: Option<&str>) -> Result<Option<u64>, ApiError> {
    int_param(query, "since")
}

/// `?inactive_since=` (or CHP's `?inactiveSince=`, which wins), as milliseconds since the epoch.
fn inactive_since(query: Option<&str>) -> Result<Option<i64>, ApiError> {
    let value =
        query_param(query, "inactiveSince").or_else(|| query_param(query, "inactive_since"));
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => parse_date(&v).map(Some).ok_or(ApiError::BadDate(v)),
    }
}

fn with_version(mut resp: Response<ProxyBody>, version: u64) -> Response<ProxyBody> {
    resp.headers_mut()
        .insert(VERSION_HEADER, http::HeaderValue::from(version));
    resp
}

/// The date forms JupyterHub and people send: RFC 3339 with any offset, a naive date-time
/// (taken as UTC, as Python's `isoformat()` of a UTC time reads), a bare date, and RFC 2822.
pub fn parse_date(s: &str) -> Option<i64> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    let s = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Some(d.timestamp_millis());
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(d) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(d.and_utc().timestamp_millis());
        }
    }
    if let Ok(d) = DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%:z") {
        return Some(d.timestamp_millis());
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d
            .and_hms_opt(0, 0, 0)
            .map(|d| d.and_utc().timestamp_millis());
    }
    DateTime::parse_from_rfc2822(s)
        .ok()
        .map(|d| d.timestamp_millis())
}

/// A route as JSON without copying its data: the posted keys, then `last_activity`.
struct RouteView<'a>(&'a Route);

impl serde::Serialize for RouteView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let data: &RouteData = self.0.data();
        let mut map = s.serialize_map(Some(data.len() + 1))?;
        for (k, v) in data {
            map.serialize_entry(k, v)?;
        }
        map.serialize_entry(
            "last_activity",
            &format_timestamp(self.0.last_activity_ms()),
        )?;
        map.end()
    }
}

/// Routes as one JSON object `{key: route}` in the order given (callers pass them sorted, so
/// two listings of one table are byte-identical), plus `{key: null}` for each removed key.
pub fn serialize_routes<'a>(
    routes: impl Iterator<Item = &'a Arc<Route>>,
    removed: &[Arc<str>],
) -> Bytes {
    let mut out = Vec::with_capacity(4096);
    let mut ser = serde_json::Serializer::new(&mut out);
    let result = (|| {
        let mut map = ser.serialize_map(None)?;
        for route in routes {
            map.serialize_entry(route.key(), &RouteView(route))?;
        }
        for key in removed {
            map.serialize_entry(&**key, &Value::Null)?;
        }
        map.end()
    })();
    if let Err(e) = result {
        tracing::error!(error = %e, "could not serialise the route table");
    }
    Bytes::from(out)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_the_forms_clients_send() {
        let want = 1_763_836_200_123;
        for s in [
            "2025-11-22T18:30:00.123Z",
            "2025-11-22T18:30:00.123+00:00",
            "2025-11-22T19:30:00.123+01:00",
            "2025-11-22T18:30:00.123",
            "2025-11-22 18:30:00.123",
        ] {
            assert_eq!(parse_date(s), Some(want), "{s}");
        }
        assert_eq!(parse_date("2025-11-22"), Some(1_763_769_600_000));
        assert_eq!(
            parse_date("Sat, 22 Nov 2025 18:30:00 +0000"),
            Some(want - 123)
        );
        assert_eq!(parse_date("yesterday"), None);
        assert_eq!(parse_date(""), None);
    }

    #[test]
    fn inactive_since_prefers_the_camel_case_name() {
        let q = Some("inactive_since=2025-11-22&inactiveSince=2025-11-23");
        assert_eq!(inactive_since(q).unwrap(), parse_date("2025-11-23"));
        assert!(matches!(
            inactive_since(Some("inactive_since=nope")),
            Err(ApiError::BadDate(_))
        ));
        assert_eq!(inactive_since(Some("other=1")).unwrap(), None);
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
