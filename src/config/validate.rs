//! Validation: the layered [`Options`] become a [`Config`], or the first problem found becomes a
//! [`ConfigError`] naming its flag. Nothing here binds a socket or opens a store; files are only
//! checked to exist.

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::options::{Cli, Options};
use super::{Config, ConfigError, Secret, Storage};
use crate::auth::oauth::OAuthSettings;
use crate::auth::AuthSettings;
use crate::logging::LogFormat;
use crate::proxy::ErrorPages;
use crate::server::Listen;
use crate::store::redis::{RedisServer, RedisSettings, SentinelSettings};
use crate::target::Target;
use crate::tls::{ClientFiles, ServerFiles, Versions};

/// The most data-plane workers `--workers` may ask for.
const MAX_WORKERS: usize = 1024;

/// Checks every option and resolves the defaults that depend on other options. `cli` says
/// which options were given on the command line, for the conflicts CHP defines on flags only.
pub(super) fn validate(
    o: Options,
    cli: &Cli,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    refuse_unbuilt(&o)?;
    let proxy_listen = proxy_listen(&o, cli)?;
    let api_listen = api_listen(&o, cli, &proxy_listen)?;
    let metrics_listen = metrics_listen(&o, cli)?;
    let default_target = o
        .default_target
        .as_deref()
        .map(|t| target("--default-target", t))
        .transpose()?;
    let error_pages = error_pages(&o)?;
    let custom_headers = custom_headers(&o)?;
    let (log_level, log_format) = logging(&o)?;
    let storage = storage(&o)?;
    let hub_api_url = o
        .hub_api_url
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(|u| target("--hub-api-url", u))
        .transpose()?;
    if o.notify_hub && hub_api_url.is_none() {
        return Err(ConfigError::new("--notify-hub", "needs --hub-api-url"));
    }
    if let Some(url) = &o.api_url {
        target("--api-url", url)?;
    }
    let auth = auth(&o, hub_api_url.as_ref())?;
    let mut warnings = Vec::new();
    let (proxy_tls, api_tls) = server_tls(&o, &mut warnings)?;
    let client_tls = client_tls(&o)?;
    let redirect = redirect(&o, proxy_tls.is_some(), &proxy_listen)?;
    let workers = workers(o.workers)?;
    let ms = |v: Option<u64>| v.filter(|v| *v > 0).map(Duration::from_millis);
    Ok(Config {
        proxy_listen,
        api_listen,
        metrics_listen,
        auth_token: token(env("CONFIGPROXY_AUTH_TOKEN"), o.auth_token)
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        default_target,
        error_pages,
        host_routing: o.host_routing,
        x_forward: o.x_forward,
        prepend_path: o.prepend_path,
        include_prefix: o.include_prefix,
        custom_headers,
        insecure: o.insecure,
        log_level,
        log_format,
        pid_file: o.pid_file,
        client_idle_timeout: ms(o.timeout),
        proxy_timeout: ms(o.proxy_timeout),
        keep_alive_timeout: ms(Some(o.keep_alive_timeout)).unwrap_or(Duration::from_secs(5)),
        max_route_body: 1024 * 1024,
        proxy_tls,
        api_tls,
        client_tls,
        redirect,
        max_header_size: o.max_header_size,
        max_connections: o.max_connections.max(1),
        workers,
        access_log: o.access_log,
        warnings,
        max_sync_body: o.max_sync_body,
        storage,
        hub_api_url,
        hub_api_token: token(env("JUPYTERHUB_API_TOKEN"), o.hub_api_token).map(Secret::new),
        notify_hub: o.notify_hub,
        api_url: o.api_url,
        auth,
        shutdown_grace: Duration::from_secs(o.shutdown_timeout),
        limits: limits(o.limits.clone(), o.limit_login_rate)?,
        limit_login_rate: o.limit_login_rate,
        config_file: o.config,
    })
}

/// The `[limits]` table with `--limit-login-rate` over its `login.rate`, validated; `None` when
/// it sets no limit.
pub(super) fn limits(
    file: Option<crate::limits::LimitsFile>,
    login_rate: Option<f64>,
) -> Result<Option<crate::limits::Settings>, ConfigError> {
    let mut file = file.unwrap_or_default();
    if let Some(rate) = login_rate {
        let login = file.login.get_or_insert_with(Default::default);
        login.rate = Some(rate);
    }
    crate::limits::Settings::from_file(&file).map_err(|e| {
        let flag = match (login_rate, e.key.as_str()) {
            (Some(_), "limits.login.rate") => "--limit-login-rate".to_owned(),
            _ => e.key,
        };
        ConfigError::new(flag, e.problem)
    })
}

/// A token from the environment, else from the file; an empty variable counts as unset.
fn token(env: Option<String>, file: Option<String>) -> Option<String> {
    env.filter(|t| !t.is_empty()).or(file)
}

fn target(flag: &str, url: &str) -> Result<Target, ConfigError> {
    Target::parse(url).map_err(|e| ConfigError::new(flag, e.to_string()))
}

/// Refuses CHP flags whose features are not built yet, naming the first one given.
fn refuse_unbuilt(o: &Options) -> Result<(), ConfigError> {
    let given = [
        (
            "--auto-rewrite",
            o.auto_rewrite,
            "Location rewriting is not supported yet",
        ),
        (
            "--change-origin",
            o.change_origin,
            "changing the Host header is not supported yet",
        ),
        (
            "--protocol-rewrite",
            o.protocol_rewrite.is_some(),
            "Location rewriting is not supported yet",
        ),
    ];
    match given.iter().find(|(_, set, _)| *set) {
        Some((flag, _, why)) => Err(ConfigError::new(*flag, *why)),
        None => Ok(()),
    }
}

/// `*` and no address at all both mean every interface.
fn host(ip: Option<&str>) -> String {
    match ip {
        None | Some("*") => String::new(),
        Some(ip) => ip.to_owned(),
    }
}

fn proxy_listen(o: &Options, cli: &Cli) -> Result<Listen, ConfigError> {
    match &o.socket {
        Some(_) if cli.gave("ip") || cli.gave("port") => Err(ConfigError::new(
            "--socket",
            "cannot be used with --ip or --port",
        )),
        Some(path) => Ok(Listen::Unix(path.clone())),
        None => Ok(Listen::Tcp {
            host: host(o.ip.as_deref()),
            port: o.port,
        }),
    }
}

fn api_listen(o: &Options, cli: &Cli, proxy: &Listen) -> Result<Listen, ConfigError> {
    if let Some(path) = &o.api_socket {
        if cli.gave("api_ip") || cli.gave("api_port") {
            return Err(ConfigError::new(
                "--api-socket",
                "cannot be used with --api-ip or --api-port",
            ));
        }
        return Ok(Listen::Unix(path.clone()));
    }
    // CHP: --port + 1, or 8001 without a TCP proxy port. Port 0 (pick a free port, for tests)
    // gives 0 for the API as well.
    let port = match (o.api_port, proxy) {
        (Some(port), _) => port,
        (None, Listen::Tcp { port: 0, .. }) => 0,
        (None, Listen::Tcp { port, .. }) => port.checked_add(1).ok_or_else(|| {
            ConfigError::new("--api-port", "--port + 1 is not a valid port; set one")
        })?,
        (None, Listen::Unix(_)) => 8001,
    };
    Ok(Listen::Tcp {
        host: o.api_ip.clone(),
        port,
    })
}

fn metrics_listen(o: &Options, cli: &Cli) -> Result<Option<Listen>, ConfigError> {
    if let Some(path) = &o.metrics_socket {
        if cli.gave("metrics_ip") || cli.gave("metrics_port") {
            return Err(ConfigError::new(
                "--metrics-socket",
                "cannot be used with --metrics-ip or --metrics-port",
            ));
        }
        return Ok(Some(Listen::Unix(path.clone())));
    }
    Ok(o.metrics_port.map(|port| Listen::Tcp {
        host: host(o.metrics_ip.as_deref()),
        port,
    }))
}

fn error_pages(o: &Options) -> Result<ErrorPages, ConfigError> {
    match (&o.error_target, &o.error_path) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            "--error-target",
            "cannot be used with --error-path; pick one",
        )),
        (Some(t), None) => Ok(ErrorPages::Target(target("--error-target", t)?)),
        (None, Some(dir)) if !dir.is_dir() => Err(ConfigError::new(
            "--error-path",
            format!("{} is not a directory", dir.display()),
        )),
        (None, Some(dir)) => Ok(ErrorPages::Dir(dir.clone())),
        (None, None) => Ok(ErrorPages::Builtin),
    }
}

/// The file's `custom_headers`, then each `--custom-header` (trimmed as CHP trims them).
fn custom_headers(o: &Options) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
    let mut headers = Vec::new();
    for (name, value) in o.custom_headers.iter().flatten() {
        headers.push(parse_header(name, value, "custom_headers")?);
    }
    for h in &o.custom_header {
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
        headers.push(parse_header(name.trim(), value.trim(), "--custom-header")?);
    }
    Ok(headers)
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

/// The level as `tracing` names it (CHP's names mapped), and the line format.
fn logging(o: &Options) -> Result<(String, LogFormat), ConfigError> {
    let level = o.log_level.to_ascii_lowercase();
    let level = match level.as_str() {
        "trace" | "debug" | "info" | "error" => level,
        "warn" | "warning" => "warn".to_owned(),
        "critical" | "fatal" => "error".to_owned(),
        other => {
            return Err(ConfigError::new(
                "--log-level",
                format!("unknown level {other:?} (expected debug, info, warn or error)"),
            ))
        }
    };
    let format = match o.log_format.as_str() {
        "plain" => LogFormat::Plain,
        "json" => LogFormat::Json,
        other => {
            return Err(ConfigError::new(
                "--log-format",
                format!("unknown format {other:?} (expected plain or json)"),
            ))
        }
    };
    Ok((level, format))
}

fn storage(o: &Options) -> Result<Storage, ConfigError> {
    match o.storage_backend.as_str() {
        "memory" => Ok(Storage::Memory),
        "file" => Ok(Storage::File(o.storage_path.clone())),
        "redis" => Ok(Storage::Redis(redis_settings(o)?)),
        other => Err(ConfigError::new(
            "--storage-backend",
            format!("backend {other:?} is not supported (available: memory, file, redis)"),
        )),
    }
}

/// The most `--redis-min-replicas` may ask: more replicas than any deployment runs is a typo.
const MIN_REPLICAS_MAX: u32 = 16;

/// `--redis-url`, `--redis-sentinel` or `--redis-cluster` (one of them), the flags that go with
/// each, `--redis-prefix`, `--redis-ca` and `--redis-min-replicas`.
fn redis_settings(o: &Options) -> Result<RedisSettings, ConfigError> {
    let given = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let server = match (
        given(&o.redis_url),
        given(&o.redis_sentinel),
        given(&o.redis_cluster),
    ) {
        (None, None, None) => {
            return Err(ConfigError::new(
                "--redis-url",
                "--storage-backend redis needs the Redis server's URL (redis://host:port), \
                 --redis-sentinel or --redis-cluster",
            ))
        }
        (None, None, Some(list)) => {
            if o.redis_sentinel_master.is_some() || o.redis_sentinel_password.is_some() {
                return Err(ConfigError::new(
                    "--redis-cluster",
                    "the --redis-sentinel-* flags only mean something with --redis-sentinel",
                ));
            }
            RedisServer::Cluster {
                nodes: host_ports("--redis-cluster", &list)?,
                password: given(&o.redis_password),
            }
        }
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "--redis-sentinel",
                "give one of --redis-url, --redis-sentinel and --redis-cluster",
            ))
        }
        (Some(url), None, None) => {
            redis_url_only(o)?;
            redis_url(&url)?;
            RedisServer::Url(url)
        }
        (None, Some(list), None) => RedisServer::Sentinel(sentinel_settings(o, &list)?),
    };
    if !matches!(server, RedisServer::Url(_)) && o.redis_ca.is_some() {
        return Err(ConfigError::new(
            "--redis-ca",
            "TLS towards Sentinel or a cluster is not supported yet",
        ));
    }
    if let Some(path) = &o.redis_ca {
        // Read again when the store opens; a file that is not there is a configuration error,
        // found before any socket is bound, not a store that seems unreachable.
        std::fs::read(path).map_err(|e| {
            ConfigError::new("--redis-ca", format!("cannot read {}: {e}", path.display()))
        })?;
    }
    let prefix = o.redis_prefix.clone();
    if prefix.is_empty() || prefix.contains(['{', '}']) || prefix.chars().any(char::is_whitespace) {
        return Err(ConfigError::new(
            "--redis-prefix",
            "must be non-empty, without braces or spaces",
        ));
    }
    let min_replicas = o.redis_min_replicas;
    if min_replicas > MIN_REPLICAS_MAX {
        return Err(ConfigError::new(
            "--redis-min-replicas",
            format!("{min_replicas} is more than {MIN_REPLICAS_MAX}"),
        ));
    }
    Ok(RedisSettings {
        server,
        prefix,
        ca: o.redis_ca.clone(),
        min_replicas,
    })
}

/// With `--redis-url`, the flags of Sentinel and of a cluster are refused.
fn redis_url_only(o: &Options) -> Result<(), ConfigError> {
    if o.redis_password.is_some() {
        return Err(ConfigError::new(
            "--redis-password",
            "with --redis-url the password goes in the URL (redis://:PASSWORD@host)",
        ));
    }
    for (flag, given) in [
        ("--redis-sentinel-master", o.redis_sentinel_master.is_some()),
        (
            "--redis-sentinel-password",
            o.redis_sentinel_password.is_some(),
        ),
    ] {
        if given {
            return Err(ConfigError::new(
                flag,
                "only means something with --redis-sentinel",
            ));
        }
    }
    Ok(())
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

/// `--redis-sentinel`'s nodes, the master's name and the passwords.
fn sentinel_settings(o: &Options, list: &str) -> Result<SentinelSettings, ConfigError> {
    let nodes = host_ports("--redis-sentinel", list)?;
    let master = o
        .redis_sentinel_master
        .clone()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
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
        password: o.redis_password.clone().filter(|p| !p.is_empty()),
        sentinel_password: o.redis_sentinel_password.clone().filter(|p| !p.is_empty()),
    })
}

/// Authentication at the edge: on by default when there is a hub to ask.
fn auth(o: &Options, hub: Option<&Target>) -> Result<Option<AuthSettings>, ConfigError> {
    let hub = match (o.auth_mode.as_deref(), hub) {
        (None | Some("on"), Some(hub)) => hub,
        (None | Some("on" | "off"), _) => return Ok(None),
        (Some(other), _) => {
            return Err(ConfigError::new(
                "--auth-mode",
                format!("expected on or off, got {other:?}"),
            ))
        }
    };
    let (session_secrets, ephemeral_secret) = session_secrets(o)?;
    let identity_header = o
        .identity_header
        .as_deref()
        .map(|h| {
            HeaderName::try_from(h).map_err(|_| {
                ConfigError::new("--identity-header", format!("invalid header name {h:?}"))
            })
        })
        .transpose()?;
    Ok(Some(AuthSettings {
        cache_ttl: Duration::from_secs(o.auth_cache_ttl),
        negative_ttl: Duration::from_secs(o.auth_negative_ttl),
        grace: Duration::from_secs(o.auth_grace),
        cache_size: o.auth_cache_size,
        allow_token_in_url: o.allow_token_in_url,
        legacy_token_endpoint: o.auth_legacy_token_endpoint,
        hub_login_cookie: o.hub_login_cookie.clone().filter(|c| !c.is_empty()),
        oauth: oauth(o, hub)?,
        session_secrets,
        ephemeral_secret,
        identity_header,
        cookie_path: o.cookie_path.clone(),
        cookie_secure: o.cookie_secure,
    }))
}

fn oauth(o: &Options, hub: &Target) -> Result<Option<OAuthSettings>, ConfigError> {
    let (client_id, callback_url) = match (&o.oauth_client_id, &o.oauth_callback_url) {
        (Some(id), Some(url)) => (id.clone(), url.clone()),
        (None, None) => return Ok(None),
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
    Ok(Some(OAuthSettings {
        client_id,
        callback_url,
        callback_path,
        authorize_url: crate::path::join(hub.path(), "oauth2/authorize"),
    }))
}

/// The session secrets, and whether hubgate made one up (none given: sessions end at restart).
fn session_secrets(o: &Options) -> Result<(Vec<Vec<u8>>, bool), ConfigError> {
    let mut secrets: Vec<Vec<u8>> = o
        .session_secrets
        .iter()
        .flat_map(|s| s.0.iter())
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
    let ephemeral = secrets.is_empty();
    if ephemeral {
        let mut random = vec![0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
            .map_err(|_| ConfigError::new("--session-secrets", "no randomness for a secret"))?;
        secrets.push(random);
    }
    Ok((secrets, ephemeral))
}

/// TLS on the public and API listeners; CHP's flags that rustls has no use for become warnings.
fn server_tls(
    o: &Options,
    warnings: &mut Vec<String>,
) -> Result<(Option<ServerFiles>, Option<ServerFiles>), ConfigError> {
    let versions = match o.ssl_protocol.as_deref() {
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
    if o.ssl_ciphers.is_some() {
        warnings.push(
            "--ssl-ciphers is ignored: rustls offers only its own modern AEAD cipher suites".into(),
        );
    }
    if o.ssl_allow_rc4 {
        warnings.push("--ssl-allow-rc4 is ignored: RC4 is never offered".into());
    }
    if o.ssl_dhparam.is_some() {
        warnings.push("--ssl-dhparam is ignored: rustls uses its own (EC)DHE groups".into());
    }
    let proxy = ServerFlags {
        prefix: "--ssl",
        key: &o.ssl_key,
        cert: &o.ssl_cert,
        ca: &o.ssl_ca,
        request_cert: o.ssl_request_cert,
        reject_unauthorized: o.ssl_reject_unauthorized,
    };
    let api = ServerFlags {
        prefix: "--api-ssl",
        key: &o.api_ssl_key,
        cert: &o.api_ssl_cert,
        ca: &o.api_ssl_ca,
        request_cert: o.api_ssl_request_cert,
        reject_unauthorized: o.api_ssl_reject_unauthorized,
    };
    Ok((proxy.files(versions)?, api.files(versions)?))
}

/// One listener's TLS flags, all named with one prefix (`--ssl`, `--api-ssl`).
struct ServerFlags<'a> {
    prefix: &'static str,
    key: &'a Option<PathBuf>,
    cert: &'a Option<PathBuf>,
    ca: &'a Option<PathBuf>,
    request_cert: bool,
    reject_unauthorized: bool,
}

impl ServerFlags<'_> {
    /// The listener's TLS files. Only existence is checked here; whether they make a
    /// configuration is checked at start.
    fn files(&self, versions: Versions) -> Result<Option<ServerFiles>, ConfigError> {
        let prefix = self.prefix;
        let needs = |flag: &str, what: String| ConfigError::new(format!("{prefix}-{flag}"), what);
        let (key, cert) = match (self.key, self.cert) {
            (None, None) if self.ca.is_some() || self.request_cert => {
                return Err(needs("ca", format!("needs {prefix}-key and {prefix}-cert")))
            }
            (None, None) => return Ok(None),
            (Some(_), None) => return Err(needs("key", format!("needs {prefix}-cert as well"))),
            (None, Some(_)) => return Err(needs("cert", format!("needs {prefix}-key as well"))),
            (Some(k), Some(c)) => (k, c),
        };
        for (flag, p) in [
            ("key", Some(key)),
            ("cert", Some(cert)),
            ("ca", self.ca.as_ref()),
        ] {
            if let Some(p) = p.filter(|p| !p.is_file()) {
                return Err(needs(
                    flag,
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        if self.request_cert && self.ca.is_none() {
            return Err(needs(
                "request-cert",
                format!("needs {prefix}-ca to verify client certificates against"),
            ));
        }
        Ok(Some(ServerFiles {
            key: key.clone(),
            cert: cert.clone(),
            ca: self.ca.clone(),
            request_cert: self.request_cert,
            reject_unauthorized: self.reject_unauthorized,
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            versions,
        }))
    }
}

/// hubgate's client certificate and CA towards `https://` targets.
fn client_tls(o: &Options) -> Result<ClientFiles, ConfigError> {
    let files = ClientFiles {
        key: o.client_ssl_key.clone(),
        cert: o.client_ssl_cert.clone(),
        ca: o.client_ssl_ca.clone(),
    };
    if files.key.is_some() != files.cert.is_some() {
        return Err(ConfigError::new(
            "--client-ssl-key",
            "needs --client-ssl-cert as well (and the other way round)",
        ));
    }
    for (flag, path) in [
        ("--client-ssl-key", &files.key),
        ("--client-ssl-cert", &files.cert),
        ("--client-ssl-ca", &files.ca),
    ] {
        if let Some(p) = path.as_ref().filter(|p| !p.is_file()) {
            return Err(ConfigError::new(
                flag,
                format!("{} is not a readable file", p.display()),
            ));
        }
    }
    Ok(files)
}

/// The plain-HTTP port that redirects, and the HTTPS port it points at.
fn redirect(o: &Options, tls: bool, proxy: &Listen) -> Result<Option<(u16, u16)>, ConfigError> {
    match o.redirect_port {
        None => Ok(None),
        Some(_) if !tls => Err(ConfigError::new(
            "--redirect-port",
            "HTTPS redirection needs --ssl-key and --ssl-cert",
        )),
        Some(port) => {
            let to = o.redirect_to.unwrap_or(match proxy {
                Listen::Tcp { port, .. } => *port,
                Listen::Unix(_) => 443,
            });
            Ok(Some((port, to)))
        }
    }
}

/// Worker threads for the public port: as asked, else one per core hubgate may run on.
fn workers(asked: Option<usize>) -> Result<usize, ConfigError> {
    match asked {
        Some(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
        Some(n) => Err(ConfigError::new(
            "--workers",
            format!("must be between 1 and {MAX_WORKERS}, got {n}"),
        )),
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS))),
    }
}
