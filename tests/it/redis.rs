//! The Redis store (`--storage-backend redis`): several hubgate replicas sharing one route table
//! through a real `redis-server`, which each test starts on a loopback port of its own, in a
//! temporary directory of its own, and stops when done ([`RedisServer`]).
//!
//! What is proved: changes made through any replica reach the others and every table ends equal
//! (version included) under concurrent writers, a replica killed with SIGKILL catches up, an
//! outage of Redis (with and without persistence) neither fails a proxied request nor loses a
//! route, `last_activity` and revocations travel between replicas, a replica that starts before
//! Redis waits for it, and passwords and TLS work (and fail clearly when wrong).
//!
//! `redis-server` must be installed; when it is not and the tests run as root (as in CI), the
//! fixture installs Debian's package; otherwise it panics saying so. These tests never skip.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};

use crate::certs::Ca;
use crate::fakehub::{Endpoint, FakeHub};
use crate::support::{empty, eventually, random_token, send_signal, Backend, Hubgate, Resp};

/// The Redis tests here and in `redis_failover` hold this shared; the test that compares write
/// rates holds it alone, so that the heaviest of the others (dozens of processes writing) do not
/// run beside it and skew one window against the other.
pub(crate) static PACE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Upper bound for one cross-process condition here: replicas converging, Redis starting.
pub(crate) const LIMIT: Duration = Duration::from_secs(20);
/// `last_activity` is flushed every 5 s; a raised value then travels through the log.
const ACTIVITY_LIMIT: Duration = Duration::from_secs(20);
/// A target that is never asked (the tests that use it send no traffic).
pub(crate) const NOWHERE: &str = "http://127.0.0.1:9";
/// What a browser sends as `Accept` when it navigates.
const BROWSER: (&str, &str) = ("accept", "text/html,application/xhtml+xml,*/*;q=0.8");

// ---------------------------------------------------------------------------------------------
// The redis-server fixture

/// How a [`RedisServer`] runs.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `--appendonly yes --appendfsync always`: everything acknowledged survives a restart.
    /// Without: `--save '' --appendonly no`, a restart comes back empty.
    pub persistent: bool,
    /// `--requirepass`.
    pub password: Option<String>,
    /// Serve TLS only (`--port 0 --tls-port`), with a certificate from a CA of the fixture's own
    /// (see [`RedisServer::ca_file`]).
    pub tls: bool,
    /// `--replicaof 127.0.0.1 <port>`: a replica of the server on that port.
    pub replica_of: Option<u16>,
    /// `--cluster-enabled yes` (node timeout 1 s), its node file in its directory.
    pub cluster: bool,
}

/// A `redis-server` child process on `127.0.0.1:<port>` with its own directory; killed on drop.
/// `restart` brings it back on the same port and directory (so with the same data when
/// persistent).
pub struct RedisServer {
    opts: RedisOptions,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// How many times the process was started: each start logs to a file of its own.
    starts: u32,
    /// The CA that signed the server's certificate, with `tls`.
    ca: Option<PathBuf>,
}

/// How one attempt to start the process ended.
enum Launch {
    Ready,
    PortTaken,
}

impl RedisServer {
    /// Starts a server on a free loopback port, waiting until it accepts connections.
    pub async fn start(opts: RedisOptions) -> RedisServer {
        let mut server = RedisServer::prepare(opts);
        for _ in 0..10 {
            match server.launch().await {
                Launch::Ready => return server,
                // Someone took the port between our probe and redis-server's bind: another.
                Launch::PortTaken => server.port = free_port(),
            }
        }
        panic!("redis-server found every port it was given taken (10 tries)");
    }

    /// A server with a port and a directory, not started yet (see [`RedisServer::restart`]):
    /// for a hubgate that must start before Redis.
    pub fn prepare(opts: RedisOptions) -> RedisServer {
        redis_server_binary();
        let dir = tempfile::Builder::new()
            .prefix("hubgate-redis-")
            .tempdir()
            .expect("temporary directory for redis-server");
        let ca = opts.tls.then(|| {
            let ca = Ca::new("hubgate redis test CA");
            ca.issue("redis", 1).write(dir.path(), "redis");
            ca.write(dir.path(), "ca")
        });
        RedisServer {
            opts,
            port: free_port(),
            dir,
            child: None,
            starts: 0,
            ca,
        }
    }

    /// `redis://` (or `rediss://`) with the password, when there is one.
    pub fn url(&self) -> String {
        self.url_with_password(self.opts.password.as_deref())
    }

    /// The URL with another password (`None`: without one).
    pub fn url_with_password(&self, password: Option<&str>) -> String {
        let scheme = if self.opts.tls { "rediss" } else { "redis" };
        let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}", self.port)
    }

    /// The CA certificate that signed the server's, for `--redis-ca` (with `tls` only).
    pub fn ca_file(&self) -> &Path {
        self.ca.as_deref().expect("this redis-server has no TLS")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Makes the next [`RedisServer::restart`] start as a replica of the server on `primary`.
    pub fn set_replica_of(&mut self, primary: Option<u16>) {
        self.opts.replica_of = primary;
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server logged over all its starts, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            for ext in ["log", "out"] {
                let path = self.dir.path().join(format!("redis-{n}.{ext}"));
                out.push_str(&std::fs::read_to_string(path).unwrap_or_default());
            }
        }
        out
    }

    /// Stops the server the way an operator does (SIGTERM: redis-server shuts down cleanly,
    /// syncing its append-only file), and waits until it has exited.
    pub async fn stop(&mut self) {
        self.signal_and_wait("TERM").await;
    }

    /// Sends `signal` (`STOP`, `CONT`) to the running server and does not wait.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            send_signal(child.id(), signal);
        }
    }

    /// SIGKILL, and waits until it has exited.
    pub async fn kill(&mut self) {
        self.signal_and_wait("KILL").await;
    }

    /// Starts the server again (stopping it first if it runs) on the same port and directory.
    /// The port is ours only while the server runs, so if something else took it meanwhile the
    /// test cannot go on: this panics saying so.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.launch().await {
                Launch::Ready => return,
                Launch::PortTaken if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Launch::PortTaken => panic!(
                    "redis-server cannot restart on port {}: something else took it",
                    self.port
                ),
            }
        }
    }

    async fn signal_and_wait(&mut self, signal: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send_signal(child.id(), signal);
        let deadline = Instant::now() + LIMIT;
        while child.try_wait().expect("poll redis-server").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-server did not exit within {LIMIT:?} of SIG{signal}; logs:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One start on `self.port`: waits until the server logs that it accepts connections.
    async fn launch(&mut self) -> Launch {
        assert!(self.child.is_none(), "redis-server is already running");
        self.starts += 1;
        let dir = self.dir.path();
        let log = dir.join(format!("redis-{}.log", self.starts));
        let out = dir.join(format!("redis-{}.out", self.starts));
        let port = self.port.to_string();
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--logfile".into(),
            log.display().to_string(),
            "--daemonize".into(),
            "no".into(),
            "--save".into(),
            String::new(),
        ];
        if self.opts.persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        if self.opts.tls {
            let file = |name: &str| dir.join(name).display().to_string();
            args.extend([
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port,
                "--tls-cert-file".into(),
                file("redis.crt"),
                "--tls-key-file".into(),
                file("redis.key"),
                "--tls-ca-cert-file".into(),
                file("ca.pem"),
                "--tls-auth-clients".into(),
                "no".into(),
            ]);
        } else {
            args.extend(["--port".into(), port]);
        }
        if let Some(password) = &self.opts.password {
            args.extend(["--requirepass".into(), password.clone()]);
            // A replica, or a primary demoted by a failover, logs in to its primary with it.
            args.extend(["--masterauth".into(), password.clone()]);
        }
        if let Some(primary) = self.opts.replica_of {
            args.extend([
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary.to_string(),
            ]);
        }
        if self.opts.cluster {
            args.extend([
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                dir.join("nodes.conf").display().to_string(),
                "--cluster-node-timeout".into(),
                "1000".into(),
            ]);
        }
        // A primary waits 5 s by default before it streams its data to a new replica (to serve
        // several at once); the failover tests' replicas need it at once.
        args.extend(["--repl-diskless-sync-delay", "0"].map(String::from));
        let out_file = File::create(&out).expect("create redis-server output file");
        let child = Command::new(redis_server_binary())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out_file.try_clone().expect("clone output file"))
            .stderr(out_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + LIMIT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default()
                + &std::fs::read_to_string(&out).unwrap_or_default();
            let child = self.child.as_mut().expect("started above");
            if let Some(status) = child.try_wait().expect("poll redis-server") {
                self.child = None;
                if text.contains("Address already in use") {
                    return Launch::PortTaken;
                }
                panic!("redis-server {args:?} exited with {status} at start; logs:\n{text}");
            }
            if text.contains("Ready to accept connections") {
                return Launch::Ready;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server was not ready within {LIMIT:?}; logs:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port nothing listens on now: bound on `127.0.0.1:0`, then released (redis-server cannot
/// be given port 0 and tell us which one it took).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The `redis-server` to run, installing Debian's package first when it is missing and this
/// runs as root (as CI does). Panics when it cannot be had.
pub(crate) fn redis_server_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(found) = find_redis_server() {
            return found;
        }
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        assert!(
            root,
            "redis-server is not installed, and these tests are not running as root, so they \
             cannot install it: run `apt-get install -y redis-server` (Debian/Ubuntu) and retry. \
             The Redis store tests (tests/it/redis.rs) need a real redis-server and never skip."
        );
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        let installed = apt(&["install", "-y", "-q", "redis-server"])
            || (apt(&["update", "-q"]) && apt(&["install", "-y", "-q", "redis-server"]));
        assert!(
            installed,
            "redis-server is not installed and `apt-get install -y redis-server` failed; \
             the Redis store tests (tests/it/redis.rs) need it"
        );
        find_redis_server().expect("redis-server is still missing after apt-get install")
    })
}

fn find_redis_server() -> Option<PathBuf> {
    let works = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    [
        PathBuf::from("redis-server"),
        PathBuf::from("/usr/bin/redis-server"),
        PathBuf::from("/usr/sbin/redis-server"),
        PathBuf::from("/usr/local/bin/redis-server"),
    ]
    .into_iter()
    .find(|p| works(p))
}

// ---------------------------------------------------------------------------------------------
// Replicas

fn store_args(url: &str) -> Vec<String> {
    ["--storage-backend", "redis", "--redis-url", url]
        .map(String::from)
        .to_vec()
}

/// One hubgate on the Redis store at `url`, loaded and ready.
async fn replica(url: &str) -> Hubgate {
    let hg = Hubgate::builder().args(store_args(url)).start().await;
    wait_ready(&hg, "a new replica").await;
    hg
}

/// `n` replicas sharing the store at `url`, each loaded and ready.
async fn replicas(url: &str, n: usize) -> Vec<Hubgate> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(replica(url).await);
    }
    out
}

pub(crate) async fn ready(hg: &Hubgate) -> Resp {
    hg.api_get("/health/ready").await
}

pub(crate) async fn wait_ready(hg: &Hubgate, what: &str) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let resp = ready(hg).await;
        if resp.status == StatusCode::OK {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not ready within {LIMIT:?}: {}\nhubgate stderr:\n{}",
            resp.text(),
            hg.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `GET /api/status`.
pub(crate) async fn status(hg: &Hubgate) -> Value {
    let resp = hg.api_get("/api/status").await;
    assert_eq!(resp.status, StatusCode::OK, "GET /api/status: {resp:?}");
    resp.json()
}

pub(crate) async fn table_version(hg: &Hubgate) -> u64 {
    status(hg).await["table_version"]
        .as_u64()
        .expect("table_version in /api/status")
}

/// A table as posted: every route's data without `last_activity`.
pub(crate) type Posted = BTreeMap<String, Value>;

pub(crate) fn posted(table: &Map<String, Value>) -> Posted {
    crate::support::posted(table).into_iter().collect()
}

/// What `expected` (route → target) looks like as posted.
pub(crate) fn targets(expected: &BTreeMap<String, String>) -> Posted {
    expected
        .iter()
        .map(|(k, t)| (k.clone(), json!({ "target": t })))
        .collect()
}

/// What one replica holds: its listing and its table version (from `/api/status`).
struct View {
    table: Map<String, Value>,
    version: u64,
}

async fn view(hg: &Hubgate) -> View {
    View {
        table: hg.routes().await,
        version: table_version(hg).await,
    }
}

/// Waits until every replica lists the same table at the same version. With `activity`, the
/// listings must be equal whole (`last_activity` included); without, only as posted (for tests
/// with traffic, whose `last_activity` moves). Panics with the differences after [`LIMIT`].
pub(crate) async fn converge(
    replicas: &[&Hubgate],
    activity: bool,
    what: &str,
) -> Map<String, Value> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let views = join_all(replicas.iter().map(|hg| view(hg))).await;
        let same = |a: &View, b: &View| {
            a.version == b.version
                && if activity {
                    a.table == b.table
                } else {
                    posted(&a.table) == posted(&b.table)
                }
        };
        if views.iter().all(|v| same(v, &views[0])) {
            return views
                .into_iter()
                .next()
                .expect("one replica at least")
                .table;
        }
        if Instant::now() > deadline {
            let mut report = String::new();
            for (i, v) in views.iter().enumerate() {
                report.push_str(&format!(
                    "replica {i}: version {}, {} routes\n",
                    v.version,
                    v.table.len()
                ));
                let first = posted(&views[0].table);
                let mine = posted(&v.table);
                let differ: Vec<_> = first
                    .keys()
                    .chain(mine.keys())
                    .filter(|k| first.get(*k) != mine.get(*k))
                    .take(5)
                    .collect();
                if !differ.is_empty() {
                    report.push_str(&format!("  differs from replica 0 at {differ:?}\n"));
                }
                if activity {
                    let differ: Vec<_> = v
                        .table
                        .iter()
                        .filter(|(k, d)| views[0].table.get(*k) != Some(d))
                        .take(3)
                        .map(|(k, d)| format!("{k}: {d} vs {:?}", views[0].table.get(k)))
                        .collect();
                    if !differ.is_empty() {
                        report.push_str(&format!("  listing differs: {differ:?}\n"));
                    }
                }
            }
            let logs: Vec<String> = replicas.iter().map(|hg| tail(&hg.logs(), 15)).collect();
            panic!(
                "{what}: replicas did not converge within {LIMIT:?}:\n{report}\
                 last log lines of each:\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `GET path` on the public address, as a result rather than a panic: for loops that count
/// failures.
pub(crate) async fn try_get(hg: &Hubgate, path: &str) -> Result<StatusCode, String> {
    let req = Request::get(hg.proxy_url(path)).body(empty()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), hg.client.request(req))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| format!("request failed: {e:?}"))?;
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body failed: {e:?}"))?;
    Ok(status)
}

/// Asserts `resp` is a JSON 503 with a message.
pub(crate) fn assert_json_503(resp: &Resp, what: &str) -> String {
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {resp:?}"
    );
    assert!(
        resp.content_type().starts_with("application/json"),
        "{what}: content type {:?}",
        resp.content_type()
    );
    let doc = resp.json();
    assert_eq!(doc["status"], json!(503), "{what}: {doc}");
    let message = doc["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{what}: no message: {doc}");
    message
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_route_added_through_one_replica_is_served_by_the_others() {
    let _shared = PACE.read().await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let r = replicas(&redis.url(), 3).await;
    let backend = Backend::echo().await;
    r[0].add_route("/shared", &backend.url("")).await;
    for (i, hg) in r.iter().enumerate().skip(1) {
        eventually(
            LIMIT,
            &format!("replica {i} to serve /shared"),
            || async move { try_get(hg, "/shared/x").await == Ok(StatusCode::OK) },
        )
        .await;
        let resp = hg.get(&format!("/shared/from-{i}")).await;
        assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
        assert_eq!(resp.json()["path"], json!(format!("/shared/from-{i}")));
    }
    assert!(backend.seen().iter().any(|s| s.path == "/shared/from-2"));
    // As posted: the requests above moved `last_activity`, which travels on its own schedule
    // (see `traffic_through_one_replica_moves_last_activity_on_another`).
    converge(&r.iter().collect::<Vec<_>>(), false, "after one add").await;
}

/// `PATCH /api/proxy` with these adds and removes, asserting 200 and the counts.
async fn patch(hg: &Hubgate, add: &BTreeMap<String, String>, remove: &[String]) {
    let add: Map<String, Value> = add
        .iter()
        .map(|(k, t)| (k.clone(), json!({ "target": t })))
        .collect();
    let body = json!({"add": add, "remove": remove}).to_string();
    let resp = hg.api(Method::PATCH, "/api/proxy", body).await;
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "PATCH /api/proxy: {}\nhubgate stderr:\n{}",
        resp.text(),
        tail(&hg.logs(), 20)
    );
    let doc = resp.json();
    assert_eq!(doc["added"], json!(add.len()), "{doc}");
    assert_eq!(doc["removed"], json!(remove.len()), "{doc}");
}

/// Batches through `hg` in the key space `/b<name>/...`: `rounds` batches of `size` adds, each
/// (after the first) also removing every fourth route of the batch before. Returns what stays.
async fn batch_writer(hg: &Hubgate, name: usize, rounds: usize, size: usize) -> Posted {
    let mut kept = BTreeMap::new();
    let mut previous: Vec<String> = Vec::new();
    for round in 0..rounds {
        let add: BTreeMap<String, String> = (0..size)
            .map(|i| {
                (
                    format!("/b{name}/{round}/{i}"),
                    format!("{NOWHERE}/b{name}-{round}-{i}"),
                )
            })
            .collect();
        let remove: Vec<String> = previous.iter().step_by(4).cloned().collect();
        patch(hg, &add, &remove).await;
        for key in &remove {
            kept.remove(key);
        }
        previous = add.keys().cloned().collect();
        kept.extend(add);
    }
    targets(&kept)
}

/// Plain `POST /api/routes` through `hg` in the key space `/p<name>/...`, then a `DELETE` of
/// every other one. Returns what stays.
async fn route_writer(hg: &Hubgate, name: usize, count: usize) -> Posted {
    let mut kept = BTreeMap::new();
    for i in 0..count {
        let key = format!("/p{name}/{i}");
        let target = format!("{NOWHERE}/p{name}-{i}");
        hg.add_route(&key, &target).await;
        kept.insert(key, target);
    }
    for i in (0..count).step_by(2) {
        let key = format!("/p{name}/{i}");
        let resp = hg.api_delete(&format!("/api/routes{key}")).await;
        assert_eq!(
            resp.status,
            StatusCode::NO_CONTENT,
            "DELETE {key}: {resp:?}"
        );
        kept.remove(&key);
    }
    targets(&kept)
}

#[tokio::test]
async fn ten_thousand_concurrent_changes_through_three_replicas_leave_identical_tables() {
    let _shared = PACE.read().await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let r = replicas(&redis.url(), 3).await;
    let all: Vec<&Hubgate> = r.iter().collect();

    // Every replica takes batches and plain posts at the same time, in key spaces of their
    // own, so what must stay is known whatever the order the store puts them in.
    const ROUNDS: usize = 12;
    const SIZE: usize = 200;
    const POSTS: usize = 100;
    const POSTERS: usize = 6;
    let batches = join_all((0..3).map(|n| batch_writer(&r[n], n, ROUNDS, SIZE)));
    let posts = join_all((0..POSTERS).map(|n| route_writer(&r[n % 3], n, POSTS)));
    let (batches, posts) = tokio::join!(batches, posts);
    let mut expected: Posted = batches.into_iter().chain(posts).flatten().collect();
    let batch_changes = 3 * (ROUNDS * SIZE + (ROUNDS - 1) * SIZE / 4);
    let post_changes = POSTERS * (POSTS + POSTS / 2);

    let table = converge(&all, true, "after the concurrent writers").await;
    assert_eq!(
        posted(&table),
        expected,
        "the table is what the writers left"
    );
    let version = table_version(&r[0]).await;
    assert_eq!(
        table_version(&r[2]).await,
        version,
        "equal versions on every replica"
    );

    // Then one sync of more than a thousand changes (sent to the others as a reload marker):
    // drop every route of two batch writers, add 300 new ones, keep the rest.
    let mut desired = expected.clone();
    desired.retain(|k, _| !k.starts_with("/b0/") && !k.starts_with("/b1/"));
    let removed = expected.len() - desired.len();
    for i in 0..300 {
        desired.insert(
            format!("/synced/{i}"),
            json!({ "target": format!("{NOWHERE}/synced-{i}") }),
        );
    }
    let body = serde_json::to_string(&desired).unwrap();
    let resp = r[1].api(Method::POST, "/api/proxy", body).await;
    assert_eq!(resp.status, StatusCode::OK, "sync: {}", resp.text());
    let doc = resp.json();
    assert_eq!(doc["added"], json!(300), "{doc}");
    assert_eq!(doc["removed"], json!(removed), "{doc}");
    assert_eq!(doc["updated"], json!(0), "{doc}");
    assert!(
        removed > 1000,
        "the sync is large enough to be sent as a reload"
    );
    expected = desired;

    let table = converge(&all, true, "after the sync").await;
    assert_eq!(posted(&table), expected);
    assert_eq!(
        table_version(&r[0]).await,
        version + 1,
        "a sync is one version"
    );
    let total = batch_changes + post_changes + removed + 300;
    assert!(total >= 10_000, "{total} changes");
}

#[tokio::test]
async fn a_route_added_through_one_replica_can_be_removed_through_another_at_once() {
    let _shared = PACE.read().await;
    // JupyterHub talks to whichever replica its load balancer picks: a DELETE may reach a
    // replica that has not yet read the POST that preceded it from the log.
    let redis = RedisServer::start(RedisOptions::default()).await;
    let r = replicas(&redis.url(), 2).await;
    for i in 0..50 {
        let key = format!("/user/u{i}");
        r[0].add_route(&key, NOWHERE).await;
        let resp = r[1].api_delete(&format!("/api/routes{key}")).await;
        assert_eq!(
            resp.status,
            StatusCode::NO_CONTENT,
            "DELETE {key} through the second replica right after the first acknowledged the \
             add: {resp:?}"
        );
    }
    let table = converge(&[&r[0], &r[1]], true, "after adds and removes").await;
    assert!(table.is_empty(), "every route was removed: {table:?}");
}

/// Adds `/<name>/<i>` through `hg` and removes every third one, until `stop`; every write must
/// succeed. Returns what stays.
async fn steady_writer(hg: &Hubgate, name: &str, stop: &AtomicBool) -> Posted {
    let mut kept = BTreeMap::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("/{name}/{i}");
        let target = format!("{NOWHERE}/{name}-{i}");
        hg.add_route(&key, &target).await;
        kept.insert(key, target);
        if i % 3 == 2 {
            let old = format!("/{name}/{}", i - 2);
            let resp = hg.api_delete(&format!("/api/routes{old}")).await;
            assert_eq!(
                resp.status,
                StatusCode::NO_CONTENT,
                "DELETE {old}: {resp:?}"
            );
            kept.remove(&old);
        }
        i += 1;
    }
    targets(&kept)
}

/// Waits until `hg`'s table version has moved `by` past `from`.
async fn versions_pass(hg: &Hubgate, from: u64, by: u64) {
    eventually(
        LIMIT,
        &format!("the table version to pass {from} + {by}"),
        || async move { table_version(hg).await >= from + by },
    )
    .await;
}

#[tokio::test]
async fn a_replica_killed_and_restarted_catches_up_with_the_others() {
    let _shared = PACE.read().await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let url = redis.url();
    let a = replica(&url).await;
    let b = replica(&url).await;
    let mut c = replica(&url).await;
    let stop = AtomicBool::new(false);

    let scenario = async {
        let start = table_version(&a).await;
        versions_pass(&a, start, 20).await;
        c.signal("KILL");
        let exit = c.exit_status().await;
        assert!(!exit.success(), "SIGKILL ends hubgate: {exit}");
        let killed_at = table_version(&a).await;
        versions_pass(&a, killed_at, 40).await;
        let c = replica(&url).await;
        let back_at = table_version(&a).await;
        versions_pass(&a, back_at, 20).await;
        stop.store(true, Ordering::Relaxed);
        c
    };
    let (kept_a, kept_b, c) = tokio::join!(
        steady_writer(&a, "a", &stop),
        steady_writer(&b, "b", &stop),
        scenario
    );
    let expected: Posted = kept_a.into_iter().chain(kept_b).collect();
    let table = converge(&[&a, &b, &c], true, "after the restart").await;
    assert_eq!(posted(&table), expected);
}

/// Requests to `paths` on every replica, round and round until `stop`: counts answers (200
/// or not) and keeps the first failures.
pub(crate) struct Traffic {
    ok: AtomicUsize,
    pub(crate) failures: Mutex<Vec<String>>,
}

impl Traffic {
    pub(crate) fn new() -> Traffic {
        Traffic {
            ok: AtomicUsize::new(0),
            failures: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    pub(crate) async fn run(&self, replicas: &[&Hubgate], paths: &[String], stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            for (i, hg) in replicas.iter().enumerate() {
                for path in paths {
                    match try_get(hg, path).await {
                        Ok(StatusCode::OK) => {
                            self.ok.fetch_add(1, Ordering::SeqCst);
                        }
                        other => {
                            let mut failures = self.failures.lock().unwrap();
                            if failures.len() < 20 {
                                failures.push(format!("replica {i} {path}: {other:?}"));
                            } else {
                                failures.push(String::new());
                            }
                        }
                    }
                }
            }
        }
    }

    /// Waits until `more` requests succeeded after `from`.
    pub(crate) async fn passes(&self, from: usize, more: usize, what: &str) {
        eventually(LIMIT, what, || async move { self.ok() >= from + more }).await;
    }

    /// Fails the test if any request failed `during` what it ran through.
    pub(crate) fn assert_none_failed(&self, during: &str) {
        let failures = self.failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "{} of {} proxied requests failed {during}; first ones: {:?}",
            failures.len(),
            failures.len() + self.ok(),
            &failures[..failures.len().min(20)]
        );
    }
}

/// Redis goes away for a while and comes back (with its data when `persistent`, empty when not)
/// while requests flow through every replica.
async fn redis_outage(persistent: bool) {
    let mut redis = RedisServer::start(RedisOptions {
        persistent,
        ..RedisOptions::default()
    })
    .await;
    let url = redis.url();
    let r = replicas(&url, 3).await;
    let all: Vec<&Hubgate> = r.iter().collect();
    let backend = Backend::echo().await;
    let mut expected = BTreeMap::new();
    for i in 0..4 {
        let key = format!("/app{i}");
        r[i % 3].add_route(&key, &backend.url("")).await;
        expected.insert(key, backend.url(""));
    }
    converge(&all, false, "before the outage").await;
    let paths: Vec<String> = (0..4).map(|i| format!("/app{i}/ping")).collect();
    let traffic = Traffic::new();
    let stop = AtomicBool::new(false);

    let scenario = async {
        traffic.passes(0, 30, "traffic before the outage").await;
        // With `appendfsync always` even SIGKILL loses nothing acknowledged.
        if persistent {
            redis.kill().await;
        } else {
            redis.stop().await;
        }
        let stopped_at = traffic.ok();
        for (i, hg) in r.iter().enumerate() {
            eventually(LIMIT, &format!("replica {i} not ready"), || async move {
                ready(hg).await.status == StatusCode::SERVICE_UNAVAILABLE
            })
            .await;
            let doc = ready(hg).await.json();
            let reasons = doc["reasons"].to_string();
            assert!(
                reasons.contains("redis route store is unreachable"),
                "replica {i}: readiness names the store: {doc}"
            );
            let doc = status(hg).await;
            assert_eq!(doc["store"]["backend"], json!("redis"), "{doc}");
            assert_eq!(doc["store"]["reachable"], json!(false), "{doc}");
            assert_eq!(store_reachable_metric(hg).await, 0, "replica {i}");
            // Reads are served from memory.
            assert_eq!(
                posted(&hg.routes().await),
                targets(&expected),
                "replica {i}"
            );
        }
        // Writes are refused while the store is away; replica 2 is not asked to write, so its
        // first write after the outage shows whether it recovers without a failed write first.
        for (i, hg) in r.iter().enumerate().take(2) {
            let resp = hg
                .api_post(
                    "/api/routes/during",
                    &json!({ "target": NOWHERE }).to_string(),
                )
                .await;
            let message = assert_json_503(&resp, &format!("replica {i}: POST while redis is down"));
            assert!(message.contains("route store"), "replica {i}: {message}");
            let body = json!({"add": {"/during2": {"target": NOWHERE}}}).to_string();
            let resp = hg.api(Method::PATCH, "/api/proxy", body).await;
            assert_json_503(&resp, &format!("replica {i}: PATCH while redis is down"));
            let resp = hg.api_delete("/api/routes/app0").await;
            assert_json_503(&resp, &format!("replica {i}: DELETE while redis is down"));
        }
        traffic
            .passes(stopped_at, 30, "traffic while redis is down")
            .await;

        redis.restart().await;
        for (i, hg) in r.iter().enumerate() {
            wait_ready(hg, &format!("replica {i} after redis came back")).await;
            assert_eq!(store_reachable_metric(hg).await, 1, "replica {i}");
        }
        for (i, hg) in r.iter().enumerate() {
            let key = format!("/after{i}");
            let resp = hg
                .api_post(
                    &format!("/api/routes{key}"),
                    &json!({ "target": backend.url("") }).to_string(),
                )
                .await;
            assert_eq!(
                resp.status,
                StatusCode::CREATED,
                "replica {i}: the first write once ready again: {}\nhubgate stderr:\n{}",
                resp.text(),
                tail(&hg.logs(), 20)
            );
            expected.insert(key, backend.url(""));
        }
        let restarted_at = traffic.ok();
        traffic
            .passes(restarted_at, 30, "traffic after redis came back")
            .await;
        stop.store(true, Ordering::Relaxed);
    };
    tokio::join!(traffic.run(&all, &paths, &stop), scenario);

    traffic.assert_none_failed("during the outage");
    let table = converge(&all, false, "after the outage").await;
    assert_eq!(posted(&table), targets(&expected));
    for (i, hg) in r.iter().enumerate() {
        let resp = hg.get(&format!("/after{i}/x")).await;
        assert_eq!(resp.status, StatusCode::OK, "replica {i}: {resp:?}");
    }
    // Redis holds the table again (refilled, when it came back empty): a new replica loads it.
    let late = replica(&url).await;
    let table = converge(&[&r[0], &late], false, "a replica started after the outage").await;
    assert_eq!(posted(&table), targets(&expected));
    for hg in &r {
        assert!(
            !hg.logs().contains("panicked"),
            "hubgate panicked:\n{}",
            hg.logs()
        );
    }
}

/// `hubgate_store_reachable` from the API port's `/metrics`.
pub(crate) async fn store_reachable_metric(hg: &Hubgate) -> i64 {
    api_metric(hg, "hubgate_store_reachable").await
}

/// A metric without labels from the API port's `/metrics`.
async fn api_metric(hg: &Hubgate, name: &str) -> i64 {
    let resp = hg.api_get("/metrics").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    let text = resp.text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

#[tokio::test]
async fn redis_down_and_back_with_its_data_loses_no_request_and_no_route() {
    let _shared = PACE.read().await;
    redis_outage(true).await;
}

#[tokio::test]
async fn redis_down_and_back_empty_is_refilled_from_the_replicas() {
    let _shared = PACE.read().await;
    redis_outage(false).await;
}

#[tokio::test]
async fn traffic_through_one_replica_moves_last_activity_on_another() {
    let _shared = PACE.read().await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let a = replica(&redis.url()).await;
    let b = replica(&redis.url()).await;
    let backend = Backend::echo().await;
    a.add_route("/busy", &backend.url("")).await;
    converge(&[&a, &b], true, "after the add").await;
    let before = b.last_activity("/busy").await;
    // Traffic until `a`'s own value has moved past the one `b` shows.
    eventually(LIMIT, "traffic to move last_activity on a", || async {
        let resp = a.get("/busy/x").await;
        assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
        a.last_activity("/busy").await > before
    })
    .await;
    let moved = a.last_activity("/busy").await;
    eventually(ACTIVITY_LIMIT, "b to show a's last_activity", || async {
        b.last_activity("/busy").await == moved
    })
    .await;
    assert!(moved > before);
}

#[tokio::test]
async fn sessions_work_on_every_replica_and_revocations_reach_them_all() {
    let _shared = PACE.read().await;
    let redis = RedisServer::start(RedisOptions::default()).await;
    let hub = FakeHub::start(&random_token()).await;
    hub.add_user("alice", false, &[]);
    let backend = Backend::echo().await;
    let secrets = format!("redis-tests-session-secret-{}", random_token());
    let gate = |extra: &[&str]| {
        Hubgate::builder()
            .args(store_args(&redis.url()))
            .args(["--auth-mode", "on", "--hub-api-url", &hub.api_url()])
            .args(["--session-secrets", &secrets])
            .args(extra)
            .env("JUPYTERHUB_API_TOKEN", hub.service_token())
            .start()
    };
    let a = gate(&["--allow-token-in-url"]).await;
    let b = gate(&[]).await;
    let route = json!({
        "target": backend.url(""), "user": "alice", "server_name": "", "jupyterhub": true
    });
    a.add_route_data("/user/alice", route).await;
    let token = hub.issue_token(
        "alice",
        Some(&["access:servers!user=alice", "read:users!user=alice"]),
    );
    eventually(LIMIT, "b to serve alice's route", || async {
        b.get_as("/user/alice/lab", &token).await.status == StatusCode::OK
    })
    .await;

    // A session cookie obtained through a works on b, without asking the hub.
    let resp = a
        .get_with(&format!("/user/alice/lab?token={token}"), &[BROWSER])
        .await;
    assert_eq!(resp.status, StatusCode::FOUND, "{resp:?}");
    let session = resp
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("hubgate-session="))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie: {resp:?}"))
        .to_owned();
    let cookie = format!("hubgate-session={session}");
    let calls = hub.auth_calls();
    let resp = b.get_with("/user/alice/lab", &[("cookie", &cookie)]).await;
    assert_eq!(resp.status, StatusCode::OK, "a's session at b: {resp:?}");
    let resp = b.get_as("/user/alice/lab", &token).await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(hub.auth_calls(), calls, "b's answers came from its cache");

    // Revoking alice through a voids her session on b and makes b ask the hub again.
    let resp = a.api_delete("/api/auth/cache/users/alice").await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT, "{resp:?}");
    let resp = a.get_with("/user/alice/lab", &[("cookie", &cookie)]).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "at a: {resp:?}");
    eventually(LIMIT, "the revocation to reach b", || async {
        let resp = b.get_with("/user/alice/lab", &[("cookie", &cookie)]).await;
        match resp.status {
            StatusCode::OK => false,
            StatusCode::UNAUTHORIZED => true,
            other => panic!("alice's revoked session at b: {other}: {resp:?}"),
        }
    })
    .await;
    let user_calls = hub.calls(Endpoint::User);
    let resp = b.get_as("/user/alice/lab", &token).await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(
        hub.calls(Endpoint::User),
        user_calls + 1,
        "b asked the hub about alice's token again"
    );

    // Clearing everything through b reaches a the same way: a caches alice's token again
    // (one hub call, then none), then b clears.
    for _ in 0..2 {
        let resp = a.get_as("/user/alice/lab", &token).await;
        assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    }
    let user_calls = hub.calls(Endpoint::User);
    let resp = a.get_as("/user/alice/lab", &token).await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(
        hub.calls(Endpoint::User),
        user_calls,
        "a has alice's token cached"
    );
    let resp = b.api_delete("/api/auth/cache").await;
    assert_eq!(resp.status, StatusCode::NO_CONTENT, "{resp:?}");
    eventually(LIMIT, "the cache clear to reach a", || async {
        let before = hub.calls(Endpoint::User);
        let resp = a.get_as("/user/alice/lab", &token).await;
        assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
        hub.calls(Endpoint::User) > before
    })
    .await;
}

#[tokio::test]
async fn a_replica_started_before_redis_waits_for_it_and_then_loads_the_table() {
    let _shared = PACE.read().await;
    let mut redis = RedisServer::start(RedisOptions {
        persistent: true,
        ..RedisOptions::default()
    })
    .await;
    let backend = Backend::echo().await;
    let mut expected = BTreeMap::new();
    {
        let seed = replica(&redis.url()).await;
        for i in 0..5 {
            let key = format!("/seed/{i}");
            seed.add_route(&key, &backend.url("")).await;
            expected.insert(key, backend.url(""));
        }
    }
    redis.stop().await;

    let hg = Hubgate::builder()
        .args(store_args(&redis.url()))
        .start()
        .await;
    let resp = ready(&hg).await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "{resp:?}");
    let reasons = resp.json()["reasons"].to_string();
    assert!(
        reasons.contains("the route table is not loaded yet") && reasons.contains("redis"),
        "readiness names the reason: {reasons}"
    );
    let resp = hg.get("/seed/0/x").await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "proxy: {resp:?}"
    );
    assert!(backend.seen().is_empty());
    let message = assert_json_503(&hg.api_get("/api/routes").await, "GET /api/routes");
    assert!(message.contains("not loaded"), "{message}");
    let resp = hg
        .api_post("/api/routes/new", &json!({ "target": NOWHERE }).to_string())
        .await;
    assert_json_503(&resp, "POST /api/routes");
    let doc = status(&hg).await;
    assert_eq!(doc["store"]["loaded"], json!(false), "{doc}");
    assert_eq!(doc["store"]["reachable"], json!(false), "{doc}");

    redis.restart().await;
    wait_ready(&hg, "once redis is up").await;
    assert_eq!(posted(&hg.routes().await), targets(&expected));
    let resp = hg.get("/seed/3/x").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.json()["path"], json!("/seed/3/x"));
    hg.add_route("/new", NOWHERE).await;
}

/// Asserts `hg` cannot load because of `why` (in its readiness and logs, lower case), and that
/// none of `secrets` shows anywhere it answers or logs.
async fn assert_refused(hg: &Hubgate, why: &[&str], secrets: &[&str], what: &str) {
    eventually(
        LIMIT,
        &format!("{what}: a failed load in the logs"),
        || async { hg.logs().contains("cannot load routes yet") },
    )
    .await;
    let resp = ready(hg).await;
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {resp:?}"
    );
    let reasons = resp.text().to_lowercase();
    let logs = hg.logs();
    let lower = logs.to_lowercase();
    assert!(
        why.iter().any(|w| reasons.contains(w) && lower.contains(w)),
        "{what}: neither readiness nor logs say why ({why:?}): {reasons}\nlogs:\n{logs}"
    );
    assert!(!logs.contains("panicked"), "{what}: a panic:\n{logs}");
    let status = hg.api_get("/api/status").await.text();
    for secret in secrets {
        for (place, text) in [
            ("logs", &logs),
            ("readiness", &resp.text()),
            ("status", &status),
        ] {
            assert!(
                !text.contains(secret),
                "{what}: a password shows in the {place}:\n{text}"
            );
        }
    }
}

#[tokio::test]
async fn a_password_protected_redis_needs_the_right_password_and_never_logs_it() {
    let _shared = PACE.read().await;
    let password = format!("pw-{}", random_token());
    let redis = RedisServer::start(RedisOptions {
        password: Some(password.clone()),
        ..RedisOptions::default()
    })
    .await;
    let a = replica(&redis.url()).await;
    let b = replica(&redis.url()).await;
    let backend = Backend::echo().await;
    a.add_route("/pw", &backend.url("")).await;
    eventually(LIMIT, "b to serve /pw", || async {
        try_get(&b, "/pw/x").await == Ok(StatusCode::OK)
    })
    .await;

    let wrong = format!("wrong-{}", random_token());
    let bad = Hubgate::builder()
        .args(store_args(&redis.url_with_password(Some(&wrong))))
        .start()
        .await;
    let none = Hubgate::builder()
        .args(store_args(&redis.url_with_password(None)))
        .start()
        .await;
    let secrets = [password.as_str(), wrong.as_str()];
    assert_refused(
        &bad,
        &["authentication failed"],
        &secrets,
        "a wrong password",
    )
    .await;
    assert_refused(&none, &["noauth"], &secrets, "no password").await;
    let resp = bad.get("/pw/x").await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE, "{resp:?}");
    for hg in [&a, &b] {
        assert!(!hg.logs().contains(&password), "the password is logged");
    }
}

#[tokio::test]
async fn rediss_with_a_private_ca_works_and_an_unknown_ca_is_refused() {
    let _shared = PACE.read().await;
    let redis = RedisServer::start(RedisOptions {
        tls: true,
        ..RedisOptions::default()
    })
    .await;
    let ca = redis.ca_file().display().to_string();
    let tls_replica = || {
        Hubgate::builder()
            .args(store_args(&redis.url()))
            .args(["--redis-ca", &ca])
            .start()
    };
    let a = tls_replica().await;
    let b = tls_replica().await;
    wait_ready(&a, "a over TLS").await;
    wait_ready(&b, "b over TLS").await;
    let backend = Backend::echo().await;
    a.add_route("/tls", &backend.url("")).await;
    eventually(LIMIT, "b to serve /tls", || async {
        try_get(&b, "/tls/x").await == Ok(StatusCode::OK)
    })
    .await;
    converge(&[&a, &b], false, "over TLS").await;

    let other = Ca::new("a CA redis does not use").write(redis.dir(), "other-ca");
    let stranger = Hubgate::builder()
        .args(store_args(&redis.url()))
        .args(["--redis-ca", &other.display().to_string()])
        .start()
        .await;
    assert_refused(&stranger, &["certificate", "issuer"], &[], "an unknown CA").await;
}

/// Adds `/<name>/<i>` through `hg` one after the other until `stop`; every write must be 201.
/// Returns how many were made.
async fn disjoint_writer(hg: &Hubgate, name: &str, stop: &AtomicBool) -> usize {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("/{name}/{n}");
        let resp = hg
            .api_post(
                &format!("/api/routes{key}"),
                &json!({ "target": NOWHERE }).to_string(),
            )
            .await;
        assert_eq!(
            resp.status,
            StatusCode::CREATED,
            "POST {key}: {}\nhubgate stderr:\n{}",
            resp.text(),
            tail(&hg.logs(), 20)
        );
        n += 1;
    }
    n
}

/// Runs one [`disjoint_writer`] per replica in `writers` for `window`; answers their counts.
async fn writes_in(writers: &[(&Hubgate, &str)], window: Duration) -> Vec<usize> {
    let stop = AtomicBool::new(false);
    let timer = async {
        tokio::time::sleep(window).await;
        stop.store(true, Ordering::Relaxed);
    };
    let (counts, ()) = tokio::join!(
        join_all(
            writers
                .iter()
                .map(|(hg, name)| disjoint_writer(hg, name, &stop))
        ),
        timer
    );
    counts
}

#[tokio::test]
async fn writers_of_different_routes_on_three_replicas_each_keep_a_third_of_their_solo_pace() {
    let _alone = PACE.write().await;
    // Conflicts are per route: a batch computed on an older table is applied on top of what
    // other replicas changed meanwhile, when none of that touched its routes. (Per table, as
    // before, the last writer kept winning and the others retried and starved.)
    let redis = RedisServer::start(RedisOptions::default()).await;
    let r = replicas(&redis.url(), 3).await;
    // Equal short windows, alone and together taken in turns, so that a machine busy with
    // something else (other tests) for a while weighs on both alike.
    let window = Duration::from_millis(300);
    let rounds = 8;
    let mut solo = 0;
    let mut together = vec![0; 3];
    for round in 0..rounds {
        solo += writes_in(&[(&r[0], &format!("solo{round}"))], window).await[0];
        let names: Vec<String> = ["a", "b", "c"].map(|n| format!("{n}{round}")).to_vec();
        let counts = writes_in(
            &[(&r[0], &names[0]), (&r[1], &names[1]), (&r[2], &names[2])],
            window,
        )
        .await;
        for (sum, n) in together.iter_mut().zip(counts) {
            *sum += n;
        }
    }
    for (i, n) in together.iter().enumerate() {
        assert!(
            n * 3 >= solo,
            "replica {i} made {n} writes in {rounds} windows of {window:?} with the others \
             writing, against {solo} alone: less than a third (all: {together:?})"
        );
    }
    let table = converge(&[&r[0], &r[1], &r[2]], false, "after the writers").await;
    assert_eq!(table.len(), solo + together.iter().sum::<usize>());
    for (i, hg) in r.iter().enumerate() {
        assert_eq!(
            api_metric(hg, "hubgate_store_conflicts_total").await,
            0,
            "replica {i}: writes of different routes never conflict"
        );
    }
    eprintln!(
        "disjoint writers: alone {solo} writes in {rounds} x {window:?}; together {together:?}"
    );
}

#[tokio::test]
async fn a_batch_answers_a_route_absent_only_if_no_replica_added_it_before() {
    let _shared = PACE.read().await;
    // Replica B's batch adds one route and removes one that replica A added just before (A's
    // 201 came before B was asked): B may not have heard of A's route yet, and its batch may be
    // applied on top of A's change, but it must answer "removed", never "absent".
    let redis = RedisServer::start(RedisOptions::default()).await;
    let r = replicas(&redis.url(), 2).await;
    for i in 0..100 {
        let x = format!("/x/{i}");
        r[0].add_route(&x, NOWHERE).await;
        let body = json!({"add": {format!("/b/{i}"): {"target": NOWHERE}}, "remove": [x]});
        let resp = r[1]
            .api(Method::PATCH, "/api/proxy", body.to_string())
            .await;
        assert_eq!(resp.status, StatusCode::OK, "PATCH {body}: {resp:?}");
        let doc = resp.json();
        assert_eq!(
            (doc["added"].clone(), doc["removed"].clone()),
            (json!(1), json!(1)),
            "round {i}: {x} was added (201) before the batch was sent: {doc}"
        );
    }
    let table = converge(&[&r[0], &r[1]], false, "after the batches").await;
    assert_eq!(table.len(), 100, "only the /b/ routes are left");
}
