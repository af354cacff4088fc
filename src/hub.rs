//! hubgate as a client of the hub's REST API: the handshake that makes a restarted (or moved)
//! proxy get its routes back without an operator.
//!
//! JupyterHub's `/hub/api/proxy` resource (scope `proxy`) answers `POST` by reconciling its routes
//! into the proxy, and `PATCH` by first taking a new proxy API address and token. hubgate calls
//! the first when it starts with a table it cannot vouch for, and the second when configured to
//! announce itself; failures are retried with backoff while the proxy keeps serving.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::target::Target;
use crate::upstream::{FailureCause, UpstreamClient};

/// How long one call to the hub may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Backoff between failed handshakes: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the hub is probed for readiness.
const PROBE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("hub unreachable ({})", .0.as_str())]
    Unreachable(FailureCause),
    #[error("hub answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("hub did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot build the hub request: {0}")]
    Request(String),
    #[error("hub answered with a body hubgate cannot read: {0}")]
    Malformed(String),
}

/// The hub's API, as configured.
pub struct Hub {
    /// `--hub-api-url`, e.g. `http://127.0.0.1:8081/hub/api`.
    api: Target,
    token: Option<String>,
    client: UpstreamClient,
    /// The body of `PATCH /proxy` when hubgate announces its own API address.
    announce: Option<Value>,
    /// Whether a handshake has succeeded (or was not needed) since start.
    registered: AtomicBool,
    /// When the hub last answered with anything but a 5xx (ms since the epoch; 0: never).
    last_ok_ms: AtomicI64,
    last_failure: Mutex<Option<String>>,
}

impl Hub {
    pub fn new(
        api: Target,
        token: Option<String>,
        client: UpstreamClient,
        announce: Option<Value>,
    ) -> Self {
        Hub {
            api,
            token,
            client,
            announce,
            registered: AtomicBool::new(false),
            last_ok_ms: AtomicI64::new(0),
            last_failure: Mutex::new(None),
        }
    }

    /// hubgate's own token for the hub (JUPYTERHUB_API_TOKEN).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Whether a handshake has succeeded (or was not needed) since start.
    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    /// Records that the table needs no handshake (the store vouched for it).
    pub fn mark_registered(&self) {
        self.registered.store(true, Ordering::Relaxed);
    }

    /// One handshake: `PATCH /proxy` with hubgate's address when announcing (the hub then
    /// reconciles), else `POST /proxy` (reconcile now).
    ///
    /// # Errors
    /// [`HubError`] when the hub cannot be reached or refuses.
    pub async fn handshake_once(&self) -> Result<(), HubError> {
        match &self.announce {
            Some(body) => self.call(Method::PATCH, "proxy", Some(body)).await?,
            None => self.call(Method::POST, "proxy", None).await?,
        };
        self.registered.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Keeps trying [`Hub::handshake_once`] with backoff until it succeeds.
    pub async fn handshake(self: Arc<Self>) {
        let mut wait = BACKOFF_FIRST;
        let mut attempt = 1u32;
        loop {
            match self.handshake_once().await {
                Ok(()) => {
                    tracing::info!(attempt, "hub handshake done: the hub synced its routes");
                    return;
                }
                Err(e) if attempt <= 3 => {
                    // When the hub starts hubgate, the first attempts race the hub's own start:
                    // not worth a warning yet.
                    tracing::info!(attempt, error = %e, retry_in_ms = wait.as_millis() as u64, "hub handshake not done yet");
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, retry_in_ms = wait.as_millis() as u64, "hub handshake failed");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(BACKOFF_MAX);
            attempt += 1;
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Bytes, HubError> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, body) = self
            .request(
                method,
                path,
                self.token.as_deref(),
                Bytes::from(body),
                "application/json",
            )
            .await?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(HubError::Status {
                status,
                body: snippet(&body),
            })
        }
    }

    /// Who holds this token: `GET /user` authenticated by the token itself. `Ok(None)` when the
    /// hub does not accept the token.
    ///
    /// # Errors
    /// [`HubError`] when the hub cannot be asked (down, 5xx, timeout).
    pub async fn user_for_token(&self, token: &str) -> Result<Option<HubUser>, HubError> {
        self.get_user("user", Some(token)).await
    }

    /// The pre-2.0 way to ask about a token: `GET /authorizations/token/<t>` with hubgate's own
    /// token, for old hubs.
    ///
    /// # Errors
    /// As [`Hub::user_for_token`].
    pub async fn user_for_token_legacy(&self, token: &str) -> Result<Option<HubUser>, HubError> {
        let path = format!("authorizations/token/{}", encode_segment(token));
        self.get_user(&path, self.token.as_deref()).await
    }

    /// Who is logged in with the hub's own login cookie: `GET /authorizations/cookie/<name>/<v>`.
    ///
    /// # Errors
    /// As [`Hub::user_for_token`].
    pub async fn user_for_cookie(
        &self,
        name: &str,
        value: &str,
    ) -> Result<Option<HubUser>, HubError> {
        let path = format!(
            "authorizations/cookie/{}/{}",
            encode_segment(name),
            encode_segment(value)
        );
        self.get_user(&path, self.token.as_deref()).await
    }

    /// The groups a user is in: `GET /users/<name>` with hubgate's token (`read:users:groups`).
    /// `Ok(None)` when the hub has no such user or does not let hubgate see it.
    ///
    /// # Errors
    /// As [`Hub::user_for_token`].
    pub async fn groups_of(&self, user: &str) -> Result<Option<Vec<String>>, HubError> {
        let path = format!("users/{}", encode_segment(user));
        Ok(self
            .get_user(&path, self.token.as_deref())
            .await?
            .map(|u| u.groups))
    }

    /// `GET <path>` answered with a user model (200), or not accepted (401/403/404).
    async fn get_user(&self, path: &str, token: Option<&str>) -> Result<Option<HubUser>, HubError> {
        let (status, body) = self
            .request(Method::GET, path, token, Bytes::new(), "application/json")
            .await?;
        user_answer(status, &body)
    }

    /// Trades an OAuth code for an access token at `/oauth2/token`.
    /// `Ok(None)` when the hub refuses the code.
    ///
    /// # Errors
    /// As [`Hub::user_for_token`].
    pub async fn exchange_code(&self, form: String) -> Result<Option<String>, HubError> {
        let (status, body) = self
            .request(
                Method::POST,
                "oauth2/token",
                None,
                Bytes::from(form),
                "application/x-www-form-urlencoded",
            )
            .await?;
        if status.is_server_error() {
            return Err(HubError::Status {
                status,
                body: snippet(&body),
            });
        }
        if !status.is_success() {
            tracing::warn!(status = status.as_u16(), body = %snippet(&body), "hub refused an OAuth code");
            return Ok(None);
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            access_token: String,
        }
        serde_json::from_slice::<TokenAnswer>(&body)
            .map(|t| Some(t.access_token))
            .map_err(|e| HubError::Malformed(e.to_string()))
    }

    /// The URL path under which the hub's API lives (`/hub/api`), for browser redirects.
    pub fn api_path(&self) -> &str {
        self.api.path()
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Bytes,
        content_type: &'static str,
    ) -> Result<(StatusCode, Bytes), HubError> {
        let uri = self
            .api
            .uri(&crate::path::join(self.api.path(), path), None)
            .map_err(|e| HubError::Request(e.to_string()))?;
        let mut req = Request::new(Full::new(body).map_err(|n| match n {}).boxed());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(token) = token {
            let value = HeaderValue::from_str(&format!("token {token}"))
                .map_err(|_| HubError::Request("a token is not a valid header value".into()))?;
            headers.insert(header::AUTHORIZATION, value);
        }
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HubError::Unreachable(FailureCause::of(&e)))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| HubError::Unreachable(FailureCause::of(&e)))?
                .to_bytes();
            Ok((status, body))
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| HubError::Timeout(CALL_TIMEOUT))
            .and_then(|r| r);
        let endpoint = endpoint_label(path);
        match &result {
            Ok((status, _)) => {
                crate::metrics::hub_call(endpoint, status.as_str(), started.elapsed());
                if status.is_server_error() {
                    self.failed(&format!("answered {status}"));
                } else {
                    self.last_ok_ms
                        .store(crate::routes::now_ms(), Ordering::Relaxed);
                }
            }
            Err(e) => {
                crate::metrics::hub_call(endpoint, "error", started.elapsed());
                self.failed(&e.to_string());
            }
        }
        result
    }

    fn failed(&self, why: &str) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_owned());
    }

    /// Asks the hub's API root whether it is there (it answers without a token).
    pub async fn probe(&self) -> bool {
        matches!(
            self.request(Method::GET, "", None, Bytes::new(), "application/json").await,
            Ok((status, _)) if !status.is_server_error()
        )
    }

    /// Probes the hub every few seconds, so readiness and `/api/status` know whether it is there
    /// even when no request needed it lately.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.probe().await {
                tracing::debug!("hub probe failed");
            }
        }
    }

    /// Whether the hub answered (anything but a 5xx) within `window`.
    pub fn answered_within(&self, window: Duration) -> bool {
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        last > 0 && crate::routes::now_ms() - last <= window.as_millis() as i64
    }

    /// The last failure talking to the hub, if any.
    pub fn last_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The metric label for a hub API path: its kind, never its arguments (tokens, names).
fn endpoint_label(path: &str) -> &'static str {
    let mut parts = path.split('/');
    match (parts.next(), parts.next()) {
        (Some("user"), _) => "user",
        (Some("users"), _) => "users",
        (Some("authorizations"), Some("token")) => "authorizations_token",
        (Some("authorizations"), Some("cookie")) => "authorizations_cookie",
        (Some("oauth2"), Some("token")) => "oauth2_token",
        (Some("proxy"), _) => "proxy",
        (Some(""), None) => "root",
        _ => "other",
    }
}

/// A user as the hub describes it (`GET /user` and friends). Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct HubUser {
    pub name: String,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub groups: Vec<String>,
    /// The token's expanded scopes; absent from hubs older than 2.0.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub session_id: Option<String>,
}

/// 200: the user; 401/403/404: not accepted; anything else: the hub failed.
fn user_answer(status: StatusCode, body: &[u8]) -> Result<Option<HubUser>, HubError> {
    match status.as_u16() {
        200 => serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| HubError::Malformed(e.to_string())),
        401 | 403 | 404 => Ok(None),
        _ => Err(HubError::Status {
            status,
            body: snippet(body),
        }),
    }
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

/// Percent-encodes one path segment (every byte but unreserved characters).
fn encode_segment(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}
