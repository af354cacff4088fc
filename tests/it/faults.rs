//! Fault injection: targets that refuse, reset, stall or answer garbage; a hub that is slow, down
//! or broken (with authentication on); a route store whose disk refuses writes.
//!
//! In each: the client sees the documented answer (status and, from hubgate itself, its page or
//! JSON), the log says why, nothing acknowledged is lost, a refused change leaves nothing half
//! applied, and hubgate recovers by itself once the fault goes away.
//!
//! The disk-full stand-in is a file size limit: hubgate starts with `SIGXFSZ` ignored (the
//! harness's `Builder::prelude`) so that a write past the limit fails with `EFBIG`; no tmpfs or
//! loop mount is needed, and the limit is set and lifted on the running process with `prlimit`.

use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use http::{Method, Request, StatusCode};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};

use crate::abuse::{exchange, fresh_get, logged, parse_responses, Recorder, Reply};
use crate::fakehub::{Endpoint, FakeHub, Mode};
use crate::support::{eventually, http_client, random_token, send, Hubgate, Resp, WAIT};

// ---------------------------------------------------------------------------------------------
// A target with switchable faults

/// What a `Faulty` target does with the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// 200 `ok <path>` with a length, keep-alive.
    None,
    /// Resets the connection once the request head arrived.
    Reset,
    /// Answers bytes that are not HTTP, then closes.
    NotHttp,
    /// Answers an invalid status line.
    BadStatus,
    /// 200, chunked: one good chunk, then a chunk size that is not hex.
    BadChunks,
    /// 200 with `Content-Length: 100000`, 1000 bytes of it, then a reset.
    ResetMidBody,
    /// Never answers (reads until the connection closes).
    StallHead,
    /// 200 with `Content-Length: 100000`, 1000 bytes of it, then nothing.
    StallMidBody,
    /// Reads the head and 1 KiB of the body, then resets.
    ResetMidUpload,
}

/// An HTTP/1.1 target on raw TCP whose behaviour the test switches while hubgate runs.
struct Faulty {
    addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    /// The request targets received, in order.
    requests: Arc<Mutex<Vec<String>>>,
    /// Connections open right now.
    open: Arc<AtomicUsize>,
    _task: JoinHandle<()>,
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Faulty {
    async fn start(fault: Fault) -> Faulty {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(Mutex::new(fault));
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let open = Arc::new(AtomicUsize::new(0));
        let (f, r, o) = (fault.clone(), requests.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                let guard = OpenGuard(o.clone());
                tokio::spawn(faulty_connection(stream, f.clone(), r.clone(), guard));
            }
        });
        Faulty {
            addr,
            fault,
            requests,
            open,
            _task: task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

async fn faulty_connection(
    mut stream: TcpStream,
    fault: Arc<Mutex<Fault>>,
    requests: Arc<Mutex<Vec<String>>>,
    _open: OpenGuard,
) {
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_until(&mut stream, &mut buf, |b| {
            b.windows(4).position(|w| w == b"\r\n\r\n")
        })
        .await
        else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
        requests.lock().unwrap().push(path.clone());
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let current = *fault.lock().unwrap();
        if current == Fault::ResetMidUpload {
            let _ = read_until(&mut stream, &mut buf, |b| (b.len() >= 1024).then_some(0)).await;
            reset(stream);
            return;
        }
        // Read the whole body (by length, or up to the last chunk).
        let body_read = if chunked {
            read_until(&mut stream, &mut buf, |b| {
                b.windows(5).position(|w| w == b"0\r\n\r\n").map(|p| p + 5)
            })
            .await
        } else {
            read_until(&mut stream, &mut buf, |b| {
                (b.len() >= length).then_some(length)
            })
            .await
        };
        let Some(body_end) = body_read else { return };
        buf.drain(..body_end);

        let prefix_1000 = "p".repeat(1000);
        let reply: Vec<u8> = match current {
            Fault::None | Fault::ResetMidUpload => {
                let body = format!("ok {path}");
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            }
            Fault::Reset => {
                reset(stream);
                return;
            }
            Fault::NotHttp => b"SSH-2.0-OpenSSH_9.6 this is not HTTP\r\n\r\n".to_vec(),
            Fault::BadStatus => b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            Fault::BadChunks => {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nnot a chunk\r\n"
                    .to_vec()
            }
            Fault::ResetMidBody | Fault::StallMidBody => {
                format!("HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{prefix_1000}").into_bytes()
            }
            Fault::StallHead => Vec::new(),
        };
        if stream.write_all(&reply).await.is_err() {
            return;
        }
        match current {
            Fault::None | Fault::ResetMidUpload => continue,
            Fault::ResetMidBody => reset(stream),
            Fault::StallHead | Fault::StallMidBody => {
                // Hold the connection until the other side gives up on it.
                let mut sink = [0; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            }
            _ => {}
        }
        return;
    }
}

/// Reads into `buf` until `done` finds what it wants (its answer is returned), or the
/// connection ends (`None`).
async fn read_until(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> Option<usize>,
) -> Option<usize> {
    let mut chunk = [0; 16 * 1024];
    loop {
        if let Some(at) = done(buf) {
            return Some(at);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Closes `stream` with a TCP reset.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

fn assert_error_page(resp: &Resp, status: StatusCode, what: &str) {
    assert_eq!(resp.status, status, "{what}: {resp:?}");
    assert!(
        resp.content_type().starts_with("text/html"),
        "{what}: hubgate's error page: {resp:?}"
    );
}

/// `GET path` on a new connection; the parsed reply.
async fn raw_get(hg: &Hubgate, path: &str) -> Reply {
    fresh_get(hg.proxy, path, &[]).await
}

// ---------------------------------------------------------------------------------------------
// Targets

#[tokio::test]
async fn a_target_that_refuses_is_503_and_is_used_as_soon_as_it_listens() {
    // Bound but not listening: connections are refused, and the port stays ours.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/t", &format!("http://{addr}")).await;

    assert_error_page(
        &hg.get("/t/x").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "refused",
    );
    logged(
        || hg.logs(),
        "saying the target refused",
        |l| l.contains("target failed (refused)") && l.contains("onnection refused"),
    )
    .await;

    // The target comes up on the same address: the same route serves, nothing to reset.
    let listener = socket.listen(64).unwrap();
    let _server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (f, r) = (Arc::new(Mutex::new(Fault::None)), Arc::default());
            let open = OpenGuard(Arc::new(AtomicUsize::new(1)));
            tokio::spawn(faulty_connection(stream, f, r, open));
        }
    });
    let resp = hg.get("/t/x").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.text(), "ok /t/x");
}

#[tokio::test]
async fn a_target_that_resets_before_answering_is_503_then_served_again() {
    let target = Faulty::start(Fault::None).await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/t", &target.url()).await;
    // A pooled connection exists before the fault.
    assert_eq!(hg.get("/t/before").await.status, StatusCode::OK);

    target.set(Fault::Reset);
    for i in 0..3 {
        let resp = hg.get(&format!("/t/reset-{i}")).await;
        assert_error_page(&resp, StatusCode::SERVICE_UNAVAILABLE, "reset");
    }
    logged(
        || hg.logs(),
        "saying the target reset",
        |l| l.contains("proxy error") && l.contains("target failed (reset)"),
    )
    .await;
    assert!(
        target.requests().iter().any(|p| p == "/t/reset-2"),
        "{:?}",
        target.requests()
    );

    target.set(Fault::None);
    for i in 0..3 {
        let resp = hg.get(&format!("/t/after-{i}")).await;
        assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
        assert_eq!(resp.text(), format!("ok /t/after-{i}"));
    }
}

#[tokio::test]
async fn a_target_that_answers_garbage_is_503_and_the_log_says_what_it_sent() {
    let target = Faulty::start(Fault::None).await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/t", &target.url()).await;
    assert_eq!(hg.get("/t/before").await.status, StatusCode::OK);

    for (fault, says) in [
        (Fault::NotHttp, "invalid HTTP version"),
        (Fault::BadStatus, "invalid HTTP status-code"),
    ] {
        target.set(fault);
        let resp = hg.get("/t/garbage").await;
        assert_error_page(
            &resp,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{fault:?}"),
        );
        logged(
            || hg.logs(),
            says,
            |l| l.contains("proxy error") && l.contains(says),
        )
        .await;
    }

    target.set(Fault::None);
    let resp = hg.get("/t/after").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.text(), "ok /t/after");
}

#[tokio::test]
async fn a_response_cut_in_the_middle_reaches_the_client_cut_and_is_logged() {
    let target = Faulty::start(Fault::None).await;
    let mut hg = Hubgate::start(&[]).await;
    hg.add_route("/t", &target.url()).await;

    for fault in [Fault::ResetMidBody, Fault::BadChunks] {
        target.set(fault);
        // The status is committed before the failure. What matters is that the client can
        // tell the response is incomplete: its body never ends cleanly (a length met, or a
        // last chunk); or, when the failure came before the head left, no response at all.
        for _ in 0..2 {
            let data = exchange(
                hg.proxy,
                b"GET /t/cut HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            let replies = parse_responses(&data);
            assert!(
                replies.iter().all(|r| r.status == 200 && !r.complete),
                "{fault:?}: a cut response must not look complete to the client: {:?}",
                String::from_utf8_lossy(&data)
            );
        }
    }
    // Each cut is logged with its cause.
    for cause in ["cause=reset", "Invalid chunk size"] {
        logged(
            || hg.logs(),
            cause,
            |l| l.contains("target failed in the middle of a response") && l.contains(cause),
        )
        .await;
    }

    target.set(Fault::None);
    let reply = raw_get(&hg, "/t/after").await;
    assert_eq!(
        (reply.status, reply.text()),
        (200, "ok /t/after".to_owned())
    );
    assert!(hg.is_running());
}

#[tokio::test]
async fn a_target_that_resets_in_the_middle_of_an_upload_is_503() {
    let target = Faulty::start(Fault::ResetMidUpload).await;
    let hg = Hubgate::start(&[]).await;
    hg.add_route("/t", &target.url()).await;

    // Raw, so that the answer is read even when the rest of the upload no longer can be sent
    // (hubgate stops reading it; a client library would report that write error instead).
    let mut upload = format!(
        "POST /t/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        256 * 1024
    )
    .into_bytes();
    upload.extend(vec![b'u'; 256 * 1024]);
    let data = exchange(hg.proxy, &upload).await;
    let replies = parse_responses(&data);
    assert!(
        replies.len() == 1 && replies[0].status == 503 && replies[0].complete,
        "{:?}",
        String::from_utf8_lossy(&data)
    );
    assert_eq!(
        replies[0].header("content-type"),
        Some("text/html; charset=utf-8")
    );
    logged(
        || hg.logs(),
        "saying the target reset",
        |l| l.contains("proxy error") && l.contains("target failed (reset)"),
    )
    .await;
    let logs = hg.logs();
    assert!(
        !logs.contains("bad request"),
        "not blamed on the client:\n{logs}"
    );

    target.set(Fault::None);
    let data = exchange(hg.proxy, &upload).await;
    let replies = parse_responses(&data);
    assert_eq!(
        replies[0].status,
        200,
        "{:?}",
        String::from_utf8_lossy(&data)
    );
    assert_eq!(replies[0].text(), "ok /t/upload");
}

#[tokio::test]
async fn a_target_that_never_answers_is_503_after_the_proxy_timeout_and_let_go() {
    let target = Faulty::start(Fault::StallHead).await;
    let other = Recorder::start().await;
    let hg = Hubgate::start(&["--proxy-timeout", "1000"]).await;
    hg.add_route("/t", &target.url()).await;
    hg.add_route("/o", &other.url()).await;

    let stalled = tokio::spawn({
        let client = http_client();
        let url = hg.proxy_url("/t/stalled");
        async move {
            send(
                &client,
                Request::get(url).body(crate::support::empty()).unwrap(),
            )
            .await
        }
    });
    // Meanwhile everyone else is served.
    assert_eq!(hg.get("/o/meanwhile").await.status, StatusCode::OK);
    let resp = stalled.await.unwrap();
    assert_error_page(
        &resp,
        StatusCode::SERVICE_UNAVAILABLE,
        "stalled before its head",
    );
    logged(
        || hg.logs(),
        "saying the target timed out",
        |l| {
            l.contains("proxy error")
                && l.contains("target did not answer within the proxy timeout")
        },
    )
    .await;
    // hubgate let go of the connection it gave up on.
    eventually(WAIT, "the stalled target connection to be closed", || {
        let open = target.open();
        async move { open == 0 }
    })
    .await;

    target.set(Fault::None);
    let reply = raw_get(&hg, "/t/after").await;
    assert_eq!(
        (reply.status, reply.text()),
        (200, "ok /t/after".to_owned())
    );
}

#[tokio::test]
async fn a_target_stalled_in_the_middle_of_a_body_is_cut_by_the_idle_timeout() {
    let target = Faulty::start(Fault::StallMidBody).await;
    let other = Recorder::start().await;
    let hg = Hubgate::start(&["--timeout", "1500", "--keep-alive-timeout", "60000"]).await;
    hg.add_route("/t", &target.url()).await;
    hg.add_route("/o", &other.url()).await;

    let stalled = tokio::spawn({
        let proxy = hg.proxy;
        async move {
            exchange(
                proxy,
                b"GET /t/stalled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
        }
    });
    assert_eq!(hg.get("/o/meanwhile").await.status, StatusCode::OK);
    // `exchange` fails the test if the connection is still open after WAIT.
    let data = stalled.await.unwrap();
    let replies = parse_responses(&data);
    assert_eq!(replies.len(), 1, "{:?}", String::from_utf8_lossy(&data));
    assert_eq!(replies[0].status, 200);
    assert_eq!(replies[0].body.len(), 1000);
    assert!(!replies[0].complete);
    eventually(WAIT, "the stalled target connection to be closed", || {
        let open = target.open();
        async move { open == 0 }
    })
    .await;
    logged(
        || hg.logs(),
        "saying why the connection was closed",
        |l| l.contains("moved no byte"),
    )
    .await;

    // (On a new connection: --timeout also closes the test client's idle pooled ones.)
    target.set(Fault::None);
    let reply = raw_get(&hg, "/t/after").await;
    assert_eq!(
        (reply.status, reply.text()),
        (200, "ok /t/after".to_owned())
    );
}

// ---------------------------------------------------------------------------------------------
// The hub

/// A hub with user alice, and a hubgate authenticating against it, with a target for alice's
/// server (`/user/alice`) and an open route (`/open`) that needs no hub.
struct HubSetup {
    hub: FakeHub,
    hg: Hubgate,
    alice: Recorder,
    open: Recorder,
}

/// Alice's server at `/user/alice` and a route that needs no hub at `/open`, each to a target
/// of its own.
async fn alice_and_open_routes(hg: &Hubgate) -> (Recorder, Recorder) {
    let alice = Recorder::start().await;
    let open = Recorder::start().await;
    for (path, data) in [
        (
            "/user/alice",
            json!({"target": alice.url(), "user": "alice", "server_name": ""}),
        ),
        ("/open", json!({"target": open.url()})),
    ] {
        hg.add_route_data(path, data).await;
    }
    (alice, open)
}

impl HubSetup {
    async fn start() -> HubSetup {
        let hub = FakeHub::start(&random_token()).await;
        hub.add_user("alice", false, &[]);
        let hg = Hubgate::builder()
            .args(["--hub-api-url", &hub.api_url()])
            .env("JUPYTERHUB_API_TOKEN", hub.service_token())
            .start()
            .await;
        let (alice, open) = alice_and_open_routes(&hg).await;
        // The start-up handshake is done, so that it is not what the faults below hit.
        eventually(WAIT, "the start-up handshake", || {
            let n = hub.calls(Endpoint::Proxy);
            async move { n >= 1 }
        })
        .await;
        HubSetup {
            hub,
            hg,
            alice,
            open,
        }
    }

    fn token(&self) -> String {
        self.hub
            .issue_token("alice", Some(&["access:servers!user=alice"]))
    }

    async fn get_as(&self, path: &str, token: &str) -> Resp {
        let auth = format!("token {token}");
        self.hg.get_with(path, &[("authorization", &auth)]).await
    }
}

/// A refusal from hubgate itself: this status, JSON `{"status", "message"}`, no secret.
fn assert_json_refusal(resp: &Resp, status: StatusCode, token: &str, what: &str) {
    assert_eq!(resp.status, status, "{what}: {resp:?}");
    assert_eq!(resp.content_type(), "application/json", "{what}: {resp:?}");
    let doc = resp.json();
    assert_eq!(doc["status"], status.as_u16(), "{what}: {doc}");
    assert!(doc["message"].is_string(), "{what}: {doc}");
    assert!(
        !resp.text().contains(token),
        "{what}: the token leaked: {doc}"
    );
}

#[tokio::test]
async fn a_slow_hub_holds_only_the_requests_that_need_it() {
    let s = HubSetup::start().await;
    let cached = s.token();
    assert_eq!(
        s.get_as("/user/alice/a", &cached).await.status,
        StatusCode::OK
    );

    s.hub.hold();
    let fresh = s.token();
    let held = tokio::spawn({
        let client = s.hg.client.clone();
        let url = format!("http://{}/user/alice/held", s.hg.proxy);
        let auth = format!("token {fresh}");
        async move {
            let req = Request::get(url)
                .header("authorization", auth)
                .body(crate::support::empty())
                .unwrap();
            send(&client, req).await
        }
    });
    eventually(WAIT, "the check to reach the hub", || {
        let n = s.hub.calls(Endpoint::User);
        async move { n >= 2 }
    })
    .await;
    // While the hub sits on that check, nothing else waits for it.
    assert_eq!(s.hg.get("/open/x").await.status, StatusCode::OK);
    assert_eq!(
        s.get_as("/user/alice/b", &cached).await.status,
        StatusCode::OK
    );
    assert_eq!(
        s.hg.api(Method::GET, "/api/routes", "").await.status,
        StatusCode::OK
    );
    assert!(
        !held.is_finished(),
        "the held check did not wait for the hub"
    );

    s.hub.release();
    let resp = held.await.unwrap();
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(
        s.alice.paths(),
        ["/user/alice/a", "/user/alice/b", "/user/alice/held"]
    );
}

#[tokio::test]
async fn a_hub_that_is_down_or_broken_means_503_json_and_hubgate_recovers_by_itself() {
    let s = HubSetup::start().await;
    let cases: [(&str, &str); 3] = [
        ("down", "hub unreachable"),
        ("failing", "hub answered 500"),
        ("malformed", "cannot read"),
    ];
    for (what, says) in cases {
        // A token the hub was never asked about: no cached answer stands in for the hub.
        let token = s.token();
        match what {
            "down" => s.hub.set_down(true),
            "failing" => s.hub.set_mode(Mode::Failing),
            _ => s.hub.set_mode(Mode::Malformed),
        }
        let resp = s.get_as("/user/alice/lab", &token).await;
        assert_json_refusal(&resp, StatusCode::SERVICE_UNAVAILABLE, &token, what);
        logged(
            || s.hg.logs(),
            says,
            |l| l.contains("hub unavailable; request refused") && l.contains(says),
        )
        .await;
        // A route that needs no hub is served all along.
        assert_eq!(s.hg.get("/open/x").await.status, StatusCode::OK);
        s.hub.set_down(false);
        s.hub.set_mode(Mode::Normal);
        // The failure was not remembered as a refusal: the same token works at once.
        let resp = s.get_as("/user/alice/lab", &token).await;
        assert_eq!(resp.status, StatusCode::OK, "{what}, then fixed: {resp:?}");
    }
    assert_eq!(s.alice.paths().len(), 3, "{:?}", s.alice.paths());
    assert_eq!(s.open.paths().len(), 3);
}

#[tokio::test]
async fn a_hub_that_is_gone_leaves_open_routes_open_and_shows_in_the_status() {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let gone = socket.local_addr().unwrap();
    let hg = Hubgate::builder()
        .args(["--hub-api-url", &format!("http://{gone}/hub/api")])
        .env(
            "JUPYTERHUB_API_TOKEN",
            "service-token-of-a-hub-that-is-gone",
        )
        .start()
        .await;
    let (alice, _open) = alice_and_open_routes(&hg).await;
    let token = "a-token-nobody-can-check";
    let auth = format!("token {token}");
    let resp = hg
        .get_with("/user/alice/lab", &[("authorization", &auth)])
        .await;
    assert_json_refusal(&resp, StatusCode::SERVICE_UNAVAILABLE, token, "hub gone");
    assert!(alice.paths().is_empty());
    assert_eq!(hg.get("/open/x").await.status, StatusCode::OK);
    logged(
        || hg.logs(),
        "saying the hub refused connections",
        |l| l.contains("hub unavailable; request refused") && l.contains("refused"),
    )
    .await;
    let status = hg.api(Method::GET, "/api/status", "").await.json();
    assert_eq!(status["status"], "unreachable", "{status}");
    assert!(
        status["report"]["errors"].to_string().contains("hub"),
        "{status}"
    );
}

// ---------------------------------------------------------------------------------------------
// The route store

/// Sets `RLIMIT_FSIZE` of `pid` (soft and hard) to `limit` bytes, or lifts it.
fn file_size_limit(pid: u32, limit: Option<u64>) {
    let value = limit.map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--fsize={value}:unlimited"),
        ])
        .output()
        .expect("run prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit --fsize={value}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn log_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("routes.log"))
        .map(|m| m.len())
        .unwrap_or(0)
}

fn assert_store_refusal(resp: &Resp, what: &str) {
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{what}: {resp:?}"
    );
    assert_eq!(resp.content_type(), "application/json", "{what}");
    let doc = resp.json();
    assert_eq!(doc["status"], 503, "{what}: {doc}");
    let message = doc["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("store") && message.contains("nothing was changed"),
        "{what}: {doc}"
    );
}

#[tokio::test]
async fn a_store_whose_disk_refuses_writes_answers_503_changes_nothing_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = Recorder::start().await;
    // With SIGXFSZ ignored, a write past RLIMIT_FSIZE fails with EFBIG instead of killing.
    let launch = || {
        Hubgate::builder()
            .file_store(dir.path())
            .prelude("trap '' XFSZ")
    };
    let mut hg = launch().start().await;
    for key in ["/a", "/b"] {
        hg.add_route(key, &target.url()).await;
    }
    let before = hg.routes().await;
    let version = hg.table_version().await;

    // The disk takes 10 more bytes, then refuses: the next record is torn half way.
    let len = log_len(dir.path());
    file_size_limit(hg.pid(), Some(len + 10));
    let body = json!({"target": target.url()}).to_string();
    let refused = [
        (Method::POST, "/api/routes/c".to_owned(), body.clone()),
        (Method::DELETE, "/api/routes/a".to_owned(), String::new()),
        (
            Method::PATCH,
            "/api/proxy".to_owned(),
            json!({"add": {"/d": {"target": target.url()}}, "remove": ["/b"]}).to_string(),
        ),
        (
            Method::POST,
            "/api/proxy".to_owned(),
            json!({"/e": {"target": target.url()}}).to_string(),
        ),
    ];
    for (method, path, body) in &refused {
        let what = format!("{method} {path}");
        let resp = hg.api(method.clone(), path, body.clone()).await;
        assert_store_refusal(&resp, &what);
        assert_eq!(hg.routes().await, before, "{what}: the table changed");
        assert_eq!(
            hg.table_version().await,
            version,
            "{what}: the version moved"
        );
    }
    assert_eq!(log_len(dir.path()), len, "the torn record was cut back");
    logged(
        || hg.logs(),
        "saying why the store failed",
        |l| l.contains("route store write failed") && l.contains("File too large"),
    )
    .await;
    let status = hg.api(Method::GET, "/api/status", "").await.json();
    assert!(
        status["report"]["errors"]
            .to_string()
            .contains("route store refused a write"),
        "{status}"
    );
    // Requests are served from the table all along.
    assert_eq!(hg.get("/a/x").await.status, StatusCode::OK);

    // The disk has room again: the next change goes through, with no restart.
    file_size_limit(hg.pid(), None);
    let resp = hg.api(Method::POST, "/api/routes/c", body).await;
    assert_eq!(resp.status, StatusCode::CREATED, "{resp:?}");
    assert_eq!(hg.table_version().await, version + 1);
    let after = hg.routes().await;
    assert!(hg.is_running());

    // Everything acknowledged is there after a crash, and nothing refused is; the log loads
    // clean (the torn record was never left in it).
    hg.stop("KILL").await;
    let hg = launch().start().await;
    let mut reloaded = hg.routes().await;
    let mut expected = after.clone();
    for table in [&mut reloaded, &mut expected] {
        for route in table.values_mut() {
            route.as_object_mut().unwrap().remove("last_activity");
        }
    }
    assert_eq!(reloaded, expected);
    assert_eq!(hg.table_version().await, version + 1);
    let logs = hg.logs();
    assert!(
        !logs.contains("damaged") && !logs.contains("torn"),
        "{logs}"
    );
    assert_eq!(hg.get("/c/x").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_route_log_that_is_not_a_regular_file_is_refused_at_start() {
    // /dev/full takes no write and reads as endless zeros: loading it would never end.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/full", dir.path().join("routes.log")).unwrap();
    // At most 4 GiB of address space: a hubgate that tries to hold far more fails fast instead
    // of eating the machine.
    let out = Hubgate::builder()
        .file_store(dir.path())
        .prelude("ulimit -v 4194304")
        .run_to_exit()
        .await;
    let (status, log) = (out.status, String::from_utf8_lossy(&out.stderr));
    assert!(!status.success(), "{status}\n{log}");
    assert!(
        log.contains("routes.log") && log.contains("not a regular file"),
        "{status}: the log names the file and the problem:\n{log}"
    );
}
