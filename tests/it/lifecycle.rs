//! The process's life: graceful shutdown (in-flight requests finish, exit code 0; cut by
//! `--shutdown-timeout`, exit code 1), websockets closed at stop, two hubgates sharing a port
//! (`SO_REUSEPORT`) while one stops under load, the access log, JSON logs, and the log level
//! changed through the API.
//!
//! Also helpers that `tls` and `limits` share: raw HTTP exchanges that keep the response headers,
//! and a free port.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use futures_util::{SinkExt, StreamExt};
use http::{header, Method, Request, StatusCode};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    collect, empty, eventually, full, http_client, send, Backend, HeldBackend, Hubgate, Resp,
    WsEvent, WsPeer, WAIT,
};

/// A response read from a raw exchange, headers included (names lowercased).
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// Writes `request` (which should ask for `Connection: close`) and reads until the connection
/// ends; `Err` when it could not connect or nothing parseable came back within `WAIT`.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Result<RawReply, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut data = Vec::new();
        // A reset after the response is as good as EOF here.
        let end = match stream.read_to_end(&mut data).await {
            Ok(_) => "EOF".to_owned(),
            Err(e) => format!("{:?}", e.kind()),
        };
        Ok::<_, String>((data, end))
    };
    let (data, end) = tokio::time::timeout(WAIT, exchange)
        .await
        .map_err(|_| format!("no complete response within {WAIT:?}"))??;
    parse_reply(&data).ok_or_else(|| {
        format!(
            "unparseable response (connection ended by {end}): {:?}",
            String::from_utf8_lossy(&data)
        )
    })
}

/// A status line, headers and a `Content-Length` (or read-to-end) body.
pub fn parse_reply(data: &[u8]) -> Option<RawReply> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&data[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = data[end + 4..].to_vec();
    if let Some(len) = headers.get("content-length").and_then(|v| v.parse().ok()) {
        body.truncate(len);
    }
    Some(RawReply {
        status,
        headers,
        body,
    })
}

/// A port that was free a moment ago, for flags that need a fixed port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// `GET url` from a client of its own; the error's debug text when no response came.
async fn try_get(url: String) -> Result<Resp, String> {
    let req = Request::get(url).body(empty()).unwrap();
    collect(http_client().request(req)).await
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    let backend = HeldBackend::start().await;
    let target = backend.url();
    let mut hg = Hubgate::start(&["--default-target", &target]).await;
    let proxy = hg.proxy;

    let in_flight = tokio::spawn(try_get(format!("http://{proxy}/slow")));
    backend.wait_arrived(1).await;
    hg.signal("TERM");

    // The listener goes away while the request is still held at the backend.
    eventually(
        WAIT,
        "new connections to be refused after SIGTERM",
        || async {
            match TcpStream::connect(proxy).await {
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
                Ok(_) => false,
            }
        },
    )
    .await;
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before its backend answered: {:?}",
        in_flight.await
    );

    backend.release.send_replace(true);
    let resp = in_flight
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("in-flight request failed after SIGTERM: {e}\n{}", hg.logs()));
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.text(), "slow answer");

    hg.assert_exits_with_0("exit after a complete drain").await;
}

#[tokio::test]
async fn sighup_with_nothing_to_reload_leaves_hubgate_serving() {
    let backend = HeldBackend::start().await;
    backend.release.send_replace(true);
    let target = backend.url();
    let mut hg = Hubgate::start(&["--default-target", &target]).await;
    let proxy = hg.proxy;
    hg.signal("HUP");
    eventually(WAIT, "the SIGHUP to be logged", || {
        let logged = hg.logs().contains("received SIGHUP");
        async move { logged }
    })
    .await;
    let resp = try_get(format!("http://{proxy}/after-hup"))
        .await
        .unwrap_or_else(|e| panic!("no answer after SIGHUP: {e}\n{}", hg.logs()));
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert!(hg.is_running(), "hubgate exited on SIGHUP:\n{}", hg.logs());
}

#[tokio::test]
async fn shutdown_timeout_cuts_a_slow_request_and_exits_1() {
    let backend = HeldBackend::start().await;
    let target = backend.url();
    let mut hg = Hubgate::start(&["--default-target", &target, "--shutdown-timeout", "1"]).await;
    let proxy = hg.proxy;

    let in_flight = tokio::spawn(try_get(format!("http://{proxy}/slow")));
    backend.wait_arrived(1).await;
    hg.signal("TERM");

    // The backend never answers while hubgate lives: the grace period must cut the request.
    let status = hg.exit_status().await;
    assert_eq!(
        status.code(),
        Some(1),
        "exit after the grace period cut a request: {status}\n{}",
        hg.logs()
    );
    let outcome = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("the cut request did not end")
        .unwrap();
    assert!(
        outcome.is_err(),
        "the request cut by the deadline got a response: {outcome:?}"
    );
}

#[tokio::test]
async fn open_websocket_is_closed_when_hubgate_stops() {
    let peer = WsPeer::start().await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/ws", &format!("http://{}", peer.addr)).await;
    let url = format!("ws://{}/ws/x", hg.proxy);
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("websocket handshake timed out")
        .expect("websocket handshake");
    assert!(matches!(peer.next_event().await, WsEvent::Opened { .. }));
    ws.send(Message::Text("before".into())).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(
        matches!(&echoed, Some(Ok(Message::Text(t))) if t == "before"),
        "{echoed:?}"
    );

    hg.signal("TERM");
    // The client sees the stream end: a close frame, EOF or a reset, never silence.
    loop {
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap_or_else(|_| panic!("websocket still open {WAIT:?} after SIGTERM"));
        match next {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
            Some(Ok(_)) => continue,
        }
    }
    assert!(
        matches!(peer.next_event().await, WsEvent::Closed),
        "the target side of the tunnel was not closed"
    );
    hg.assert_exits_with_0("exit after the tunnels closed")
        .await;
}

/// Sets `net.ipv4.tcp_migrate_req` to 1 for the life of the guard, then restores it.
struct MigrateReq {
    old: String,
}

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

impl MigrateReq {
    fn enable() -> MigrateReq {
        let old = std::fs::read_to_string(MIGRATE_REQ).unwrap_or_else(|e| {
            panic!(
                "cannot read {MIGRATE_REQ} ({e}): this test needs Linux 5.14+ where \
                 net.ipv4.tcp_migrate_req moves queued connections to the other SO_REUSEPORT \
                 listener when one closes; without it a stopping replica resets them"
            )
        });
        if let Err(e) = std::fs::write(MIGRATE_REQ, "1") {
            panic!(
                "cannot set net.ipv4.tcp_migrate_req=1 by writing {MIGRATE_REQ} ({e}); it was \
                 {:?}. Run this test as root (CI does) or set it beforehand: without it the \
                 kernel resets connections still queued on the stopping hubgate's socket, so \
                 the zero-failure handover cannot be checked",
                old.trim()
            );
        }
        MigrateReq { old }
    }
}

impl Drop for MigrateReq {
    fn drop(&mut self) {
        let _ = std::fs::write(MIGRATE_REQ, self.old.trim());
    }
}

/// One request on a new connection; which replica answered (its `x-replica` header as echoed).
async fn replica_of(addr: SocketAddr) -> Result<String, String> {
    let reply = raw_exchange(
        addr,
        b"GET /echo HTTP/1.1\r\nHost: replicas.example\r\nConnection: close\r\n\r\n",
    )
    .await?;
    if reply.status != 200 {
        return Err(format!(
            "status {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        ));
    }
    let doc: Value = serde_json::from_slice(&reply.body).map_err(|e| format!("body: {e}"))?;
    doc["headers"]["x-replica"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no x-replica in {doc}"))
}

#[tokio::test]
async fn two_replicas_share_a_port_and_one_stops_without_a_failed_request() {
    let _migrate = MigrateReq::enable();
    let backend = Backend::echo().await;
    let target = backend.url("");
    let port = free_port().to_string();
    let replica = |name: &'static str| {
        let header = format!("x-replica: {name}");
        let args: Vec<String> = [
            "--ip",
            "127.0.0.1",
            "--port",
            port.as_str(),
            "--api-ip",
            "127.0.0.1",
            "--api-port",
            "0",
            "--default-target",
            target.as_str(),
            "--custom-header",
            header.as_str(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args
    };
    let mut a = Hubgate::builder()
        .without_listen_args()
        .args(replica("a"))
        .start()
        .await;
    let b = Hubgate::builder()
        .without_listen_args()
        .args(replica("b"))
        .start()
        .await;
    let addr = a.proxy;
    assert_eq!(addr, b.proxy, "both replicas must bind the same port");

    // Both serve: the kernel spreads new connections over the two sockets.
    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..200 {
        let which = replica_of(addr)
            .await
            .expect("a request to the shared port");
        *seen.entry(which).or_default() += 1;
    }
    assert_eq!(
        seen.len(),
        2,
        "only one replica answered 200 requests: {seen:?}"
    );

    // Load on new connections; replica a is stopped a third of the way in.
    const TOTAL: usize = 3000;
    const WORKERS: usize = 8;
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let after_stop = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (done, failures, after_stop, stopped) = (
            done.clone(),
            failures.clone(),
            after_stop.clone(),
            stopped.clone(),
        );
        workers.push(tokio::spawn(async move {
            for _ in 0..TOTAL / WORKERS {
                let exited = stopped.load(Ordering::SeqCst);
                match replica_of(addr).await {
                    Ok(which) if exited => {
                        *after_stop.lock().unwrap().entry(which).or_default() += 1;
                    }
                    Ok(_) => {}
                    Err(e) => failures.lock().unwrap().push(e),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    eventually(WAIT, "a third of the load to be sent", || {
        let n = done.load(Ordering::SeqCst);
        async move { n >= TOTAL / 3 }
    })
    .await;
    let status = a.stop("TERM").await;
    stopped.store(true, Ordering::SeqCst);
    for worker in workers {
        tokio::time::timeout(WAIT * 3, worker)
            .await
            .expect("the load did not finish")
            .unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {TOTAL} requests failed while replica a stopped (first: {:?}); a's log:\n{}",
        failures.len(),
        failures.first(),
        a.logs()
    );
    assert_eq!(status.code(), Some(0), "replica a: {status}\n{}", a.logs());
    let after_stop = after_stop.lock().unwrap().clone();
    assert!(
        !after_stop.contains_key("a") && after_stop.get("b").copied().unwrap_or(0) > 0,
        "after a exited only b may answer: {after_stop:?}"
    );
}

/// The `key=value` fields of a plain log line.
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

fn access_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("hubgate::access"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn access_log_has_one_line_per_request_without_paths_or_secrets() {
    let backend = Backend::echo().await;
    let hg = Hubgate::start(&["--access-log"]).await;
    hg.add_route("/app", &backend.url("")).await;

    let get = hg
        .proxy_request(Method::GET, "/app/private-segment?token=secret-x&q=1")
        .header(header::COOKIE, "c=secret-y")
        .body(empty())
        .unwrap();
    let first = hg.proxy_send(get).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let post = hg
        .proxy_request(Method::POST, "/app/other-segment")
        .body(full("hello"))
        .unwrap();
    let second = hg.proxy_send(post).await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");

    eventually(WAIT, "two access-log lines", || {
        let n = access_lines(&hg.logs()).len();
        async move { n >= 2 }
    })
    .await;
    let logs = hg.logs();
    let lines = access_lines(&logs);
    assert_eq!(lines.len(), 2, "one line per request:\n{logs}");
    for (line, method, resp) in [(&lines[0], "GET", &first), (&lines[1], "POST", &second)] {
        let f = fields(line);
        assert_eq!(f.get("method").map(String::as_str), Some(method), "{line}");
        assert_eq!(f.get("route").map(String::as_str), Some("/app"), "{line}");
        assert_eq!(f.get("status").map(String::as_str), Some("200"), "{line}");
        let duration: f64 = f
            .get("duration_ms")
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no numeric duration_ms: {line}"));
        assert!(duration >= 0.0, "{line}");
        assert_eq!(
            f.get("bytes").and_then(|b| b.parse::<usize>().ok()),
            Some(resp.body.len()),
            "bytes must be the response body's length: {line}"
        );
        assert_eq!(
            f.get("client").map(String::as_str),
            Some("127.0.0.1"),
            "{line}"
        );
    }
    for secret in [
        "secret-x",
        "secret-y",
        "private-segment",
        "other-segment",
        "q=1",
    ] {
        assert!(
            !logs.contains(secret),
            "{secret:?} appears in the log:\n{logs}"
        );
    }
}

#[tokio::test]
async fn json_log_format_makes_every_line_json() {
    let backend = Backend::echo().await;
    let mut hg = Hubgate::start(&["--log-format", "json", "--access-log"]).await;
    hg.add_route("/app", &backend.url("")).await;
    let resp = send(
        &http_client(),
        Request::get(format!("http://{}/app/x", hg.proxy))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK);
    eventually(WAIT, "the access line", || {
        let found = hg.logs().contains("hubgate::access");
        async move { found }
    })
    .await;
    let status = hg.stop("TERM").await;
    assert!(status.success(), "{status}\n{}", hg.logs());

    let logs = hg.logs();
    let mut access = None;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let doc: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\nwhole log:\n{logs}"));
        if doc["target"] == "hubgate::access" {
            access = Some(doc);
        }
    }
    let access = access.unwrap_or_else(|| panic!("no access line:\n{logs}"));
    let f = &access["fields"];
    assert_eq!(f["method"], "GET", "{access}");
    assert_eq!(f["route"], "/app", "{access}");
    assert_eq!(f["status"], 200, "{access}");
    assert_eq!(f["bytes"], resp.body.len(), "{access}");
}

/// The byte offset just past the access line with index `index` (counting from 0).
fn end_of_access_line(log: &str, index: usize) -> usize {
    let mut offset = 0;
    let mut seen = 0;
    for line in log.split_inclusive('\n') {
        offset += line.len();
        if line.contains("hubgate::access") {
            if seen == index {
                return offset;
            }
            seen += 1;
        }
    }
    panic!("no access line number {index}:\n{log}");
}

async fn log_level(hg: &Hubgate) -> String {
    let resp = hg.api_get("/api/log-level").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    resp.json()["level"]
        .as_str()
        .unwrap_or_else(|| panic!("no level in {resp:?}"))
        .to_owned()
}

#[tokio::test]
async fn log_level_refuses_bad_levels_and_missing_tokens() {
    let hg = Hubgate::start(&[]).await;
    assert_eq!(log_level(&hg).await, "info");

    let no_token = hg
        .api_with(Method::PUT, "/api/log-level", &[], r#"{"level":"debug"}"#)
        .await;
    assert_eq!(no_token.status, StatusCode::FORBIDDEN, "{no_token:?}");
    let no_token = hg.api_with(Method::GET, "/api/log-level", &[], "").await;
    assert_eq!(no_token.status, StatusCode::FORBIDDEN, "{no_token:?}");
    assert_eq!(log_level(&hg).await, "info", "after PUTs without a token");

    let mut wrong = Vec::new();
    for bad in [
        r#"{"level":"verbose"}"#,
        r#"{"level":"debug=loud"}"#,
        r#"{"level":""}"#,
        r#"{"level":7}"#,
        r#"{"lvl":"debug"}"#,
        "not json",
    ] {
        let resp = hg.api(Method::PUT, "/api/log-level", bad).await;
        let level = log_level(&hg).await;
        if resp.status != StatusCode::BAD_REQUEST || level != "info" {
            wrong.push(format!(
                "PUT {bad} -> {} {}; level now {level:?}",
                resp.status,
                resp.text()
            ));
            // Put it back so the next case starts from info.
            hg.api(Method::PUT, "/api/log-level", r#"{"level":"info"}"#)
                .await;
        }
    }
    assert!(
        wrong.is_empty(),
        "bad levels must get 400 and leave the level alone:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test]
async fn log_level_set_to_debug_and_back_through_the_api() {
    let backend = Backend::echo().await;
    let hg = Hubgate::start(&["--access-log"]).await;
    hg.add_route("/app", &backend.url("")).await;
    assert_eq!(log_level(&hg).await, "info");
    assert_eq!(hg.get("/app/debug-off").await.status, StatusCode::OK);

    let resp = hg
        .api(Method::PUT, "/api/log-level", r#"{"level":"debug"}"#)
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.json()["level"], "debug");
    assert_eq!(log_level(&hg).await, "debug");
    assert_eq!(hg.get("/app/debug-on").await.status, StatusCode::OK);
    eventually(WAIT, "a debug `forwarding` line", || {
        let found = hg.logs().lines().any(|l| l.contains("forwarding"));
        async move { found }
    })
    .await;

    let before = access_lines(&hg.logs()).len();
    let resp = hg
        .api(Method::PUT, "/api/log-level", r#"{"level":"info"}"#)
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(log_level(&hg).await, "info");
    // Lines logged before the switch may still be on their way through the pipe: the access
    // line of a request sent after the switch marks where the info-only part begins.
    assert_eq!(hg.get("/app/fence").await.status, StatusCode::OK);
    eventually(WAIT, "the access line of the fence request", || {
        let n = access_lines(&hg.logs()).len();
        async move { n > before }
    })
    .await;
    let mark = end_of_access_line(&hg.logs(), before);
    for _ in 0..3 {
        assert_eq!(hg.get("/app/debug-off").await.status, StatusCode::OK);
    }
    // Each request's access line comes after its `forwarding` line would have.
    eventually(WAIT, "the access lines of the last requests", || {
        let n = access_lines(&hg.logs()[mark..]).len();
        async move { n >= 3 }
    })
    .await;
    let after = hg.logs()[mark..].to_owned();
    assert!(
        !after.contains("forwarding") && !after.contains(" DEBUG "),
        "debug lines after going back to info:\n{after}"
    );
}
