//! Every option, declared once: [`Options`] is at the same time the command line (clap derive,
//! with the environment variable that stands in for a flag) and the configuration file's schema
//! (serde, keys in snake_case). Its defaults are clap's, so `--help` shows them and a file that
//! leaves a key out gets the same value as a command line that leaves the flag out.
//!
//! # Why clap and serde, and not a layering crate
//! The layers are flag, environment, file, default. clap already resolves the first two and
//! the last one, and records which of them each value came from
//! ([`ArgMatches::value_source`]); serde already checks the file's keys and types. What is left
//! is laying the explicitly given values over the file's, which [`Cli::over`] does by name, for
//! every option at once. A layering crate (figment is the well-kept one) would add a handful of
//! crates, a proc-macro among them, to do that overlay, and could still not tell a boolean flag
//! left out from one given as `false` the way `value_source` can.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches, Parser};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Options that only the command line takes: a configuration file naming them is refused.
/// `config` names the file itself; `custom_header` is the flag form of the file's
/// `custom_headers` table, `limit_login_rate` of `limits.login.rate`; the rest are CHP flags that hubgate refuses or ignores.
pub const FLAG_ONLY: &[&str] = &[
    "config",
    "custom_header",
    "limit_login_rate",
    "ssl_ciphers",
    "ssl_allow_rc4",
    "ssl_dhparam",
    "client_ssl_request_cert",
    "client_ssl_reject_unauthorized",
    "auto_rewrite",
    "change_origin",
    "protocol_rewrite",
];

/// Every option: flags and defaults follow configurable-http-proxy 5.3. A file key is the field
/// name; `auth_token`, `hub_api_token` and `custom_headers` are file keys only (the tokens'
/// usual home is the environment, read in [`super::Config::load`]). Its `Debug` hides the
/// secrets ([`SECRET_OPTIONS`], and the password in `--redis-url`).
#[derive(Clone, Parser, Serialize, Deserialize)]
#[command(
    name = "hubgate",
    version,
    about = "An authenticating reverse proxy for JupyterHub; a drop-in for configurable-http-proxy"
)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// TOML configuration file (see config/hubgate.toml); flags and environment override it.
    #[arg(long, env = "HUBGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Public-facing IP or host name of the proxy [default: all interfaces]
    #[arg(long, value_name = "IP")]
    pub ip: Option<String>,
    /// Public-facing port of the proxy
    #[arg(long, value_name = "N", default_value_t = 8000)]
    pub port: u16,
    /// Unix socket for the proxy to listen on, instead of --ip/--port
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Inward-facing IP or host name for API requests
    #[arg(long, value_name = "IP", default_value = "localhost")]
    pub api_ip: String,
    /// Inward-facing port for API requests [default: --port + 1]
    #[arg(long, value_name = "N")]
    pub api_port: Option<u16>,
    /// Unix socket for the API to listen on, instead of --api-ip/--api-port
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// The API token (file only; the environment's CONFIGPROXY_AUTH_TOKEN wins)
    #[arg(skip)]
    pub auth_token: Option<String>,

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
    #[arg(long = "no-x-forward", action = ArgAction::SetFalse)]
    pub x_forward: bool,
    /// Don't prepend the target's path to proxied requests
    #[arg(long = "no-prepend-path", action = ArgAction::SetFalse)]
    pub prepend_path: bool,
    /// Don't include the routing prefix in proxied requests
    #[arg(long = "no-include-prefix", action = ArgAction::SetFalse)]
    pub include_prefix: bool,
    /// Header added to every proxied request, `name: value` (repeatable)
    #[arg(long, value_name = "HEADER")]
    pub custom_header: Vec<String>,
    /// Headers added to every proxied request (file only; the flag is --custom-header)
    #[arg(skip)]
    pub custom_headers: Option<BTreeMap<String, String>>,
    /// Don't verify the certificates of https targets
    #[arg(long)]
    pub insecure: bool,

    /// Log level: debug, info, warn, error (also trace)
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: plain or json
    #[arg(
        long,
        env = "HUBGATE_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "plain"
    )]
    pub log_format: String,
    /// Write our PID to this file (removed at exit)
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,

    /// Milliseconds a client connection may sit idle during a proxied request before it is dropped
    #[arg(long, value_name = "MS")]
    pub timeout: Option<u64>,
    /// Milliseconds to wait for a target's response before answering 503
    #[arg(long, value_name = "MS")]
    pub proxy_timeout: Option<u64>,
    /// Milliseconds an idle keep-alive client connection is kept open
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub keep_alive_timeout: u64,

    /// Where routes are kept: memory (CHP's behaviour), file (on local disk, surviving
    /// restarts) or redis (shared by several replicas)
    #[arg(long, value_name = "BACKEND", default_value = "memory")]
    pub storage_backend: String,
    /// The Redis server of `--storage-backend redis`: redis://[:password@]host[:port][/db] or
    /// rediss://... for TLS
    #[arg(
        long,
        env = "HUBGATE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Prefix of hubgate's Redis keys; replicas sharing a table use the same one
    #[arg(long, value_name = "PREFIX", default_value = "hubgate")]
    pub redis_prefix: String,
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
    /// put it in the URL) [default: none]
    #[arg(
        long,
        env = "HUBGATE_REDIS_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub redis_password: Option<String>,
    /// Answer a route change only once this many Redis replicas have it too (WAIT), so that a
    /// failover cannot lose it; 0 to 16 (0: the primary alone)
    #[arg(
        long,
        env = "HUBGATE_REDIS_MIN_REPLICAS",
        value_name = "N",
        default_value_t = 0
    )]
    pub redis_min_replicas: u32,
    /// IP for the metrics server [default: all interfaces]
    #[arg(long, value_name = "IP")]
    pub metrics_ip: Option<String>,
    /// Port of the metrics server (/metrics, /health/live, /health/ready) [default: none]
    #[arg(long, value_name = "N")]
    pub metrics_port: Option<u16>,
    /// Unix socket for the metrics server, instead of --metrics-ip/--metrics-port
    #[arg(long, value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,

    /// Directory of the file store
    #[arg(
        long,
        env = "HUBGATE_STORAGE_PATH",
        value_name = "DIR",
        default_value = "hubgate-data"
    )]
    pub storage_path: PathBuf,
    /// Largest body of POST/PATCH /api/proxy, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_sync_body: usize,

    /// The hub's API, e.g. http://127.0.0.1:8081/hub/api (token in JUPYTERHUB_API_TOKEN)
    #[arg(long, env = "JUPYTERHUB_API_URL", value_name = "URL")]
    pub hub_api_url: Option<String>,
    /// hubgate's token for the hub (file only; the environment's JUPYTERHUB_API_TOKEN wins)
    #[arg(skip)]
    pub hub_api_token: Option<String>,
    /// Announce this proxy's API address and token to the hub (PATCH /hub/api/proxy) at start
    #[arg(long)]
    pub notify_hub: bool,
    /// The API address to announce to the hub [default: http://<api-ip>:<api-port>]
    #[arg(long, value_name = "URL")]
    pub api_url: Option<String>,

    /// Authentication at the edge: on (the default when --hub-api-url is set) or off
    #[arg(long, value_name = "on|off")]
    pub auth_mode: Option<String>,
    /// Seconds a hub answer about a credential is trusted
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub auth_cache_ttl: u64,
    /// Seconds a refused credential is remembered
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub auth_negative_ttl: u64,
    /// Seconds past its TTL a cached identity still works while the hub is down
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub auth_grace: u64,
    /// Most credentials cached at once
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub auth_cache_size: u64,
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
    pub session_secrets: Option<Secrets>,
    /// Header set to the authenticated user's name on forwarded requests (e.g. X-Forwarded-User)
    #[arg(long, value_name = "NAME")]
    pub identity_header: Option<String>,
    /// Path attribute of hubgate's cookies
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub cookie_path: String,
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

    /// Largest request head in bytes; larger gets 431
    #[arg(long, value_name = "BYTES", default_value_t = 32 * 1024)]
    pub max_header_size: usize,
    /// Most client connections on the public port at once; more get 503
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Data-plane worker threads serving the public port, 1 to 1024 [default: the number of
    /// cores hubgate may run on]
    #[arg(long, env = "HUBGATE_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// Seconds in-flight requests may run after SIGTERM/SIGINT
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub shutdown_timeout: u64,
    /// Log one line per proxied request (method, route, status, duration, bytes)
    #[arg(long, env = "HUBGATE_ACCESS_LOG")]
    pub access_log: bool,
    /// Fair-use limits per user and per client address (file only: the `[limits]` table;
    /// reloaded on SIGHUP)
    #[arg(skip)]
    pub limits: Option<crate::limits::LimitsFile>,
    /// Logins per second per client address on the hub's login and token endpoints (the
    /// file's `limits.login.rate`, which it overrides; `0.2` is 12 a minute)
    #[arg(long, env = "HUBGATE_LIMIT_LOGIN_RATE", value_name = "PER_SEC")]
    pub limit_login_rate: Option<f64>,

    // Flags CHP has whose features hubgate does not have. They are parsed so that using one
    // gets a clear refusal naming it instead of an "unknown flag" or, worse, silence.
    #[arg(long, hide = true)]
    pub auto_rewrite: bool,
    #[arg(long, hide = true)]
    pub change_origin: bool,
    #[arg(long, hide = true)]
    pub protocol_rewrite: Option<String>,
}

impl Default for Options {
    /// What an empty command line gives, with no environment: the declared defaults.
    fn default() -> Self {
        let command = Options::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command.get_matches_from(["hubgate"]);
        Options::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

impl Options {
    /// The configuration file's keys, in declaration order.
    pub fn file_keys() -> Vec<String> {
        let all = serde_json::to_value(Options::default()).unwrap_or_default();
        all.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|k| !FLAG_ONLY.contains(&k.as_str()))
            .collect()
    }
}

/// The options that hold a secret (field names): `Debug` shows them as `"<hidden>"`.
pub const SECRET_OPTIONS: &[&str] = &[
    "auth_token",
    "hub_api_token",
    "redis_password",
    "redis_sentinel_password",
    "session_secrets",
];

/// Every option by name, as the file would have it, except that the secrets are hidden: what
/// ends up in a log or a panic message when options are printed.
impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Ok(serde_json::Value::Object(mut fields)) = serde_json::to_value(self) else {
            return f.write_str("Options { .. }");
        };
        for (name, value) in fields.iter_mut() {
            if value.is_null() {
                continue;
            }
            if SECRET_OPTIONS.contains(&name.as_str()) {
                *value = "<hidden>".into();
            } else if name == "redis_url" {
                if let Some(url) = value.as_str() {
                    *value = crate::store::redis::without_password(url).into();
                }
            }
        }
        let mut out = f.debug_struct("Options");
        for (name, value) in &fields {
            out.field(name, &format_args!("{value}"));
        }
        out.finish()
    }
}

/// Session cookie secrets: comma-separated on the command line and in the environment, a list
/// in the file. Never printed.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secrets(pub Vec<String>);

impl From<&str> for Secrets {
    fn from(s: &str) -> Self {
        Secrets(s.split(',').map(str::to_owned).collect())
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({} hidden)", self.0.len())
    }
}

/// The command line as parsed: the options, and which of them the command line or the
/// environment gave (the rest are defaults, which a configuration file may override).
#[derive(Debug, Clone, Default)]
pub struct Cli {
    pub options: Options,
    given: BTreeSet<String>,
}

impl Cli {
    /// Whether the command line or the environment gave this option (by field name).
    pub fn gave(&self, id: &str) -> bool {
        self.given.contains(id)
    }

    /// The file's options with every option given on the command line or in the environment
    /// laid over them: flag over environment (clap's own order) over file over default.
    ///
    /// # Errors
    /// Only if the options cannot be written out and read back, which would be a bug here.
    pub fn over(&self, file: Options) -> Result<Options, ConfigError> {
        let broken = |e: serde_json::Error| ConfigError::new("--config", e.to_string());
        let mut layered = serde_json::to_value(file).map_err(broken)?;
        let mut given = serde_json::to_value(&self.options).map_err(broken)?;
        for id in &self.given {
            if let Some(value) = given.get_mut(id) {
                layered[id] = value.take();
            }
        }
        serde_json::from_value(layered).map_err(broken)
    }
}

impl CommandFactory for Cli {
    fn command() -> clap::Command {
        Options::command()
    }
    fn command_for_update() -> clap::Command {
        Options::command_for_update()
    }
}

impl FromArgMatches for Cli {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let options = Options::from_arg_matches(matches)?;
        let given = Options::command()
            .get_arguments()
            .map(|arg| arg.get_id().as_str())
            .filter(|id| {
                matches!(
                    matches.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .map(str::to_owned)
            .collect();
        Ok(Cli { options, given })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Cli::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Parser for Cli {}

/// Reads the configuration file: TOML whose keys are [`Options`]' fields, command-line-only
/// options refused.
///
/// # Errors
/// [`ConfigError`] for `--config`: the file cannot be read, is not TOML, has an unknown key or a
/// value of the wrong type.
pub fn read_file(path: &Path) -> Result<Options, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    let bad = |e: toml::de::Error| {
        ConfigError::new("--config", format!("{}: {}", path.display(), e.message()))
    };
    let keys: toml::Table = toml::from_str(&text).map_err(bad)?;
    if let Some(key) = keys.keys().find(|k| FLAG_ONLY.contains(&k.as_str())) {
        return Err(ConfigError::new(
            "--config",
            format!(
                "{}: `{key}` is a command-line flag only, not a file key",
                path.display()
            ),
        ));
    }
    toml::from_str(&text).map_err(bad)
}
