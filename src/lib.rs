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
//! - [`limits`]: fair use: request rates, concurrency and websockets per user and per client.
//! - [`proxy`]: the data plane: forwarding, websockets, error pages.
//! - [`upstream`]: connections to targets: each worker's pool, the hub's client, failure causes.
//! - [`tls`]: rustls for the listeners (reloadable certificates) and towards targets.
//! - [`http`]: small HTTP pieces every plane uses: bodies, hubgate's own answers, connection info.
//! - [`server`]: listeners, connections, the connection limit, spreading connections over
//!   workers, idle timeouts and draining.
//! - [`workers`]: the data plane's threads: one single-threaded runtime per core.
//! - [`app`]: the process's phases: build the parts, bind, serve, drain.
//! - [`metrics`]: Prometheus metrics (hubgate's and CHP's names), lock-free on the request path.
//! - [`status`]: health and readiness, `/api/status`, and the metrics listener.
//!
//! The data plane and the control plane meet only at [`routes::RouteTable`].

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod control;
pub mod http;
pub mod hub;
pub mod limits;
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
pub mod workers;

use crate::config::Config;

/// How a run ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every in-flight request finished after the shutdown signal.
    Drained,
    /// The grace period ran out with requests still in flight.
    Cut,
}

/// Runs hubgate until SIGTERM or SIGINT, in its phases (see [`app`]).
///
/// # Errors
/// When the store cannot be loaded, TLS files are unusable, a listener cannot be bound or the
/// pid file cannot be written.
pub async fn run(config: Config) -> anyhow::Result<Exit> {
    // hubgate's own TLS names its provider; the Redis client's takes the process default.
    // Another caller (a test) may have installed one already: that one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let parts = app::Parts::build(&config).await?;
    let sockets = app::Sockets::bind(&config).await?;
    let _pid_file = app::PidFile::write(config.pid_file.as_deref())?;
    let serving = app::serve(parts, sockets, &config)?;
    app::shutdown_signal().await;
    Ok(serving.drain(config.shutdown_grace).await)
}
