//! hubgate: an authenticating reverse proxy for JupyterHub, and a drop-in replacement for
//! configurable-http-proxy (same flags, same `/api/routes`, same `CONFIGPROXY_AUTH_TOKEN`).
//!
//! Where things live:
//! - [`config`]: the command line (CHP's flags), the TOML file and the environment, validated.
//! - [`path`]: request paths and route keys: decoding, dot segments, the canonical key form.
//! - [`target`]: target URLs (`http`, `https`, `http+unix`), parsed when a route is added.
//! - [`routes`]: the route table: lock-free snapshots, longest-prefix lookup, `last_activity`.
//! - [`api`]: the control plane, `/api/routes` as CHP answers it.
//! - [`proxy`]: the data plane: forwarding, websockets, error pages.
//! - [`upstream`]: the pooled client and connector to targets, and failure causes.
//! - [`server`]: listeners, connections, idle timeouts and draining.
//!
//! The data plane and the control plane meet only at [`routes::RouteTable`].

pub mod api;
pub mod config;
pub mod path;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod target;
pub mod upstream;

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

use crate::config::Config;
use crate::routes::{Change, Route, RouteData, RouteTable};
use crate::server::{ConnSettings, Listener};

/// How a run ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every in-flight request finished after the shutdown signal.
    Drained,
    /// The grace period ran out with requests still in flight.
    Cut,
}

/// Runs hubgate until SIGTERM or SIGINT.
///
/// # Errors
/// When a listener cannot be bound or the pid file cannot be written.
pub async fn run(config: Config) -> anyhow::Result<Exit> {
    let table = Arc::new(RouteTable::new());
    if let Some(target) = &config.default_target {
        let mut data = RouteData::new();
        data.insert("target".into(), Value::String(target.as_str().to_owned()));
        let route = Route::new("/".into(), target.clone(), data, config.host_routing);
        table.apply(vec![Change::Upsert(Arc::new(route))]);
    }
    if config.auth_token.is_none() {
        tracing::warn!("REST API is not authenticated: CONFIGPROXY_AUTH_TOKEN is not set");
    }

    // Bind everything before serving anything, so a bad address fails the start as a whole.
    let proxy_listener = Listener::bind(&config.proxy_listen).await?;
    let api_listener = Listener::bind(&config.api_listen).await?;
    for (name, l) in [("proxy", &proxy_listener), ("api", &api_listener)] {
        tracing::info!(listener = %name, addr = %l.describe(), "listening");
    }
    let _pid_file = match &config.pid_file {
        Some(path) => Some(PidFile::write(path)?),
        None => None,
    };

    let client = upstream::client(config.insecure);
    let proxy = Arc::new(proxy::Proxy::new(
        table.clone(),
        client,
        proxy::ForwardOptions::from_config(&config),
    ));
    let api = Arc::new(api::Api::new(
        table.clone(),
        config.auth_token.clone(),
        config.host_routing,
        config.max_route_body,
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let settings = ConnSettings {
        idle_timeout: config.client_idle_timeout,
        keep_alive_timeout: config.keep_alive_timeout,
    };
    let api_settings = ConnSettings {
        idle_timeout: None,
        keep_alive_timeout: config.keep_alive_timeout,
    };
    let grace = config.shutdown_grace;
    let proxy_task = tokio::spawn(server::serve(
        proxy_listener,
        "proxy",
        settings,
        move |req, info| proxy.clone().handle(req, info),
        stop_rx.clone(),
        grace,
    ));
    let api_task = tokio::spawn(server::serve(
        api_listener,
        "api",
        api_settings,
        move |req, _info| api.clone().handle(req),
        stop_rx,
        grace,
    ));

    shutdown_signal().await;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    let _ = stop_tx.send(true);
    let proxy_drained = proxy_task.await.unwrap_or(false);
    let api_drained = api_task.await.unwrap_or(false);
    if proxy_drained && api_drained {
        tracing::info!("all requests finished; exiting");
        Ok(Exit::Drained)
    } else {
        tracing::warn!("grace period over with requests still in flight; exiting");
        Ok(Exit::Cut)
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop hubgate");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("received SIGINT"),
    }
}

/// The pid file, removed when dropped.
struct PidFile(std::path::PathBuf);

impl PidFile {
    fn write(path: &std::path::Path) -> anyhow::Result<Self> {
        std::fs::write(path, std::process::id().to_string())
            .map_err(|e| anyhow::anyhow!("--pid-file: cannot write {}: {e}", path.display()))?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
