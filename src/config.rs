//! Configuration: configurable-http-proxy's command line, an optional TOML file, and the
//! environment, merged into one validated [`Config`] before any socket is bound.
//!
//! Precedence is flag, then environment variable, then file, then default. Every CHP flag keeps
//! its exact name and default; a flag whose feature hubgate does not have yet is refused at start
//! rather than silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use http::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::target::Target;
use crate::tls::{ClientFiles, ServerFiles, Versions};

/// The exit code for a configuration error (EX_USAGE, as linkerd2-proxy uses).
pub const EXIT_CONFIG: i32 = 64;

/// A configuration problem, naming the flag (or file key) and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {problem}")]
pub struct ConfigError {
    pub flag: String,
    pub problem: String,
}

impl ConfigError {
    fn new(flag: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            flag: flag.into(),
            problem: problem.into(),
        }
    }
}

/// The command line. Names, forms and defaults follow configurable-http-proxy 5.3.
#[derive(Debug, Default, Parser)]
#[command(
    name = "hubgate",
    version,
    about = "An authenticating reverse proxy for JupyterHub; a drop-in for configurable-http-proxy"
)]
pub struct Cli {
    /// TOML configuration file (see config/hubgate.toml); flags and environment override it.
    #[arg(long, env = "HUBGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Public-facing IP or host name of the proxy [default: all interfaces]
    #[arg(long, value_name = "IP")]
    pub ip: Option<String>,
    /// Public-facing port of the proxy [default: 8000]
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Unix socket for the proxy to listen on, instead of --ip/--port
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Inward-facing IP or host name for API requests [default: localhost]
    #[arg(long, value_name = "IP")]
    pub api_ip: Option<String>,
    /// Inward-facing port for API requests [default: --port + 1]
    #[arg(long, value_name = "N")]
    pub api_port: Option<u16>,
    /// Unix socket for the API to listen on, instead of --api-ip/--api-port
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Default proxy target (proto://host[:port]), added as the route for `/`
    #[arg(long, value_name = "URL")]
    pub default_target: Option<String>,
    /// Server that renders error pages: hubgate GETs <URL>/<code>?url=<path>
    #[arg(long, value_name = "URL")]
    pub error_target: Option<String>,
    /// Directory of error pages: <code>.html, else error.html
    #[arg(long, value_name = "DIR")]
    pub error_path: Option<PathBuf>,

    /// Use the request's host as the first segment of the routing path
    #[arg(long)]
    pub host_routing: bool,
    /// Don't add X-Forwarded-* headers to proxied requests
    #[arg(long)]
    pub no_x_forward: bool,
    /// Don't prepend the target's path to proxied requests
    #[arg(long)]
    pub no_prepend_path: bool,
    /// Don't include the routing prefix in proxied requests
    #[arg(long)]
    pub no_include_prefix: bool,
    /// Header added to every proxied request, `name: value` (repeatable)
    #[arg(long, value_name = "HEADER")]
    pub custom_header: Vec<String>,
    /// Don't verify the certificates of https targets
    #[arg(long)]
    pub insecure: bool,

    /// Log level: debug, info, warn, error (also trace) [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log format: plain or json [default: plain]
    #[arg(long, env = "HUBGATE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Write our PID to this file (removed at exit)
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,

    /// Milliseconds a client connection may sit idle during a proxied request before it is dropped
    #[arg(long, value_name = "MS")]
    pub timeout: Option<u64>,
    /// Milliseconds to wait for a target's response before answering 503
    #[arg(long, value_name = "MS")]
    pub proxy_timeout: Option<u64>,
    /// Milliseconds an idle keep-alive client connection is kept open [default: 5000]
    #[arg(long, value_name = "MS")]
    pub keep_alive_timeout: Option<u64>,

    /// Where routes are kept: memory (CHP's behaviour, the default), file (on local disk,
    /// surviving restarts) or redis (shared by several replicas)
    #[arg(long, value_name = "BACKEND")]
    pub storage_backend: Option<String>,
    /// The Redis server of `--storage-backend redis`: redis://[:password@]host[:port][/db] or
    /// rediss://... for TLS
    #[arg(long, env = "HUBGATE_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,
    /// Prefix of hubgate's Redis keys; replicas sharing a table use the same one
    /// [default: hubgate]
    #[arg(long, value_name = "PREFIX")]
    pub redis_prefix: Option<String>,
    /// PEM file of the certificate authorities that sign the Redis server's certificate (rediss://)
    /// [default: the system's]
    #[arg(long, value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,
    /// Sentinels to ask for the Redis primary (instead of --redis-url): host:port,host:port
    #[arg(long, env = "HUBGATE_REDIS_SENTINEL", value_name = "HOST:PORT,...")]
    pub redis_sentinel: Option<String>,
    /// Name of the primary the sentinels watch (as in `sentinel monitor NAME ...`)
    #[arg(long, env = "HUBGATE_REDIS_SENTINEL_MASTER", value_name = "NAME")]
    pub redis_sentinel_master: Option<String>,
    /// Nodes of a Redis Cluster to start from (instead of --redis-url): host:port,host:port
    #[arg(long, env = "HUBGATE_REDIS_CLUSTER", value_name = "HOST:PORT,...")]
    pub redis_cluster: Option<String>,
    /// Password of the sentinels themselves [default: none]
    #[arg(
        long,
        env = "HUBGATE_REDIS_SENTINEL_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub redis_sentinel_password: Option<String>,
    /// Password of the Redis servers found through Sentinel or in the cluster (with --redis-url,
    /// put it in the URL)
    /// [default: none]
    #[arg(
        long,
        env = "HUBGATE_REDIS_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub redis_password: Option<String>,
    /// Answer a route change only once this many Redis replicas have it too (WAIT), so that a
    /// failover cannot lose it [default: 0, the primary alone]
    #[arg(long, env = "HUBGATE_REDIS_MIN_REPLICAS", value_name = "N")]
    pub redis_min_replicas: Option<u32>,
    /// IP for the metrics server [default: all interfaces]
    #[arg(long, value_name = "IP")]
    pub metrics_ip: Option<String>,
    /// Port of the metrics server (/metrics, /health/live, /health/ready) [default: none]
    #[arg(long, value_name = "N")]
    pub metrics_port: Option<u16>,
    /// Unix socket for the metrics server, instead of --metrics-ip/--metrics-port
    #[arg(long, value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,

    /// Directory of the file store [default: ./hubgate-data]
    #[arg(long, env = "HUBGATE_STORAGE_PATH", value_name = "DIR")]
    pub storage_path: Option<PathBuf>,
    /// Largest body of POST/PATCH /api/proxy, in bytes [default: 67108864]
    #[arg(long, value_name = "BYTES")]
    pub max_sync_body: Option<usize>,

    /// The hub's API, e.g. http://127.0.0.1:8081/hub/api (token in JUPYTERHUB_API_TOKEN)
    #[arg(long, env = "JUPYTERHUB_API_URL", value_name = "URL")]
    pub hub_api_url: Option<String>,
    /// Announce this proxy's API address and token to the hub (PATCH /hub/api/proxy) at start
    #[arg(long)]
    pub notify_hub: bool,
    /// The API address to announce to the hub [default: http://<api-ip>:<api-port>]
    #[arg(long, value_name = "URL")]
    pub api_url: Option<String>,

    /// Authentication at the edge: on (the default when --hub-api-url is set) or off
    #[arg(long, value_name = "on|off")]
    pub auth_mode: Option<String>,
    /// Seconds a hub answer about a credential is trusted [default: 300]
    #[arg(long, value_name = "SECS")]
    pub auth_cache_ttl: Option<u64>,
    /// Seconds a refused credential is remembered [default: 10]
    #[arg(long, value_name = "SECS")]
    pub auth_negative_ttl: Option<u64>,
    /// Seconds past its TTL a cached identity still works while the hub is down [default: 300]
    #[arg(long, value_name = "SECS")]
    pub auth_grace: Option<u64>,
    /// Most credentials cached at once [default: 100000]
    #[arg(long, value_name = "N")]
    pub auth_cache_size: Option<u64>,
    /// Accept ?token= on ordinary requests too (websocket handshakes always may)
    #[arg(long)]
    pub allow_token_in_url: bool,
    /// Check tokens with the hub's legacy GET /authorizations/token/<token> (hubs before 2.0)
    #[arg(long)]
    pub auth_legacy_token_endpoint: bool,
    /// The hub's login cookie to accept, e.g. __Host-jupyterhub-hub-login
    #[arg(long, value_name = "NAME")]
    pub hub_login_cookie: Option<String>,
    /// OAuth client id hubgate is registered under at the hub
    #[arg(long, env = "JUPYTERHUB_CLIENT_ID", value_name = "ID")]
    pub oauth_client_id: Option<String>,
    /// OAuth callback URL registered at the hub; hubgate answers its path itself
    #[arg(long, env = "JUPYTERHUB_OAUTH_CALLBACK_URL", value_name = "URL")]
    pub oauth_callback_url: Option<String>,
    /// Session cookie signing secrets, comma-separated; the first signs, all verify
    #[arg(
        long,
        env = "HUBGATE_SESSION_SECRETS",
        value_name = "SECRETS",
        hide_env_values = true
    )]
    pub session_secrets: Option<String>,
    /// Header set to the authenticated user's name on forwarded requests (e.g. X-Forwarded-User)
    #[arg(long, value_name = "NAME")]
    pub identity_header: Option<String>,
    /// Path attribute of hubgate's cookies [default: /]
    #[arg(long, value_name = "PATH")]
    pub cookie_path: Option<String>,
    /// Mark hubgate's cookies Secure (when TLS is terminated in front of hubgate)
    #[arg(long)]
    pub cookie_secure: bool,

    /// TLS key for the public listener (PEM); with --ssl-cert, the proxy speaks HTTPS and HTTP/2
    #[arg(long, value_name = "FILE")]
    pub ssl_key: Option<PathBuf>,
    /// TLS certificate (chain) for the public listener (PEM)
    #[arg(long, value_name = "FILE")]
    pub ssl_cert: Option<PathBuf>,
    /// CA for verifying client certificates on the public listener
    #[arg(long, value_name = "FILE")]
    pub ssl_ca: Option<PathBuf>,
    /// Ask public clients for a certificate (verified against --ssl-ca)
    #[arg(long)]
    pub ssl_request_cert: bool,
    /// Refuse public clients without a valid certificate (with --ssl-request-cert)
    #[arg(long)]
    pub ssl_reject_unauthorized: bool,
    /// TLS version: TLSv1_2 or TLSv1_3 only (default: both; older ones are not offered)
    #[arg(long, value_name = "PROTOCOL")]
    pub ssl_protocol: Option<String>,
    /// Accepted for CHP compatibility; rustls uses its own safe cipher suites
    #[arg(long, value_name = "CIPHERS")]
    pub ssl_ciphers: Option<String>,
    /// Accepted for CHP compatibility; RC4 is never offered
    #[arg(long)]
    pub ssl_allow_rc4: bool,
    /// Accepted for CHP compatibility; rustls uses (EC)DHE groups of its own
    #[arg(long, value_name = "FILE")]
    pub ssl_dhparam: Option<PathBuf>,
    /// TLS key for the API listener (PEM)
    #[arg(long, value_name = "FILE")]
    pub api_ssl_key: Option<PathBuf>,
    /// TLS certificate for the API listener (PEM)
    #[arg(long, value_name = "FILE")]
    pub api_ssl_cert: Option<PathBuf>,
    /// CA for verifying API clients' certificates
    #[arg(long, value_name = "FILE")]
    pub api_ssl_ca: Option<PathBuf>,
    /// Ask API clients for a certificate (verified against --api-ssl-ca)
    #[arg(long)]
    pub api_ssl_request_cert: bool,
    /// Refuse API clients without a valid certificate (with --api-ssl-request-cert)
    #[arg(long)]
    pub api_ssl_reject_unauthorized: bool,
    /// Client key presented to https:// targets (PEM)
    #[arg(long, value_name = "FILE")]
    pub client_ssl_key: Option<PathBuf>,
    /// Client certificate presented to https:// targets (PEM)
    #[arg(long, value_name = "FILE")]
    pub client_ssl_cert: Option<PathBuf>,
    /// CA that https:// targets are verified against (instead of the system's)
    #[arg(long, value_name = "FILE")]
    pub client_ssl_ca: Option<PathBuf>,
    /// Accepted for CHP compatibility (JupyterHub passes it); meaningless for a client
    #[arg(long)]
    pub client_ssl_request_cert: bool,
    /// Accepted for CHP compatibility (JupyterHub passes it); targets are always verified
    #[arg(long)]
    pub client_ssl_reject_unauthorized: bool,
    /// Plain-HTTP port answering 301 to the HTTPS address
    #[arg(long, value_name = "PORT")]
    pub redirect_port: Option<u16>,
    /// The port the redirects point at [default: --port]
    #[arg(long, value_name = "PORT")]
    pub redirect_to: Option<u16>,

    /// Largest request head in bytes; larger gets 431 [default: 32768]
    #[arg(long, value_name = "BYTES")]
    pub max_header_size: Option<usize>,
    /// Most client connections on the public port at once; more get 503 [default: 10000]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Seconds in-flight requests may run after SIGTERM/SIGINT [default: 10]
    #[arg(long, value_name = "SECS")]
    pub shutdown_timeout: Option<u64>,
    /// Log one line per proxied request (method, route, status, duration, bytes)
    #[arg(long, env = "HUBGATE_ACCESS_LOG")]
    pub access_log: bool,

    // Flags CHP has whose features hubgate does not have. They are parsed so that using one
    // gets a clear refusal naming it instead of an "unknown flag" or, worse, silence.
    #[arg(long, hide = true)]
    pub auto_rewrite: bool,
    #[arg(long, hide = true)]
    pub change_origin: bool,
    #[arg(long, hide = true)]
    pub protocol_rewrite: Option<String>,
}

/// The configuration file. Keys are the long flag names in snake_case; see config/hubgate.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub ip: Option<String>,
    pub port: Option<u16>,
    pub socket: Option<PathBuf>,
    pub api_ip: Option<String>,
    pub api_port: Option<u16>,
    pub api_socket: Option<PathBuf>,
    pub auth_token: Option<String>,
    pub default_target: Option<String>,
    pub error_target: Option<String>,
    pub error_path: Option<PathBuf>,
    pub host_routing: Option<bool>,
    pub x_forward: Option<bool>,
    pub prepend_path: Option<bool>,
    pub include_prefix: Option<bool>,
    pub custom_headers: Option<BTreeMap<String, String>>,
    pub insecure: Option<bool>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub pid_file: Option<PathBuf>,
    pub timeout: Option<u64>,
    pub proxy_timeout: Option<u64>,
    pub keep_alive_timeout: Option<u64>,
    pub storage_backend: Option<String>,
    pub redis_url: Option<String>,
    pub redis_prefix: Option<String>,
    pub redis_ca: Option<PathBuf>,
    pub redis_sentinel: Option<String>,
    pub redis_sentinel_master: Option<String>,
    pub redis_cluster: Option<String>,
    pub redis_sentinel_password: Option<String>,
    pub redis_password: Option<String>,
    pub redis_min_replicas: Option<u32>,
    pub metrics_ip: Option<String>,
    pub metrics_port: Option<u16>,
    pub metrics_socket: Option<PathBuf>,
    pub storage_path: Option<PathBuf>,
    pub max_sync_body: Option<usize>,
    pub hub_api_url: Option<String>,
    pub hub_api_token: Option<String>,
    pub notify_hub: Option<bool>,
    pub api_url: Option<String>,
    pub auth_mode: Option<String>,
    pub auth_cache_ttl: Option<u64>,
    pub auth_negative_ttl: Option<u64>,
    pub auth_grace: Option<u64>,
    pub auth_cache_size: Option<u64>,
    pub allow_token_in_url: Option<bool>,
    pub auth_legacy_token_endpoint: Option<bool>,
    pub hub_login_cookie: Option<String>,
    pub oauth_client_id: Option<String>,
    pub oauth_callback_url: Option<String>,
    pub session_secrets: Option<Vec<String>>,
    pub identity_header: Option<String>,
    pub cookie_path: Option<String>,
    pub cookie_secure: Option<bool>,
    pub ssl_key: Option<PathBuf>,
    pub ssl_cert: Option<PathBuf>,
    pub ssl_ca: Option<PathBuf>,
    pub ssl_request_cert: Option<bool>,
    pub ssl_reject_unauthorized: Option<bool>,
    pub ssl_protocol: Option<String>,
    pub api_ssl_key: Option<PathBuf>,
    pub api_ssl_cert: Option<PathBuf>,
    pub api_ssl_ca: Option<PathBuf>,
    pub api_ssl_request_cert: Option<bool>,
    pub api_ssl_reject_unauthorized: Option<bool>,
    pub client_ssl_key: Option<PathBuf>,
    pub client_ssl_cert: Option<PathBuf>,
    pub client_ssl_ca: Option<PathBuf>,
    pub redirect_port: Option<u16>,
    pub redirect_to: Option<u16>,
    pub max_header_size: Option<usize>,
    pub max_connections: Option<usize>,
    pub shutdown_timeout: Option<u64>,
    pub access_log: Option<bool>,
}

/// Where routes are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    Memory,
    File(PathBuf),
    Redis(RedisSettings),
}

/// Where the Redis store is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub server: RedisServer,
    pub prefix: String,
    pub ca: Option<PathBuf>,
    /// Replicas that must have a change (`WAIT`) before it is acknowledged; 0: do not wait.
    pub min_replicas: u32,
}

/// How the Redis primary is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisServer {
    /// One address (`--redis-url`).
    Url(String),
    /// Asked of Sentinel, again after every lost connection (so a failover is followed).
    Sentinel(SentinelSettings),
    /// A Redis Cluster: the redis crate's cluster client finds the primary of the keys' slot
    /// and follows redirections and failovers.
    Cluster {
        /// Nodes to start from, as `(host, port)`.
        nodes: Vec<(String, u16)>,
        password: Option<String>,
    },
}

/// `--redis-sentinel` and the flags that go with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelSettings {
    /// Each sentinel as `(host, port)`.
    pub nodes: Vec<(String, u16)>,
    pub master: String,
    /// Of the Redis servers (primary and replicas).
    pub password: Option<String>,
    /// Of the sentinels.
    pub sentinel_password: Option<String>,
}

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A host (IP or name, resolved at bind time; empty means all interfaces) and a port.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

/// Where error pages come from.
#[derive(Debug, Clone)]
pub enum ErrorPages {
    /// hubgate's own small HTML pages.
    Builtin,
    /// GET `<target>/<code>?url=<path>`.
    Target(Target),
    /// `<dir>/<code>.html`, else `<dir>/error.html`.
    Dir(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy_listen: Listen,
    pub api_listen: Listen,
    /// The metrics server, when asked for (CHP: `--metrics-port`).
    pub metrics_listen: Option<Listen>,
    /// `None` (or empty in the environment) leaves the API open, as CHP does.
    pub auth_token: Option<String>,
    pub default_target: Option<Target>,
    pub error_pages: ErrorPages,
    pub host_routing: bool,
    pub x_forward: bool,
    pub prepend_path: bool,
    pub include_prefix: bool,
    pub custom_headers: Vec<(HeaderName, HeaderValue)>,
    pub insecure: bool,
    pub log_level: String,
    pub log_format: LogFormat,
    pub pid_file: Option<PathBuf>,
    pub client_idle_timeout: Option<Duration>,
    pub proxy_timeout: Option<Duration>,
    pub keep_alive_timeout: Duration,
    /// Largest body accepted by `POST /api/routes/...`.
    pub max_route_body: usize,
    /// Largest body accepted by `POST`/`PATCH /api/proxy`.
    pub max_sync_body: usize,
    pub storage: Storage,
    /// The hub's API, for the handshake (and, later, authentication).
    pub hub_api_url: Option<Target>,
    pub hub_api_token: Option<String>,
    /// Announce hubgate's API to the hub at start.
    pub notify_hub: bool,
    /// hubgate's API URL as the hub should reach it; derived from the API listener when unset.
    pub api_url: Option<String>,
    /// Authentication at the edge; `None` behaves exactly as CHP.
    pub auth: Option<crate::auth::AuthSettings>,
    /// TLS on the public listener (HTTPS, HTTP/2 by ALPN).
    pub proxy_tls: Option<ServerFiles>,
    /// TLS on the API listener.
    pub api_tls: Option<ServerFiles>,
    /// TLS towards `https://` targets.
    pub client_tls: ClientFiles,
    /// A plain-HTTP listener on this port redirecting (301) to this HTTPS port.
    pub redirect: Option<(u16, u16)>,
    pub max_header_size: usize,
    pub max_connections: usize,
    pub access_log: bool,
    /// Things to warn about once logging is up (flags accepted but mapped or ignored).
    pub warnings: Vec<String>,
    /// How long in-flight requests may run after SIGTERM before hubgate exits anyway.
    pub shutdown_grace: Duration,
}

impl Config {
    /// Builds the configuration from parsed flags, the environment and the file they name.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first bad flag or file key.
    pub fn load(cli: Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(cli, file, env)
    }

    fn merge(
        cli: Cli,
        file: FileConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        refuse_unbuilt(&cli)?;

        let ip = cli.ip.clone().or(file.ip);
        let port = cli.port.or(file.port);
        let socket = cli.socket.clone().or(file.socket);
        let proxy_listen = match socket {
            Some(path) => {
                if cli.ip.is_some() || cli.port.is_some() {
                    return Err(ConfigError::new(
                        "--socket",
                        "cannot be used with --ip or --port",
                    ));
                }
                Listen::Unix(path)
            }
            None => Listen::Tcp {
                host: match ip.as_deref() {
                    None | Some("*") => String::new(),
                    Some(ip) => ip.to_owned(),
                },
                port: port.unwrap_or(8000),
            },
        };

        let api_ip = cli.api_ip.clone().or(file.api_ip);
        let api_port = cli.api_port.or(file.api_port);
        let api_listen = match cli.api_socket.clone().or(file.api_socket) {
            Some(path) => {
                if cli.api_ip.is_some() || cli.api_port.is_some() {
                    return Err(ConfigError::new(
                        "--api-socket",
                        "cannot be used with --api-ip or --api-port",
                    ));
                }
                Listen::Unix(path)
            }
            None => Listen::Tcp {
                host: api_ip.unwrap_or_else(|| "localhost".to_owned()),
                // CHP: --port + 1, or 8001 without a TCP proxy port. Port 0 (pick a free port,
                // for tests) gives 0 for the API as well.
                port: api_port.unwrap_or(match &proxy_listen {
                    Listen::Tcp { port: 0, .. } => 0,
                    Listen::Tcp { port, .. } => port.checked_add(1).ok_or_else(|| {
                        ConfigError::new("--api-port", "--port + 1 is not a valid port; set one")
                    })?,
                    Listen::Unix(_) => 8001,
                }),
            },
        };

        let metrics_ip = cli.metrics_ip.clone().or(file.metrics_ip);
        let metrics_port = cli.metrics_port.or(file.metrics_port);
        let metrics_listen = match cli.metrics_socket.clone().or(file.metrics_socket) {
            Some(path) => {
                if cli.metrics_ip.is_some() || cli.metrics_port.is_some() {
                    return Err(ConfigError::new(
                        "--metrics-socket",
                        "cannot be used with --metrics-ip or --metrics-port",
                    ));
                }
                Some(Listen::Unix(path))
            }
            None => metrics_port.map(|port| Listen::Tcp {
                host: match metrics_ip.as_deref() {
                    None | Some("*") => String::new(),
                    Some(ip) => ip.to_owned(),
                },
                port,
            }),
        };

        let auth_token = env("CONFIGPROXY_AUTH_TOKEN")
            .filter(|t| !t.is_empty())
            .or(file.auth_token)
            .filter(|t| !t.is_empty());

        let default_target = cli
            .default_target
            .or(file.default_target)
            .map(|t| {
                Target::parse(&t).map_err(|e| ConfigError::new("--default-target", e.to_string()))
            })
            .transpose()?;

        let error_target = cli.error_target.or(file.error_target);
        let error_path = cli.error_path.or(file.error_path);
        let error_pages = match (error_target, error_path) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "--error-target",
                    "cannot be used with --error-path; pick one",
                ))
            }
            (Some(t), None) => ErrorPages::Target(
                Target::parse(&t).map_err(|e| ConfigError::new("--error-target", e.to_string()))?,
            ),
            (None, Some(dir)) => {
                if !dir.is_dir() {
                    return Err(ConfigError::new(
                        "--error-path",
                        format!("{} is not a directory", dir.display()),
                    ));
                }
                ErrorPages::Dir(dir)
            }
            (None, None) => ErrorPages::Builtin,
        };

        let mut custom_headers = Vec::new();
        for (name, value) in file.custom_headers.unwrap_or_default() {
            custom_headers.push(parse_header(&name, &value, "custom_headers")?);
        }
        for h in &cli.custom_header {
            let (name, value) = h
                .trim()
                .split_once(':')
                .filter(|(n, _)| !n.trim().is_empty())
                .ok_or_else(|| {
                    ConfigError::new(
                        "--custom-header",
                        format!("expected `name: value`, got {h:?}"),
                    )
                })?;
            custom_headers.push(parse_header(name.trim(), value.trim(), "--custom-header")?);
        }

        let log_level = cli
            .log_level
            .or(file.log_level)
            .unwrap_or_else(|| "info".to_owned())
            .to_ascii_lowercase();
        let log_level = match log_level.as_str() {
            "trace" | "debug" | "info" | "error" => log_level,
            "warn" | "warning" => "warn".to_owned(),
            "critical" | "fatal" => "error".to_owned(),
            other => {
                return Err(ConfigError::new(
                    "--log-level",
                    format!("unknown level {other:?} (expected debug, info, warn or error)"),
                ))
            }
        };
        let log_format = match cli.log_format.or(file.log_format).as_deref() {
            None | Some("plain") => LogFormat::Plain,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "--log-format",
                    format!("unknown format {other:?} (expected plain or json)"),
                ))
            }
        };

        let storage_path = cli
            .storage_path
            .or(file.storage_path)
            .unwrap_or_else(|| PathBuf::from("hubgate-data"));
        let storage = match cli.storage_backend.or(file.storage_backend).as_deref() {
            None | Some("memory") => Storage::Memory,
            Some("file") => Storage::File(storage_path),
            Some("redis") => redis_settings(RedisFlags {
                url: cli.redis_url.or(file.redis_url),
                prefix: cli.redis_prefix.or(file.redis_prefix),
                ca: cli.redis_ca.or(file.redis_ca),
                sentinel: cli.redis_sentinel.or(file.redis_sentinel),
                cluster: cli.redis_cluster.or(file.redis_cluster),
                sentinel_master: cli.redis_sentinel_master.or(file.redis_sentinel_master),
                sentinel_password: cli.redis_sentinel_password.or(file.redis_sentinel_password),
                password: cli.redis_password.or(file.redis_password),
                min_replicas: cli.redis_min_replicas.or(file.redis_min_replicas),
            })?,
            Some(other) => {
                return Err(ConfigError::new(
                    "--storage-backend",
                    format!("backend {other:?} is not supported (available: memory, file, redis)"),
                ))
            }
        };

        let hub_api_url = cli
            .hub_api_url
            .or(file.hub_api_url)
            .filter(|u| !u.is_empty())
            .map(|u| {
                Target::parse(&u).map_err(|e| ConfigError::new("--hub-api-url", e.to_string()))
            })
            .transpose()?;
        let hub_api_token = env("JUPYTERHUB_API_TOKEN")
            .filter(|t| !t.is_empty())
            .or(file.hub_api_token);
        let notify_hub = cli.notify_hub || file.notify_hub.unwrap_or(false);
        if notify_hub && hub_api_url.is_none() {
            return Err(ConfigError::new("--notify-hub", "needs --hub-api-url"));
        }
        let api_url = cli.api_url.or(file.api_url);
        if let Some(url) = &api_url {
            Target::parse(url).map_err(|e| ConfigError::new("--api-url", e.to_string()))?;
        }

        let auth_on = match cli.auth_mode.or(file.auth_mode).as_deref() {
            None | Some("on") => hub_api_url.is_some(),
            Some("off") => false,
            Some(other) => {
                return Err(ConfigError::new(
                    "--auth-mode",
                    format!("expected on or off, got {other:?}"),
                ))
            }
        };
        let auth = if auth_on {
            let hub = hub_api_url.as_ref().expect("auth_on implies a hub URL");
            Some(auth_settings(
                AuthInputs {
                    ttl: cli.auth_cache_ttl.or(file.auth_cache_ttl),
                    negative_ttl: cli.auth_negative_ttl.or(file.auth_negative_ttl),
                    grace: cli.auth_grace.or(file.auth_grace),
                    size: cli.auth_cache_size.or(file.auth_cache_size),
                    allow_token_in_url: cli.allow_token_in_url
                        || file.allow_token_in_url.unwrap_or(false),
                    legacy: cli.auth_legacy_token_endpoint
                        || file.auth_legacy_token_endpoint.unwrap_or(false),
                    hub_login_cookie: cli.hub_login_cookie.or(file.hub_login_cookie),
                    client_id: cli.oauth_client_id.or(file.oauth_client_id),
                    callback_url: cli.oauth_callback_url.or(file.oauth_callback_url),
                    secrets: cli
                        .session_secrets
                        .map(|s| s.split(',').map(str::to_owned).collect())
                        .or(file.session_secrets),
                    identity_header: cli.identity_header.or(file.identity_header),
                    cookie_path: cli.cookie_path.or(file.cookie_path),
                    cookie_secure: cli.cookie_secure || file.cookie_secure.unwrap_or(false),
                },
                hub,
            )?)
        } else {
            None
        };

        let mut warnings = Vec::new();
        let versions = match cli.ssl_protocol.or(file.ssl_protocol).as_deref() {
            None | Some("TLS" | "SSLv23" | "TLS_method" | "SSLv23_method") => Versions::Default,
            Some("TLSv1_2" | "TLSv1_2_method") => Versions::Only12,
            Some("TLSv1_3" | "TLSv1_3_method") => Versions::Only13,
            Some(other) => {
                warnings.push(format!(
                    "--ssl-protocol {other}: not offered by rustls; speaking TLS 1.2 and 1.3"
                ));
                Versions::Default
            }
        };
        if cli.ssl_ciphers.is_some() {
            warnings.push(
                "--ssl-ciphers is ignored: rustls offers only its own modern AEAD cipher suites"
                    .into(),
            );
        }
        if cli.ssl_allow_rc4 {
            warnings.push("--ssl-allow-rc4 is ignored: RC4 is never offered".into());
        }
        if cli.ssl_dhparam.is_some() {
            warnings.push("--ssl-dhparam is ignored: rustls uses its own (EC)DHE groups".into());
        }
        let proxy_tls = server_files(
            "--ssl",
            cli.ssl_key.or(file.ssl_key),
            cli.ssl_cert.or(file.ssl_cert),
            cli.ssl_ca.or(file.ssl_ca),
            cli.ssl_request_cert || file.ssl_request_cert.unwrap_or(false),
            cli.ssl_reject_unauthorized || file.ssl_reject_unauthorized.unwrap_or(false),
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            versions,
        )?;
        let api_tls = server_files(
            "--api-ssl",
            cli.api_ssl_key.or(file.api_ssl_key),
            cli.api_ssl_cert.or(file.api_ssl_cert),
            cli.api_ssl_ca.or(file.api_ssl_ca),
            cli.api_ssl_request_cert || file.api_ssl_request_cert.unwrap_or(false),
            cli.api_ssl_reject_unauthorized || file.api_ssl_reject_unauthorized.unwrap_or(false),
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            versions,
        )?;
        let client_tls = ClientFiles {
            key: cli.client_ssl_key.or(file.client_ssl_key),
            cert: cli.client_ssl_cert.or(file.client_ssl_cert),
            ca: cli.client_ssl_ca.or(file.client_ssl_ca),
        };
        if client_tls.key.is_some() != client_tls.cert.is_some() {
            return Err(ConfigError::new(
                "--client-ssl-key",
                "needs --client-ssl-cert as well (and the other way round)",
            ));
        }
        for (flag, path) in [
            ("--client-ssl-key", &client_tls.key),
            ("--client-ssl-cert", &client_tls.cert),
            ("--client-ssl-ca", &client_tls.ca),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(ConfigError::new(
                        flag,
                        format!("{} is not a readable file", p.display()),
                    ));
                }
            }
        }
        let redirect = match cli.redirect_port.or(file.redirect_port) {
            None => None,
            Some(_) if proxy_tls.is_none() => {
                return Err(ConfigError::new(
                    "--redirect-port",
                    "HTTPS redirection needs --ssl-key and --ssl-cert",
                ))
            }
            Some(port) => {
                let to = cli
                    .redirect_to
                    .or(file.redirect_to)
                    .unwrap_or(match &proxy_listen {
                        Listen::Tcp { port, .. } => *port,
                        Listen::Unix(_) => 443,
                    });
                Some((port, to))
            }
        };

        let ms = |v: Option<u64>| v.filter(|v| *v > 0).map(Duration::from_millis);
        Ok(Config {
            proxy_listen,
            api_listen,
            metrics_listen,
            auth_token,
            default_target,
            error_pages,
            host_routing: cli.host_routing || file.host_routing.unwrap_or(false),
            x_forward: !cli.no_x_forward && file.x_forward.unwrap_or(true),
            prepend_path: !cli.no_prepend_path && file.prepend_path.unwrap_or(true),
            include_prefix: !cli.no_include_prefix && file.include_prefix.unwrap_or(true),
            custom_headers,
            insecure: cli.insecure || file.insecure.unwrap_or(false),
            log_level,
            log_format,
            pid_file: cli.pid_file.or(file.pid_file),
            client_idle_timeout: ms(cli.timeout.or(file.timeout)),
            proxy_timeout: ms(cli.proxy_timeout.or(file.proxy_timeout)),
            keep_alive_timeout: ms(cli.keep_alive_timeout.or(file.keep_alive_timeout))
                .unwrap_or(Duration::from_secs(5)),
            max_route_body: 1024 * 1024,
            proxy_tls,
            api_tls,
            client_tls,
            redirect,
            max_header_size: cli
                .max_header_size
                .or(file.max_header_size)
                .unwrap_or(32 * 1024),
            max_connections: cli
                .max_connections
                .or(file.max_connections)
                .unwrap_or(10_000)
                .max(1),
            access_log: cli.access_log || file.access_log.unwrap_or(false),
            warnings,
            max_sync_body: cli
                .max_sync_body
                .or(file.max_sync_body)
                .unwrap_or(64 * 1024 * 1024),
            storage,
            hub_api_url,
            hub_api_token,
            notify_hub,
            api_url,
            auth,
            shutdown_grace: Duration::from_secs(
                cli.shutdown_timeout.or(file.shutdown_timeout).unwrap_or(10),
            ),
        })
    }
}

/// One listener's TLS files, from the flags with this prefix (`--ssl`, `--api-ssl`). Only
/// existence is checked here; whether they make a configuration is checked at start.
#[allow(clippy::too_many_arguments)]
fn server_files(
    prefix: &str,
    key: Option<PathBuf>,
    cert: Option<PathBuf>,
    ca: Option<PathBuf>,
    request_cert: bool,
    reject_unauthorized: bool,
    alpn: Vec<Vec<u8>>,
    versions: Versions,
) -> Result<Option<ServerFiles>, ConfigError> {
    let (key, cert) = match (key, cert) {
        (None, None) => {
            if ca.is_some() || request_cert {
                return Err(ConfigError::new(
                    format!("{prefix}-ca"),
                    format!("needs {prefix}-key and {prefix}-cert"),
                ));
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(ConfigError::new(
                format!("{prefix}-key"),
                format!("needs {prefix}-cert as well"),
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                format!("{prefix}-cert"),
                format!("needs {prefix}-key as well"),
            ))
        }
        (Some(k), Some(c)) => (k, c),
    };
    for (flag, p) in [
        ("key", Some(&key)),
        ("cert", Some(&cert)),
        ("ca", ca.as_ref()),
    ] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(ConfigError::new(
                    format!("{prefix}-{flag}"),
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
    }
    if request_cert && ca.is_none() {
        return Err(ConfigError::new(
            format!("{prefix}-request-cert"),
            format!("needs {prefix}-ca to verify client certificates against"),
        ));
    }
    Ok(Some(ServerFiles {
        key,
        cert,
        ca,
        request_cert,
        reject_unauthorized,
        alpn,
        versions,
    }))
}

/// Authentication settings as given, before validation.
struct AuthInputs {
    ttl: Option<u64>,
    negative_ttl: Option<u64>,
    grace: Option<u64>,
    size: Option<u64>,
    allow_token_in_url: bool,
    legacy: bool,
    hub_login_cookie: Option<String>,
    client_id: Option<String>,
    callback_url: Option<String>,
    secrets: Option<Vec<String>>,
    identity_header: Option<String>,
    cookie_path: Option<String>,
    cookie_secure: bool,
}

fn auth_settings(i: AuthInputs, hub: &Target) -> Result<crate::auth::AuthSettings, ConfigError> {
    let oauth = match (i.client_id, i.callback_url) {
        (Some(client_id), Some(callback_url)) => {
            let callback_path = match callback_url.split_once("://") {
                Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]).to_owned(),
                None => callback_url.clone(),
            };
            let callback_path = callback_path.split('?').next().unwrap_or("/").to_owned();
            if !callback_path.starts_with('/') || callback_path == "/" {
                return Err(ConfigError::new(
                    "--oauth-callback-url",
                    "must be a URL or absolute path with a path of its own, e.g. /hubgate/oauth_callback",
                ));
            }
            Some(crate::auth::oauth::OAuthSettings {
                client_id,
                callback_url,
                callback_path,
                authorize_url: crate::path::join(hub.path(), "oauth2/authorize"),
            })
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::new(
                "--oauth-client-id",
                "needs --oauth-callback-url too",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "--oauth-callback-url",
                "needs --oauth-client-id too",
            ))
        }
    };
    let mut secrets: Vec<Vec<u8>> = i
        .secrets
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.trim().as_bytes().to_vec())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(short) = secrets.iter().find(|s| s.len() < 32) {
        return Err(ConfigError::new(
            "--session-secrets",
            format!(
                "each secret needs at least 32 bytes (one has {})",
                short.len()
            ),
        ));
    }
    let ephemeral_secret = secrets.is_empty();
    if ephemeral_secret {
        let mut random = vec![0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
            .map_err(|_| ConfigError::new("--session-secrets", "no randomness for a secret"))?;
        secrets.push(random);
    }
    let identity_header = i
        .identity_header
        .map(|h| {
            HeaderName::try_from(h.as_str()).map_err(|_| {
                ConfigError::new("--identity-header", format!("invalid header name {h:?}"))
            })
        })
        .transpose()?;
    let secs = |v: Option<u64>, default: u64| Duration::from_secs(v.unwrap_or(default));
    Ok(crate::auth::AuthSettings {
        cache_ttl: secs(i.ttl, 300),
        negative_ttl: secs(i.negative_ttl, 10),
        grace: secs(i.grace, 300),
        cache_size: i.size.unwrap_or(100_000),
        allow_token_in_url: i.allow_token_in_url,
        legacy_token_endpoint: i.legacy,
        hub_login_cookie: i.hub_login_cookie.filter(|c| !c.is_empty()),
        oauth,
        session_secrets: secrets,
        ephemeral_secret,
        identity_header,
        cookie_path: i.cookie_path.unwrap_or_else(|| "/".to_owned()),
        cookie_secure: i.cookie_secure,
    })
}

/// The Redis flags as given (flag, else file key).
struct RedisFlags {
    url: Option<String>,
    prefix: Option<String>,
    ca: Option<PathBuf>,
    sentinel: Option<String>,
    cluster: Option<String>,
    sentinel_master: Option<String>,
    sentinel_password: Option<String>,
    password: Option<String>,
    min_replicas: Option<u32>,
}

/// The most `--redis-min-replicas` may ask: more replicas than any deployment runs is a typo.
const MIN_REPLICAS_MAX: u32 = 16;

fn redis_settings(f: RedisFlags) -> Result<Storage, ConfigError> {
    let url = f.url.filter(|u| !u.is_empty());
    let sentinel = f.sentinel.filter(|s| !s.is_empty());
    let cluster = f.cluster.filter(|s| !s.is_empty());
    let server = match (url, sentinel, cluster) {
        (None, None, None) => {
            return Err(ConfigError::new(
                "--redis-url",
                "--storage-backend redis needs the Redis server's URL (redis://host:port), \
                 --redis-sentinel or --redis-cluster",
            ))
        }
        (None, None, Some(list)) => {
            if f.sentinel_master.is_some() || f.sentinel_password.is_some() {
                return Err(ConfigError::new(
                    "--redis-cluster",
                    "the --redis-sentinel-* flags only mean something with --redis-sentinel",
                ));
            }
            RedisServer::Cluster {
                nodes: host_ports("--redis-cluster", &list)?,
                password: f.password.filter(|p| !p.is_empty()),
            }
        }
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "--redis-sentinel",
                "give one of --redis-url, --redis-sentinel and --redis-cluster",
            ))
        }
        (Some(url), None, None) => {
            if f.password.is_some() {
                return Err(ConfigError::new(
                    "--redis-password",
                    "with --redis-url the password goes in the URL (redis://:PASSWORD@host)",
                ));
            }
            for (flag, given) in [
                ("--redis-sentinel-master", f.sentinel_master.is_some()),
                ("--redis-sentinel-password", f.sentinel_password.is_some()),
            ] {
                if given {
                    return Err(ConfigError::new(
                        flag,
                        "only means something with --redis-sentinel",
                    ));
                }
            }
            redis_url(&url)?;
            RedisServer::Url(url)
        }
        (None, Some(list), None) => RedisServer::Sentinel(sentinel_settings(
            &list,
            f.sentinel_master,
            f.password,
            f.sentinel_password,
        )?),
    };
    if !matches!(server, RedisServer::Url(_)) && f.ca.is_some() {
        return Err(ConfigError::new(
            "--redis-ca",
            "TLS towards Sentinel or a cluster is not supported yet",
        ));
    }
    let prefix = f.prefix.unwrap_or_else(|| "hubgate".to_owned());
    if prefix.is_empty() || prefix.contains(['{', '}']) || prefix.chars().any(char::is_whitespace) {
        return Err(ConfigError::new(
            "--redis-prefix",
            "must be non-empty, without braces or spaces",
        ));
    }
    let min_replicas = f.min_replicas.unwrap_or(0);
    if min_replicas > MIN_REPLICAS_MAX {
        return Err(ConfigError::new(
            "--redis-min-replicas",
            format!("{min_replicas} is more than {MIN_REPLICAS_MAX}"),
        ));
    }
    Ok(Storage::Redis(RedisSettings {
        server,
        prefix,
        ca: f.ca,
        min_replicas,
    }))
}

fn redis_url(url: &str) -> Result<(), ConfigError> {
    let scheme = url.split("://").next().unwrap_or_default();
    if !["redis", "rediss", "redis+unix", "unix"].contains(&scheme) || !url.contains("://") {
        return Err(ConfigError::new(
            "--redis-url",
            "expected redis://, rediss:// or redis+unix:// (the URL is not shown: it may hold a password)",
        ));
    }
    if let Err(e) = redis::Client::open(url) {
        // The URL may carry a password: name the problem, never echo the URL.
        return Err(ConfigError::new(
            "--redis-url",
            format!("not a usable Redis URL ({})", e.category()),
        ));
    }
    Ok(())
}

/// `host:port,host:port` (IPv6 as `[addr]:port`).
fn host_ports(flag: &'static str, list: &str) -> Result<Vec<(String, u16)>, ConfigError> {
    let mut nodes = Vec::new();
    for item in list.split(',').map(str::trim) {
        let parsed = item.rsplit_once(':').and_then(|(host, port)| {
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
            (!host.is_empty() && !host.contains(['/', '@', ' '])).then(|| (host.to_owned(), port))
        });
        match parsed {
            Some(node) => nodes.push(node),
            None => {
                return Err(ConfigError::new(
                    flag,
                    format!("{item:?} is not host:port (expected host:port,host:port)"),
                ))
            }
        }
    }
    Ok(nodes)
}

/// `--redis-sentinel`'s nodes and the master's name.
fn sentinel_settings(
    list: &str,
    master: Option<String>,
    password: Option<String>,
    sentinel_password: Option<String>,
) -> Result<SentinelSettings, ConfigError> {
    let nodes = host_ports("--redis-sentinel", list)?;
    let master = master.filter(|m| !m.is_empty()).ok_or_else(|| {
        ConfigError::new(
            "--redis-sentinel-master",
            "--redis-sentinel needs the name of the primary the sentinels watch",
        )
    })?;
    if master.chars().any(char::is_whitespace) {
        return Err(ConfigError::new(
            "--redis-sentinel-master",
            "must not contain spaces",
        ));
    }
    Ok(SentinelSettings {
        nodes,
        master,
        password: password.filter(|p| !p.is_empty()),
        sentinel_password: sentinel_password.filter(|p| !p.is_empty()),
    })
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().to_owned();
        ConfigError::new("--config", format!("{}: {msg}", path.display()))
    })
}

fn parse_header(
    name: &str,
    value: &str,
    flag: &str,
) -> Result<(HeaderName, HeaderValue), ConfigError> {
    let name = HeaderName::try_from(name)
        .map_err(|_| ConfigError::new(flag, format!("invalid header name {name:?}")))?;
    let value = HeaderValue::try_from(value)
        .map_err(|_| ConfigError::new(flag, format!("invalid value for header {name}")))?;
    Ok((name, value))
}

/// Refuses CHP flags whose features are not built yet, naming the first one given.
fn refuse_unbuilt(cli: &Cli) -> Result<(), ConfigError> {
    let given = [
        (
            "--auto-rewrite",
            cli.auto_rewrite,
            "Location rewriting is not supported yet",
        ),
        (
            "--change-origin",
            cli.change_origin,
            "changing the Host header is not supported yet",
        ),
        (
            "--protocol-rewrite",
            cli.protocol_rewrite.is_some(),
            "Location rewriting is not supported yet",
        ),
    ];
    match given.iter().find(|(_, set, _)| *set) {
        Some((flag, _, why)) => Err(ConfigError::new(*flag, *why)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["hubgate"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).unwrap();
        Config::load(cli, &|_| None)
    }

    #[test]
    fn defaults_match_chp() {
        let c = load(&[]).unwrap();
        assert_eq!(
            c.proxy_listen,
            Listen::Tcp {
                host: String::new(),
                port: 8000
            }
        );
        assert_eq!(
            c.api_listen,
            Listen::Tcp {
                host: "localhost".into(),
                port: 8001
            }
        );
        assert!(c.x_forward && c.prepend_path && c.include_prefix && !c.host_routing);
        assert_eq!(c.keep_alive_timeout, Duration::from_secs(5));
        assert!(c.auth_token.is_none());
    }

    #[test]
    fn both_flag_forms_parse() {
        let c = load(&["--port=9000", "--api-ip", "127.0.0.1"]).unwrap();
        assert_eq!(
            c.proxy_listen,
            Listen::Tcp {
                host: String::new(),
                port: 9000
            }
        );
        assert_eq!(
            c.api_listen,
            Listen::Tcp {
                host: "127.0.0.1".into(),
                port: 9001
            }
        );
    }

    #[test]
    fn conflicts_and_unbuilt_flags_name_the_flag() {
        let e = load(&["--error-target", "http://a/", "--error-path", "/tmp"]).unwrap_err();
        assert_eq!(e.flag, "--error-target");
        assert!(e.problem.contains("--error-path"));
        assert_eq!(load(&["--ssl-key", "k.pem"]).unwrap_err().flag, "--ssl-key");
        assert_eq!(
            load(&["--change-origin"]).unwrap_err().flag,
            "--change-origin"
        );
        assert_eq!(
            load(&["--redirect-port", "80"]).unwrap_err().flag,
            "--redirect-port"
        );
        assert_eq!(
            load(&["--custom-header", "nocolon"]).unwrap_err().flag,
            "--custom-header"
        );
        assert_eq!(
            load(&["--default-target", "nope"]).unwrap_err().flag,
            "--default-target"
        );
        assert_eq!(
            load(&["--socket", "/tmp/s", "--port", "1"])
                .unwrap_err()
                .flag,
            "--socket"
        );
        assert_eq!(
            load(&["--storage-backend", "etcd"]).unwrap_err().flag,
            "--storage-backend"
        );
        assert_eq!(
            load(&["--storage-backend", "redis"]).unwrap_err().flag,
            "--redis-url"
        );
        let e = load(&[
            "--storage-backend",
            "redis",
            "--redis-url",
            "http://:secret@h/",
        ])
        .unwrap_err();
        assert_eq!(e.flag, "--redis-url");
        assert!(!e.problem.contains("secret"), "{}", e.problem);
    }

    #[test]
    fn redis_backend_takes_a_url_and_a_prefix() {
        let c = load(&[
            "--storage-backend",
            "redis",
            "--redis-url",
            "redis://:pw@127.0.0.1:6380/2",
        ])
        .unwrap();
        assert_eq!(
            c.storage,
            Storage::Redis(RedisSettings {
                server: RedisServer::Url("redis://:pw@127.0.0.1:6380/2".into()),
                prefix: "hubgate".into(),
                ca: None,
                min_replicas: 0,
            })
        );
        let e = load(&[
            "--storage-backend",
            "redis",
            "--redis-url",
            "redis://h/",
            "--redis-prefix",
            "a{b}",
        ])
        .unwrap_err();
        assert_eq!(e.flag, "--redis-prefix");
    }

    #[test]
    fn redis_sentinel_takes_nodes_a_master_and_passwords() {
        let c = load(&[
            "--storage-backend",
            "redis",
            "--redis-sentinel",
            "127.0.0.1:26379, [::1]:26380,s3:26381",
            "--redis-sentinel-master",
            "hub",
            "--redis-password",
            "pw",
            "--redis-min-replicas",
            "1",
        ])
        .unwrap();
        assert_eq!(
            c.storage,
            Storage::Redis(RedisSettings {
                server: RedisServer::Sentinel(SentinelSettings {
                    nodes: vec![
                        ("127.0.0.1".into(), 26379),
                        ("::1".into(), 26380),
                        ("s3".into(), 26381)
                    ],
                    master: "hub".into(),
                    password: Some("pw".into()),
                    sentinel_password: None,
                }),
                prefix: "hubgate".into(),
                ca: None,
                min_replicas: 1,
            })
        );
        let flag = |args: &[&str]| {
            let mut all = vec!["--storage-backend", "redis"];
            all.extend_from_slice(args);
            load(&all).unwrap_err().flag
        };
        assert_eq!(
            flag(&["--redis-sentinel", "h:1"]),
            "--redis-sentinel-master"
        );
        assert_eq!(
            flag(&["--redis-sentinel", "h", "--redis-sentinel-master", "m"]),
            "--redis-sentinel"
        );
        assert_eq!(
            flag(&["--redis-sentinel", "h:1,", "--redis-sentinel-master", "m"]),
            "--redis-sentinel"
        );
        assert_eq!(
            flag(&["--redis-sentinel", "h:1", "--redis-url", "redis://h/"]),
            "--redis-sentinel"
        );
        assert_eq!(
            flag(&["--redis-url", "redis://h/", "--redis-password", "x"]),
            "--redis-password"
        );
        assert_eq!(
            flag(&["--redis-url", "redis://h/", "--redis-sentinel-master", "m"]),
            "--redis-sentinel-master"
        );
        assert_eq!(
            flag(&["--redis-url", "redis://h/", "--redis-min-replicas", "17"]),
            "--redis-min-replicas"
        );
        assert_eq!(
            flag(&["--redis-cluster", "h:1", "--redis-url", "redis://h/"]),
            "--redis-sentinel"
        );
        assert_eq!(flag(&["--redis-cluster", "h:x"]), "--redis-cluster");
        let c = load(&[
            "--storage-backend",
            "redis",
            "--redis-cluster",
            "a:7000,b:7001",
            "--redis-password",
            "pw",
        ])
        .unwrap();
        assert!(matches!(
            c.storage,
            Storage::Redis(RedisSettings {
                server: RedisServer::Cluster { ref nodes, password: Some(ref p) },
                ..
            }) if nodes.len() == 2 && p == "pw"
        ));
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let file: FileConfig = toml::from_str(
            "port = 7000\nauth_token = \"from-file\"\nx_forward = false\ncustom_headers = { X-A = \"1\" }\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from(["hubgate", "--port", "7100"]).unwrap();
        let c = Config::merge(cli, file, &|k| {
            (k == "CONFIGPROXY_AUTH_TOKEN").then(|| "env".into())
        })
        .unwrap();
        assert_eq!(
            c.proxy_listen,
            Listen::Tcp {
                host: String::new(),
                port: 7100
            }
        );
        assert_eq!(c.auth_token.as_deref(), Some("env"));
        assert!(!c.x_forward);
        assert_eq!(c.custom_headers[0].0, "x-a");
    }

    #[test]
    fn storage_defaults_to_memory_and_file_takes_a_path() {
        assert_eq!(load(&[]).unwrap().storage, Storage::Memory);
        let c = load(&["--storage-backend", "file", "--storage-path", "/tmp/x"]).unwrap();
        assert_eq!(c.storage, Storage::File("/tmp/x".into()));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("prot = 1").is_err());
    }

    #[test]
    fn custom_headers_trim_like_chp() {
        let c = load(&["--custom-header", " X-B : two words "]).unwrap();
        assert_eq!(c.custom_headers[0].0, "x-b");
        assert_eq!(c.custom_headers[0].1, "two words");
    }
}
