//! hubgate: an authenticating reverse proxy for JupyterHub, and a drop-in replacement for
//! configurable-http-proxy (same flags, same `/api/routes`, same `CONFIGPROXY_AUTH_TOKEN`).
//!
//! Where things live:
//! - [`config`]: the command line (CHP's flags), the TOML file and the environment, validated.
//! - [`path`]: request paths and route keys: decoding, dot segments, the canonical key form.
//! - [`target`]: target URLs (`http`, `https`, `http+unix`), parsed when a route is added.
//! - [`routes`]: the route table: lock-free snapshots, longest-prefix lookup, `last_activity`.
//! - [`store`]: route storage behind one interface: memory (CHP's) and the embedded file store.
//! - [`control`]: the control plane's single writer: store first, then the route table.
//! - [`api`]: the REST API: `/api/routes` as CHP answers it, and `/api/proxy` (sync, batches).
//! - [`hub`]: hubgate as a client of the hub's API: handshake, credential checks, OAuth.
//! - [`logging`]: the `tracing` subscriber and the level the API can change at run time.
//! - [`auth`]: authentication and authorization at the edge, with its cache and sessions.
//! - [`proxy`]: the data plane: forwarding, websockets, error pages.
//! - [`upstream`]: the pooled client and connector to targets, and failure causes.
//! - [`tls`]: rustls for the listeners (reloadable certificates) and towards targets.
//! - [`server`]: listeners, connections, idle timeouts and draining.
//! - [`metrics`]: Prometheus metrics (hubgate's and CHP's names), lock-free on the request path.
//! - [`status`]: health and readiness, `/api/status`, and the metrics listener.
//!
//! The data plane and the control plane meet only at [`routes::RouteTable`].

pub mod api;
pub mod auth;
pub mod config;
pub mod control;
pub mod hub;
pub mod logging;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod status;
pub mod store;
pub mod target;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

use crate::config::{Config, Storage};
use crate::control::{Control, Op};
use crate::routes::{Change, Route, RouteData, RouteTable};
use crate::server::{ConnSettings, Listener};
use crate::store::Store;

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
    // hubgate's own TLS names its provider; the Redis client's takes the process default.
    // Another caller (a test) may have installed one already: that one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The table is loaded before any listener exists, so the public port never answers from a
    // half-loaded table.
    let store: Arc<dyn Store> = match &config.storage {
        Storage::Memory => Arc::new(store::MemoryStore),
        Storage::File(dir) => Arc::new(
            store::file::FileStore::open(dir)
                .map_err(|e| anyhow::anyhow!("--storage-path {}: {e}", dir.display()))?,
        ),
        Storage::Redis(settings) => Arc::new(
            store::redis::RedisStore::open(settings)
                .map_err(|e| anyhow::anyhow!("--redis-url: {e}"))?,
        ),
    };
    let table = Arc::new(RouteTable::new());
    let control = if store.retries_load() {
        // A shared store may come up after hubgate: serve (and answer readiness with the
        // reason) while it loads; see `Control::launch`.
        Control::launch(table.clone(), store.clone(), config.host_routing)
    } else {
        Control::start(table.clone(), store.clone(), config.host_routing)
            .await
            .map_err(|e| anyhow::anyhow!("cannot load routes: {e}"))?
            .0
    };
    if let Some(target) = &config.default_target {
        let set_default = set_default_target(
            control.clone(),
            table.clone(),
            target.clone(),
            config.host_routing,
        );
        if table.is_loaded() {
            set_default
                .await
                .map_err(|e| anyhow::anyhow!("--default-target: {e}"))?;
        } else {
            tokio::spawn(async move {
                if let Err(e) = set_default.await {
                    tracing::error!(error = %e, "--default-target could not be set");
                }
            });
        }
    }
    if config.auth_token.is_none() {
        tracing::warn!("REST API is not authenticated: CONFIGPROXY_AUTH_TOKEN is not set");
    }

    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    // TLS files are read before binding, so a bad certificate fails the start as a whole.
    let tls_of = |name: &'static str, files: &Option<tls::ServerFiles>| {
        files
            .clone()
            .map(|f| tls::Reloadable::load(name, f))
            .transpose()
            .map_err(|e| anyhow::anyhow!("{name} TLS: {e}"))
    };
    let proxy_tls = tls_of("proxy", &config.proxy_tls)?;
    let api_tls = tls_of("api", &config.api_tls)?;
    let tls_listeners: Vec<_> = [proxy_tls.clone(), api_tls.clone()]
        .into_iter()
        .flatten()
        .collect();
    let client_tls = tls::client_config(&config.client_tls, config.insecure)
        .map_err(|e| anyhow::anyhow!("--client-ssl-*: {e}"))?;

    // Bind everything before serving anything, so a bad address fails the start as a whole.
    let proxy_listener = Listener::bind(&config.proxy_listen).await?;
    let api_listener = Listener::bind(&config.api_listen).await?;
    let metrics_listener = match &config.metrics_listen {
        Some(listen) => Some(Listener::bind(listen).await?),
        None => None,
    };
    let redirect_listener = match config.redirect {
        Some((port, _)) => Some(
            Listener::bind(&config::Listen::Tcp {
                host: match &config.proxy_listen {
                    config::Listen::Tcp { host, .. } => host.clone(),
                    config::Listen::Unix(_) => String::new(),
                },
                port,
            })
            .await?,
        ),
        None => None,
    };
    for (name, l) in [
        ("proxy", Some(&proxy_listener)),
        ("api", Some(&api_listener)),
        ("metrics", metrics_listener.as_ref()),
        ("redirect", redirect_listener.as_ref()),
    ] {
        if let Some(l) = l {
            tracing::info!(listener = %name, addr = %l.describe(), "listening");
        }
    }
    let _pid_file = match &config.pid_file {
        Some(path) => Some(PidFile::write(path)?),
        None => None,
    };

    let client = upstream::client(client_tls);
    let hub = match &config.hub_api_url {
        Some(api) => {
            let announce = if config.notify_hub {
                Some(announcement(&config, &api_listener)?)
            } else {
                None
            };
            Some(Arc::new(hub::Hub::new(
                api.clone(),
                config.hub_api_token.clone(),
                client.clone(),
                announce,
            )))
        }
        None => None,
    };
    if let Some(hub) = &hub {
        tokio::spawn(hub.clone().watch());
        let (hub, store, control) = (hub.clone(), store.clone(), control.clone());
        let notify = config.notify_hub;
        tokio::spawn(async move {
            // The store's answer decides: a table the hub synced before needs no handshake.
            if !control.trusted().await || notify {
                hub.handshake().await;
                // From now on this store's table is the hub's: a restart can vouch for it.
                match store.mark_synced().await {
                    Ok(()) => {
                        tracing::info!(store = store.name(), "store marked as synced by the hub")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not record the hub sync in the store")
                    }
                }
            } else {
                hub.mark_registered();
            }
        });
    }

    let auth = match (&config.auth, &hub) {
        (Some(settings), Some(hub)) => {
            if settings.ephemeral_secret {
                tracing::warn!("no --session-secrets: sessions end when hubgate restarts and are not shared with other replicas");
            }
            if hub.token().is_none() {
                tracing::warn!(
                    "JUPYTERHUB_API_TOKEN is not set: hub cookies, groups and OAuth will not work"
                );
            }
            tracing::info!(
                oauth = settings.oauth.is_some(),
                "authentication at the edge is on"
            );
            Some(Arc::new(auth::Auth::new(hub.clone(), settings.clone())))
        }
        _ => None,
    };
    let (close_tunnels, closing) = watch::channel(false);
    let proxy = Arc::new(proxy::Proxy::new(
        table.clone(),
        client,
        proxy::ForwardOptions::from_config(&config),
        auth.clone(),
        closing,
    ));
    if let Some(auth) = &auth {
        tokio::spawn(follow_revocations(control.revocations(), auth.clone()));
    }
    let status = Arc::new(status::Status::new(
        table.clone(),
        control.clone(),
        hub.clone(),
        auth.clone(),
        config.auth_token.is_none(),
        config.auth.as_ref().is_some_and(|a| a.ephemeral_secret),
        tls_listeners.clone(),
    ));
    let api = Arc::new(api::Api::new(
        table.clone(),
        control,
        hub,
        auth,
        status.clone(),
        api::ApiSettings {
            token: config.auth_token.clone(),
            host_routing: config.host_routing,
            max_body: config.max_route_body,
            max_sync_body: config.max_sync_body,
        },
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let settings = ConnSettings {
        idle_timeout: config.client_idle_timeout,
        keep_alive_timeout: config.keep_alive_timeout,
        max_header_size: config.max_header_size,
        max_connections: config.max_connections,
        tls: proxy_tls.clone(),
    };
    let api_settings = ConnSettings {
        idle_timeout: None,
        keep_alive_timeout: config.keep_alive_timeout,
        max_header_size: config.max_header_size,
        max_connections: config.max_connections,
        tls: api_tls.clone(),
    };
    let plain_settings = ConnSettings {
        tls: None,
        ..api_settings.clone()
    };
    tokio::spawn(tls::watch(tls_listeners));
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
        api_settings.clone(),
        move |req, _info| api.clone().handle(req),
        stop_rx.clone(),
        grace,
    ));

    let redirect_task = redirect_listener
        .zip(config.redirect)
        .map(|(listener, (_, to))| {
            tokio::spawn(server::serve(
                listener,
                "redirect",
                plain_settings.clone(),
                move |req, _info| async move { Ok(server::redirect_to_https(&req, to)) },
                stop_rx.clone(),
                grace,
            ))
        });
    let metrics_task = metrics_listener.map(|listener| {
        tokio::spawn(server::serve(
            listener,
            "metrics",
            plain_settings,
            move |req, _info| status.clone().handle_metrics_port(req),
            stop_rx.clone(),
            grace,
        ))
    });

    shutdown_signal().await;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    let _ = stop_tx.send(true);
    let proxy_drained = proxy_task.await.unwrap_or(false);
    let api_drained = api_task.await.unwrap_or(false);
    for task in [metrics_task, redirect_task].into_iter().flatten() {
        let _ = task.await;
    }
    // HTTP requests are done (or cut); now close the websockets, both sides.
    let _ = close_tunnels.send(true);
    let open = || metrics::get().active_websockets.get();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if proxy_drained && api_drained {
        tracing::info!("all requests finished; exiting");
        Ok(Exit::Drained)
    } else {
        tracing::warn!("grace period over with requests still in flight; exiting");
        Ok(Exit::Cut)
    }
}

/// Applies the revocations other replicas sent through a shared store.
async fn follow_revocations(
    mut revocations: tokio::sync::broadcast::Receiver<store::Revocation>,
    auth: Arc<auth::Auth>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match revocations.recv().await {
            Ok(revocation) => auth.apply_revocation(&revocation),
            // Some were missed: fail closed and void everything issued until now.
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "revocations came faster than they were applied; voiding every cached credential");
                auth.clear();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Routes `/` to `--default-target` unless it already goes there (a restarted replica finds it
/// in its store).
async fn set_default_target(
    control: Control,
    table: Arc<RouteTable>,
    target: target::Target,
    host_routing: bool,
) -> Result<(), control::ControlError> {
    control.trusted().await;
    let current = table
        .load()
        .get("/")
        .map(|r| r.target().as_str().to_owned());
    if current.as_deref() == Some(target.as_str()) {
        return Ok(());
    }
    let mut data = RouteData::new();
    data.insert("target".into(), Value::String(target.as_str().to_owned()));
    let route = Route::new("/".into(), target, data, host_routing);
    control
        .apply(Op::Batch(vec![Change::Upsert(Arc::new(route))]))
        .await
        .map(drop)
}

/// The body of `PATCH /hub/api/proxy`: JupyterHub reads `api_url` and `auth_token`; its API
/// documents `ip`, `port` and `protocol` as well.
fn announcement(config: &Config, api: &Listener) -> anyhow::Result<Value> {
    let addr = match api {
        Listener::Tcp(l) => Some(l.local_addr()?),
        Listener::Unix(..) => None,
    };
    let api_url = match (&config.api_url, addr) {
        (Some(url), _) => url.clone(),
        (None, Some(addr)) => format!("http://{addr}"),
        (None, None) => {
            anyhow::bail!("--notify-hub: set --api-url when the API is on a Unix socket")
        }
    };
    Ok(serde_json::json!({
        "api_url": api_url,
        "auth_token": config.auth_token,
        "ip": addr.map(|a| a.ip().to_string()),
        "port": addr.map(|a| a.port()),
        "protocol": "http",
    }))
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
