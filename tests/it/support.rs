//! The harness: start hubgate as a child process, in-process backends, and HTTP helpers.
//!
//! Nothing here knows hubgate's internals: hubgate is found through `CARGO_BIN_EXE_hubgate`, its
//! addresses are read from the `listening listener=... addr=...` lines it logs to stderr (plain or
//! JSON), and everything else goes over TCP, signals and the environment.
//!
//! Every test starts hubgate with `Hubgate::start(flags)` or `Hubgate::builder()`: the builder
//! sets the environment (`env`; nothing hubgate reads is inherited), a metrics listener
//! (`metrics`), a file store (`file_store`), the test's own listeners (`without_listen_args`),
//! a shell prelude run before hubgate is `exec`ed (`prelude`: ignored signals, resource limits),
//! and `spawn` hands over a process that is not listening yet (Unix sockets). The process lives
//! until the value is dropped, so a test can signal it, wait for its exit status, and start
//! another on the same data.

use std::{
    convert::Infallible,
    future::Future,
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::{
    handshake::server::{Request as WsRequest, Response as WsResponse},
    Message,
};

/// How long hubgate may take to log both listening addresses.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for one request or one cross-process condition. Generous: machines are shared.
pub const WAIT: Duration = Duration::from_secs(20);
/// Pause between two polls of an `eventually` condition.
const POLL: Duration = Duration::from_millis(25);

/// A file of this repository, as text.
pub fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The lines of the README's section `## {title}`, up to the next `## ` heading.
pub fn readme_section(title: &str) -> Vec<String> {
    let readme = repo_file("README.md");
    let heading = format!("## {title}");
    let lines: Vec<String> = readme
        .lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .map(str::to_owned)
        .collect();
    assert!(!lines.is_empty(), "README.md has no section {heading:?}");
    lines
}

/// The body type of every request and response built by the tests.
pub type Body = BoxBody<Bytes, Infallible>;
pub type HttpClient = Client<HttpConnector, Body>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A token that differs between runs and between processes of one run.
pub fn random_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("tok{:x}{:x}{n:x}", nanos, std::process::id())
}

/// Poll `check` until it returns true; panic naming `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Read a whole response; an error (or `WAIT` passing) is the error's debug text.
pub async fn collect<F, E>(response: F) -> Result<Resp, String>
where
    F: Future<Output = Result<Response<Incoming>, E>>,
    E: std::fmt::Debug,
{
    let exchange = async {
        let resp = response.await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        Ok(Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no response within {WAIT:?}")))
}

/// Asserts that `resp` is hubgate's JSON error for `status` (`{"status": N, "message": "..."}`)
/// and returns the message.
#[track_caller]
pub fn assert_json_error(resp: &Resp, status: StatusCode, what: &str) -> String {
    assert_eq!(resp.status, status, "{what}: {resp:?}");
    assert!(
        resp.content_type().starts_with("application/json"),
        "{what}: content type {:?}",
        resp.content_type()
    );
    let body = resp.json();
    assert_eq!(body["status"], status.as_u16(), "{what}: {body}");
    body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no string message in {body}"))
        .to_owned()
}

/// A response read completely.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    pub fn content_type(&self) -> String {
        self.headers
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    }

    /// The route table version an API answer carries in `x-hubgate-version`.
    pub fn table_version(&self) -> u64 {
        let value = self
            .headers
            .get(TABLE_VERSION)
            .unwrap_or_else(|| panic!("no {TABLE_VERSION} header: {self:?}"));
        value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{TABLE_VERSION} is not an integer: {value:?}"))
    }
}

/// The header in which the API reports the route table's version.
const TABLE_VERSION: &str = "x-hubgate-version";

/// Send `req` and read the whole response, failing the test after `WAIT`.
pub async fn send(client: &HttpClient, req: Request<Body>) -> Resp {
    send_within(client, req, WAIT).await
}

/// Send `req` and read the whole response, failing the test when either the response or its
/// body takes longer than `wait`.
pub async fn send_within(client: &HttpClient, req: Request<Body>, wait: Duration) -> Resp {
    let what = format!("{} {}", req.method(), req.uri());
    let resp = tokio::time::timeout(wait, client.request(req))
        .await
        .unwrap_or_else(|_| panic!("{what}: no response within {wait:?}"))
        .unwrap_or_else(|e| panic!("{what}: request failed: {e:?}"));
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(wait, body.collect())
        .await
        .unwrap_or_else(|_| panic!("{what}: body not complete within {wait:?}"))
        .unwrap_or_else(|e| panic!("{what}: reading body failed: {e:?}"))
        .to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Variables hubgate reads besides these two: every name with one of these prefixes.
const HUBGATE_ENV_PREFIXES: [&str; 2] = ["HUBGATE_", "JUPYTERHUB_"];
const HUBGATE_ENV: [&str; 2] = ["CONFIGPROXY_AUTH_TOKEN", "RUST_LOG"];

/// Whether hubgate reads the environment variable `name` (so a child must not inherit it).
fn read_by_hubgate(name: &str) -> bool {
    HUBGATE_ENV.contains(&name) || HUBGATE_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// How to start hubgate. `Hubgate::builder()` gives a token-protected API on `127.0.0.1:0`, no
/// extra flags, and an environment without any variable hubgate reads (a test run from inside
/// a JupyterHub session must not hand hubgate that session's `JUPYTERHUB_*`): a test sets what
/// it needs with `env`.
pub struct Builder {
    args: Vec<String>,
    token: Option<String>,
    /// Set in this order, after the token.
    env: Vec<(String, String)>,
    listen_args: bool,
    metrics: bool,
    /// Shell commands run before hubgate is `exec`ed in their place.
    prelude: Vec<String>,
}

impl Builder {
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Start without `CONFIGPROXY_AUTH_TOKEN` in the environment: the API is open.
    pub fn open_api(mut self) -> Self {
        self.token = None;
        self
    }

    /// Set `CONFIGPROXY_AUTH_TOKEN` to exactly `token` (which may be empty).
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Set `name` to `value` in hubgate's environment (`JUPYTERHUB_API_TOKEN`,
    /// `HUBGATE_SESSION_SECRETS`, ...). The API token is `token`'s business.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Also serve metrics: add `--metrics-ip 127.0.0.1 --metrics-port 0` (unless
    /// `without_listen_args`), wait for the `metrics` listener too, and report it in
    /// `Hubgate::metrics`.
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Keep the routes in the file store in `dir` (`--storage-backend file --storage-path DIR`),
    /// so that a hubgate started later on the same `dir` finds them.
    pub fn file_store(self, dir: &Path) -> Self {
        let dir = dir.display().to_string();
        self.args(["--storage-backend", "file", "--storage-path", &dir])
    }

    /// Do not add `--ip 127.0.0.1 --port 0 --api-ip 127.0.0.1 --api-port 0`: the test's own
    /// arguments must choose the listeners.
    pub fn without_listen_args(mut self) -> Self {
        self.listen_args = false;
        self
    }

    /// Run this shell command first (`trap '' XFSZ`, `ulimit -v 4194304`), then `exec` hubgate:
    /// ignored signals and resource limits survive the `exec`, so hubgate starts with them and
    /// keeps its pid (for `prlimit` on the running process).
    pub fn prelude(mut self, command: &str) -> Self {
        self.prelude.push(command.to_owned());
        self
    }

    fn command(&self) -> Command {
        let bin = env!("CARGO_BIN_EXE_hubgate");
        let mut cmd = if self.prelude.is_empty() {
            Command::new(bin)
        } else {
            let script = format!("{}; exec \"$0\" \"$@\"", self.prelude.join("; "));
            let mut cmd = Command::new("sh");
            cmd.args(["-c", &script, bin]);
            cmd
        };
        if self.listen_args {
            cmd.args([
                "--ip",
                "127.0.0.1",
                "--port",
                "0",
                "--api-ip",
                "127.0.0.1",
                "--api-port",
                "0",
            ]);
            if self.metrics {
                cmd.args(["--metrics-ip", "127.0.0.1", "--metrics-port", "0"]);
            }
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(read_by_hubgate) {
                cmd.env_remove(name);
            }
        }
        if let Some(token) = &self.token {
            cmd.env("CONFIGPROXY_AUTH_TOKEN", token);
        }
        for (name, value) in &self.env {
            cmd.env(name, value);
        }
        cmd
    }

    /// Run hubgate expecting it to exit on its own (configuration errors, `--version`).
    pub async fn run_to_exit(self) -> Output {
        let mut child = self.spawn();
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "hubgate {:?} did not exit within {WAIT:?} (is this flag implemented now? \
                 then this test needs updating); stderr:\n{}",
                child.args,
                child.logs()
            );
            tokio::time::sleep(POLL).await;
        };
        let (stdout, stderr) = child.finish_output();
        Output {
            status,
            stdout,
            stderr,
        }
    }

    /// Start hubgate and wait until it logged the addresses of its proxy and API listeners (and
    /// metrics listener, with `metrics`), which must be on TCP.
    pub async fn start(self) -> Hubgate {
        let metrics = self.metrics;
        let mut process = self.spawn();
        let proxy = process.tcp_listener("proxy").await;
        let api = process.tcp_listener("api").await;
        let metrics = if metrics {
            Some(process.tcp_listener("metrics").await)
        } else {
            None
        };
        Hubgate {
            process,
            proxy,
            api,
            metrics,
            client: http_client(),
        }
    }

    /// Start hubgate without waiting for anything: for listeners that are not on TCP
    /// (`--socket`), found with `Spawned::listening`.
    pub fn spawn(self) -> Spawned {
        let cmd = self.command();
        Spawned::spawn(cmd, self.args, self.token.filter(|t| !t.is_empty()))
    }
}

/// A hubgate child process, listening yet or not. Its stdout and stderr are drained by threads
/// into buffers, so it never blocks on a full pipe; it is killed and reaped on drop, and lives
/// until then: signals, exit statuses and restarts on the same data are the test's to make.
pub struct Spawned {
    child: Child,
    /// The test's own arguments, for messages.
    args: Vec<String>,
    token: Option<String>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    drains: Vec<thread::JoinHandle<()>>,
}

impl Spawned {
    fn spawn(mut cmd: Command, args: Vec<String>, token: Option<String>) -> Spawned {
        let mut child = cmd.spawn().expect("spawn hubgate");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout is piped");
        let err = child.stderr.take().expect("stderr is piped");
        let drains = vec![drain(out, stdout.clone()), drain(err, stderr.clone())];
        Spawned {
            child,
            args,
            token,
            stdout,
            stderr,
            drains,
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll hubgate")
    }

    /// The API token, when the API is protected.
    pub fn token(&self) -> &str {
        self.token.as_deref().expect("this hubgate has an open API")
    }

    /// Everything hubgate wrote to stderr so far.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// The address listener `which` (`proxy`, `api`, `metrics`) logged, `IP:PORT` or
    /// `unix:PATH`, waiting for it at most `STARTUP_TIMEOUT`.
    pub async fn listening(&mut self, which: &str) -> String {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let logs = self.logs();
            if let Some(addr) = listen_addr(&logs, which) {
                return addr;
            }
            if let Some(status) = self.try_wait() {
                let (_, stderr) = self.finish_output();
                panic!(
                    "hubgate {:?} exited with {status} before listener {which} was up; \
                     stderr:\n{}",
                    self.args,
                    String::from_utf8_lossy(&stderr)
                );
            }
            assert!(
                Instant::now() < deadline,
                "hubgate {:?} did not log listener {which} within {STARTUP_TIMEOUT:?}; \
                 stderr so far:\n{logs}",
                self.args
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn tcp_listener(&mut self, which: &str) -> SocketAddr {
        let addr = self.listening(which).await;
        addr.parse()
            .unwrap_or_else(|_| panic!("listener {which} is not on TCP: {addr}"))
    }

    /// Send signal `name` (`TERM`, `HUP`, `KILL`, ...).
    pub fn signal(&self, name: &str) {
        send_signal(self.pid(), name);
    }

    /// Wait (at most `WAIT`) for the process to exit; its logs are complete then.
    pub async fn exit_status(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.try_wait() {
                self.finish_output();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "hubgate {:?} did not exit within {WAIT:?}; stderr:\n{}",
                self.args,
                self.logs()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Send signal `name` and wait (at most `WAIT`) for the process to exit.
    pub async fn stop(&mut self, name: &str) -> ExitStatus {
        self.signal(name);
        self.exit_status().await
    }

    /// After exit: wait for both pipes to close, then take stdout and a copy of stderr.
    fn finish_output(&mut self) -> (Vec<u8>, Vec<u8>) {
        for drain in self.drains.drain(..) {
            let _ = drain.join();
        }
        (
            std::mem::take(&mut *self.stdout.lock().unwrap()),
            self.stderr.lock().unwrap().clone(),
        )
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kill -s <name> <pid>`: this crate forbids `unsafe`, so no libc.
pub fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -s {name} {pid} failed");
}

/// Copy `reader` line by line into `buffer` until EOF, on a thread of its own.
fn drain<R: Read + Send + 'static>(
    reader: R,
    buffer: Arc<Mutex<Vec<u8>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => buffer.lock().unwrap().extend_from_slice(&line),
            }
        }
    })
}

/// The `addr` of the `listening` line of listener `which`, in the plain or the JSON log format.
fn listen_addr(log: &str, which: &str) -> Option<String> {
    let plain = format!("listener={which}");
    let quoted = format!("listener=\"{which}\"");
    log.lines()
        .filter(|line| line.contains("listening"))
        .find_map(|line| {
            if let Ok(doc) = serde_json::from_str::<Value>(line) {
                let fields = &doc["fields"];
                return (fields["message"] == "listening" && fields["listener"] == which)
                    .then(|| fields["addr"].as_str().map(str::to_owned))
                    .flatten();
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if !words.iter().any(|w| *w == plain || *w == quoted) {
                return None;
            }
            words
                .iter()
                .find_map(|w| w.strip_prefix("addr="))
                .map(|a| a.trim_matches('"').to_owned())
        })
}

/// A running hubgate process, killed on drop.
pub struct Hubgate {
    process: Spawned,
    pub proxy: SocketAddr,
    pub api: SocketAddr,
    /// The metrics listener, when started with `Builder::metrics`.
    pub metrics: Option<SocketAddr>,
    pub client: HttpClient,
}

impl Hubgate {
    pub fn builder() -> Builder {
        Builder {
            args: Vec::new(),
            token: Some(random_token()),
            env: Vec::new(),
            listen_args: true,
            metrics: false,
            prelude: Vec::new(),
        }
    }

    /// Start with a token-protected API and these extra flags.
    pub async fn start(args: &[&str]) -> Hubgate {
        Hubgate::builder().args(args).start().await
    }

    /// The API token, when the API is protected.
    pub fn token(&self) -> &str {
        self.process.token()
    }

    /// Everything hubgate wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Send signal `name` (`TERM`, `HUP`, `KILL`, ...).
    pub fn signal(&self, name: &str) {
        self.process.signal(name);
    }

    /// Wait (at most `WAIT`) for the process to exit; its logs are complete then.
    pub async fn exit_status(&mut self) -> ExitStatus {
        self.process.exit_status().await
    }

    /// Waits (at most `WAIT`) for hubgate to exit, and fails unless it exited with 0.
    pub async fn assert_exits_with_0(&mut self, what: &str) {
        let status = self.exit_status().await;
        assert_eq!(status.code(), Some(0), "{what}: {status}\n{}", self.logs());
    }

    /// Send signal `name` and wait (at most `WAIT`) for the process to exit.
    pub async fn stop(&mut self, name: &str) -> ExitStatus {
        self.process.stop(name).await
    }

    /// Resident set size of the hubgate process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid())
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// A request to the public address; the test adds headers and sends it with `proxy_send`.
    pub fn proxy_request(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder().method(method).uri(self.proxy_url(path))
    }

    pub async fn proxy_send(&self, req: Request<Body>) -> Resp {
        send(&self.client, req).await
    }

    /// `GET path` on the public address.
    pub async fn get(&self, path: &str) -> Resp {
        let req = self.proxy_request(Method::GET, path).body(empty()).unwrap();
        self.proxy_send(req).await
    }

    /// `GET path` on the public address with exactly these headers.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.request(Method::GET, path, headers, Bytes::new()).await
    }

    /// `GET path` on the public address as the holder of `token`: `Authorization: token <token>`
    /// and no other header.
    pub async fn get_as(&self, path: &str, token: &str) -> Resp {
        let auth = format!("token {token}");
        self.get_with(path, &[("authorization", &auth)]).await
    }

    /// A request to the public address with exactly these headers.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        let req = with_headers(self.proxy_request(method, path), headers);
        self.proxy_send(req.body(full(body)).unwrap()).await
    }

    /// A URL on the metrics listener (see `Builder::metrics`).
    pub fn metrics_url(&self, path: &str) -> String {
        let addr = self
            .metrics
            .expect("this hubgate was started without Builder::metrics");
        format!("http://{addr}{path}")
    }

    /// `GET path` on the metrics listener, without credentials.
    pub async fn metrics_get(&self, path: &str) -> Resp {
        let req = Request::get(self.metrics_url(path)).body(empty()).unwrap();
        send(&self.client, req).await
    }

    /// A request to the API with the right token (when there is one) and no other headers.
    pub async fn api(&self, method: Method, path: &str, body: impl Into<Bytes>) -> Resp {
        let mut headers = Vec::new();
        let auth;
        if let Some(token) = &self.process.token {
            auth = format!("token {token}");
            headers.push(("authorization", auth.as_str()));
        }
        self.api_with(method, path, &headers, body).await
    }

    /// A request to the API with exactly these headers (no token added).
    pub async fn api_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Resp {
        let req = Request::builder().method(method).uri(self.api_url(path));
        let req = with_headers(req, headers);
        send(&self.client, req.body(full(body)).unwrap()).await
    }

    pub async fn api_get(&self, path: &str) -> Resp {
        self.api(Method::GET, path, Bytes::new()).await
    }

    pub async fn api_post(&self, path: &str, body: &str) -> Resp {
        self.api(Method::POST, path, body.to_owned()).await
    }

    pub async fn api_delete(&self, path: &str) -> Resp {
        self.api(Method::DELETE, path, Bytes::new()).await
    }

    /// `POST /api/routes<path>` with `data`, asserting 201.
    pub async fn add_route_data(&self, path: &str, data: Value) {
        let resp = self
            .api_post(&format!("/api/routes{path}"), &data.to_string())
            .await;
        assert_eq!(
            resp.status,
            StatusCode::CREATED,
            "adding route {path} with {data}: {:?}\nhubgate stderr:\n{}",
            resp.text(),
            self.logs()
        );
    }

    /// `POST /api/routes<path>` with `{"target": target}`, asserting 201.
    pub async fn add_route(&self, path: &str, target: &str) {
        self.add_route_data(path, json!({ "target": target })).await;
    }

    /// The route table version `GET /api/routes` reports.
    pub async fn table_version(&self) -> u64 {
        let resp = self.api_get("/api/routes").await;
        assert_eq!(resp.status, StatusCode::OK, "GET /api/routes: {resp:?}");
        resp.table_version()
    }

    /// The whole routing table from `GET /api/routes`.
    pub async fn routes(&self) -> serde_json::Map<String, Value> {
        let resp = self.api_get("/api/routes").await;
        assert_eq!(resp.status, StatusCode::OK, "GET /api/routes: {resp:?}");
        match resp.json() {
            Value::Object(map) => map,
            other => panic!("GET /api/routes is not an object: {other}"),
        }
    }

    /// One route's data from the table listing, by its normalised key.
    pub async fn route(&self, key: &str) -> Option<Value> {
        self.routes().await.get(key).cloned()
    }

    /// The `last_activity` of the route `key`, in milliseconds since the epoch.
    pub async fn last_activity(&self, key: &str) -> i64 {
        let route = self
            .route(key)
            .await
            .unwrap_or_else(|| panic!("route {key} is not in the table"));
        let stamp = route["last_activity"]
            .as_str()
            .unwrap_or_else(|| panic!("route {key} has no string last_activity: {route}"));
        parse_timestamp(stamp).unwrap_or_else(|| {
            panic!("last_activity {stamp:?} of {key} is not YYYY-MM-DDTHH:MM:SS.mmmZ")
        })
    }
}

fn with_headers(
    mut req: http::request::Builder,
    headers: &[(&str, &str)],
) -> http::request::Builder {
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req
}

/// A route listing without `last_activity`: what was posted.
pub fn posted(table: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    table
        .iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            if let Value::Object(o) = &mut v {
                o.remove("last_activity");
            }
            (k.clone(), v)
        })
        .collect()
}

/// The wall clock, which hubgate shares, in milliseconds since the epoch.
pub fn now_millis() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// Resident set size of process `pid`, in bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kib * 1024
}

/// Parse exactly `YYYY-MM-DDTHH:MM:SS.mmmZ` into milliseconds since the epoch.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[23] != b'Z'
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let digits = &s[from..to];
        if digits.bytes().all(|c| c.is_ascii_digit()) {
            digits.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second, milli) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from civil, after Howard Hinnant.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + milli)
}

/// Format milliseconds since the epoch the way `last_activity` is formatted.
pub fn format_timestamp(millis: i64) -> String {
    let days = millis.div_euclid(86_400_000);
    let rem = millis.rem_euclid(86_400_000);
    // Civil from days, after Howard Hinnant.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// A response read from a raw TCP exchange.
#[derive(Debug)]
pub struct RawResp {
    pub status: u16,
    pub body: Vec<u8>,
}

impl RawResp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Write `request` byte for byte (it must ask for `Connection: close`), read until EOF.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> RawResp {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write request");
        let mut data = Vec::new();
        // A reset after the response is as good as EOF here.
        let _ = stream.read_to_end(&mut data).await;
        data
    };
    let data = tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no complete response within {WAIT:?}"));
    parse_raw_response(&data)
        .unwrap_or_else(|| panic!("unparseable response: {:?}", String::from_utf8_lossy(&data)))
}

/// Parse a status line and headers, and a body that is chunked or runs to the end of `data`.
pub fn parse_raw_response(data: &[u8]) -> Option<RawResp> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&data[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = data[end + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Some(RawResp { status, body })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// An in-process HTTP/1 server, stopped on drop.
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A backend that holds requests until released (all of them, or only those for one path; the
/// others are answered at once), counting the held requests that arrived.
pub struct HeldBackend {
    pub server: Server,
    pub arrived: Arc<std::sync::atomic::AtomicUsize>,
    pub release: tokio::sync::watch::Sender<bool>,
}

impl HeldBackend {
    /// Holds every request.
    pub async fn start() -> HeldBackend {
        Self::holding(None).await
    }

    /// Holds requests for `path` only (every request when `None`).
    pub async fn holding(path: Option<&'static str>) -> HeldBackend {
        let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let count = arrived.clone();
        let server = serve(move |req| {
            let count = count.clone();
            let mut released = released.clone();
            async move {
                if path.is_some_and(|p| req.uri().path() != p) {
                    return Response::new(full("fast answer"));
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = released.wait_for(|r| *r).await;
                Response::new(full("slow answer"))
            }
        })
        .await;
        HeldBackend {
            server,
            arrived,
            release,
        }
    }

    pub fn url(&self) -> String {
        self.server.url("")
    }

    /// Waits (at most `WAIT`) until `n` held requests have arrived.
    pub async fn wait_arrived(&self, n: usize) {
        eventually(WAIT, "the request to reach the backend", || {
            let arrived = self.arrived.load(Ordering::SeqCst);
            async move { arrived >= n }
        })
        .await;
    }
}

/// Serve `handler` on `127.0.0.1:0` until the returned `Server` is dropped.
pub async fn serve<F, Fut>(handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Server { addr, task }
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// The request target exactly as received (path and query).
    pub path: String,
}

/// What a backend answers.
#[derive(Clone)]
pub enum Reply {
    /// 200 `application/json` describing the request (see `echo_json`).
    Echo,
    /// A fixed status, content type and body.
    Fixed {
        status: u16,
        content_type: &'static str,
        body: &'static str,
    },
}

/// A backend that records every request it receives.
pub struct Backend {
    server: Server,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    pub async fn echo() -> Backend {
        Backend::start(Reply::Echo).await
    }

    pub async fn fixed(status: u16, content_type: &'static str, body: &'static str) -> Backend {
        Backend::start(Reply::Fixed {
            status,
            content_type,
            body,
        })
        .await
    }

    async fn start(reply: Reply) -> Backend {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let server = serve(move |req| {
            let reply = reply.clone();
            let record = record.clone();
            async move { answer(req, reply, record).await }
        })
        .await;
        Backend { server, seen }
    }

    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// Every request received so far, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Request bodies up to this size are echoed back in `"body"`.
const ECHO_BODY_LIMIT: usize = 64 * 1024;

async fn answer(
    req: Request<Incoming>,
    reply: Reply,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| parts.uri.to_string());
    seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
    });
    // Count the body frame by frame: uploads of a gigabyte must not be held in memory.
    let mut body_len: u64 = 0;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(full("body read failed"))
                .unwrap();
        };
        if let Some(data) = frame.data_ref() {
            body_len += data.len() as u64;
            if kept.len() < ECHO_BODY_LIMIT {
                let room = ECHO_BODY_LIMIT - kept.len();
                kept.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
    }
    match reply {
        Reply::Fixed {
            status,
            content_type,
            body,
        } => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(full(body))
            .unwrap(),
        Reply::Echo => {
            let mut doc = echo_json(&parts.method, &path, &parts.headers, body_len);
            if body_len <= ECHO_BODY_LIMIT as u64 {
                doc["body"] = Value::String(String::from_utf8_lossy(&kept).into_owned());
            }
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(full(doc.to_string()))
                .unwrap()
        }
    }
}

/// `{"method", "path", "headers": {lowercased name: value}, "body_len"}`; repeated headers are
/// joined with `,` as HTTP allows.
fn echo_json(method: &Method, path: &str, headers: &HeaderMap, body_len: u64) -> Value {
    let mut names = serde_json::Map::new();
    for name in headers.keys() {
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        names.insert(name.as_str().to_owned(), Value::String(values.join(",")));
    }
    json!({
        "method": method.as_str(),
        "path": path,
        "headers": names,
        "body_len": body_len,
    })
}

/// A listener that accepts connections and never answers, until dropped.
pub struct Silent {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn silent_backend() -> Silent {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    Silent { addr, task }
}

/// A free address: bound, then released, so a test can start listening on it later. For a
/// target that must stay down, `dead_port` is safer (nothing else can take its port).
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().unwrap()
}

/// A port that refuses connections: bound but never listening, so no other test or hubgate
/// can take it while this value lives.
pub struct DeadPort {
    pub addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

impl DeadPort {
    /// `http://127.0.0.1:PORT`, a target that is down.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub fn dead_port() -> DeadPort {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let addr = socket.local_addr().unwrap();
    DeadPort {
        addr,
        _socket: socket,
    }
}

/// What the websocket peer reports about its connections.
#[derive(Debug)]
pub enum WsEvent {
    /// A handshake arrived for this request target with these headers.
    Opened { path: String, headers: HeaderMap },
    /// The connection ended (close frame, EOF or error).
    Closed,
}

/// A websocket echo peer: echoes text and binary messages; on the text message `close-please`
/// it sends a close frame itself.
pub struct WsPeer {
    pub addr: SocketAddr,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<WsEvent>>,
    task: JoinHandle<()>,
}

impl Drop for WsPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The text message that makes `WsPeer` close the connection from its side.
pub const WS_CLOSE_PLEASE: &str = "close-please";

impl WsPeer {
    pub async fn start() -> WsPeer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (events_tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(ws_echo(stream, events_tx.clone()));
            }
        });
        WsPeer {
            addr,
            events: tokio::sync::Mutex::new(events),
            task,
        }
    }

    /// The next event, failing the test after `WAIT`.
    pub async fn next_event(&self) -> WsEvent {
        let mut events = self.events.lock().await;
        tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap_or_else(|_| panic!("websocket peer reported nothing within {WAIT:?}"))
            .expect("websocket peer stopped")
    }
}

// tungstenite's handshake callback type has a large error variant; not ours to change.
#[allow(clippy::result_large_err)]
async fn ws_echo(stream: TcpStream, events: mpsc::UnboundedSender<WsEvent>) {
    let mut opened = None;
    let callback = |req: &WsRequest, resp: WsResponse| {
        opened = Some(WsEvent::Opened {
            path: req.uri().to_string(),
            headers: req.headers().clone(),
        });
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    if let Some(event) = opened {
        let _ = events.send(event);
    }
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Text(text)) if text == WS_CLOSE_PLEASE => {
                if ws.close(None).await.is_err() {
                    break;
                }
            }
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(msg).await.is_err() {
                    break;
                }
            }
            // After a close frame, keep polling: that sends tungstenite's reply and then ends.
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = events.send(WsEvent::Closed);
}
