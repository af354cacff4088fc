//! Shared harness for the end-to-end tests against a real JupyterHub 6 (`jupyterhub`,
//! `jupyterhub_restart`, `jupyterhub_auth`).
//!
//! What it owns:
//! - the Python venv with `jupyterhub` from PyPI, created once under `CARGO_TARGET_TMPDIR` and
//!   reused by every test and every later run (needs `python3` with `venv` on PATH and PyPI);
//! - [`Hub`]: a running `jupyterhub -f tests/e2e/<config>` in a temporary working directory,
//!   stopped on drop together with any proxy it started;
//! - [`eventually`] (bounded polling that gives up early when the hub has exited), a plain HTTP
//!   client, and small helpers (free ports, signals, hubgate's route table).
//!
//! Every hub configuration in `tests/e2e/` builds on `jupyterhub_config.py`, which reads the
//! ports, tokens and paths from `HUBGATE_E2E_*` variables set here. The base URL is
//! `/@/space%20word/`, as in JupyterHub's own tests.
//!
//! Linux only: it reads `/proc/<pid>/cmdline` to make sure it kills the proxy, nothing else.
#![cfg(target_os = "linux")]

use std::ffi::OsString;
use std::fs;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value};

/// What the venv installs. Changing it makes the next run rebuild the venv.
const JUPYTERHUB_REQUIREMENT: &str = "jupyterhub>=6,<7";
/// The hub's base URL as configured and as it appears on the wire.
pub const BASE_URL: &str = "/@/space%20word/";
/// The same prefix as a route key: percent-decoded, no trailing slash.
pub const BASE_KEY: &str = "/@/space word";
/// How long any one cross-process step may take before the test gives up.
pub const PATIENCE: Duration = Duration::from_secs(60);
/// Token the hub gives the proxy as `CONFIGPROXY_AUTH_TOKEN`.
pub const PROXY_TOKEN: &str = "e2e-proxy-token-0123456789";
/// Token of the `e2e` service, which has the hub's admin role.
pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";

/// Variables a hubgate would read from its environment: none may leak in from the test's own.
const HUBGATE_ENV: [&str; 5] = [
    "CONFIGPROXY_AUTH_TOKEN",
    "JUPYTERHUB_API_TOKEN",
    "JUPYTERHUB_API_URL",
    "JUPYTERHUB_CLIENT_ID",
    "JUPYTERHUB_OAUTH_CALLBACK_URL",
];

/// The hubgate binary under test.
pub fn hubgate_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hubgate"))
}

/// The three loopback ports of one scenario, free when picked.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// The proxy's public port (what browsers use).
    pub public: u16,
    /// The proxy's REST API.
    pub api: u16,
    /// The hub's own HTTP server.
    pub hub: u16,
}

impl Ports {
    pub fn free() -> Result<Self> {
        let [public, api, hub] = free_ports()?;
        Ok(Ports { public, api, hub })
    }

    /// `--hub-api-url` for a hubgate in front of this hub: the hub's API under its base URL.
    pub fn hub_api_url(&self) -> String {
        format!("http://127.0.0.1:{}{BASE_URL}hub/api", self.hub)
    }
}

/// How to start a hub.
pub struct HubSpec {
    /// A configuration file in `tests/e2e/`.
    pub config: &'static str,
    /// `ConfigurableHTTPProxy.command` (when the configuration lets the hub start its proxy).
    pub proxy_command: PathBuf,
    pub ports: Ports,
    /// More environment for the hub (and so for the proxy it starts, which inherits it).
    pub env: Vec<(&'static str, OsString)>,
}

/// A running `jupyterhub`; stopped and cleaned up on drop.
pub struct Hub {
    child: Mutex<Child>,
    workdir: tempfile::TempDir,
    log_path: PathBuf,
    pub proxy_command: PathBuf,
    pub public_port: u16,
    pub api_port: u16,
    pub hub_port: u16,
    /// Every proxy pid seen, to kill any the hub leaves behind if it has to be killed itself:
    /// it starts the proxy in a session of its own, so the proxy would outlive it.
    proxy_pids: Mutex<Vec<u32>>,
}

impl Hub {
    pub fn start(venv: &Path, spec: HubSpec) -> Result<Self> {
        let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
        let workdir = tempfile::Builder::new()
            .prefix("e2e-hub-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .context("creating the hub's working directory")?;
        let log_path = workdir.path().join("jupyterhub.log");
        let log = fs::File::create(&log_path).context("creating the hub's log file")?;
        let Ports { public, api, hub } = spec.ports;
        let mut command = Command::new(venv.join("bin/jupyterhub"));
        command
            .arg("-f")
            .arg(e2e.join(spec.config))
            .current_dir(workdir.path())
            .env("HUBGATE_E2E_PUBLIC_PORT", public.to_string())
            .env("HUBGATE_E2E_API_PORT", api.to_string())
            .env("HUBGATE_E2E_HUB_PORT", hub.to_string())
            .env("HUBGATE_E2E_WORKDIR", workdir.path())
            .env("HUBGATE_E2E_PROXY_COMMAND", &spec.proxy_command)
            .env("HUBGATE_E2E_PROXY_TOKEN", PROXY_TOKEN)
            .env("HUBGATE_E2E_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("HUBGATE_E2E_PYTHON", venv.join("bin/python"));
        for name in HUBGATE_ENV {
            command.env_remove(name);
        }
        command.envs(spec.env);
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning jupyterhub")?;
        Ok(Hub {
            child: Mutex::new(child),
            workdir,
            log_path,
            proxy_command: spec.proxy_command,
            public_port: public,
            api_port: api,
            hub_port: hub,
            proxy_pids: Mutex::new(Vec::new()),
        })
    }

    /// A URL under the hub's base URL on the proxy's public port.
    pub fn public_url(&self, rest: &str) -> String {
        format!("http://127.0.0.1:{}{BASE_URL}{rest}", self.public_port)
    }

    /// A URL on the proxy's API port.
    pub fn api_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api_port)
    }

    /// The hub's working directory (database, pid files, what the fake servers record).
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten()
    }

    fn pid_file(&self) -> PathBuf {
        self.workdir.path().join("jupyterhub-proxy.pid")
    }

    /// The pid the hub wrote for the proxy it started last.
    pub fn proxy_pid(&self) -> Result<u32> {
        let text = fs::read_to_string(self.pid_file()).context("reading the proxy pid file")?;
        let pid = text.trim().parse().context("proxy pid file")?;
        let mut seen = self.proxy_pids.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains(&pid) {
            seen.push(pid);
        }
        Ok(pid)
    }

    /// Whether `pid` is a live process running our proxy command (not a zombie, not reused).
    pub fn is_proxy(&self, pid: u32) -> bool {
        let proc = Path::new("/proc").join(pid.to_string());
        let zombie = fs::read_to_string(proc.join("stat"))
            .map(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, s)| s.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        let cmdline = fs::read(proc.join("cmdline")).unwrap_or_default();
        let wanted = self.proxy_command.as_os_str().as_encoded_bytes();
        !zombie && cmdline.split(|&b| b == 0).any(|arg| arg == wanted)
    }

    /// The hub's log so far (with the log of the proxy it started, which shares the stream).
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Where the hub's log ends now, to read only what comes after with [`Hub::log_since`].
    pub fn log_offset(&self) -> usize {
        fs::metadata(&self.log_path).map_or(0, |m| m.len() as usize)
    }

    /// The hub's log from `offset` (a [`Hub::log_offset`]) on.
    pub fn log_since(&self, offset: usize) -> String {
        let log = fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(log.get(offset..).unwrap_or_default()).into_owned()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines, &self.log_path)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        // SIGTERM is how an operator stops the hub: it stops the users' servers and the proxy it
        // started.
        if matches!(child.try_wait(), Ok(None)) {
            let _ = signal(child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
        let _ = self.proxy_pid();
        let pids = self
            .proxy_pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for pid in pids {
            if self.is_proxy(pid) {
                let _ = signal(pid, "KILL");
            }
        }
    }
}

/// The last `lines` lines of `log`, saying where the rest is.
pub fn tail(log: &str, lines: usize, path: &Path) -> String {
    let all: Vec<&str> = log.lines().collect();
    let skip = all.len().saturating_sub(lines);
    let mut tail = all[skip..].join("\n");
    if skip > 0 {
        tail = format!("[... {skip} earlier lines in {}]\n{tail}", path.display());
    }
    tail
}

/// Retry `attempt` until it succeeds, the hub exits, or `PATIENCE` runs out.
pub async fn eventually<T, F, Fut>(hub: &Hub, what: &str, attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    eventually_within(hub, PATIENCE, what, attempt).await
}

/// [`eventually`] with a bound of its own.
pub async fn eventually_within<T, F, Fut>(
    hub: &Hub,
    patience: Duration,
    what: &str,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if let Some(status) = hub.exit_status() {
            bail!("waiting until {what}: JupyterHub exited with {status}; last try: {error:#}");
        }
        if Instant::now() >= deadline {
            return Err(error.context(format!("waiting until {what}: gave up after {patience:?}")));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A plain HTTP/1.1 client without connection reuse (proxies get killed under it).
pub struct Http(Client<HttpConnector, Full<Bytes>>);

/// Status, headers and body of an answer.
pub type Answer = (StatusCode, HeaderMap, Bytes);

impl Http {
    pub fn new() -> Self {
        Http(
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
        )
    }

    pub async fn get(&self, url: &str, token: Option<&str>) -> Result<Answer> {
        self.send(Method::GET, url, token).await
    }

    /// A request without a body, with `Authorization: token <token>` when given.
    pub async fn send(&self, method: Method, url: &str, token: Option<&str>) -> Result<Answer> {
        self.request(method, url, token, &[], Bytes::new()).await
    }

    /// A request with headers of the caller's choosing and a body.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        headers: &[(HeaderName, String)],
        body: Bytes,
    ) -> Result<Answer> {
        let mut request = Request::builder().method(method.clone()).uri(url);
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("token {token}"));
        }
        for (name, value) in headers {
            request = request.header(name, HeaderValue::from_str(value)?);
        }
        let request = request.body(Full::new(body))?;
        let exchange = async {
            let response = self.0.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok((parts.status, parts.headers, body))
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| anyhow!("{method} {url}: no answer within 10 s"))?
            .with_context(|| format!("{method} {url}"))
    }
}

/// hubgate's table as `GET /api/routes` lists it, checked to be what the hub can parse.
pub async fn proxy_routes(http: &Http, hub: &Hub) -> Result<Map<String, Value>> {
    let url = hub.api_url("/api/routes");
    let (status, headers, body) = http.get(&url, Some(PROXY_TOKEN)).await?;
    ensure!(
        status == StatusCode::OK,
        "GET {url}: {status} {}",
        text(&body)
    );
    // The hub parses the table only when it is labelled JSON.
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    ensure!(
        content_type.is_some_and(|t| t.starts_with("application/json")),
        "GET {url}: Content-Type {content_type:?}, the hub needs application/json"
    );
    match serde_json::from_slice(&body).context("GET /api/routes: not JSON")? {
        Value::Object(routes) => Ok(routes),
        other => bail!("GET /api/routes: not an object: {other}"),
    }
}

/// `GET <base>user/alice/...` without credentials reaches alice's fake server, which echoes what
/// it received.
pub async fn alice_answers(http: &Http, hub: &Hub) -> Result<()> {
    let url = hub.public_url("user/alice/some/path?probe=1");
    let (status, _, body) = http.get(&url, None).await?;
    ensure!(
        status == StatusCode::OK,
        "GET {url}: {status} {}",
        text(&body)
    );
    let echo: Value = serde_json::from_slice(&body)
        .with_context(|| format!("GET {url}: not the fake server's JSON: {}", text(&body)))?;
    ensure!(
        echo["server"] == "fake-singleuser",
        "GET {url}: unexpected answer {echo}"
    );
    ensure!(
        echo["user"] == "alice",
        "GET {url}: answered by {}'s server",
        echo["user"]
    );
    let want_path = format!("{BASE_URL}user/alice/some/path");
    ensure!(
        echo["path"] == want_path.as_str() && echo["query"] == "probe=1",
        "GET {url}: the server saw path {} query {}, want {want_path} probe=1",
        echo["path"],
        echo["query"]
    );
    let want_host = format!("127.0.0.1:{}", hub.public_port);
    ensure!(
        echo["headers"]["host"] == want_host.as_str(),
        "Host not kept: the server saw {}",
        echo["headers"]["host"]
    );
    ensure!(
        echo["headers"]["x-forwarded-proto"] == "http",
        "X-Forwarded-Proto: the server saw {}",
        echo["headers"]["x-forwarded-proto"]
    );
    Ok(())
}

/// Creates a user and starts their server through the hub's REST API (admin token).
pub async fn start_server(http: &Http, hub: &Hub, user: &str) -> Result<()> {
    let (status, _, body) = http
        .send(
            Method::POST,
            &hub.public_url(&format!("hub/api/users/{user}")),
            Some(ADMIN_TOKEN),
        )
        .await?;
    ensure!(
        status == StatusCode::CREATED,
        "creating {user}: {status} {}",
        text(&body)
    );
    let (status, _, body) = http
        .send(
            Method::POST,
            &hub.public_url(&format!("hub/api/users/{user}/server")),
            Some(ADMIN_TOKEN),
        )
        .await?;
    ensure!(
        status == StatusCode::CREATED || status == StatusCode::ACCEPTED,
        "starting {user}'s server: {status} {}",
        text(&body)
    );
    Ok(())
}

/// Stops a user's server through the hub's REST API (admin token).
pub async fn stop_server(http: &Http, hub: &Hub, user: &str) -> Result<()> {
    let (status, _, body) = http
        .send(
            Method::DELETE,
            &hub.public_url(&format!("hub/api/users/{user}/server")),
            Some(ADMIN_TOKEN),
        )
        .await?;
    ensure!(
        status == StatusCode::NO_CONTENT || status == StatusCode::ACCEPTED,
        "stopping {user}'s server: {status} {}",
        text(&body)
    );
    Ok(())
}

/// Waits until the hub has checked its proxy's routes (every 2 s) once more after now.
pub async fn hub_reconciles_again(hub: &Hub) -> Result<()> {
    let checks = hub.log().matches("Checking routes").count();
    eventually(hub, "the hub reconciles routes again", || async {
        let now = hub.log().matches("Checking routes").count();
        ensure!(now > checks, "no new route check yet");
        Ok(())
    })
    .await
}

/// Waits until the hub answers through the proxy, checks it is JupyterHub 6, and returns its
/// version.
pub async fn hub_answers(http: &Http, hub: &Hub) -> Result<String> {
    let version = eventually(hub, "the hub answers through the proxy", || async {
        let (status, _, body) = http.get(&hub.public_url("hub/api"), None).await?;
        ensure!(
            status == StatusCode::OK,
            "GET hub/api: {status} {}",
            text(&body)
        );
        let info: Value = serde_json::from_slice(&body).context("hub/api is not JSON")?;
        Ok(info["version"].as_str().unwrap_or_default().to_owned())
    })
    .await?;
    ensure!(
        version.starts_with("6."),
        "expected JupyterHub 6, got {version:?}"
    );
    Ok(version)
}

pub fn text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(500) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.into_owned(),
    }
}

/// Ports free right now on 127.0.0.1, all different (each listener is held until all are read).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// Send a signal with kill(1): this crate forbids `unsafe`, so no libc.
pub fn signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{name} {pid}: {status}");
    Ok(())
}

/// The test venv, created on first use and reused by later runs.
pub fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        prepare_venv().unwrap_or_else(|e| panic!("setting up the JupyterHub venv failed: {e:#}"))
    })
}

fn prepare_venv() -> Result<PathBuf> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = tmp.join("e2e-venv");
    // Written last, so a venv without it (an interrupted install) is rebuilt from scratch.
    let marker = venv.join("hubgate-e2e-ready");
    let ready = || fs::read_to_string(&marker).is_ok_and(|m| m == JUPYTERHUB_REQUIREMENT);
    if ready() {
        return Ok(venv);
    }
    let _lock = DirLock::acquire(&tmp.join("e2e-venv.lock"))?;
    if ready() {
        return Ok(venv);
    }
    let started = Instant::now();
    if venv.exists() {
        fs::remove_dir_all(&venv).context("removing an incomplete venv")?;
    }
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    let python = venv.join("bin/python");
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .arg(JUPYTERHUB_REQUIREMENT))?;
    let show = run(Command::new(&python).args(["-m", "pip", "show", "jupyterhub"]))?;
    eprintln!(
        "created {} in {:.0?}:\n{show}",
        venv.display(),
        started.elapsed()
    );
    fs::write(&marker, JUPYTERHUB_REQUIREMENT)?;
    Ok(venv)
}

/// Run a setup command to completion; its whole output is the error if it fails.
fn run(command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let both = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "{command:?} failed with {}:\n{both}",
        output.status
    );
    Ok(both)
}

/// A lock between test processes (nextest runs tests in parallel processes): the directory
/// exists while someone holds it, and names the holder's pid so a crashed holder's lock is
/// taken over.
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(path: &Path) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(15 * 60);
        loop {
            match fs::create_dir(path) {
                Ok(()) => {
                    fs::write(path.join("pid"), std::process::id().to_string())?;
                    return Ok(DirLock(path.to_owned()));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if Self::holder_gone(path) {
                        let _ = fs::remove_dir_all(path);
                        continue;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "{} held too long",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
    }

    fn holder_gone(path: &Path) -> bool {
        let pid = fs::read_to_string(path.join("pid")).ok();
        match pid.and_then(|pid| pid.trim().parse::<u32>().ok()) {
            Some(pid) => !Path::new("/proc").join(pid.to_string()).exists(),
            // Created but no pid yet: give the holder a moment to write it.
            None => fs::metadata(path)
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(30))
                .unwrap_or(false),
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
