//! End to end: a real JupyterHub 6 starts hubgate as its proxy and drives it.
//!
//! This is the drop-in promise tested the way an operator would rely on it: JupyterHub is told
//! only that its `ConfigurableHTTPProxy.command` is hubgate. The hub starts it with CHP's flags
//! and `CONFIGPROXY_AUTH_TOKEN`, adds its own route and a user's route through `/api/routes`,
//! reconciles the table every 2 s, and restarts hubgate when it dies. The scenario: the hub
//! answers through hubgate; alice's server, started through the hub's REST API, answers through
//! hubgate; both tables (hubgate's `/api/routes`, the hub's `/hub/api/proxy`) agree; hubgate is
//! SIGKILLed and the hub's new one serves alice again; stopping alice's server removes her route;
//! and the hub's log never shows it repairing the table.
//!
//! The test sets up what it needs by itself: a Python venv with `jupyterhub` from PyPI, created
//! once under `CARGO_TARGET_TMPDIR` and reused (needs `python3` with `venv` on PATH and PyPI).
//! The single-user server is `tests/e2e/singleuser.py`, a stdlib HTTP server that answers with
//! the user's name; the hub's configuration is `tests/e2e/jupyterhub_config.py`. The base URL is
//! `/@/space%20word/`, as in JupyterHub's own tests, so a proxy that stores or lists route keys
//! in the wrong encoding shows up as a missing route or as route churn in the hub's log.
//!
//! Set `HUBGATE_E2E_PROXY_COMMAND` to another proxy executable (configurable-http-proxy) to run
//! the same scenario against it.
//!
//! Linux only: it reads `/proc/<pid>/cmdline` to make sure it kills the proxy, nothing else.
#![cfg(target_os = "linux")]

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
use hyper::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value};

/// What the venv installs. Changing it makes the next run rebuild the venv.
const JUPYTERHUB_REQUIREMENT: &str = "jupyterhub>=6,<7";
/// The hub's base URL as configured and as it appears on the wire.
const BASE_URL: &str = "/@/space%20word/";
/// The same prefix as a route key: percent-decoded, no trailing slash.
const BASE_KEY: &str = "/@/space word";
/// How long any one cross-process step may take before the test gives up.
const PATIENCE: Duration = Duration::from_secs(60);
/// Token the hub gives the proxy as `CONFIGPROXY_AUTH_TOKEN`.
const PROXY_TOKEN: &str = "e2e-proxy-token-0123456789";
/// Token of the `e2e` service, which has the hub's admin role.
const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyterhub_runs_on_hubgate_and_restarts_it() {
    let venv = tokio::task::spawn_blocking(venv)
        .await
        .expect("venv setup panicked");
    let hub = Hub::start(venv).unwrap_or_else(|e| panic!("starting JupyterHub failed: {e:#}"));
    if let Err(e) = scenario(&hub).await {
        panic!(
            "{e:#}\n\n----- JupyterHub log (hubgate logs to the same stream) -----\n{}",
            hub.log_tail(400)
        );
    }
}

async fn scenario(hub: &Hub) -> Result<()> {
    let http = Http::new();

    let version = eventually(hub, "the hub answers through hubgate", || async {
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
    eprintln!(
        "JupyterHub {version} is up behind {}",
        hub.proxy_command.display()
    );

    let (status, _, body) = http
        .send(
            Method::POST,
            &hub.public_url("hub/api/users/alice"),
            Some(ADMIN_TOKEN),
        )
        .await?;
    ensure!(
        status == StatusCode::CREATED,
        "creating alice: {status} {}",
        text(&body)
    );
    let (status, _, body) = http
        .send(
            Method::POST,
            &hub.public_url("hub/api/users/alice/server"),
            Some(ADMIN_TOKEN),
        )
        .await?;
    ensure!(
        status == StatusCode::CREATED || status == StatusCode::ACCEPTED,
        "starting alice's server: {status} {}",
        text(&body)
    );

    eventually(hub, "alice's server answers through hubgate", || {
        alice_answers(&http, hub)
    })
    .await?;
    check_proxy_routes(&http, hub).await?;
    check_hub_view(&http, hub, true).await?;

    // Kill hubgate the hard way: the hub must notice, start a new one and re-add every route.
    let first = hub.proxy_pid()?;
    ensure!(
        hub.is_proxy(first),
        "pid {first} from the pid file is not {}",
        hub.proxy_command.display()
    );
    signal(first, "KILL")?;
    let second = eventually(hub, "the hub starts a new hubgate", || async {
        let pid = hub.proxy_pid()?;
        ensure!(
            pid != first,
            "pid file still names the killed proxy {first}"
        );
        ensure!(hub.is_proxy(pid), "pid {pid} is not (yet) the proxy");
        Ok(pid)
    })
    .await?;
    eprintln!("hub restarted the proxy: pid {first} -> {second}");
    eventually(
        hub,
        "alice's server answers through the new hubgate",
        || alice_answers(&http, hub),
    )
    .await?;
    check_proxy_routes(&http, hub).await?;

    // Let the hub reconcile its table against the new proxy at least once more (every 2 s).
    let checks = hub.log().matches("Checking routes").count();
    eventually(hub, "the hub reconciles routes again", || async {
        let now = hub.log().matches("Checking routes").count();
        ensure!(now > checks, "no new route check yet");
        Ok(())
    })
    .await?;
    check_hub_view(&http, hub, true).await?;

    // Stopping the server: the hub DELETEs the route by its encoded key, and requests for alice
    // fall through to the hub's route, where the hub redirects them to its own pages.
    let (status, _, body) = http
        .send(
            Method::DELETE,
            &hub.public_url("hub/api/users/alice/server"),
            Some(ADMIN_TOKEN),
        )
        .await?;
    ensure!(
        status == StatusCode::NO_CONTENT || status == StatusCode::ACCEPTED,
        "stopping alice's server: {status} {}",
        text(&body)
    );
    eventually(hub, "alice's route is gone from hubgate", || async {
        let alice_key = format!("{BASE_KEY}/user/alice");
        let routes = proxy_routes(&http, hub).await?;
        ensure!(
            !routes.contains_key(&alice_key),
            "hubgate still lists {alice_key:?}"
        );
        let url = hub.public_url("user/alice/some/path");
        let (status, headers, body) = http.get(&url, None).await?;
        let location = headers.get(LOCATION).and_then(|v| v.to_str().ok());
        let want = format!("{BASE_URL}hub/user/alice/some/path");
        ensure!(
            status == StatusCode::FOUND && location == Some(want.as_str()),
            "GET {url}: {status} Location {location:?} {}, want the hub's 302 to {want}",
            text(&body)
        );
        Ok(())
    })
    .await?;
    check_hub_view(&http, hub, false).await?;

    // The hub never had to repair the table: everything hubgate listed was what it added, and
    // every DELETE found its route.
    let log = hub.log();
    ensure!(
        log.contains("Proxy stopped with exit code -9"),
        "the hub never logged that the killed proxy stopped"
    );
    for churn in [
        "Deleting stale route",
        "Updating route",
        "Updating Hub route",
        "already deleted",
    ] {
        ensure!(
            !log.contains(churn),
            "`{churn}` in the hub's log: the table listed by GET /api/routes \
             differs from what the hub added, or a DELETE did not find its route"
        );
    }
    Ok(())
}

/// `GET <base>user/alice/...` reaches alice's fake server, which echoes what it received.
async fn alice_answers(http: &Http, hub: &Hub) -> Result<()> {
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

/// hubgate's table as `GET /api/routes` lists it, checked to be what the hub can parse.
async fn proxy_routes(http: &Http, hub: &Hub) -> Result<Map<String, Value>> {
    let url = format!("http://127.0.0.1:{}/api/routes", hub.api_port);
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

/// hubgate's own table lists the hub's and alice's routes under decoded keys with their data.
async fn check_proxy_routes(http: &Http, hub: &Hub) -> Result<()> {
    let routes = proxy_routes(http, hub).await?;
    let alice_key = format!("{BASE_KEY}/user/alice");
    let alice = routes
        .get(&alice_key)
        .with_context(|| format!("no route {alice_key:?} in {}", Value::from(routes.clone())))?;
    ensure!(
        alice["user"] == "alice"
            && alice["server_name"] == ""
            && alice["jupyterhub"] == true
            && alice["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("http://127.0.0.1:"))
            && alice["last_activity"].is_string(),
        "route {alice_key:?} has the wrong data: {alice}"
    );
    let hub_route = routes.get(BASE_KEY).with_context(|| {
        format!(
            "no hub route {BASE_KEY:?} in {}",
            Value::from(routes.clone())
        )
    })?;
    let hub_target = format!("http://127.0.0.1:{}", hub.hub_port);
    ensure!(
        hub_route["hub"] == true
            && hub_route["jupyterhub"] == true
            && hub_route["target"] == hub_target.as_str(),
        "hub route has the wrong data: {hub_route}"
    );
    Ok(())
}

/// The table as the hub sees it (`GET /hub/api/proxy`): it re-quotes every key it reads from
/// the proxy, so only decoded keys come back as the routes it added. Alice's route is there
/// while her server runs.
async fn check_hub_view(http: &Http, hub: &Hub, with_alice: bool) -> Result<()> {
    let url = hub.public_url("hub/api/proxy");
    let (status, _, body) = http.get(&url, Some(ADMIN_TOKEN)).await?;
    ensure!(
        status == StatusCode::OK,
        "GET {url}: {status} {}",
        text(&body)
    );
    let view: Value = serde_json::from_slice(&body).context("hub/api/proxy: not JSON")?;
    let view = view.as_object().context("hub/api/proxy: not an object")?;
    let keys: Vec<&String> = view.keys().collect();
    let alice = format!("{BASE_URL}user/alice/");
    ensure!(
        view.contains_key(BASE_URL) && view.contains_key(&alice) == with_alice,
        "the hub sees {keys:?}, want {BASE_URL:?}{}",
        if with_alice {
            format!(" and {alice:?}")
        } else {
            " only".into()
        }
    );
    ensure!(
        keys.iter().all(|k| !k.contains("%25")),
        "the hub sees doubly encoded keys {keys:?}"
    );
    Ok(())
}

/// A running `jupyterhub` with hubgate as its proxy; stopped and cleaned up on drop.
struct Hub {
    child: Mutex<Child>,
    workdir: tempfile::TempDir,
    log_path: PathBuf,
    proxy_command: PathBuf,
    public_port: u16,
    api_port: u16,
    hub_port: u16,
    /// Every proxy pid seen, to kill any the hub leaves behind if it has to be killed itself:
    /// it starts the proxy in a session of its own, so the proxy would outlive it.
    proxy_pids: Mutex<Vec<u32>>,
}

impl Hub {
    fn start(venv: &Path) -> Result<Self> {
        let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
        let proxy_command = std::env::var_os("HUBGATE_E2E_PROXY_COMMAND")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hubgate")));
        let workdir = tempfile::Builder::new()
            .prefix("e2e-hub-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .context("creating the hub's working directory")?;
        let log_path = workdir.path().join("jupyterhub.log");
        let log = fs::File::create(&log_path).context("creating the hub's log file")?;
        let [public_port, api_port, hub_port] = free_ports()?;
        let child = Command::new(venv.join("bin/jupyterhub"))
            .arg("-f")
            .arg(e2e.join("jupyterhub_config.py"))
            .current_dir(workdir.path())
            .env("HUBGATE_E2E_PUBLIC_PORT", public_port.to_string())
            .env("HUBGATE_E2E_API_PORT", api_port.to_string())
            .env("HUBGATE_E2E_HUB_PORT", hub_port.to_string())
            .env("HUBGATE_E2E_WORKDIR", workdir.path())
            .env("HUBGATE_E2E_PROXY_COMMAND", &proxy_command)
            .env("HUBGATE_E2E_PROXY_TOKEN", PROXY_TOKEN)
            .env("HUBGATE_E2E_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("HUBGATE_E2E_PYTHON", venv.join("bin/python"))
            .env_remove("CONFIGPROXY_AUTH_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning jupyterhub")?;
        Ok(Hub {
            child: Mutex::new(child),
            workdir,
            log_path,
            proxy_command,
            public_port,
            api_port,
            hub_port,
            proxy_pids: Mutex::new(Vec::new()),
        })
    }

    /// A URL under the hub's base URL on hubgate's public port.
    fn public_url(&self, rest: &str) -> String {
        format!("http://127.0.0.1:{}{BASE_URL}{rest}", self.public_port)
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.try_wait().ok().flatten()
    }

    fn pid_file(&self) -> PathBuf {
        self.workdir.path().join("jupyterhub-proxy.pid")
    }

    /// The pid the hub wrote for the proxy it started last.
    fn proxy_pid(&self) -> Result<u32> {
        let text = fs::read_to_string(self.pid_file()).context("reading the proxy pid file")?;
        let pid = text.trim().parse().context("proxy pid file")?;
        let mut seen = self.proxy_pids.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains(&pid) {
            seen.push(pid);
        }
        Ok(pid)
    }

    /// Whether `pid` is a live process running our proxy command (not a zombie, not reused).
    fn is_proxy(&self, pid: u32) -> bool {
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

    fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        let skip = all.len().saturating_sub(lines);
        let mut tail = all[skip..].join("\n");
        if skip > 0 {
            tail = format!(
                "[... {skip} earlier lines in {}]\n{tail}",
                self.log_path.display()
            );
        }
        tail
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        // SIGTERM is how an operator stops the hub: it stops alice's server and hubgate itself.
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

/// Retry `attempt` until it succeeds, the hub exits, or `PATIENCE` runs out.
async fn eventually<T, F, Fut>(hub: &Hub, what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if let Some(status) = hub.exit_status() {
            bail!("waiting until {what}: JupyterHub exited with {status}; last try: {error:#}");
        }
        if Instant::now() >= deadline {
            return Err(error.context(format!("waiting until {what}: gave up after {PATIENCE:?}")));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A plain HTTP/1.1 client without connection reuse (hubgate gets killed under it).
struct Http(Client<HttpConnector, Full<Bytes>>);

impl Http {
    fn new() -> Self {
        Http(
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
        )
    }

    async fn get(&self, url: &str, token: Option<&str>) -> Result<(StatusCode, HeaderMap, Bytes)> {
        self.send(Method::GET, url, token).await
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
    ) -> Result<(StatusCode, HeaderMap, Bytes)> {
        let mut request = Request::builder().method(method.clone()).uri(url);
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("token {token}"));
        }
        let request = request.body(Full::new(Bytes::new()))?;
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

fn text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(500) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.into_owned(),
    }
}

/// Ports free right now on 127.0.0.1, all different (each listener is held until all are read).
fn free_ports<const N: usize>() -> Result<[u16; N]> {
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
fn signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{name} {pid}: {status}");
    Ok(())
}

/// The test venv, created on first use and reused by later runs.
fn venv() -> &'static Path {
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
