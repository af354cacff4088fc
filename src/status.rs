//! What operators and orchestrators ask about hubgate itself: liveness, readiness, the
//! `/api/status` report, and the metrics listener (`--metrics-ip`/`--metrics-port`, as CHP).
//!
//! A [`Status`] exists only once the route table is loaded and every listener is bound, so those
//! two readiness conditions hold by construction; the third, when authentication is on, is that
//! the hub answered recently.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::auth::Auth;
use crate::control::Control;
use crate::http::json;
use crate::http::ProxyBody;
use crate::hub::Hub;
use crate::metrics;
use crate::routes::{format_timestamp, now_ms, RouteTable};

/// How recently the hub must have answered for hubgate (with authentication on) to be ready.
const HUB_FRESH: Duration = Duration::from_secs(30);
/// How long a store failure or target failures keep showing in the status report.
const STORE_FAILURE_WINDOW_MS: i64 = 5 * 60 * 1000;
const TARGET_FAILURE_WINDOW_MS: i64 = 60 * 1000;
/// A certificate expiring within this is reported.
const CERT_WARNING_MS: i64 = 14 * 24 * 3600 * 1000;

/// hubgate's view of its own health.
pub struct Status {
    started: Instant,
    table: Arc<RouteTable>,
    control: Control,
    hub: Option<Arc<Hub>>,
    auth: Option<Arc<Auth>>,
    api_open: bool,
    ephemeral_secret: bool,
    /// The TLS listeners, for certificate expiry.
    tls: Vec<Arc<crate::tls::Reloadable>>,
}

impl Status {
    pub fn new(
        table: Arc<RouteTable>,
        control: Control,
        hub: Option<Arc<Hub>>,
        auth: Option<Arc<Auth>>,
        api_open: bool,
        ephemeral_secret: bool,
        tls: Vec<Arc<crate::tls::Reloadable>>,
    ) -> Self {
        Status {
            started: Instant::now(),
            table,
            control,
            hub,
            auth,
            api_open,
            ephemeral_secret,
            tls,
        }
    }

    /// `GET /health/live`: the process answers.
    pub fn live(&self) -> Response<ProxyBody> {
        json(StatusCode::OK, r#"{"status":"live"}"#)
    }

    /// `GET /health/ready`: 200 when hubgate can serve correctly, else 503 with the reasons.
    pub fn ready(&self) -> Response<ProxyBody> {
        let mut reasons = Vec::new();
        let store = self.control.store_health();
        if !self.table.is_loaded() {
            reasons.push(format!(
                "the route table is not loaded yet from the {} route store ({})",
                self.control.store_name(),
                store.detail.as_deref().unwrap_or("loading")
            ));
        } else if !store.reachable {
            reasons.push(format!(
                "the {} route store is unreachable ({}): routes are served from memory but cannot change",
                self.control.store_name(),
                store.detail.as_deref().unwrap_or("no detail")
            ));
        }
        if let (Some(hub), Some(_)) = (&self.hub, &self.auth) {
            if !hub.answered_within(HUB_FRESH) {
                reasons.push(format!(
                    "authentication is on and the hub has not answered in the last {} s ({})",
                    HUB_FRESH.as_secs(),
                    hub.last_failure().unwrap_or_else(|| "not asked yet".into())
                ));
            }
        }
        if reasons.is_empty() {
            json(StatusCode::OK, r#"{"status":"ready"}"#)
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not ready", "reasons": reasons}).to_string(),
            )
        }
    }

    /// `GET /api/status`: a workspace-proxy style health report.
    pub fn report(&self) -> Response<ProxyBody> {
        let now = now_ms();
        let m = metrics::get();
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let store = self.control.store_health();
        if !store.reachable {
            errors.push(format!(
                "the {} route store is unreachable: {}",
                self.control.store_name(),
                store.detail.as_deref().unwrap_or("no detail")
            ));
        }
        let store_failure = m.last_store_failure_ms.load(Ordering::Relaxed);
        if store_failure > 0 && now - store_failure < STORE_FAILURE_WINDOW_MS {
            errors.push(format!(
                "the route store refused a write at {}",
                format_timestamp(store_failure)
            ));
        }
        let target_failure = m.last_upstream_failure_ms.load(Ordering::Relaxed);
        if target_failure > 0 && now - target_failure < TARGET_FAILURE_WINDOW_MS {
            warnings.push(format!(
                "targets failed to answer, most recently at {}",
                format_timestamp(target_failure)
            ));
        }
        if self.api_open {
            warnings.push("CONFIGPROXY_AUTH_TOKEN is not set: the API is open".to_owned());
        }
        for tls in &self.tls {
            match tls.not_after() {
                Some(t) if t * 1000 - now < CERT_WARNING_MS => warnings.push(format!(
                    "the {} listener's certificate expires at {}",
                    tls.name(),
                    format_timestamp(t * 1000)
                )),
                Some(_) => {}
                None => warnings.push(format!(
                    "the {} listener's certificate expiry cannot be read",
                    tls.name()
                )),
            }
        }
        if self.ephemeral_secret {
            warnings.push(
                "no session secrets configured: sessions end at restart and are not shared"
                    .to_owned(),
            );
        }
        let status = match &self.hub {
            Some(hub) if !hub.answered_within(HUB_FRESH) => {
                errors.push(format!(
                    "the hub is unreachable ({})",
                    hub.last_failure().unwrap_or_else(|| "not asked yet".into())
                ));
                "unreachable"
            }
            Some(hub) if !hub.registered() => "unregistered",
            _ if !errors.is_empty() => "unhealthy",
            _ => "ok",
        };
        let snapshot = self.table.load();
        let body = json!({
            "status": status,
            "checked_at": format_timestamp(now),
            "report": {"errors": errors, "warnings": warnings},
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "routes": snapshot.len(),
            "table_version": snapshot.version(),
            "store": {
                "backend": self.control.store_name(),
                "reachable": store.reachable,
                "loaded": self.table.is_loaded(),
            },
            "auth": self.auth.as_ref().map(|a| a.cache_stats()),
        });
        json(StatusCode::OK, body.to_string())
    }

    /// `GET /metrics`: refreshes the gauges that are read rather than counted, then renders.
    pub fn metrics(&self) -> Response<ProxyBody> {
        let m = metrics::get();
        let snapshot = self.table.load();
        m.routes.set(snapshot.len() as i64);
        m.table_version.set(snapshot.version() as i64);
        m.store_reachable
            .set(i64::from(self.control.store_health().reachable));
        if let Some(auth) = &self.auth {
            m.auth_cache_entries.set(auth.cache_len() as i64);
        }
        for tls in &self.tls {
            if let Some(t) = tls.not_after() {
                m.certificate_expiry.with_label_values(&[tls.name()]).set(t);
            }
        }
        let mut resp = Response::new(crate::http::full_body(m.render()));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }

    /// The metrics listener: `/metrics`, `/health/live`, `/health/ready`; 404 for anything else.
    pub async fn handle_metrics_port<B>(
        self: Arc<Self>,
        req: Request<B>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = json(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"status":405,"message":"Method not supported"}"#,
            );
            resp.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static("GET, HEAD"),
            );
            return Ok(resp);
        }
        Ok(match req.uri().path() {
            "/metrics" => self.metrics(),
            "/health/live" => self.live(),
            "/health/ready" => self.ready(),
            _ => json(
                StatusCode::NOT_FOUND,
                r#"{"status":404,"message":"Not Found"}"#,
            ),
        })
    }
}
