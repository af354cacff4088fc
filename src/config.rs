//! Configuration: configurable-http-proxy's command line, an optional TOML file, and the
//! environment, merged into one validated [`Config`] before any socket is bound.
//!
//! Precedence is flag, then environment variable, then file, then default. Every CHP flag keeps
//! its exact name and default; a flag whose feature hubgate does not have yet is refused at start
//! rather than silently ignored.
//!
//! Each option is declared once, in [`Options`] (`config/options.rs`): its flag, environment
//! variable, file key, default and help text. Loading has two steps with one job each: layering
//! (which value wins) and validation (`config/validate.rs`: is the whole a configuration, and
//! what do the defaults that depend on other options resolve to). The README's flag table and
//! `config/hubgate.toml` are tested against the declaration (`tests/it/cli.rs`).

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::logging::LogFormat;
use crate::proxy::{ErrorPages, ForwardOptions};
use crate::store::redis::RedisSettings;
use crate::target::Target;
use crate::tls::{ClientFiles, ServerFiles};

mod options;
mod validate;

/// Where a listener binds; `server` owns it, start-up names it through here.
pub use crate::server::Listen;
pub use options::{Cli, Options, Secrets, FLAG_ONLY, SECRET_OPTIONS};

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

/// Where routes are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    Memory,
    File(PathBuf),
    Redis(RedisSettings),
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy_listen: Listen,
    pub api_listen: Listen,
    /// The metrics server, when asked for (CHP: `--metrics-port`).
    pub metrics_listen: Option<Listen>,
    /// `None` (or empty in the environment) leaves the API open, as CHP does.
    pub auth_token: Option<Secret>,
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
    pub hub_api_token: Option<Secret>,
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
    /// Data-plane worker threads serving the public port (`--workers`): at least 1.
    pub workers: usize,
    pub access_log: bool,
    /// Things to warn about once logging is up (flags accepted but mapped or ignored).
    pub warnings: Vec<String>,
    /// How long in-flight requests may run after SIGTERM before hubgate exits anyway.
    pub shutdown_grace: Duration,
    /// Fair-use limits (`[limits]`); `None` leaves the data plane without any.
    pub limits: Option<crate::limits::Settings>,
    /// `--limit-login-rate`, which a reload keeps over the file's `limits.login.rate`.
    pub limit_login_rate: Option<f64>,
    /// The configuration file, read again for the limits on SIGHUP.
    pub config_file: Option<PathBuf>,
}

/// A token or password: `Debug` shows `<hidden>`, so a configuration printed whole (in a log, a
/// panic, a test's failure message) shows none; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

/// The `[limits]` table of the configuration file as it is now, with `--limit-login-rate` over
/// it, for a reload on SIGHUP.
///
/// # Errors
/// [`ConfigError`] when the file cannot be read, is not a configuration, or its limits are bad.
pub fn read_limits(
    path: &std::path::Path,
    login_rate: Option<f64>,
) -> Result<Option<crate::limits::Settings>, ConfigError> {
    let file = options::read_file(path)?;
    validate::limits(file.limits, login_rate)
}

impl Config {
    /// Builds the configuration from parsed flags, the environment and the file they name, in
    /// two steps: lay the options given on the command line or in the environment over the
    /// file's ([`Cli::over`]), then validate the result as a whole.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first bad flag or file key.
    pub fn load(cli: Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let file = match &cli.options.config {
            Some(path) => options::read_file(path)?,
            None => Options::default(),
        };
        Self::merge(cli, file, env)
    }

    fn merge(
        cli: Cli,
        file: Options,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let options = cli.over(file)?;
        validate::validate(options, &cli, env)
    }
}

// The data plane's settings, read from the configuration here so that `proxy` need not know
// `config` (which knows `proxy`'s types).
impl ForwardOptions {
    pub fn from_config(config: &Config) -> Self {
        ForwardOptions {
            host_routing: config.host_routing,
            x_forward: config.x_forward,
            prepend_path: config.prepend_path,
            include_prefix: config.include_prefix,
            custom_headers: config.custom_headers.clone(),
            proxy_timeout: config.proxy_timeout,
            error_pages: config.error_pages.clone(),
            access_log: config.access_log,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redis::{RedisServer, SentinelSettings};
    use clap::Parser;

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
            flag(&[
                "--redis-url",
                "rediss://h/",
                "--redis-ca",
                "/nonexistent/ca.pem"
            ]),
            "--redis-ca"
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
        let file: Options = toml::from_str(
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
        assert_eq!(c.auth_token.as_ref().map(Secret::expose), Some("env"));
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
        assert!(toml::from_str::<Options>("prot = 1").is_err());
    }

    #[test]
    fn custom_headers_trim_like_chp() {
        let c = load(&["--custom-header", " X-B : two words "]).unwrap();
        assert_eq!(c.custom_headers[0].0, "x-b");
        assert_eq!(c.custom_headers[0].1, "two words");
    }

    fn merged(args: &[&str], file: &str) -> Result<Config, ConfigError> {
        let mut argv = vec!["hubgate"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).unwrap();
        Config::merge(cli, toml::from_str(file).unwrap(), &|_| None)
    }

    #[test]
    fn switches_left_out_keep_the_file_value() {
        let c = merged(
            &[],
            "x_forward = false\naccess_log = true\nhost_routing = true",
        )
        .unwrap();
        assert!(!c.x_forward && c.access_log && c.host_routing);
        let c = merged(&["--no-x-forward"], "x_forward = true").unwrap();
        assert!(!c.x_forward);
        let c = merged(&["--port", "7100"], "port = 7000\napi_port = 7500").unwrap();
        assert_eq!(
            (c.proxy_listen, c.api_listen),
            (
                Listen::Tcp {
                    host: String::new(),
                    port: 7100
                },
                Listen::Tcp {
                    host: "localhost".into(),
                    port: 7500
                }
            )
        );
    }

    #[test]
    fn socket_conflicts_only_with_flags() {
        // A file's socket with a file's port: the socket wins, as before the layering.
        let c = merged(&[], "socket = \"/tmp/s\"\nport = 9").unwrap();
        assert_eq!(c.proxy_listen, Listen::Unix("/tmp/s".into()));
        let e = merged(&["--port", "9"], "socket = \"/tmp/s\"").unwrap_err();
        assert_eq!(e.flag, "--socket");
    }

    #[test]
    fn workers_default_to_the_cores_and_stay_in_range() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(load(&[]).unwrap().workers, cores.min(1024));
        assert_eq!(load(&["--workers", "3"]).unwrap().workers, 3);
        assert_eq!(merged(&[], "workers = 1024").unwrap().workers, 1024);
        for bad in ["0", "1025"] {
            let e = load(&["--workers", bad]).unwrap_err();
            assert_eq!(e.flag, "--workers");
            assert!(e.problem.contains(bad), "{}", e.problem);
        }
        assert_eq!(merged(&[], "workers = 0").unwrap_err().flag, "--workers");
    }

    #[test]
    fn command_line_only_options_are_refused_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        for key in FLAG_ONLY {
            std::fs::write(&path, format!("{key} = true\n")).unwrap();
            let cli = Cli::try_parse_from(["hubgate", "--config", path.to_str().unwrap()]).unwrap();
            let e = Config::load(cli, &|_| None).unwrap_err();
            assert_eq!(e.flag, "--config");
            assert!(e.problem.contains(key), "{key}: {}", e.problem);
        }
        assert!(Options::file_keys()
            .iter()
            .all(|k| !FLAG_ONLY.contains(&k.as_str())));
        assert!(Options::file_keys().contains(&"custom_headers".to_owned()));
    }

    #[test]
    fn no_secret_option_is_printed() {
        let cli = Cli::try_parse_from([
            "hubgate",
            "--redis-url",
            "redis://:url-pw-1@h:6379/0",
            "--redis-password",
            "redis-pw-2",
            "--redis-sentinel-password",
            "sentinel-pw-3",
            "--session-secrets",
            "session-secret-4",
        ])
        .unwrap();
        let mut options = cli.options.clone();
        options.auth_token = Some("api-token-5".into());
        options.hub_api_token = Some("hub-token-6".into());
        let printed = format!("{options:?} {cli:?} {options:#?}");
        for secret in [
            "url-pw-1",
            "redis-pw-2",
            "sentinel-pw-3",
            "session-secret-4",
            "api-token-5",
            "hub-token-6",
        ] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("redis://<hidden>@h:6379/0"), "{printed}");
        assert!(printed.contains("redis_prefix: \"hubgate\""), "{printed}");
    }

    #[test]
    fn the_validated_configuration_prints_no_secret() {
        let cli = Cli::try_parse_from([
            "hubgate",
            "--storage-backend",
            "redis",
            "--redis-url",
            "redis://:url-pw-1@h:6379/0",
            "--hub-api-url",
            "http://127.0.0.1:8081/hub/api",
            "--session-secrets",
            "session-secret-4-0123456789abcdef0123456789",
        ])
        .unwrap();
        let mut config = Config::load(cli, &|_| None).unwrap();
        config.auth_token = Some(Secret::new("api-token-5".into()));
        config.hub_api_token = Some(Secret::new("hub-token-6".into()));
        let printed = format!("{config:?}");
        for secret in ["url-pw-1", "session-secret-4", "api-token-5", "hub-token-6"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        // The session secret as bytes, the way a derived Debug would print a Vec<u8>.
        let bytes = format!("{:?}", b"session".to_vec());
        assert!(!printed.contains(&bytes[1..bytes.len() - 1]), "{printed}");
        assert!(printed.contains("<hidden>"), "{printed}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let cli = Cli::try_parse_from(["hubgate", "--session-secrets", "s3cr3t-value"]).unwrap();
        assert!(!format!("{cli:?}").contains("s3cr3t"));
    }
}
