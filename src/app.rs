//! The process: start-up as phases (build the parts, bind every listener, serve, drain), each a
//! function with one job. [`crate::run`] calls them in order.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::watch;

use crate::config::{Config, Storage};
use crate::control::{self, Control, Op};
use crate::routes::{Change, Route, RouteData, RouteTable};
use crate::server::{self, Bound, ConnSettings, Intake, Listener, Port};
use crate::store::{self, Store};
use crate::upstream::{Pool, PoolSettings};
use crate::workers::{Plan, Workers};
use crate::{api, auth, hub, limits, metrics, proxy, status, target, tls, upstream, Exit};

/// Everything hubgate is made of, built and loaded, before any socket exists.
pub struct Parts {
    store: Arc<dyn Store>,
    table: Arc<RouteTable>,
    control: Control,
    proxy_tls: Option<Arc<tls::Reloadable>>,
    api_tls: Option<Arc<tls::Reloadable>>,
    client_tls: Arc<rustls::ClientConfig>,
}

impl Parts {
    /// Phase 1: the store and the table loaded from it, the control plane and TLS material. The
    /// table is loaded before any listener exists, so the public
    /// port never answers from a half-loaded table; TLS files are read now, so a bad certificate
    /// fails the start as a whole.
    ///
    /// # Errors
    /// When the store cannot be opened or loaded, or TLS files are unusable.
    pub async fn build(config: &Config) -> anyhow::Result<Parts> {
        let store = open_store(&config.storage)?;
        let table = Arc::new(RouteTable::new());
        let control = start_control(&table, &store, config.host_routing).await?;
        if let Some(target) = &config.default_target {
            route_default_target(&control, &table, target, config.host_routing).await?;
        }
        if config.auth_token.is_none() {
            tracing::warn!("REST API is not authenticated: CONFIGPROXY_AUTH_TOKEN is not set");
        }
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        let tls_of = |name: &'static str, files: &Option<tls::ServerFiles>| {
            files
                .clone()
                .map(|f| tls::Reloadable::load(name, f))
                .transpose()
                .map_err(|e| anyhow::anyhow!("{name} TLS: {e}"))
        };
        let client_tls = tls::client_config(&config.client_tls, config.insecure)
            .map_err(|e| anyhow::anyhow!("--client-ssl-*: {e}"))?;
        Ok(Parts {
            store,
            table,
            control,
            proxy_tls: tls_of("proxy", &config.proxy_tls)?,
            api_tls: tls_of("api", &config.api_tls)?,
            client_tls: Arc::new(client_tls),
        })
    }

    fn tls_listeners(&self) -> Vec<Arc<tls::Reloadable>> {
        [self.proxy_tls.clone(), self.api_tls.clone()]
            .into_iter()
            .flatten()
            .collect()
    }
}

fn open_store(storage: &Storage) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match storage {
        Storage::Memory => Arc::new(store::MemoryStore),
        Storage::File(dir) => Arc::new(
            store::file::FileStore::open(dir)
                .map_err(|e| anyhow::anyhow!("--storage-path {}: {e}", dir.display()))?,
        ),
        Storage::Redis(settings) => Arc::new(
            store::redis::RedisStore::open(settings)
                .map_err(|e| anyhow::anyhow!("{}: {e}", settings.server.flag()))?,
        ),
    })
}

async fn start_control(
    table: &Arc<RouteTable>,
    store: &Arc<dyn Store>,
    host_routing: bool,
) -> anyhow::Result<Control> {
    if store.retries_load() {
        // A shared store may come up after hubgate: serve (and answer readiness with the
        // reason) while it loads; see `Control::launch`.
        return Ok(Control::launch(table.clone(), store.clone(), host_routing));
    }
    Ok(Control::start(table.clone(), store.clone(), host_routing)
        .await
        .map_err(|e| anyhow::anyhow!("cannot load routes: {e}"))?
        .0)
}

/// Routes `/` to `--default-target`: now when the table is loaded, else once it is.
async fn route_default_target(
    control: &Control,
    table: &Arc<RouteTable>,
    target: &target::Target,
    host_routing: bool,
) -> anyhow::Result<()> {
    let set = set_default_target(control.clone(), table.clone(), target.clone(), host_routing);
    if table.is_loaded() {
        return set
            .await
            .map_err(|e| anyhow::anyhow!("--default-target: {e}"));
    }
    tokio::spawn(async move {
        if let Err(e) = set.await {
            tracing::error!(error = %e, "--default-target could not be set");
        }
    });
    Ok(())
}

/// The hub's client (announcing the API's address when `--notify-hub`), and the edge.
struct Edge {
    hub: Option<Arc<hub::Hub>>,
    auth: Option<Arc<auth::Auth>>,
    /// Fair-use limits, one state for every worker.
    limits: Option<Arc<limits::Limits>>,
}

impl Edge {
    fn build(
        config: &Config,
        api: &Listener,
        client_tls: &rustls::ClientConfig,
    ) -> anyhow::Result<Edge> {
        let hub = match &config.hub_api_url {
            Some(url) => {
                let announce = match config.notify_hub {
                    true => Some(announcement(config, api)?),
                    false => None,
                };
                Some(Arc::new(hub::Hub::new(
                    url.clone(),
                    config.hub_api_token.as_ref().map(|t| t.expose().to_owned()),
                    upstream::client(client_tls.clone()),
                    announce,
                )))
            }
            None => None,
        };
        let auth = edge(config, hub.as_ref());
        let limits = config
            .limits
            .clone()
            .map(|settings| Arc::new(limits::Limits::new(settings)));
        Ok(Edge { hub, auth, limits })
    }
}

/// Authentication at the edge, when configured and a hub is there to ask.
fn edge(config: &Config, hub: Option<&Arc<hub::Hub>>) -> Option<Arc<auth::Auth>> {
    let (settings, hub) = (config.auth.as_ref()?, hub?);
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

/// Every listener, bound: the public port once per worker, the others once.
pub struct Sockets {
    proxy: Bound,
    control: ControlSockets,
}

/// The listeners the control plane serves on its own runtime.
struct ControlSockets {
    api: Listener,
    metrics: Option<Listener>,
    redirect: Option<Listener>,
}

impl Sockets {
    /// Phase 2: bind everything before serving anything, so a bad address fails the start as
    /// a whole.
    ///
    /// # Errors
    /// The first address that cannot be bound.
    pub async fn bind(config: &Config) -> anyhow::Result<Sockets> {
        let proxy = Bound::bind(&config.proxy_listen, config.workers).await?;
        let api = Listener::bind(&config.api_listen).await?;
        let metrics = match &config.metrics_listen {
            Some(listen) => Some(Listener::bind(listen).await?),
            None => None,
        };
        let redirect = match config.redirect {
            Some((port, _)) => {
                let host = match &config.proxy_listen {
                    server::Listen::Tcp { host, .. } => host.clone(),
                    server::Listen::Unix(_) => String::new(),
                };
                Some(Listener::bind(&server::Listen::Tcp { host, port }).await?)
            }
            None => None,
        };
        let sockets = Sockets {
            proxy,
            control: ControlSockets {
                api,
                metrics,
                redirect,
            },
        };
        sockets.announce(config.workers);
        Ok(sockets)
    }

    fn announce(&self, workers: usize) {
        tracing::info!(listener = %"proxy", addr = %self.proxy.describe(), workers, "listening");
        let c = &self.control;
        let others = [
            ("api", Some(&c.api)),
            ("metrics", c.metrics.as_ref()),
            ("redirect", c.redirect.as_ref()),
        ];
        for (name, listener) in others {
            if let Some(l) = listener {
                tracing::info!(listener = %name, addr = %describe(l), "listening");
            }
        }
    }
}

fn describe(listener: &Listener) -> String {
    match listener {
        Listener::Tcp(l) => l
            .local_addr()
            .map_or_else(|e| format!("?({e})"), |a| a.to_string()),
        Listener::Unix(_, file) => format!("unix:{}", file.path().display()),
    }
}

/// What serves, and what stops it.
pub struct Serving {
    stop: watch::Sender<bool>,
    close_tunnels: watch::Sender<bool>,
    workers: Workers,
    control_servers: Vec<tokio::task::JoinHandle<bool>>,
}

/// Phase 3: the hub handshake and background tasks, the control plane's listeners on this
/// runtime, and the workers on theirs.
///
/// # Errors
/// When the hub announcement cannot be formed or a worker thread cannot start.
pub fn serve(parts: Parts, sockets: Sockets, config: &Config) -> anyhow::Result<Serving> {
    let edge = Edge::build(config, &sockets.control.api, &parts.client_tls)?;
    if let Some(hub) = &edge.hub {
        tokio::spawn(hub.clone().watch());
        let (store, control) = (parts.store.clone(), parts.control.clone());
        tokio::spawn(handshake(hub.clone(), store, control, config.notify_hub));
    }
    if let Some(auth) = &edge.auth {
        tokio::spawn(follow_revocations(
            parts.control.revocations(),
            auth.clone(),
        ));
    }
    tokio::spawn(tls::watch(parts.tls_listeners()));
    tokio::spawn(hangups());
    if let (Some(limits), Some(file)) = (&edge.limits, &config.config_file) {
        let login_rate = config.limit_login_rate;
        tokio::spawn(reload_limits(limits.clone(), file.clone(), login_rate));
    }
    let (stop, stopped) = watch::channel(false);
    let (close_tunnels, closing) = watch::channel(false);
    let workers = start_workers(
        &parts,
        &edge,
        sockets.proxy,
        config,
        (stopped.clone(), closing),
    )?;
    let control_servers = serve_control(parts, edge, sockets.control, config, &stopped);
    Ok(Serving {
        stop,
        close_tunnels,
        workers,
        control_servers,
    })
}

/// `signals`: hubgate is stopping (stop accepting), and tunnels must close.
fn start_workers(
    parts: &Parts,
    edge: &Edge,
    proxy: Bound,
    config: &Config,
    signals: (watch::Receiver<bool>, watch::Receiver<bool>),
) -> anyhow::Result<Workers> {
    let (stopped, closing) = signals;
    let settings = ConnSettings {
        idle_timeout: config.client_idle_timeout,
        keep_alive_timeout: config.keep_alive_timeout,
        max_header_size: config.max_header_size,
        max_connections: config.max_connections,
        tls: parts.proxy_tls.clone(),
    };
    let copies = proxy.split();
    let (port, handoffs) = Port::new("proxy", settings, copies.len());
    let (table, auth, tls, limits) = (
        parts.table.clone(),
        edge.auth.clone(),
        parts.client_tls.clone(),
        edge.limits.clone(),
    );
    let opts = proxy::ForwardOptions::from_config(config);
    let make = move |_worker: usize| {
        Arc::new(
            proxy::Proxy::new(
                table.clone(),
                Pool::new(tls.clone(), PoolSettings::default()),
                opts.clone(),
                auth.clone(),
                closing.clone(),
            )
            .with_limits(limits.clone()),
        )
    };
    let plan = Plan {
        copies,
        port,
        handoffs,
        proxy: make,
        shutdown: stopped,
        grace: config.shutdown_grace,
    };
    Workers::start(plan).map_err(|e| anyhow::anyhow!("cannot start the workers: {e}"))
}

/// The API, metrics and redirect listeners, on the control plane's runtime.
fn serve_control(
    parts: Parts,
    edge: Edge,
    sockets: ControlSockets,
    config: &Config,
    stopped: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<bool>> {
    let status = Arc::new(status::Status::new(
        parts.table.clone(),
        parts.control.clone(),
        edge.hub.clone(),
        edge.auth.clone(),
        config.auth_token.is_none(),
        config.auth.as_ref().is_some_and(|a| a.ephemeral_secret),
        parts.tls_listeners(),
    ));
    let api = Arc::new(api::Api::new(
        parts.table,
        parts.control,
        edge.hub,
        edge.auth,
        status.clone(),
        api::ApiSettings {
            token: config.auth_token.as_ref().map(|t| t.expose().to_owned()),
            host_routing: config.host_routing,
            max_body: config.max_route_body,
            max_sync_body: config.max_sync_body,
        },
    ));
    let api_settings = ConnSettings {
        idle_timeout: None,
        keep_alive_timeout: config.keep_alive_timeout,
        max_header_size: config.max_header_size,
        max_connections: config.max_connections,
        tls: parts.api_tls,
    };
    let plain = ConnSettings {
        tls: None,
        ..api_settings.clone()
    };
    let grace = config.shutdown_grace;
    let mut tasks = vec![tokio::spawn(server::serve(
        Intake::of(sockets.api, "api", api_settings),
        move |req, _info| api.clone().handle(req),
        stopped.clone(),
        grace,
    ))];
    if let (Some(listener), Some((_, to))) = (sockets.redirect, config.redirect) {
        tasks.push(tokio::spawn(server::serve(
            Intake::of(listener, "redirect", plain.clone()),
            move |req, _info| async move { Ok(server::redirect_to_https(&req, to)) },
            stopped.clone(),
            grace,
        )));
    }
    if let Some(listener) = sockets.metrics {
        tasks.push(tokio::spawn(server::serve(
            Intake::of(listener, "metrics", plain),
            move |req, _info| status.clone().handle_metrics_port(req),
            stopped.clone(),
            grace,
        )));
    }
    tasks
}

impl Serving {
    /// Phase 4: stop accepting, let in-flight requests finish within the grace period, then
    /// close the websockets, both sides, and end the workers.
    pub async fn drain(mut self, grace: std::time::Duration) -> Exit {
        tracing::info!(
            grace_secs = grace.as_secs_f64(),
            "shutting down: draining in-flight requests"
        );
        let _ = self.stop.send(true);
        let mut drained = self.workers.drained().await;
        for task in self.control_servers {
            drained &= task.await.unwrap_or(false);
        }
        let _ = self.close_tunnels.send(true);
        let open = || metrics::get().active_websockets.get();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.workers.exit().await;
        if drained {
            tracing::info!("all requests finished; exiting");
            Exit::Drained
        } else {
            tracing::warn!("grace period over with requests still in flight; exiting");
            Exit::Cut
        }
    }
}

/// SIGHUP's default action ends the process, and operators send it expecting a reload. Listening
/// for it here makes it harmless whatever is configured; the TLS and limits watchers listen too
/// and reload what they own.
async fn hangups() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            while hup.recv().await.is_some() {
                tracing::info!(
                    "received SIGHUP: TLS certificates and limits reload; nothing else does"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; one would stop hubgate"),
    }
}

/// The hub handshake at start, unless the store's table is one the hub synced before.
async fn handshake(hub: Arc<hub::Hub>, store: Arc<dyn Store>, control: Control, notify: bool) {
    if control.trusted().await && !notify {
        hub.mark_registered();
        return;
    }
    hub.handshake().await;
    // From now on this store's table is the hub's: a restart can vouch for it.
    match store.mark_synced().await {
        Ok(()) => tracing::info!(store = store.name(), "store marked as synced by the hub"),
        Err(e) => tracing::warn!(error = %e, "could not record the hub sync in the store"),
    }
}

/// Reads the limits from the configuration file again on every SIGHUP. A file that does not
/// load, or that sets no limit (turning limits on or off takes a restart), keeps the old ones.
async fn reload_limits(
    limits: Arc<limits::Limits>,
    file: std::path::PathBuf,
    login_rate: Option<f64>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; limits will not reload");
            return;
        }
    };
    while hup.recv().await.is_some() {
        match crate::config::read_limits(&file, login_rate) {
            Ok(Some(settings)) => {
                limits.reload(settings);
                tracing::info!(file = %file.display(), "received SIGHUP: limits reloaded");
            }
            Ok(None) => tracing::error!(
                file = %file.display(),
                "limits not reloaded: the file sets none (turning limits off takes a restart); keeping the old ones"
            ),
            Err(e) => tracing::error!(
                file = %file.display(),
                error = %e,
                "limits not reloaded; keeping the old ones"
            ),
        }
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
        "auth_token": config.auth_token.as_ref().map(crate::config::Secret::expose),
        "ip": addr.map(|a| a.ip().to_string()),
        "port": addr.map(|a| a.port()),
        "protocol": "http",
    }))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
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
pub struct PidFile(std::path::PathBuf);

impl PidFile {
    /// Writes it where `--pid-file` says, if anywhere.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn write(path: Option<&std::path::Path>) -> anyhow::Result<Option<Self>> {
        let Some(path) = path else {
            return Ok(None);
        };
        std::fs::write(path, std::process::id().to_string())
            .map_err(|e| anyhow::anyhow!("--pid-file: cannot write {}: {e}", path.display()))?;
        Ok(Some(PidFile(path.to_owned())))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
