//! Limits that protect hubgate from its clients and its targets: slow and idle clients
//! (`--keep-alive-timeout`, `--timeout`), silent targets (`--proxy-timeout`), large heads
//! (`--max-header-size`), connection counts (`--max-connections`), descriptors under churn, and
//! Unix sockets on both sides (`http+unix://` targets, `--socket`, `--api-socket`,
//! `--metrics-socket`).

use std::{convert::Infallible, net::SocketAddr, path::Path, time::Duration};

use futures_util::{stream, SinkExt, StreamExt};
use http::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream},
    sync::oneshot,
    task::{JoinHandle, JoinSet},
};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::certs::{echo_versioned, h1};
use crate::lifecycle::raw_exchange;
use crate::support::{
    collect, empty, eventually, full, http_client, silent_backend, Backend, Hubgate, WAIT,
};

/// Reads from `stream` until it ends (EOF or error), on a task of its own; returns what came.
fn read_until_closed(mut stream: tokio::net::tcp::OwnedReadHalf) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut data = Vec::new();
        let _ = stream.read_to_end(&mut data).await;
        data
    })
}

#[tokio::test]
async fn headers_sent_one_byte_every_500ms_are_cut_off_and_others_are_served() {
    let backend = Backend::echo().await;
    let hg = Hubgate::start(&["--keep-alive-timeout", "1000"]).await;
    hg.add_route("/b", &backend.url("")).await;

    let (reader, mut writer) = TcpStream::connect(hg.proxy).await.unwrap().into_split();
    let closed = read_until_closed(reader);
    // 50 bytes at 2 per second: 25 s to send the whole head, far beyond the 1 s allowed.
    let head = b"GET /b/x HTTP/1.1\r\nHost: slow.example\r\nX-A: 0123\r\n\r\n";
    let mut sent = 0;
    let mut served = 0;
    let cut = loop {
        if closed.is_finished() {
            break true;
        }
        if sent == head.len() {
            break false;
        }
        if writer.write_all(&head[sent..=sent]).await.is_err() {
            break true;
        }
        sent += 1;
        let resp = hg.get("/b/meanwhile").await;
        assert_eq!(
            resp.status,
            StatusCode::OK,
            "a normal client while one trickles"
        );
        served += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        cut,
        "a client trickling its head one byte per 500 ms sent all {} bytes without being cut",
        head.len()
    );
    let answer = closed.await.unwrap();
    assert!(
        !String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "the trickled request was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(served > 0, "no other request was served meanwhile");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout() {
    let hg = Hubgate::start(&["--keep-alive-timeout", "1000"]).await;
    let (reader, _writer) = TcpStream::connect(hg.proxy).await.unwrap().into_split();
    let closed = read_until_closed(reader);
    let data = tokio::time::timeout(WAIT, closed)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "a connection that never sent a byte was still open {WAIT:?} after it was \
                 accepted, with --keep-alive-timeout 1000"
            )
        })
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&data).starts_with("HTTP/1.1 2"),
        "{data:?}"
    );
}

#[tokio::test]
async fn timeout_closes_a_connection_idle_in_the_middle_of_a_request() {
    let backend = Backend::echo().await;
    let hg = Hubgate::start(&["--timeout", "2000", "--keep-alive-timeout", "60000"]).await;
    hg.add_route("/b", &backend.url("")).await;
    let head = b"POST /b/upload HTTP/1.1\r\nHost: idle.example\r\nContent-Length: 10\r\n\r\n";

    // Active: a byte every 200 ms, 2 s in all, never idle for the timeout: it completes.
    let mut active = TcpStream::connect(hg.proxy).await.unwrap();
    active.write_all(head).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        active.write_all(b"x").await.unwrap();
    }
    let mut data = vec![0; 4096];
    let n = tokio::time::timeout(WAIT, active.read(&mut data))
        .await
        .expect("no answer to the active upload")
        .unwrap();
    assert!(
        data[..n].starts_with(b"HTTP/1.1 200"),
        "an upload that never idled for --timeout: {:?}",
        String::from_utf8_lossy(&data[..n])
    );

    // Idle: the head and 3 of 10 body bytes, then nothing.
    let (reader, mut writer) = TcpStream::connect(hg.proxy).await.unwrap().into_split();
    writer.write_all(head).await.unwrap();
    writer.write_all(b"abc").await.unwrap();
    let closed = read_until_closed(reader);
    let answer = tokio::time::timeout(WAIT, closed)
        .await
        .unwrap_or_else(|_| panic!("a connection idle mid-request was still open after {WAIT:?}"))
        .unwrap();
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "the stalled upload was answered 200: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn websocket_handshake_to_a_silent_target_is_503_after_the_proxy_timeout() {
    let silent = silent_backend().await;
    let hg = Hubgate::start(&["--proxy-timeout", "500"]).await;
    hg.add_route("/ws", &format!("http://{}", silent.addr))
        .await;
    let url = format!("ws://{}/ws/socket", hg.proxy);
    let outcome = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("no answer to a handshake for a silent target");
    match outcome {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{resp:?}")
        }
        Err(other) => panic!("expected an HTTP 503, got {other:?}"),
        Ok(_) => panic!("a handshake to a target that never answers succeeded"),
    }
}

#[tokio::test]
async fn a_head_over_max_header_size_is_431_and_just_under_is_served() {
    let backend = Backend::echo().await;
    let hg = Hubgate::start(&["--max-header-size", "16384"]).await;
    hg.add_route("/b", &backend.url("")).await;
    let with_header = |len: usize| {
        hg.proxy_request(Method::GET, "/b/x")
            .header("x-big", "a".repeat(len))
            .body(empty())
            .unwrap()
    };
    let under = hg.proxy_send(with_header(16384 - 1024)).await;
    assert_eq!(under.status, StatusCode::OK, "{under:?}");
    let over = hg.proxy_send(with_header(16384 + 512)).await;
    assert_eq!(
        over.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{over:?}"
    );
    // hubgate is still fine afterwards.
    assert_eq!(hg.get("/b/after").await.status, StatusCode::OK);
}

#[tokio::test]
async fn max_connections_answers_the_one_too_many_with_503_until_one_closes() {
    let backend = Backend::echo().await;
    let hg = Hubgate::start(&["--max-connections", "5", "--keep-alive-timeout", "60000"]).await;
    hg.add_route("/b", &backend.url("")).await;

    let get = || {
        Request::get("/b/x")
            .header(header::HOST, "limits.example")
            .body(empty())
            .unwrap()
    };
    let mut open = Vec::new();
    for i in 0..5 {
        let tcp = TcpStream::connect(hg.proxy).await.unwrap();
        let mut conn = h1(tcp).await.unwrap();
        let resp = collect(conn.send_request(get())).await;
        let resp = resp.unwrap_or_else(|e| panic!("connection {i} of 5: {e}"));
        assert_eq!(resp.status, StatusCode::OK, "connection {i} of 5");
        open.push(conn);
    }

    let sixth = raw_exchange(hg.proxy, b"")
        .await
        .expect("the 6th connection");
    assert_eq!(sixth.status, 503, "{sixth:?}");
    assert!(
        sixth
            .headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{sixth:?}"
    );
    let doc: Value = serde_json::from_slice(&sixth.body).expect("a JSON body");
    assert_eq!(doc["status"], 503, "{doc}");

    // The 5 are untouched.
    let first = open.first_mut().unwrap();
    first.ready().await.unwrap();
    assert_eq!(
        collect(first.send_request(get())).await.unwrap().status,
        StatusCode::OK
    );

    drop(open.pop());
    eventually(
        WAIT,
        "a new connection to be served after one closed",
        || async {
            let reply = raw_exchange(
                hg.proxy,
                b"GET /b/y HTTP/1.1\r\nHost: limits.example\r\nConnection: close\r\n\r\n",
            )
            .await;
            matches!(reply, Ok(r) if r.status == 200)
        },
    )
    .await;
}

/// A backend whose connections all close when it stops, like a process that exits.
struct Mortal {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for Mortal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mortal {
    async fn start() -> Mortal {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        conns.spawn(async move {
                            let service = hyper::service::service_fn(|req| async move {
                                Ok::<_, Infallible>(echo_versioned(req).await)
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), service)
                                .await;
                        });
                    }
                }
                while conns.try_join_next().is_some() {}
            }
            drop(listener);
            conns.shutdown().await;
        });
        Mortal {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Closes the listener and every connection, then keeps the port bound without listening:
    /// connections to it are refused, and no other test's server can take the port while a
    /// route still points at it.
    async fn stop(mut self) -> TcpSocket {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        let reserved = TcpSocket::new_v4().unwrap();
        reserved.set_reuseaddr(true).unwrap();
        reserved
            .bind(self.addr)
            .unwrap_or_else(|e| panic!("keep the stopped backend's port {}: {e}", self.addr));
        reserved
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

#[tokio::test]
async fn descriptors_return_to_where_they_were_after_churning_targets() {
    const ROUNDS: usize = 20;
    const UP: usize = 70;
    const DOWN: usize = 30;
    const MARGIN: usize = 6;
    let hg = Hubgate::start(&[]).await;
    let baseline = fd_count(hg.pid());

    let client = http_client();
    let url = hg.proxy_url("/churn/x");
    let burst = |n: usize| {
        let client = &client;
        let url = &url;
        stream::iter(0..n)
            .map(move |_| async move {
                let req = Request::get(url.as_str()).body(empty()).unwrap();
                match tokio::time::timeout(WAIT, client.request(req)).await {
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                        Ok(status)
                    }
                    Ok(Err(e)) => Err(format!("{e:?}")),
                    Err(_) => Err(format!("no response within {WAIT:?}")),
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<Result<StatusCode, String>>>()
    };
    let mut reserved = Vec::new();
    for round in 0..ROUNDS {
        let backend = Mortal::start().await;
        let target = format!("http://{}", backend.addr);
        hg.add_route("/churn", &target).await;
        let up = burst(UP).await;
        assert!(
            up.iter().all(|s| matches!(s, Ok(StatusCode::OK))),
            "round {round}, target {target} up: {up:?}\nhubgate:\n{}",
            hg.logs()
        );
        reserved.push(backend.stop().await);
        let down = burst(DOWN).await;
        assert!(
            down.iter()
                .all(|s| matches!(s, Ok(StatusCode::SERVICE_UNAVAILABLE))),
            "round {round}, target {target} gone: {down:?}\nhubgate:\n{}",
            hg.logs()
        );
    }
    drop(client);

    let pid = hg.pid();
    let mut last = 0;
    let settled = tokio::time::timeout(WAIT, async {
        loop {
            last = fd_count(pid);
            if last <= baseline + MARGIN {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "hubgate holds {last} descriptors {WAIT:?} after {} requests; it started with \
         {baseline}",
        ROUNDS * (UP + DOWN)
    );
}

/// A hyper HTTP/1.1 server answering `echo_versioned` on a Unix socket.
fn serve_unix(listener: UnixListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req| async move {
                    Ok::<_, Infallible>(echo_versioned(req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// A websocket echo peer on a Unix socket.
fn serve_unix_ws(listener: UnixListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

fn unix_target(path: &Path) -> String {
    let path = path.to_str().expect("a UTF-8 temporary path");
    format!(
        "http+unix://{}",
        utf8_percent_encode(path, NON_ALPHANUMERIC)
    )
}

#[tokio::test]
async fn unix_socket_targets_serve_requests_and_websockets() {
    let dir = tempfile::tempdir().unwrap();
    let http_sock = dir.path().join("http.sock");
    let ws_sock = dir.path().join("ws.sock");
    let http_task = serve_unix(UnixListener::bind(&http_sock).unwrap());
    let ws_task = serve_unix_ws(UnixListener::bind(&ws_sock).unwrap());

    let hg = Hubgate::start(&[]).await;
    hg.add_route("/u", &unix_target(&http_sock)).await;
    hg.add_route("/uws", &unix_target(&ws_sock)).await;

    for i in 0..3 {
        let resp = hg.get(&format!("/u/page/{i}?q=1")).await;
        assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
        assert_eq!(resp.json()["path"], format!("/u/page/{i}?q=1"));
    }

    let url = format!("ws://{}/uws/socket", hg.proxy);
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("websocket handshake timed out")
        .expect("websocket handshake through a Unix-socket target");
    for text in ["one", "two"] {
        ws.send(Message::Text(text.into())).await.unwrap();
        let echoed = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
        assert!(
            matches!(&echoed, Some(Ok(Message::Text(t))) if t == text),
            "{echoed:?}"
        );
    }
    http_task.abort();
    ws_task.abort();
}

/// `method path` on a Unix socket, with `Host: localhost` and these headers.
async fn unix_request(
    path: &Path,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> crate::support::Resp {
    let stream = UnixStream::connect(path)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    let mut conn = h1(stream).await.expect("HTTP/1.1 handshake");
    let mut req = Request::builder()
        .method(method)
        .uri(target)
        .header(header::HOST, "localhost");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    collect(conn.send_request(req.body(full(body.to_owned())).unwrap()))
        .await
        .unwrap_or_else(|e| panic!("{target} on {}: {e}", path.display()))
}

#[tokio::test]
async fn socket_api_socket_and_metrics_socket_listeners_serve() {
    let dir = tempfile::tempdir().unwrap();
    let proxy_sock = dir.path().join("proxy.sock");
    let api_sock = dir.path().join("api.sock");
    let metrics_sock = dir.path().join("metrics.sock");
    let backend = Backend::echo().await;
    let mut hg = Hubgate::builder()
        .without_listen_args()
        .args([
            "--socket",
            proxy_sock.to_str().unwrap(),
            "--api-socket",
            api_sock.to_str().unwrap(),
            "--metrics-socket",
            metrics_sock.to_str().unwrap(),
        ])
        .spawn();
    for which in ["proxy", "api", "metrics"] {
        let addr = hg.listening(which).await;
        assert!(addr.starts_with("unix:"), "{which} listens on {addr}");
    }

    let auth = format!("token {}", hg.token());
    let body = json!({ "target": backend.url("") }).to_string();
    let added = unix_request(
        &api_sock,
        Method::POST,
        "/api/routes/b",
        &[("authorization", &auth)],
        &body,
    )
    .await;
    assert_eq!(added.status, StatusCode::CREATED, "{added:?}");
    let refused = unix_request(&api_sock, Method::GET, "/api/routes", &[], "").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");

    let resp = unix_request(&proxy_sock, Method::GET, "/b/over/unix?x=1", &[], "").await;
    assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    assert_eq!(resp.json()["path"], "/b/over/unix?x=1");
    assert_eq!(backend.seen().len(), 1);

    let metrics = unix_request(&metrics_sock, Method::GET, "/metrics", &[], "").await;
    assert_eq!(metrics.status, StatusCode::OK, "{metrics:?}");
    assert!(
        metrics.text().contains("hubgate_build_info"),
        "{}",
        metrics.text()
    );

    let status = hg.stop("TERM").await;
    assert!(status.success(), "{status}\n{}", hg.logs());
    for sock in [&proxy_sock, &api_sock, &metrics_sock] {
        assert!(
            !sock.exists(),
            "{} is left behind after a clean exit",
            sock.display()
        );
    }
}
