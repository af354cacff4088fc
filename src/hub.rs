//! hubgate as a client of the hub's REST API: the handshake that makes a restarted (or moved)
//! proxy get its routes back without an operator.
//!
//! JupyterHub's `/hub/api/proxy` resource (scope `proxy`) answers `POST` by reconciling its routes
//! into the proxy, and `PATCH` by first taking a new proxy API address and token. hubgate calls
//! the first when it starts with a table it cannot vouch for, and the second when configured to
//! announce itself; failures are retried with backoff while the proxy keeps serving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
}

/// The hub's API, as configured.
pub struct Hub {
    /// `--hub-api-url`, e.g. `http://127.0.0.1:8081/hub/api`.
    api: Target,
    token: Option<String>,
    client: UpstreamClient,
    /// The body of `PATCH /proxy` when hubgate announces its own API address.
    announce: Option<Value>,
    /// Whether a handshake has succeeded since start.
    registered: AtomicBool,
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
        }
    }

    /// Whether a handshake has succeeded since start.
    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
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
        let uri = self
            .api
            .uri(&crate::path::join(self.api.path(), path), None)
            .map_err(|e| HubError::Request(e.to_string()))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("token {token}")).map_err(|_| {
                HubError::Request("the hub token is not a valid header value".into())
            })?;
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
            if status.is_success() {
                Ok(body)
            } else {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                Err(HubError::Status { status, body: text })
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| HubError::Timeout(CALL_TIMEOUT))?
    }
}
