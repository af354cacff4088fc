//! The data plane's workers (`--workers`) seen from outside: connections spread over them, one
//! connection limit for the whole process, drain on SIGTERM, certificate reload, websockets and
//! HTTP/2, each with connections served by every worker.
//!
//! Which worker serves a connection is read from the kernel, not from hubgate: each worker is a
//! thread named `hg-worker-N` (told apart by thread id), and `/proc/<pid>/task/<tid>/schedstat` counts how often a
//! thread was put on a CPU. A worker sleeps in `epoll_wait` while it has nothing to do, so a
//! round trip on an open connection wakes exactly the worker that serves it. A round trip during
//! which another worker also woke up (its idle sweep, a timer) proves nothing and is repeated.

use std::{collections::BTreeSet, sync::atomic::Ordering};

use futures_util::{SinkExt, StreamExt};
use http::{header, Request, StatusCode};
use hyper::client::conn::{http1, http2};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{connect_async, tungstenite::Message, MaybeTlsStream, WebSocketStream};

use crate::certs::{
    client_config, echo_versioned, h1, h2, peer_cert, replace_file, tls_connect, Ca, ClientOptions,
    SERVER_NAME,
};
use crate::lifecycle::raw_exchange;
use crate::support::{
    collect, empty, eventually, serve, Backend, Body, HeldBackend, Hubgate, WsPeer, WAIT,
};

/// Workers in every test here: the smallest number that can be unevenly loaded.
const WORKERS: usize = 2;

/// How many round trips `Threads::serving` tries before giving up on telling the worker.
const ATTEMPTS: usize = 50;

/// A hubgate's worker threads.
struct Threads {
    pid: u32,
    tids: Vec<String>,
}

impl Threads {
    /// The `WORKERS` threads named `hg-worker-*` of `hg`, waiting for them to start.
    async fn of(hg: &Hubgate) -> Threads {
        let pid = hg.pid();
        eventually(WAIT, "hubgate to start its worker threads", || async move {
            worker_tids(pid).len() == WORKERS
        })
        .await;
        let threads = Threads {
            pid,
            tids: worker_tids(pid),
        };
        assert!(
            threads.runs().iter().all(|&n| n > 0),
            "/proc/{pid}/task/*/schedstat counts no run of a started thread: this kernel does \
             not keep scheduler statistics (CONFIG_SCHED_INFO), which these tests need"
        );
        threads
    }

    /// How many times each worker has been put on a CPU.
    fn runs(&self) -> Vec<u64> {
        self.tids
            .iter()
            .map(|tid| {
                let path = format!("/proc/{}/task/{tid}/schedstat", self.pid);
                let stat = std::fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("{path}: {e} (did a worker thread end?)"));
                stat.split_whitespace()
                    .nth(2)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{path}: unexpected contents {stat:?}"))
            })
            .collect()
    }

    /// The worker (0..WORKERS, in thread id order) that serves `conn`: the only one that ran
    /// during a round trip on it.
    async fn serving<C: RoundTrip>(&self, conn: &mut C) -> usize {
        let mut seen = Vec::new();
        for _ in 0..ATTEMPTS {
            let before = self.runs();
            conn.round_trip().await;
            let after = self.runs();
            let ran: Vec<usize> = (0..WORKERS).filter(|&w| after[w] > before[w]).collect();
            if let [worker] = ran[..] {
                return worker;
            }
            seen.push(ran);
        }
        panic!("no round trip woke exactly one worker; workers woken per attempt: {seen:?}");
    }
}

/// Thread ids of the process's data-plane workers.
fn worker_tids(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut tids: Vec<String> = tasks
        .filter_map(|task| {
            let task = task.ok()?;
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            comm.starts_with("hg-worker-")
                .then(|| task.file_name().to_string_lossy().into_owned())
        })
        .collect();
    tids.sort_by_key(|tid| tid.parse::<u64>().unwrap_or(u64::MAX));
    tids
}

/// One request and its answer (or one message and its echo) on a connection that stays open.
trait RoundTrip {
    async fn round_trip(&mut self);
}

/// An HTTP/1.1 connection (plain or TLS) to hubgate, asking `GET /b/x`.
struct H1 {
    send: http1::SendRequest<Body>,
}

impl H1 {
    async fn over<I>(io: I) -> H1
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let send = h1(io).await.expect("HTTP/1.1 handshake with hubgate");
        H1 { send }
    }

    async fn connect(hg: &Hubgate) -> H1 {
        let tcp = TcpStream::connect(hg.proxy).await.expect("connect");
        H1::over(tcp).await
    }

    /// `GET path` on this connection, expecting a 200; returns the body.
    async fn get(&mut self, path: &str) -> String {
        self.send
            .ready()
            .await
            .expect("the connection is still open");
        let req = Request::get(path)
            .header(header::HOST, SERVER_NAME)
            .body(empty())
            .unwrap();
        let resp = collect(self.send.send_request(req))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(resp.status, StatusCode::OK, "GET {path}: {resp:?}");
        resp.text()
    }
}

impl RoundTrip for H1 {
    async fn round_trip(&mut self) {
        self.get("/b/x").await;
    }
}

/// An HTTP/2 connection (prior knowledge, no TLS) to hubgate.
struct H2 {
    send: http2::SendRequest<Body>,
    authority: String,
}

impl H2 {
    async fn connect(hg: &Hubgate) -> H2 {
        let tcp = TcpStream::connect(hg.proxy).await.expect("connect");
        let send = h2(tcp).await.expect("HTTP/2 handshake with hubgate");
        H2 {
            send,
            authority: hg.proxy.to_string(),
        }
    }

    /// `GET /b/{path}` as one stream of this connection; the path the backend saw.
    fn get(&self, path: &str) -> impl std::future::Future<Output = String> + use<> {
        let mut send = self.send.clone();
        let uri = format!("http://{}/b/{path}", self.authority);
        async move {
            send.ready().await.expect("the connection is still open");
            let req = Request::get(&uri).body(empty()).unwrap();
            let resp = collect(send.send_request(req))
                .await
                .unwrap_or_else(|e| panic!("HTTP/2 GET {uri}: {e}"));
            assert_eq!(resp.status, StatusCode::OK, "HTTP/2 GET {uri}: {resp:?}");
            resp.json()["path"].as_str().unwrap_or_default().to_owned()
        }
    }
}

impl RoundTrip for H2 {
    async fn round_trip(&mut self) {
        assert_eq!(self.get("x").await, "/b/x");
    }
}

/// A websocket through hubgate to an echo peer.
struct Ws(WebSocketStream<MaybeTlsStream<TcpStream>>);

impl RoundTrip for Ws {
    async fn round_trip(&mut self) {
        self.0
            .send(Message::text("ping through a worker"))
            .await
            .expect("send on the websocket");
        loop {
            let msg = tokio::time::timeout(WAIT, self.0.next())
                .await
                .unwrap_or_else(|_| panic!("no echo within {WAIT:?}"))
                .expect("the websocket ended")
                .expect("websocket error");
            match msg {
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Text(text) => {
                    assert_eq!(text.as_str(), "ping through a worker");
                    return;
                }
                other => panic!("unexpected websocket message {other:?}"),
            }
        }
    }
}

/// How many of `served` (worker per connection) each worker has.
fn per_worker(served: &[usize]) -> [usize; WORKERS] {
    let mut counts = [0; WORKERS];
    for &w in served {
        counts[w] += 1;
    }
    counts
}

/// Opens connections with `open` (at most `max`) until every worker serves at least `each` of
/// them; returns them with their workers.
async fn on_every_worker<C, F, Fut>(
    threads: &Threads,
    each: usize,
    max: usize,
    mut open: F,
) -> Vec<(C, usize)>
where
    C: RoundTrip,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = C>,
{
    let mut conns: Vec<(C, usize)> = Vec::new();
    while conns.len() < max {
        let served: Vec<usize> = conns.iter().map(|(_, w)| *w).collect();
        if per_worker(&served).iter().all(|&n| n >= each) {
            return conns;
        }
        let mut conn = open().await;
        let worker = threads.serving(&mut conn).await;
        conns.push((conn, worker));
    }
    let served: Vec<usize> = conns.iter().map(|(_, w)| *w).collect();
    panic!(
        "{max} connections did not give every worker {each}: per worker {:?}",
        per_worker(&served)
    );
}

/// hubgate with `--workers 2` and these flags, `/b` routed to `target`.
async fn start(target: &str, extra: &[&str]) -> (Hubgate, Threads) {
    let workers = WORKERS.to_string();
    let hg = Hubgate::builder()
        .args(["--workers", &workers, "--keep-alive-timeout", "60000"])
        .args(extra.iter().copied())
        .start()
        .await;
    hg.add_route("/b", target).await;
    let threads = Threads::of(&hg).await;
    (hg, threads)
}

/// How many more connections than the least busy worker one may hold: hubgate hands a new
/// connection over when a worker holds more than 2 above the least busy (`SLACK` in
/// src/server.rs), so after the one it then keeps, at most 3.
const MOST_ABOVE_LEAST: usize = 3;

#[tokio::test]
async fn keep_alive_connections_spread_over_every_worker_and_stay_on_theirs() {
    let backend = Backend::echo().await;
    let (hg, threads) = start(&backend.url(""), &[]).await;

    // Opened one after another and all kept open: the kernel's hash alone would leave the
    // workers a few connections apart at random; the balancing step keeps them within its slack.
    let mut conns = Vec::new();
    let mut served = Vec::new();
    for _ in 0..40 {
        let mut conn = H1::connect(&hg).await;
        served.push(threads.serving(&mut conn).await);
        conns.push(conn);
        let counts = per_worker(&served);
        let (most, least) = (counts.iter().max(), counts.iter().min());
        assert!(
            most.zip(least)
                .is_some_and(|(m, l)| m - l <= MOST_ABOVE_LEAST),
            "after {} connections the workers hold {counts:?}",
            served.len()
        );
    }
    let counts = per_worker(&served);
    assert!(counts.iter().all(|&n| n > 0), "per worker: {counts:?}");

    // A connection is served start to end by one worker.
    for (i, conn) in conns.iter_mut().enumerate() {
        let again = threads.serving(conn).await;
        assert_eq!(
            again, served[i],
            "connection {i} moved from worker {} to {again}",
            served[i]
        );
    }
}

#[tokio::test]
async fn max_connections_is_one_limit_for_all_workers() {
    let backend = Backend::echo().await;
    let (hg, threads) = start(&backend.url(""), &["--max-connections", "10"]).await;

    let mut held = Vec::new();
    let mut served = Vec::new();
    for _ in 0..10 {
        let mut conn = H1::connect(&hg).await;
        served.push(threads.serving(&mut conn).await);
        held.push(conn);
    }
    let counts = per_worker(&served);
    assert!(
        counts.iter().all(|&n| n > 0),
        "the 10 connections must be on both workers for this test to mean anything: {counts:?}"
    );

    // Twice the limit more, at once: a limit per worker would serve up to 10 of these (and
    // leave them waiting for a request); one for the process answers every one with the 503.
    let extra = (0..20).map(|_| raw_exchange(hg.proxy, b""));
    let replies = futures_util::future::join_all(extra).await;
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply.unwrap_or_else(|e| {
            panic!(
                "connection {} over the limit of 10: {e}\n{}",
                i + 11,
                hg.logs()
            )
        });
        assert_eq!(reply.status, 503, "connection {}: {reply:?}", i + 11);
        let doc: Value = serde_json::from_slice(&reply.body).expect("a JSON body");
        let message = doc["message"].as_str().unwrap_or_default();
        assert!(message.contains("Too many connections"), "{doc}");
    }

    // The 10 were not disturbed, and a closed one frees a place for a new connection.
    for conn in &mut held {
        conn.round_trip().await;
    }
    drop(held.pop());
    eventually(
        WAIT,
        "a new connection after one of the 10 closed",
        || async {
            let reply = raw_exchange(
                hg.proxy,
                b"GET /b/y HTTP/1.1\r\nHost: workers.example\r\nConnection: close\r\n\r\n",
            )
            .await;
            matches!(reply, Ok(r) if r.status == 200)
        },
    )
    .await;
}

#[tokio::test]
async fn sigterm_drains_slow_requests_on_every_worker_then_exits_0() {
    let backend = HeldBackend::holding(Some("/b/slow")).await;
    let (mut hg, threads) = start(&backend.server.url(""), &[]).await;
    let proxy = hg.proxy;

    let conns = on_every_worker(&threads, 2, 40, || H1::connect(&hg)).await;
    let mut in_flight = Vec::new();
    let mut workers = BTreeSet::new();
    for (mut conn, worker) in conns {
        workers.insert(worker);
        in_flight.push(tokio::spawn(async move { conn.get("/b/slow").await }));
    }
    let n = in_flight.len();
    eventually(WAIT, "every slow request to reach the backend", || {
        let arrived = backend.arrived.load(Ordering::SeqCst);
        async move { arrived == n }
    })
    .await;
    assert_eq!(
        workers.len(),
        WORKERS,
        "slow requests on workers {workers:?}"
    );

    hg.signal("TERM");
    eventually(
        WAIT,
        "new connections to be refused after SIGTERM",
        || async {
            matches!(TcpStream::connect(proxy).await,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        },
    )
    .await;
    assert!(
        in_flight.iter().all(|r| !r.is_finished()),
        "a slow request ended before its backend answered"
    );

    backend.release.send_replace(true);
    for request in in_flight {
        let body = tokio::time::timeout(WAIT, request)
            .await
            .unwrap_or_else(|_| panic!("a slow request did not finish after the release"))
            .unwrap_or_else(|e| panic!("a slow request failed: {e}\n{}", hg.logs()));
        assert_eq!(body, "slow answer");
    }
    hg.assert_exits_with_0("exit after a complete drain").await;
}

#[tokio::test]
async fn a_reloaded_certificate_is_presented_by_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("hubgate workers CA");
    let (key, cert) = ca.issue("first", 1).write(dir.path(), "server");
    let backend = serve(echo_versioned).await;
    let (key_arg, cert_arg) = (key.display().to_string(), cert.display().to_string());
    let tls = ["--ssl-key", &key_arg, "--ssl-cert", &cert_arg];
    let (hg, threads) = start(&backend.url(""), &tls).await;
    let config = client_config(ClientOptions::trusting(&ca));

    // A TLS connection and the certificate it was shown.
    let proxy = hg.proxy;
    let connect = || {
        let config = config.clone();
        async move {
            let stream = tls_connect(proxy, config).await.expect("TLS handshake");
            let shown = peer_cert(&stream);
            let conn = H1::over(stream).await;
            Shown { conn, shown }
        }
    };
    let old = on_every_worker(&threads, 1, 40, connect).await;
    let first = old[0].0.shown.clone();
    assert!(old.iter().all(|(c, _)| c.shown == first));

    let second = ca.issue("second", 2);
    replace_file(&cert, &second.cert_pem);
    replace_file(&key, &second.key_pem);
    hg.signal("HUP");
    eventually(
        WAIT,
        "a new connection to get the new certificate",
        || async {
            match tls_connect(hg.proxy, config.clone()).await {
                Ok(stream) => peer_cert(&stream) == second.der,
                Err(_) => false,
            }
        },
    )
    .await;

    // From now on every new connection, whichever worker serves it, gets the new one.
    let new = on_every_worker(&threads, 2, 40, connect).await;
    for (conn, worker) in &new {
        assert!(
            conn.shown == second.der,
            "worker {worker} presented another certificate after the reload"
        );
    }
    // Connections opened before the reload still work, on both workers.
    for (mut conn, _) in old {
        conn.round_trip().await;
    }
}

/// A TLS connection and the certificate hubgate presented on it.
struct Shown {
    conn: H1,
    shown: rustls::pki_types::CertificateDer<'static>,
}

impl RoundTrip for Shown {
    async fn round_trip(&mut self) {
        self.conn.round_trip().await;
    }
}

#[tokio::test]
async fn websockets_are_tunnelled_by_every_worker() {
    let peer = WsPeer::start().await;
    let (hg, threads) = start(&format!("http://{}", peer.addr), &[]).await;
    let url = format!("ws://{}/b/socket", hg.proxy);

    let connect = || async {
        let Ok(handshake) = tokio::time::timeout(WAIT, connect_async(url.as_str())).await else {
            panic!("no websocket handshake within {WAIT:?}");
        };
        let (ws, _) = handshake.expect("websocket handshake through hubgate");
        Ws(ws)
    };
    let mut tunnels = on_every_worker(&threads, 3, 40, connect).await;
    // Every tunnel is still up and keeps to its worker.
    for (ws, worker) in &mut tunnels {
        assert_eq!(threads.serving(ws).await, *worker);
    }
}

#[tokio::test]
async fn http2_connections_are_served_by_every_worker() {
    let backend = Backend::echo().await;
    let (hg, threads) = start(&backend.url(""), &[]).await;

    let conns = on_every_worker(&threads, 2, 40, || H2::connect(&hg)).await;
    // Many streams at once on each connection, on both workers.
    for (conn, worker) in &conns {
        let streams = (0..8).map(|i| conn.get(&format!("stream/{i}")));
        let paths = futures_util::future::join_all(streams).await;
        for (i, path) in paths.iter().enumerate() {
            assert_eq!(path, &format!("/b/stream/{i}"), "worker {worker}");
        }
    }
}
